"""VGG16: its table names, the input sizes it accepts, and its pooling to 7x7 against PyTorch's.

Parity of the weights is in tests/test_parity_torch.py (torchvision) and tests/test_pretrained_keras.py (Keras).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models
from tljax.models.vgg import adaptive_avg_pool
from tljax.pretrained.mappings import vgg as vgg_tables


def test_vgg_torchvision_table_names():
    """torchvision numbers every conv, ReLU and max-pool in `features`, and every layer of `classifier`."""
    backbone = models.create("vgg16", 1, fc=True).backbone
    table = {layer.target: layer.source for layer in vgg_tables.torchvision(backbone)}
    assert table["backbone/block1_conv1"] == "features.0"
    assert table["backbone/block2_conv1"] == "features.5"
    assert table["backbone/block5_conv3"] == "features.28"
    classifier = [table[t] for t in ("backbone/fc1", "backbone/fc2", "head/out")]
    assert classifier == ["classifier.0", "classifier.3", "classifier.6"]


@pytest.mark.parametrize("size, fc, features", [(32, False, 512), (40, True, 4096)])
def test_vgg_features_at_small_inputs(size, fc, features):
    """Any input of at least 32 pixels works; the fc variant pools to 7x7 first, so its fc1 fits every size."""
    model = models.create("vgg16", 3, fc=fc)
    image = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
    out = jax.eval_shape(functools.partial(model.apply, method="features"), shapes, image)
    assert out.shape == (1, features) and out.dtype == jnp.float32


def test_vgg_refuses_inputs_below_32_pixels():
    model = models.create("vgg16", 3)
    with pytest.raises(ValueError, match="at least 32x32"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 64, 3)))


@pytest.mark.parametrize("height, width", [(1, 1), (2, 3), (7, 7), (9, 13), (20, 6)])
def test_adaptive_avg_pool_matches_pytorch(height, width):
    """VGG's pooling to 7x7 repeats, averages over overlapping bins, or is the identity, exactly as PyTorch's."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(height * width).normal(size=(2, height, width, 5)).astype("float32")
    pool = torch.nn.AdaptiveAvgPool2d(7)
    expected = pool(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    actual = np.asarray(adaptive_avg_pool(jnp.asarray(x), 7))
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    if (height, width) == (7, 7):
        np.testing.assert_array_equal(actual, x)
