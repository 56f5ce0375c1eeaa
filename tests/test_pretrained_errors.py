"""Weights that do not fit, files that cannot be read, names nobody knows: each a clear error, never a half-load.

The checkpoints here are built without torch: torchvision-layout state dicts made with numpy from tljax's own
ResNet table and the Flax model's shapes, saved with `safetensors.numpy`.
"""

import functools
import re
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from tljax import models, pretrained
from tljax.pretrained.convert import _slots
from tljax.pretrained.mappings import resnet as resnet_tables


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax variable's shape in PyTorch: conv HWIO -> OIHW, dense (in, out) -> (out, in), vectors unchanged."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def torchvision_resnet(name: str) -> dict[str, np.ndarray]:
    """A random torchvision-layout state dict (1000 classes) with every tensor the `name` model has."""
    model = models.create(name, 1000)
    image = jnp.zeros((1, 64, 64, 3))
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    rng = np.random.default_rng(0)
    arrays = {}
    for layer in resnet_tables.torchvision(model.backbone):
        for key, collection, leaf, _ in _slots(layer, "torch"):
            target = f"{collection}/{layer.target}/{leaf}"
            if target in shapes:
                arrays[key] = rng.normal(0.0, 0.01, _torch_shape(shapes[target])).astype("float32")
    return arrays


@pytest.fixture(scope="module")
def resnet18() -> dict[str, np.ndarray]:
    return torchvision_resnet("resnet18")


@pytest.fixture(scope="module")
def resnet50() -> dict[str, np.ndarray]:
    return torchvision_resnet("resnet50")


def save(arrays: dict[str, np.ndarray], path: Path) -> Path:
    safetensors.numpy.save_file(arrays, path)
    return path


def mismatch(name: str, path: Path, **kwargs) -> str:
    """The message of the WeightsMismatchError that loading `path` as `name` must raise; it names the file."""
    with pytest.raises(pretrained.WeightsMismatchError) as info:
        pretrained.load(name, path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


def listed(message: str, title: str) -> tuple[int, str]:
    """(count, listing) of one section of a WeightsMismatchError message."""
    count, listing = re.search(rf"{title} \((\d+)\):\n((?:    .*\n?)*)", message).groups()
    return int(count), listing


@pytest.mark.parametrize(
    "given, name, section, keys, wrong_shapes",
    [
        ("resnet18", "resnet50", "missing from the file",
         ("layer1.0.conv3.weight (-> ", "layer1.0.downsample.0.weight (-> ", "layer1.2.conv1.weight (-> "),
         (r"layer1\.0\.conv1\.weight: \(64, 64, 3, 3\) in the file, \S+ is \(1, 1, 64, 64\)",
          r"fc\.weight: \(1000, 512\) in the file, \S+ is \(2048, 1000\)")),
        ("resnet50", "resnet18", "in the file but unused by the model",
         ("layer1.0.conv3.weight\n", "layer1.0.bn3.running_var\n", "layer1.2.bn1.weight\n"),
         (r"layer1\.0\.conv1\.weight: \(64, 64, 1, 1\) in the file, \S+ is \(3, 3, 64, 64\)",
          r"fc\.weight: \(1000, 2048\) in the file, \S+ is \(512, 1000\)")),
    ],
)
def test_resnet_of_another_depth_is_refused_with_a_listing(
    tmp_path, request, given, name, section, keys, wrong_shapes, resnet18, resnet50
):
    """A ResNet-18 file for ResNet-50 lists what is missing, a ResNet-50 file for ResNet-18 what is unused; both
    list the wrong shapes. Neither half-loads."""
    message = mismatch(name, save(request.getfixturevalue(given), tmp_path / f"{given}.safetensors"))
    count, listing = listed(message, section)
    assert count == len(set(resnet50) - set(resnet18))
    for key in keys:
        assert f"    {key}" in listing
    _, wrong = listed(message, "wrong shape")
    for pattern in wrong_shapes:
        assert re.search(pattern, wrong)


def test_wrong_input_channels_are_listed_and_any_class_count_loads(tmp_path, resnet18):
    arrays = {**resnet18, "fc.weight": resnet18["fc.weight"][:999], "fc.bias": resnet18["fc.bias"][:999]}
    model, variables, _ = pretrained.load("resnet18", save(arrays, tmp_path / "r18_999.safetensors"))
    assert model.apply(variables, jnp.zeros((1, 64, 64, 3)), train=False).shape == (1, 999)

    arrays["conv1.weight"] = np.zeros((64, 4, 7, 7), "float32")
    message = mismatch("resnet18", save(arrays, tmp_path / "r18_4ch.safetensors"))
    assert "missing from the file" not in message and "unused by the model" not in message
    assert "conv1.weight: (64, 4, 7, 7) in the file, params/backbone/stem_conv/kernel is (7, 7, 3, 64)" in message


def test_file_without_classifier_needs_num_classes(tmp_path, resnet18):
    path = save({k: v for k, v in resnet18.items() if not k.startswith("fc.")}, tmp_path / "notop.safetensors")
    with pytest.raises(pretrained.WeightsMismatchError, match=r"fc\.weight is absent.*pass num_classes=N"):
        pretrained.load("resnet18", path)
    model, variables, _ = pretrained.load("resnet18", path, num_classes=3)
    assert variables["params"]["head"]["out"]["kernel"].shape == (512, 3)


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cuts a file short, as an interrupted download does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def test_truncated_safetensors_is_a_file_error(tmp_path, resnet18):
    path = truncate(save(resnet18, tmp_path / "cut.safetensors"))
    with pytest.raises(pretrained.WeightsFileError, match=re.escape(str(path))):
        pretrained.load("resnet18", path)


def test_truncated_keras_h5_is_a_file_error(tmp_path):
    """A Keras Applications weights file (legacy HDF5 layout) cut short in transit."""
    path = tmp_path / "resnet50_weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1_conv"]
        group = f.create_group("conv1_conv")
        group.attrs["weight_names"] = [b"conv1_conv/kernel:0", b"conv1_conv/bias:0"]
        group["conv1_conv/kernel:0"] = np.ones((7, 7, 3, 64), "float32")
        group["conv1_conv/bias:0"] = np.ones((64,), "float32")
    with pytest.raises(pretrained.WeightsFileError, match=re.escape(str(truncate(path)))):
        pretrained.load("resnet50", path)


def test_unknown_model_name_lists_known_names(tmp_path, resnet18):
    path = save(resnet18, tmp_path / "resnet18.safetensors")
    for attempt in (lambda: pretrained.load("resnet51", path), lambda: models.create("resnet51", 3)):
        with pytest.raises(ValueError, match="unknown model 'resnet51'") as info:
            attempt()
        assert all(known in str(info.value) for known in ("resnet50", "vgg16"))
