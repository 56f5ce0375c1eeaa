"""Parity with the real PyTorch libraries: every architecture and naming convention tljax reads from them.

Each case builds the model in its own library (torchvision, timm, lukemelas `efficientnet_pytorch` /
`efficientnet_lite_pytorch`) with the library's random initialisation and calibrated BatchNorm statistics
(`torch_reference.calibrate_batchnorm`; ViT and ConvNeXt, which have none, with random norm, bias, token and
layer-scale parameters: `torch_reference.randomize_constants`), writes the state dict as `.safetensors` and as a zip
`.pth`, loads both with `pretrained.load` (the naming convention detected, except timm's TF ports, which share timm's
names), and compares logits with the library's in float64 (see tests/parity.py for why float64).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch_reference = pytest.importorskip("tests.torch_reference")

from tests import parity  # noqa: E402
from tljax import models, pretrained  # noqa: E402

EFFICIENTNETS = [f"efficientnet_b{i}" for i in range(8)]
LITES = [f"efficientnet_lite{i}" for i in range(5)]
# The transformers and ConvNeXts, one case per layout: the variants of a family differ only in widths and depths
# (ViT-Ti/S/B/L, ConvNeXt-T/S/B/L), which the tables take from the backbone. ViT-L and ConvNeXt-L run once, the
# others' smallest member covers each layout: timm's ViT/16 and /32, DINOv2 with and without registers, torchvision's
# ViT (ViT-B/16; tests/test_vit.py adds Google's .npz layout) and ConvNeXt. (timm name, tljax name) pairs.
VITS = [("vit_small_patch16_224", "vit_small_patch16"), ("vit_base_patch32_224", "vit_base_patch32"),
        ("vit_large_patch16_224", "vit_large_patch16")]
DINOV2 = ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"]
CONVNEXTS = ["convnext_tiny", "convnext_large"]
# Input sizes other than 64 px: small multiples of a ViT's patch size (2x2 or 3x3 patches) and ConvNeXt's smallest
# (32 px), so that compiling and running stay quick.
SIZES = {"vit_small_patch16_224": 48, "vit_large_patch16_224": 32, "vit_b_16": 32, "vit_small_patch14_dinov2": 42,
         "vit_small_patch14_reg4_dinov2": 28, **{name: 32 for name in CONVNEXTS}}

# (library, the library's model name, tljax model, convention to pass or None to detect, the convention expected)
CASES = [
    *[("torchvision", f"resnet{d}", f"resnet{d}", None, "torchvision") for d in (18, 34, 50, 101, 152)],
    ("torchvision", "vgg16", "vgg16", None, "torchvision"),
    *[("torchvision", name, name, None, "torchvision") for name in EFFICIENTNETS],
    *[("timm", f"resnet{d}", f"resnet{d}", None, "torchvision") for d in (34, 50)],
    *[("timm", name, name, None, "timm") for name in EFFICIENTNETS],
    *[("timm", f"tf_{name}", name, "timm_tf", "timm_tf") for name in EFFICIENTNETS + LITES],
    *[("lukemelas", name, name, None, "lukemelas") for name in EFFICIENTNETS + LITES],
    *[("timm", reference, name, None, "timm") for reference, name in VITS],
    *[("timm", name, name, None, "timm") for name in DINOV2 + CONVNEXTS],
    ("torchvision", "vit_b_16", "vit_base_patch16", None, "torchvision"),
    ("torchvision", "convnext_tiny", "convnext_tiny", None, "torchvision"),
]


def _same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _reference_and_load(tmp_path, library, reference_name, name, convention, detected=None, size=64):
    """The calibrated reference for `size` px inputs, and tljax's (model, variables, prep) from its state dict,
    after checking that the `.safetensors` and zip `.pth` files load to the same variables (and the detected
    convention)."""
    reference = torch_reference.build(library, reference_name, size)
    if models.family(name) in ("vit", "convnext"):
        reference = torch_reference.randomize_constants(reference)
    else:
        reference = torch_reference.calibrate_batchnorm(reference)
    files = [torch_reference.save(reference, tmp_path / f"{reference_name}{suffix}")
             for suffix in (".safetensors", ".pth")]
    if detected is not None:
        assert pretrained.read(name, files[0], convention=convention).convention.name == detected
    (model, variables, prep), (_, variables_pth, prep_pth) = (
        pretrained.load(name, path, convention=convention, image_size=size) for path in files)
    assert prep == prep_pth and _same_tree(variables, variables_pth)
    return reference, model, variables, prep


@pytest.mark.parametrize("library, reference_name, name, convention, detected", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_logits_match_the_reference_library(tmp_path, library, reference_name, name, convention, detected):
    size = SIZES.get(reference_name, 64)
    reference, model, variables, _ = _reference_and_load(tmp_path, library, reference_name, name, convention,
                                                         detected, size)
    x = parity.inputs(size=size)
    expected = torch_reference.logits(reference, x)
    assert expected.shape == (2, 1000)
    parity.assert_parity(parity.float64_outputs(model, variables, x), expected, parity.RTOL_FLOAT64)


FLOAT32_CASES = [("torchvision", "resnet50", "resnet50", None), ("torchvision", "vgg16", "vgg16", None),
                 ("torchvision", "efficientnet_b0", "efficientnet_b0", None),
                 ("timm", "efficientnet_b0", "efficientnet_b0", None),
                 ("timm", "tf_efficientnet_b0", "efficientnet_b0", "timm_tf"),
                 ("lukemelas", "efficientnet_lite0", "efficientnet_lite0", None),
                 ("timm", "vit_small_patch16_224", "vit_small_patch16", None),
                 ("timm", "convnext_tiny", "convnext_tiny", None)]


@pytest.mark.parametrize("library, reference_name, name, convention", FLOAT32_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in FLOAT32_CASES])
def test_float32_logits_match_the_reference_library(tmp_path, library, reference_name, name, convention):
    """The float32 model users run (the fast convolution forms included) against the library's float32 logits, on
    networks shallow enough for float32 rounding to stay below the tolerance."""
    reference, model, variables, _ = _reference_and_load(tmp_path, library, reference_name, name, convention)
    x = parity.inputs().astype(np.float32)
    parity.assert_parity(model.apply(variables, x, train=False), torch_reference.logits(reference, x))
