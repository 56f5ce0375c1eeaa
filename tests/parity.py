"""Comparing tljax with reference implementations: equal logits within a tolerance of their scale, input-dependent.

The comparisons run in float64 on both sides (the weights are float32 values, upcast exactly). A deep random network
with calibrated BatchNorm statistics is input-dependent but often chaotic: float32 rounding, the same in any
implementation, can change its logits by 10-50% (measured: PyTorch's own float32 against its float64, torchvision
EfficientNet-B3/B5 at 64 px), so a float32 comparison cannot tell a wrong mapping from rounding. In float64 the
rounding is 1e-16, and what remains is any real difference in the computation.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tljax.models import Classifier
from tljax.pretrained import Preprocessing

RTOL_FLOAT64 = 1e-6  # measured errors in float64: 1e-14 .. 1e-8 of the logits' scale
SPREAD = 1e-3  # the reference's logits for two inputs must differ by more than this fraction of their scale


def inputs(n: int = 2, size: int = 64, seed: int = 1) -> np.ndarray:
    """n random normalised images (standard normal, NHWC float64): the distribution the references' BatchNorm
    statistics are calibrated on. (Inputs of another distribution, e.g. uniform images through ImageNet's mean/std,
    leave the first statistics off by tens of percent, and the deepest networks' logits then grow to 1e6 and
    amplify even float64 rounding to 50%.)"""
    return np.random.default_rng(seed).normal(size=(n, size, size, 3))


def normalize64(prep: Preprocessing, x: np.ndarray) -> np.ndarray:
    """`prep.normalize` in float64 (the pipeline computes it in float32)."""
    x = np.asarray(x, np.float64)
    x = x[..., ::-1] if prep.bgr else x
    return (x * prep.scale - np.asarray(prep.mean)) / np.asarray(prep.std)


def assert_parity(actual, expected, rtol: float = 1e-4) -> float:
    """Equal within rtol of the outputs' scale, and the reference's outputs for two inputs really differ.

    A deep random network whose BatchNorm statistics do not fit its activations forgets its input: its logits then
    agree whatever the inputs, and a parity check proves nothing. Callers pass a batch of >= 2 different inputs and
    references whose statistics are calibrated on data. Returns the error relative to the scale.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    spread = np.abs(expected[0] - expected[1]).max()
    assert spread > SPREAD * scale, f"the reference ignores its input (spread {spread / scale:.2g} of the scale)"
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"max |diff| {err:.3g} x scale > {rtol} x scale {scale:.3g}"
    return float(err)


@functools.cache
def _float64_apply(model: Classifier, method: str | None) -> Callable:
    model = model.clone(backbone=model.backbone.clone(dtype=jnp.float64), head=model.head.clone(dtype=jnp.float64))
    return jax.jit(functools.partial(model.apply, method=method or "__call__", train=False))


def float64_outputs(model: Classifier, variables: dict, x: np.ndarray, method: str | None = None) -> np.ndarray:
    """The model's inference logits (or `method`'s outputs) computed in float64, compiled once per architecture."""
    with jax.enable_x64(True):
        fn = _float64_apply(model, method)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        return np.asarray(fn(variables, jnp.asarray(x, jnp.float64)))
