"""EfficientNet(-Lite): the architecture's sizes, stochastic depth, and each weight convention's input.

Parity of the weights with the reference libraries is in tests/test_parity_torch.py (torchvision, timm, lukemelas)
and tests/test_pretrained_keras.py (Keras Applications).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models
from tljax.models import efficientnet
from tljax.pretrained import mappings
from tljax.pretrained.prep import IMAGENET_MEAN, TF_INCEPTION

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
