"""Parity with Keras 3 Applications (JAX backend): same weights file, same logits."""

import keras
import numpy as np
import pytest

from tests import keras_reference as kr
from tests.parity import assert_parity
from tljax import pretrained


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_resnet50_matches_keras(tmp_path, images, layout):
    reference = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    kr.calibrate_batchnorm(reference)
    path = kr.save(reference, tmp_path / "resnet50.h5", layout)
    expected = kr.logits(reference, keras.applications.resnet.preprocess_input(images.copy()))

    model, variables, prep = pretrained.load("resnet50", path)
    assert prep.bgr and prep.scale == 1.0
    assert_parity(model.apply(variables, prep.normalize(images), train=False), expected)


def test_resnet_keras_table_follows_keras_layer_order():
    """Keras 3 files name layers by class ordinal in `model.layers` order: the table must list them in that order."""
    from tljax import models
    from tljax.pretrained.mappings import resnet as resnet_tables

    reference = keras.applications.ResNet101(weights=None, input_shape=(64, 64, 3))
    weighted = [layer.name for layer in reference.layers if layer.weights]
    table = [layer.source for layer in resnet_tables.keras(models.create("resnet101", 1, style="keras").backbone)]
    assert table == weighted
