"""VGG16: parity with Keras 3 Applications (JAX backend) from its weight files, with and without its classifier."""

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from tests import keras_reference as kr
from tests.parity import assert_parity
from tljax import models, pretrained
from tljax.pretrained.mappings import vgg as vgg_tables


@pytest.fixture(scope="module")
def reference():
    """Keras VGG16 with its classifier (224x224 input), He-normal kernels and non-zero random biases.

    (Keras's default Glorot init shrinks the signal over 16 layers until the logits no longer depend on the input.)
    """
    model = keras.applications.VGG16(weights=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            he = rng.normal(0.0, np.sqrt(2.0 / np.prod(kernel.shape[:-1])), kernel.shape)
            layer.set_weights([he.astype("float32"), rng.normal(0.0, 0.05, bias.shape).astype("float32")])
    return model


@pytest.fixture(scope="module")
def images():
    """Two unlike images: noise, and a smooth colour gradient (noise alone averages out in the pooled features)."""
    noise = np.random.default_rng(1).uniform(0, 255, (224, 224, 3))
    ramp = np.linspace(0, 255, 224)
    rows, cols = np.meshgrid(ramp, ramp, indexing="ij")
    gradient = np.stack([rows, cols, 255 - rows], -1)
    return np.stack([noise, gradient]).astype("float32")


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vgg16")
    return {layout: kr.save(reference, folder / "vgg16.h5", layout) for layout in ("legacy", "keras3")}


def keras_outputs(reference: keras.Model, layer: str, images: np.ndarray) -> np.ndarray:
    """The output of one of the Keras model's layers on caffe-preprocessed images."""
    inner = keras.Model(reference.input, reference.get_layer(layer).output)
    return np.asarray(inner(keras.applications.vgg16.preprocess_input(images.copy()), training=False))


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_vgg16_matches_keras(reference, files, images, layout):
    """num_classes=None keeps the whole ImageNet classifier: fc1, fc2 in the backbone, `predictions` as the head."""
    expected = kr.logits(reference, keras.applications.vgg16.preprocess_input(images.copy()))
    model, variables, prep = pretrained.load("vgg16", files[layout])
    assert model.backbone.fc and prep.bgr and prep.scale == 1.0
    assert variables["params"]["head"]["out"]["kernel"].shape == (4096, 1000)
    assert_parity(model.apply(variables, prep.normalize(images), train=False), expected)


@pytest.mark.parametrize("fc, keras_layer", [(False, "block5_pool"), (True, "fc2")])
def test_vgg16_new_head_on_keras_weights(reference, files, images, fc, keras_layer):
    """A new head reads past the file's classifier; `fc=True` keeps fc1/fc2 as the backbone's 4096 features."""
    model, variables, prep = pretrained.load("vgg16", files["legacy"], num_classes=7, fc=fc)
    features = model.apply(variables, prep.normalize(images), method="features")
    expected = keras_outputs(reference, keras_layer, images)
    if not fc:
        expected = expected.mean(axis=(1, 2))  # global average pooling of the last block
    assert features.shape == (2, 512 if not fc else 4096) == expected.shape
    assert_parity(features, expected)
    assert ("fc1" in variables["params"]["backbone"]) == fc
    assert variables["params"]["head"]["out"]["kernel"].shape == (features.shape[1], 7)
    assert model.apply(variables, prep.normalize(images[:1]), train=False).shape == (1, 7)


@pytest.mark.parametrize("fc", [False, True])
def test_vgg_keras_table_follows_keras_layer_order(reference, fc):
    """Keras 3 files name layers by class ordinal in `model.layers` order: the table must list them in that order."""
    weighted = [layer.name for layer in reference.layers if layer.weights]
    table = [layer.source for layer in vgg_tables.keras(models.create("vgg16", 1, fc=fc).backbone)]
    assert table == weighted


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
