"""EfficientNet(-Lite): the architecture against the reference implementations, and parity of every weight table.

References: Keras 3 Applications (JAX backend), lukemelas `efficientnet_pytorch` / `efficientnet_lite_pytorch`
(when torch is installed), and for the torchvision / timm layouts a replica of torchvision's EfficientNet written
below (torchvision and timm cannot be installed here).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from tests import keras_reference
from tests.parity import assert_parity
from tljax import models, pretrained
from tljax.models import efficientnet
from tljax.pretrained import mappings
from tljax.pretrained.mappings import efficientnet as tables
from tljax.pretrained.prep import IMAGENET_MEAN, IMAGENET_STD, TF_INCEPTION

NAMES = list(efficientnet.PRESETS)
# Parameter counts (1000 classes) of torchvision's efficientnet_b0..b7 and of efficientnet_lite_pytorch's Lite0..4.
PARAMETERS = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,
    "efficientnet_lite3": 8_197_096,
    "efficientnet_lite4": 13_006_568,
}
# A 10-block, 8-to-80-channel network with every feature of the family (expand 1 and 6, SE, strides, residuals).
SMALL = {"width": 0.25, "depth": 0.4}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")


def _abstract_variables(model, size: int = 64) -> dict:
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)


def _random_variables(abstract: dict) -> dict:
    """He-normal kernels, random biases / BN parameters / statistics (faster than `init`: XLA compiles RNG slowly)."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if path[-1].key == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        if path[-1].key in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_reference(name):
    variables = _abstract_variables(models.create(name, 1000))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == PARAMETERS[name]


def test_presets_and_head_dropout():
    assert set(efficientnet.HEAD_DROPOUT) == set(NAMES)
    assert models.create("efficientnet_b7", 5).head.dropout == 0.5
    lite4 = models.create("efficientnet_lite4", 5).backbone
    assert (lite4.stem_features, lite4.head_features, lite4.native_size) == (32, 1280, 300)
    assert [b.stage for b in lite4.blocks()].count(0) == 1  # Lite does not scale the first and last stage
    b4 = models.create("efficientnet_b4", 5).backbone
    assert (b4.stem_features, b4.head_features, [b.stage for b in b4.blocks()].count(0)) == (48, 1792, 2)


def test_stochastic_depth_drops_whole_samples_and_rescales():
    """Training drops the residual branch of ~drop_rate of the samples and scales the others' by 1 / (1 - drop_rate)."""
    spec = efficientnet.BlockSpec(0, 1, 8, 8, 1, 3, 1, 2, drop_rate=0.25)
    block = efficientnet.MBConv(spec, jax.nn.silu, True, 1e-3, jnp.float32, None)
    x = jax.random.normal(jax.random.key(0), (4000, 4, 4, 8))
    variables = _random_variables(jax.eval_shape(functools.partial(block.init, train=False), jax.random.key(1), x))
    train = jax.jit(functools.partial(block.apply, train=True, mutable=["batch_stats"]))
    y = np.asarray(train(variables, x, rngs={"dropout": jax.random.key(2)})[0])
    np.testing.assert_array_equal(y, train(variables, x, rngs={"dropout": jax.random.key(2)})[0])
    without_drop = block.clone(spec=spec._replace(drop_rate=0.0))
    branch = np.asarray(without_drop.apply(variables, x, train=True, mutable=["batch_stats"])[0] - x)
    dropped = np.all(y == np.asarray(x), axis=(1, 2, 3))
    assert abs(dropped.mean() - 0.25) < 0.03
    np.testing.assert_allclose((y - x)[~dropped], branch[~dropped] / 0.75, rtol=1e-5, atol=1e-5)


def test_train_mode_uses_dropout_rng_and_updates_batch_stats():
    """Stochastic depth draws from the "dropout" stream in training only; BatchNorm statistics update in training."""
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    model = models.create("efficientnet_b0", 3, head_dropout=0.0, drop_connect_rate=0.9, **SMALL)
    variables = _random_variables(_abstract_variables(model, 32))
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    (a, stats), (b, _) = (train(variables, x, rngs={"dropout": jax.random.key(i)}) for i in (1, 2))
    assert not np.allclose(a, b)
    stem_mean = stats["batch_stats"]["backbone"]["stem_bn"]["mean"]
    assert not np.allclose(stem_mean, variables["batch_stats"]["backbone"]["stem_bn"]["mean"])
    infer = jax.jit(model.apply)
    np.testing.assert_array_equal(infer(variables, x), infer(variables, x))  # needs no rng


def test_bfloat16_compute_gives_float32_features():
    model = models.create("efficientnet_lite0", 3, dtype="bfloat16", **SMALL)
    features_of = jax.jit(functools.partial(model.apply, method="features"))
    features = features_of(_random_variables(_abstract_variables(model, 32)), jnp.ones((1, 32, 32, 3)))
    assert features.dtype == jnp.float32 and features.shape == (1, 1280)
    assert bool(jnp.all(jnp.isfinite(features)))


# ----- Keras Applications -----------------------------------------------------------------------------------------


# The input Normalization's mean and variance in the Keras reference: not the identity, and not ImageNet's (which
# Keras treats specially), but close enough to it that both tests below feed activations of the calibrated scale.
KERAS_NORMALIZATION = ((0.5, 0.45, 0.4), (0.06, 0.05, 0.04))


@pytest.fixture(scope="module")
def keras_b0():
    """Keras's EfficientNetB0 with random BatchNorm statistics and a non-trivial input Normalization."""
    keras.backend.clear_session()  # Keras numbers its unnamed Normalization layer per session; files hold the first
    reference = keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    keras_reference.set_normalization(reference, *KERAS_NORMALIZATION)
    keras_reference.calibrate_batchnorm(reference)
    return reference


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_b0_matches_keras(tmp_path, images, keras_b0, layout):
    path = keras_reference.save(keras_b0, tmp_path / "b0.h5", layout)
    model, variables, prep = pretrained.load("efficientnet_b0", path)
    assert model.backbone.style == "tf" and prep.image_size == 224 and prep.scale == 1 / 255
    np.testing.assert_allclose(prep.mean, KERAS_NORMALIZATION[0], rtol=1e-6)
    np.testing.assert_allclose(prep.std, np.sqrt(KERAS_NORMALIZATION[1]), rtol=1e-6)
    expected = keras_reference.logits(keras_b0, images)
    assert_parity(model.apply(variables, prep.normalize(images), train=False), expected)


def test_keras_imagenet_normalization_is_folded_into_prep(tmp_path, images, keras_b0):
    """Keras's ImageNet files hold the std as "variance"; Keras adds Rescaling(1/sqrt(std)), which prep must fold in.

    The extra Rescaling feeds the stem conv, so Keras's ImageNet model equals this model with the stem kernel's input
    channels divided by sqrt(std): that is the reference.
    """
    stem = keras_b0.get_layer("stem_conv")
    kernel = stem.get_weights()[0]
    keras_reference.set_normalization(keras_b0, IMAGENET_MEAN, IMAGENET_STD)
    try:
        path = keras_reference.save(keras_b0, tmp_path / "b0.h5", "legacy")
        stem.set_weights([kernel / np.sqrt(np.float32(IMAGENET_STD))[None, None, :, None]])
        expected = keras_reference.logits(keras_b0, images)
    finally:
        stem.set_weights([kernel])
        keras_reference.set_normalization(keras_b0, *KERAS_NORMALIZATION)
    model, variables, prep = pretrained.load("efficientnet_b0", path)
    np.testing.assert_allclose(prep.mean, IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(prep.std, IMAGENET_STD, rtol=1e-6)
    assert_parity(model.apply(variables, prep.normalize(images), train=False), expected)


def test_keras_table_follows_keras_layer_order(keras_b0):
    """Keras 3 files name layers by class ordinal in `model.layers` order: the table must list them in that order.

    (Deeper variants differ only in repeats and widths, which the parameter-count and lukemelas tests cover; building
    another Keras model costs ~15 s.)
    """
    weighted = [layer.name for layer in keras_b0.layers if layer.weights]
    backbone = models.create("efficientnet_b0", 1, style="tf").backbone
    assert [layer.source for layer in tables.keras(backbone)] == weighted


# ----- PyTorch: lukemelas references, and torchvision / timm layouts ---------------------------------------------


def _torch_reference():
    """tests.torch_reference, or a clean skip when torch is not installed."""
    pytest.importorskip("torch")
    from tests import torch_reference

    return torch_reference


def _save_state_dict(path: Path, state_dict: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path


@pytest.mark.parametrize("name, package", [("efficientnet_b0", "efficientnet_pytorch"),
                                           ("efficientnet_lite0", "efficientnet_lite_pytorch")])
def test_lukemelas_matches_pytorch(tmp_path, images, name, package):
    pytest.importorskip("torch")
    reference_module = pytest.importorskip(package)
    reference = reference_module.EfficientNet.from_name(name.replace("_", "-"), image_size=64, num_classes=10)
    _torch_reference().calibrate_batchnorm(reference)
    path = _save_state_dict(tmp_path / f"{name}.safetensors", reference.state_dict())

    model, variables, prep = pretrained.load(name, path)
    assert model.backbone.style == "tf"
    assert (prep.mean, prep.std) == ((TF_INCEPTION.mean, TF_INCEPTION.std) if "lite" in name
                                     else (IMAGENET_MEAN, IMAGENET_STD))
    x = np.asarray(prep.normalize(images))
    assert_parity(model.apply(variables, x, train=False), _torch_reference().logits(reference, x))


@pytest.mark.parametrize("name", NAMES)
def test_lukemelas_table_fits_every_reference_variant(name):
    """Every tensor of the reference implementation's state dict has its place, with its shape, and vice versa."""
    torch = pytest.importorskip("torch")
    reference_module = pytest.importorskip("efficientnet_lite_pytorch" if "lite" in name else "efficientnet_pytorch")
    from tljax.pretrained.convert import convert

    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = reference_module.EfficientNet.from_name(name.replace("_", "-"))
    arrays = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = models.create(name, 1000, style="tf")
    convert(arrays, tables.lukemelas(model.backbone), _abstract_variables(model), "torch", drop_head=False)


def _torchvision_replica(backbone: efficientnet.EfficientNet, classes: int):
    """torchvision's EfficientNet module tree for `backbone`'s blocks: `features.0` = Conv2dNormActivation (conv, BN,
    SiLU), `features.1..7` = stages of MBConv (`block` = Sequential of Conv2dNormActivation units and a
    SqueezeExcitation with 1x1 convs `fc1`/`fc2`), `features.8` = head, `classifier` = (Dropout, Linear).
    PyTorch's symmetric padding k // 2 and BatchNorm epsilon 1e-5."""
    from torch import nn

    def conv_bn(cin, cout, kernel, stride=1, groups=1, act=True):
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(cout), *([nn.SiLU()] if act else []))

    class SqueezeExcitation(nn.Module):
        def __init__(self, channels, squeezed):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

        def forward(self, x):
            return x * self.fc2(nn.functional.silu(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()

    class MBConv(nn.Module):
        def __init__(self, spec):
            super().__init__()
            units = [conv_bn(spec.in_features, spec.hidden, 1)] if spec.expand_ratio != 1 else []
            units += [conv_bn(spec.hidden, spec.hidden, spec.kernel_size, spec.strides, spec.hidden),
                      SqueezeExcitation(spec.hidden, spec.se_features),
                      conv_bn(spec.hidden, spec.features, 1, act=False)]
            self.block = nn.Sequential(*units)
            self.residual = spec.strides == 1 and spec.in_features == spec.features

        def forward(self, x):
            return x + self.block(x) if self.residual else self.block(x)

    class EfficientNet(nn.Module):
        def __init__(self):
            super().__init__()
            specs = backbone.blocks()
            stages = [nn.Sequential(*[MBConv(s) for s in specs if s.stage == i]) for i in range(specs[-1].stage + 1)]
            self.features = nn.Sequential(conv_bn(3, backbone.stem_features, 3, 2), *stages,
                                          conv_bn(specs[-1].features, backbone.head_features, 1))
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(backbone.head_features, classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return EfficientNet()


@pytest.fixture(scope="module")
def torchvision_b0():
    pytest.importorskip("torch")
    replica = _torchvision_replica(models.create("efficientnet_b0", 1).backbone, 10)
    return _torch_reference().calibrate_batchnorm(replica)


def test_torchvision_matches_pytorch_replica(tmp_path, images, torchvision_b0):
    path = _save_state_dict(tmp_path / "tv.safetensors", torchvision_b0.state_dict())
    model, variables, prep = pretrained.load("efficientnet_b0", path)  # the convention is detected
    assert model.backbone.style == "torchvision" and (prep.mean, prep.std) == (IMAGENET_MEAN, IMAGENET_STD)
    x = np.asarray(prep.normalize(images))
    assert_parity(model.apply(variables, x, train=False), _torch_reference().logits(torchvision_b0, x))
    assert models.create("efficientnet_b5", 1, style="torchvision").backbone.bn_eps == 1e-3  # TF-ported B5..B7


# Tensors of timm's efficientnet_b0 state dict, with their shapes.
TIMM_B0_KEYS = {
    "conv_stem.weight": (32, 3, 3, 3),
    "bn1.running_var": (32,),
    "blocks.0.0.conv_dw.weight": (32, 1, 3, 3),
    "blocks.0.0.bn1.weight": (32,),
    "blocks.0.0.se.conv_reduce.weight": (8, 32, 1, 1),
    "blocks.0.0.se.conv_expand.bias": (32,),
    "blocks.0.0.conv_pw.weight": (16, 32, 1, 1),
    "blocks.0.0.bn2.bias": (16,),
    "blocks.1.0.conv_pw.weight": (96, 16, 1, 1),
    "blocks.1.0.bn1.running_mean": (96,),
    "blocks.1.0.conv_dw.weight": (96, 1, 3, 3),
    "blocks.1.0.bn2.weight": (96,),
    "blocks.1.0.se.conv_reduce.weight": (4, 96, 1, 1),
    "blocks.1.0.conv_pwl.weight": (24, 96, 1, 1),
    "blocks.1.0.bn3.weight": (24,),
    "blocks.5.3.conv_dw.weight": (1152, 1, 5, 5),
    "blocks.6.0.conv_pwl.weight": (320, 1152, 1, 1),
    "conv_head.weight": (1280, 320, 1, 1),
    "bn2.weight": (1280,),
    "classifier.weight": (10, 1280),
}


def test_timm_tables(tmp_path, images, torchvision_b0):
    """The torchvision replica's tensors under timm's names: the same logits with "timm", TF padding with "timm_tf"."""
    backbone = models.create("efficientnet_b0", 1).backbone
    renamed = {tv.source: timm.source for tv, timm in zip(tables.torchvision(backbone), tables.timm(backbone))}
    state_dict = {}
    for key, value in torchvision_b0.state_dict().items():
        layer, tensor = key.rsplit(".", 1)
        state_dict[f"{renamed[layer]}.{tensor}"] = value
    assert {k: tuple(state_dict[k].shape) for k in TIMM_B0_KEYS} == TIMM_B0_KEYS
    path = _save_state_dict(tmp_path / "timm.safetensors", state_dict)

    model, variables, prep = pretrained.load("efficientnet_b0", path)  # the convention is detected
    assert model.backbone.style == "torch" and (prep.mean, prep.std) == (IMAGENET_MEAN, IMAGENET_STD)
    x = np.asarray(prep.normalize(images))
    expected = _torch_reference().logits(torchvision_b0, x)
    assert_parity(model.apply(variables, x, train=False), expected)
    assert pretrained.load("efficientnet_b0", path, convention="timm_tf")[0].backbone.style == "tf"


@pytest.mark.parametrize("convention, lite_mean", [("timm", IMAGENET_MEAN), ("torchvision", IMAGENET_MEAN),
                                                   ("timm_tf", TF_INCEPTION.mean), ("lukemelas", TF_INCEPTION.mean)])
def test_prep_per_convention(convention, lite_mean):
    """Native resolution and Google's crop for every variant; [-1, 1] inputs only for TF-trained Lite weights."""
    prep_of = mappings.conventions("efficientnet")[convention].prep
    sizes = {}
    for name in NAMES:
        backbone = models.create(name, 1).backbone
        prep = prep_of({}, backbone)
        assert prep.mean == (lite_mean if backbone.lite else IMAGENET_MEAN) and prep.interpolation == "bicubic"
        assert prep.image_size * (1 / prep.crop_fraction - 1) == pytest.approx(32)
        sizes[name] = prep.image_size
    assert sizes == {"efficientnet_b0": 224, "efficientnet_b1": 240, "efficientnet_b2": 260, "efficientnet_b3": 300,
                     "efficientnet_b4": 380, "efficientnet_b5": 456, "efficientnet_b6": 528, "efficientnet_b7": 600,
                     "efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260,
                     "efficientnet_lite3": 280, "efficientnet_lite4": 300}
