"""Comparing logits across frameworks: equal within a tolerance relative to the logits' scale."""

import numpy as np


def assert_logits_close(actual, expected, rtol: float = 1e-4) -> None:
    """Equal within rtol of the logits' scale (max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x scale {scale:.3g}"
