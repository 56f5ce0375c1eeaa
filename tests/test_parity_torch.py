"""Parity with the real PyTorch libraries: every architecture and naming convention tljax reads from them.

Each case builds the model in its own library (torchvision, timm, lukemelas `efficientnet_pytorch` /
`efficientnet_lite_pytorch`) with the library's random initialisation and calibrated BatchNorm statistics
(`torch_reference.calibrate_batchnorm`), writes the state dict as `.safetensors` and as a zip `.pth`, loads both
with `pretrained.load` (the naming convention detected, except timm's TF ports, which share timm's names), and
compares logits with the library's in float64 (see tests/parity.py for why float64).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch_reference = pytest.importorskip("tests.torch_reference")

from tests import parity  # noqa: E402
from tljax import pretrained  # noqa: E402

EFFICIENTNETS = [f"efficientnet_b{i}" for i in range(8)]
LITES = [f"efficientnet_lite{i}" for i in range(5)]

# (library, the library's model name, tljax model, convention to pass or None to detect, the convention expected)
CASES = [
    *[("torchvision", f"resnet{d}", f"resnet{d}", None, "torchvision") for d in (18, 34, 50, 101, 152)],
    ("torchvision", "vgg16", "vgg16", None, "torchvision"),
    *[("torchvision", name, name, None, "torchvision") for name in EFFICIENTNETS],
    *[("timm", f"resnet{d}", f"resnet{d}", None, "torchvision") for d in (34, 50)],
    *[("timm", name, name, None, "timm") for name in EFFICIENTNETS],
    *[("timm", f"tf_{name}", name, "timm_tf", "timm_tf") for name in EFFICIENTNETS + LITES],
    *[("lukemelas", name, name, None, "lukemelas") for name in EFFICIENTNETS + LITES],
]


def _same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _reference_and_load(tmp_path, library, reference_name, name, convention, detected=None):
    """The calibrated reference, and tljax's (model, variables, prep) from its state dict, after checking that the
    `.safetensors` and zip `.pth` files load to the same variables (and the detected convention)."""
    reference = torch_reference.calibrate_batchnorm(torch_reference.build(library, reference_name))
    files = [torch_reference.save(reference, tmp_path / f"{reference_name}{suffix}")
             for suffix in (".safetensors", ".pth")]
    if detected is not None:
        assert pretrained.read(name, files[0], convention=convention).convention.name == detected
    (model, variables, prep), (_, variables_pth, prep_pth) = (
        pretrained.load(name, path, convention=convention) for path in files)
    assert prep == prep_pth and _same_tree(variables, variables_pth)
    return reference, model, variables, prep


@pytest.mark.parametrize("library, reference_name, name, convention, detected", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_logits_match_the_reference_library(tmp_path, library, reference_name, name, convention, detected):
    reference, model, variables, _ = _reference_and_load(tmp_path, library, reference_name, name, convention,
                                                         detected)
    x = parity.inputs()
    expected = torch_reference.logits(reference, x)
    assert expected.shape == (2, 1000)
    parity.assert_parity(parity.float64_outputs(model, variables, x), expected, parity.RTOL_FLOAT64)


FLOAT32_CASES = [("torchvision", "resnet50", "resnet50", None), ("torchvision", "vgg16", "vgg16", None),
                 ("torchvision", "efficientnet_b0", "efficientnet_b0", None),
                 ("timm", "efficientnet_b0", "efficientnet_b0", None),
                 ("timm", "tf_efficientnet_b0", "efficientnet_b0", "timm_tf"),
                 ("lukemelas", "efficientnet_lite0", "efficientnet_lite0", None)]


@pytest.mark.parametrize("library, reference_name, name, convention", FLOAT32_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in FLOAT32_CASES])
def test_float32_logits_match_the_reference_library(tmp_path, library, reference_name, name, convention):
    """The float32 model users run (the fast convolution forms included) against the library's float32 logits, on
    networks shallow enough for float32 rounding to stay below the tolerance."""
    reference, model, variables, _ = _reference_and_load(tmp_path, library, reference_name, name, convention)
    x = parity.inputs().astype(np.float32)
    parity.assert_parity(model.apply(variables, x, train=False), torch_reference.logits(reference, x))
