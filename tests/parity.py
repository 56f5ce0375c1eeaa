"""Comparing outputs across frameworks: equal within a tolerance relative to their scale, and input-dependent."""

import numpy as np


def assert_parity(actual, expected, rtol: float = 1e-4) -> None:
    """Equal within rtol of the outputs' scale, and the reference's outputs for two inputs really differ.

    A deep random network whose BatchNorm statistics do not fit its activations forgets its input: its logits then
    agree to ~1e-7 whatever the inputs, and a parity check proves nothing. Callers pass a batch of >= 2 different
    inputs; the references calibrate their statistics (keras_reference.calibrate_batchnorm) so the check has teeth.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.abs(expected).max()
    assert np.abs(expected[0] - expected[1]).max() > 0.1 * scale, "the reference ignores its input"
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x scale {scale:.3g}"
