"""Parity with PyTorch reference code for torchvision's layouts: same state dict, same logits.

torchvision itself cannot be installed beside torch 2.13 here, so the references below are written for these tests:
the smallest modules with torchvision's module names and semantics (ResNet v1.5 BasicBlock/Bottleneck, VGG16).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from tests import torch_reference  # noqa: E402
from tests.parity import assert_parity  # noqa: E402
from tljax import pretrained  # noqa: E402
from tljax.models.vgg import adaptive_avg_pool  # noqa: E402
from tljax.pretrained.prep import TORCHVISION  # noqa: E402


class Block(nn.Module):
    """torchvision's BasicBlock (3x3, 3x3) or Bottleneck v1.5 (1x1, strided 3x3, 1x1 with 4x expansion)."""

    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool):
        super().__init__()
        cout = width * (4 if bottleneck else 1)
        if bottleneck:
            convs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
        else:
            convs = [(cin, width, 3, stride), (width, width, 3, 1)]
        for i, (a, b, k, s) in enumerate(convs, 1):
            self.add_module(f"conv{i}", nn.Conv2d(a, b, k, s, k // 2, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(b))
        self.depth = len(convs)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = x
        for i in range(1, self.depth + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            y = self.relu(y) if i < self.depth else y
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet: conv1/bn1/relu/maxpool, layer1..4, avgpool, fc."""

    def __init__(self, stage_sizes: tuple[int, ...], bottleneck: bool, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for s, size in enumerate(stage_sizes):
            blocks = []
            for b in range(size):
                blocks.append(Block(cin, 64 * 2**s, 2 if s > 0 and b == 0 else 1, bottleneck))
                cin = 64 * 2**s * (4 if bottleneck else 1)
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG16(nn.Module):
    """torchvision's vgg16: `features` (conv, ReLU ... max-pool), `avgpool` to 7x7, `classifier`."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [], 3
        for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
            for _ in range(convs):
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(),
            nn.Linear(4096, classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


REFERENCES = {
    "resnet18": lambda: ResNet((2, 2, 2, 2), bottleneck=False),
    "resnet50": lambda: ResNet((3, 4, 6, 3), bottleneck=True),
    "vgg16": VGG16,
}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")


@pytest.mark.parametrize(
    "name, suffix",
    [("resnet18", ".safetensors"), ("resnet50", ".safetensors"), ("vgg16", ".safetensors"), ("resnet18", ".pth")],
)
def test_logits_match_pytorch(tmp_path, images, name, suffix):
    """The torchvision state dict, saved as safetensors or with torch.save (zip), gives PyTorch's logits."""
    reference = torch_reference.calibrate_batchnorm(torch_reference.he_init(REFERENCES[name]()))
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file(reference.state_dict(), path)
    else:
        torch.save(reference.state_dict(), path)

    model, variables, prep = pretrained.load(name, path)
    assert prep == TORCHVISION
    x = np.asarray(prep.normalize(images))
    expected = torch_reference.logits(reference, x)
    assert expected.shape == (2, 1000)
    assert_parity(model.apply(variables, x, train=False), expected)


@pytest.mark.parametrize("height, width", [(1, 1), (2, 3), (7, 7), (9, 13), (20, 6)])
def test_adaptive_avg_pool_matches_pytorch(height, width):
    """VGG's pooling to 7x7 repeats, averages over overlapping bins, or is the identity, exactly as PyTorch's."""
    x = np.random.default_rng(height * width).normal(size=(2, height, width, 5)).astype("float32")
    expected = nn.AdaptiveAvgPool2d(7)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    actual = np.asarray(adaptive_avg_pool(jnp.asarray(x), 7))
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    if (height, width) == (7, 7):
        np.testing.assert_array_equal(actual, x)
