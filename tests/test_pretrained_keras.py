"""Parity with Keras Applications: every preset tljax maps, from the legacy `.h5` and the Keras 3 `.weights.h5`.

The references (tests/keras_reference.py) are built once per session in a subprocess on Keras's TensorFlow backend,
in float64, with calibrated BatchNorm statistics; tljax loads their files and computes the logits in float64 too
(see tests/parity.py).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests import keras_reference, parity
from tljax import models, pretrained
from tljax.pretrained.mappings import convnext as convnext_tables
from tljax.pretrained.mappings import efficientnet as efficientnet_tables
from tljax.pretrained.mappings import resnet as resnet_tables
from tljax.pretrained.mappings import vgg as vgg_tables
from tljax.pretrained.prep import KERAS_CAFFE, TORCHVISION

# Keras Applications model -> tljax model.
PRESETS = {
    **{f"ResNet{d}": f"resnet{d}" for d in (50, 101, 152)},
    **{f"EfficientNetB{i}": f"efficientnet_b{i}" for i in range(8)},
    "VGG16": "vgg16",
    # ConvNeXt-T: the other variants differ in depth, width and their name prefix only, which the table takes from the
    # backbone (test_keras_convnext_names_follow_keras_configs checks the prefixes against Keras's configurations).
    "ConvNeXtTiny": "convnext_tiny",
}
LAYOUTS = ("legacy.h5", "model.weights.h5")


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    return keras_reference.make(tmp_path_factory.mktemp("keras"), [*PRESETS, "EfficientNetB0_imagenet"])


def _assert_prep_matches_keras(prep, reference) -> None:
    """tljax's normalisation of the images is Keras's (to the ~1e-7 of Keras's float32 Rescaling constant)."""
    actual, expected = parity.normalize64(prep, reference["images"]), reference["inputs"]
    assert np.abs(actual - expected).max() <= 1e-6 * np.abs(expected).max()


def _load_both_layouts(folder, name, **kwargs):
    """(model, variables, prep) from the legacy file, after checking the Keras 3 file gives the same."""
    (model, variables, prep), (_, variables3, prep3) = (
        pretrained.load(name, folder / layout, **kwargs) for layout in LAYOUTS)
    assert prep == prep3
    assert jax.tree.structure(variables) == jax.tree.structure(variables3)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables3)))
    return model, variables, prep


@pytest.mark.parametrize("arch", PRESETS)
def test_logits_match_keras(references, arch):
    name = PRESETS[arch]
    reference = np.load(references[arch] / "reference.npz")
    model, variables, prep = _load_both_layouts(references[arch], name)
    if name.startswith("efficientnet"):  # the file's own Normalization layer
        mean, variance = keras_reference.NORMALIZATION
        assert prep.scale == 1 / 255 and not prep.bgr
        np.testing.assert_allclose(prep.mean, mean, rtol=1e-6)
        np.testing.assert_allclose(prep.std, np.sqrt(variance), rtol=1e-6)
    elif name.startswith("convnext"):  # ImageNet's mean and std, which the model applies to 0..255 inputs itself
        assert (prep.mean, prep.std, prep.scale, prep.bgr) == (TORCHVISION.mean, TORCHVISION.std, 1 / 255, False)
    else:
        assert (prep.mean, prep.std, prep.scale, prep.bgr) == (KERAS_CAFFE.mean, KERAS_CAFFE.std, 1.0, True)
    _assert_prep_matches_keras(prep, reference)
    actual = parity.float64_outputs(model, variables, reference["inputs"])
    parity.assert_parity(actual, reference["logits"], parity.RTOL_FLOAT64)


def test_keras_imagenet_normalization_is_folded_into_prep(references):
    """Keras's ImageNet files hold the std as "variance", and Keras adds a Rescaling(1 / sqrt(std)) that is in no file:
    prep must give the whole (x / 255 - mean) / std. The reference is the model Keras builds for such a file."""
    folder = references["EfficientNetB0_imagenet"]
    reference = np.load(folder / "reference.npz")
    model, variables, prep = _load_both_layouts(folder, "efficientnet_b0")
    mean, std = keras_reference.IMAGENET_NORMALIZATION
    np.testing.assert_allclose(prep.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(prep.std, std, rtol=1e-6)
    _assert_prep_matches_keras(prep, reference)
    actual = parity.float64_outputs(model, variables, reference["inputs"])
    parity.assert_parity(actual, reference["logits"], parity.RTOL_FLOAT64)


@pytest.mark.parametrize("fc, keras_layer", [(False, "block5_pool"), (True, "fc2")])
def test_vgg16_new_head_on_keras_weights(references, fc, keras_layer):
    """A new head reads past the file's classifier; `fc=True` keeps fc1/fc2 as the backbone's 4096 features."""
    reference = np.load(references["VGG16"] / "reference.npz")
    model, variables, _ = pretrained.load("vgg16", references["VGG16"] / "legacy.h5", num_classes=7, fc=fc)
    features = parity.float64_outputs(model, variables, reference["inputs"], method="features")
    expected = reference[keras_layer]
    if not fc:
        expected = expected.mean(axis=(1, 2))  # global average pooling of the last block
    assert features.shape == (2, 512 if not fc else 4096) == expected.shape
    parity.assert_parity(features, expected, parity.RTOL_FLOAT64)
    assert ("fc1" in variables["params"]["backbone"]) == fc
    assert variables["params"]["head"]["out"]["kernel"].shape == (features.shape[1], 7)


@pytest.mark.parametrize("arch, fc", [("ResNet101", None), ("EfficientNetB3", None), ("VGG16", False),
                                      ("VGG16", True), ("ConvNeXtTiny", None)])
def test_keras_tables_follow_keras_layer_order(references, arch, fc):
    """Keras 3 files name layers by class ordinal in `model.layers` order: the tables must list them in that order
    (VGG16's with or without fc layers in the backbone: the file's classifier is listed either way)."""
    weighted = json.loads((references[arch] / "layers.json").read_text())
    name = PRESETS[arch]
    if arch == "VGG16":
        table = vgg_tables.keras(models.create(name, 1, fc=fc).backbone)
    elif arch.startswith("ResNet"):
        table = resnet_tables.keras(models.create(name, 1, style="keras").backbone)
    elif arch.startswith("ConvNeXt"):
        table = convnext_tables.keras(models.create(name, 1).backbone)
    else:
        table = efficientnet_tables.keras(models.create(name, 1, style="tf").backbone)
    assert [layer.source for layer in table] == weighted


def test_keras_convnext_names_follow_keras_configs():
    """Keras names a ConvNeXt's layers after its variant; the variant each tljax preset maps to has the same blocks
    and widths in Keras's own configurations (Keras Applications' MODEL_CONFIGS)."""
    from keras.src.applications.convnext import MODEL_CONFIGS

    for name in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge"):
        backbone = models.create(name, 1).backbone
        variant = convnext_tables.KERAS_NAMES[(backbone.depths, backbone.widths)]
        assert variant == name
        keras_config = MODEL_CONFIGS[variant.removeprefix("convnext_")]
        assert (list(backbone.depths), list(backbone.widths)) == (keras_config["depths"],
                                                                  keras_config["projection_dims"])
        assert next(iter(convnext_tables.keras(backbone))).source == f"{name}_stem/{name}_stem_conv"
