"""ConvNeXt: sizes, depths for layer decay and stages for unfreezing, input sizes, stochastic depth, bfloat16, Keras's
nested Sequential layers in both file layouts, and a checkpoint of another variant.

Parity of the weights is in tests/test_parity_torch.py (timm, torchvision) and tests/test_pretrained_keras.py (Keras).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models, pretrained
from tljax.pretrained import readers

# Parameter counts with a 1000-way classifier of timm's models of the same names.
PARAMETERS = {
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
    "convnext_xlarge": 350_196_968,
}
SMALL = {"depths": (1, 2, 1, 1), "widths": (8, 16, 24, 32)}  # every kind of layer, compiles in seconds


def _init(model, size: int = 32):
    """A batch of 4 random images and the model's variables: random normal kernels (an initialisation XLA would
    compile), the constants' initial values, and random layer scales, so that every block counts."""
    image = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        if path[-1].key in ("kernel", "gamma"):
            fan_in = np.prod(leaf.shape[:-1]) if path[-1].key == "kernel" else 1
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (np.ones if path[-1].key == "scale" else np.zeros)(leaf.shape, np.float32)

    return image, jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.mark.parametrize("name", PARAMETERS)
def test_parameter_counts_match_timm(name):
    image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(models.create(name, 1000).init, train=False), jax.random.key(0),
                               image)
    assert set(variables) == {"params"}
    assert sum(x.size for x in jax.tree.leaves(variables)) == PARAMETERS[name]


def test_depths_and_stages_cover_every_module_once():
    """Layer decay: the stem at 0, block k of the network at k + 1, a stage's downsampling with its first block, the
    final norm with the head; gradual unfreezing: each module in exactly one stage."""
    model = models.create("convnext_tiny", 3)
    depths = models.layer_depths(model)
    assert depths["backbone/stem_conv"] == 0 and depths["backbone/stage1_block0"] == 1
    assert depths["backbone/stage2_downsample_conv"] == depths["backbone/stage2_block0"] == 4
    assert depths["backbone/stage4_block2"] == 18 and depths["backbone/head_norm"] == depths["head"] == 19
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]["backbone"]
    assert set(params) == {name.split("/")[1] for name in depths if name != "head"}
    stages = models.unfreeze_stages("convnext_tiny")
    assert len(stages) == 4
    for module in params:
        assert sum(bool(re.fullmatch(stage, module)) for stage in stages) == 1, module


def test_inputs_below_32_pixels_are_refused():
    with pytest.raises(ValueError, match="at least 32x32"):
        jax.eval_shape(models.create("convnext_tiny", 3).init, jax.random.key(0), jnp.zeros((1, 24, 64, 3)))


def test_stochastic_depth_only_in_training_mode():
    model = models.create("convnext_tiny", 3, drop_path_rate=0.5, **SMALL)
    x, variables = _init(model)
    features = functools.partial(model.apply, method="features")
    inference = jax.jit(features)(variables, x)
    trained = jax.jit(functools.partial(features, train=True))(variables, x, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(trained, inference)
    plain = models.create("convnext_tiny", 3, **SMALL)
    np.testing.assert_allclose(jax.jit(functools.partial(plain.apply, train=True, method="features"))(variables, x),
                               inference, rtol=1e-5, atol=1e-5)


def test_bfloat16_moves_features_by_its_rounding_only():
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = models.create("convnext_tiny", 3, dtype=dtype, **SMALL)
        x, variables = _init(model)
        out[dtype] = np.asarray(jax.jit(functools.partial(model.apply, method="features"))(variables, x))
        assert out[dtype].dtype == np.float32
    err = np.abs(out["bfloat16"] - out["float32"]).max() / np.abs(out["float32"]).max()
    assert 1e-4 < err < 5e-2


@pytest.mark.parametrize("weight_names", [
    # Keras 3's legacy writer prefixes the Sequential's name; tf.keras's names the inner layers alone.
    ["stem/stem_conv/kernel", "stem/stem_conv/bias", "stem/stem_layernorm/gamma", "stem/stem_layernorm/beta"],
    ["stem_conv/kernel:0", "stem_conv/bias:0", "stem_layernorm/gamma:0", "stem_layernorm/beta:0"],
])
def test_legacy_keras_nested_sequential_keys_name_the_inner_layers(weight_names):
    keys = [key for key, _ in readers._legacy_keys("stem", weight_names)]
    assert keys == ["stem/stem_conv/0", "stem/stem_conv/1", "stem/stem_layernorm/0", "stem/stem_layernorm/1"]
    # A plain layer keeps `layer/index`, whatever scope its variables were created in.
    assert [k for k, _ in readers._legacy_keys("normalization_1", ["normalization/mean:0", "normalization/var:0"])] \
        == ["normalization_1/0", "normalization_1/1"]


def test_checkpoint_of_another_variant_is_refused_with_a_listing(tmp_path):
    """A ConvNeXt-T file given to a ConvNeXt-S: its third stage lacks 18 blocks."""
    torch_reference = pytest.importorskip("tests.torch_reference")
    path = torch_reference.save(torch_reference.build("timm", "convnext_tiny", 32), tmp_path / "tiny.safetensors")
    with pytest.raises(pretrained.WeightsMismatchError, match=r"missing from the file \(\d+\):\n    "
                                                              r"stages\.2\.blocks\.9\.conv_dw\.weight"):
        pretrained.load("convnext_small", path)
