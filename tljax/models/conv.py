"""The one convolution function of tljax, computing each kind of convolution in its fastest form.

XLA's CPU convolution kernels are slow for three kinds of convolution in transfer-learning backbones, although the
numbers they produce are easy to get another way (identical up to float rounding):
  * a 1x1 convolution is a matrix product (`matmul`): ~5x faster forward and backward on CPU than XLA's convolution
    (about half of a bottleneck ResNet's FLOPs are 1x1 convolutions); this form is used on every backend;
  * a depthwise convolution (EfficientNet) runs at 0.3-0.5 GFLOP/s as a grouped convolution on CPU; as a sum of
    k*k shifted slices of the padded input times per-channel taps it runs 20-30x faster forward. This form is used
    on CPU only: GPU/TPU convolution libraries do depthwise convolutions well.
  * a k x k convolution with an output of at most `SMALL_OUTPUT` pixels (the last stages of a ResNet or VGG at 32-64
    px) takes XLA's CPU runtime 10-100x the time of the product of the output pixels' receptive fields with the
    kernel (`patches`): 512 channels at 2x2 px, batch 8, 182 against 2 ms forward, and the input gradient of a
    stride-2 one from 4x4 px 125 against 3 ms. This form is used on CPU only.
`TLJAX_CONV=native` forces XLA's convolution for everything (to compare), `TLJAX_CONV=fast` the fast forms on any
backend; the default "auto" chooses as above. The choice is made when a function is traced.

The k x k convolutions left to XLA run in whichever library XLA's CPU runtime hands them to. By default that is
YNNPACK, whose kernel gradients at ResNet-50's shapes take 2-4x the time of Eigen's (3x3, 64 channels at 40 px,
batch 32: 108 against 24 ms; the 7x7 stem 135 against 43 ms), and whose forward passes are no faster.
`compiler_options` keeps YNNPACK for the products and reductions and gives the convolutions back to Eigen; every
tljax step on CPU is compiled with it (ResNet-50's fine-tuning step 1.18x, forward passes unchanged).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp

Padding = str | int | Sequence[tuple[int, int]]
MODES = ("auto", "native", "fast")
SMALL_OUTPUT = 4  # pixels (2x2): k x k convolutions with outputs this small run as `patches` on CPU


def _mode() -> str:
    mode = os.environ.get("TLJAX_CONV", "auto")
    if mode not in MODES:
        raise ValueError(f"TLJAX_CONV={mode!r}; choose one of {MODES}")
    return mode


def explicit_padding(padding: Padding, spatial: Sequence[int], kernel: Sequence[int], strides: int):
    """((top, bottom), (left, right)) for PyTorch ints, TF "SAME"/"VALID" or explicit pairs."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":  # TF: output ceil(n / s); the odd pixel of padding goes at the end
        pads = []
        for n, k in zip(spatial, kernel):
            total = max((-(-n // strides) - 1) * strides + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


# XLA's CPU libraries: YNNPACK for products and reductions (its default), not for convolutions (Eigen's instead).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str]:
    """XLA options for compiling tljax's steps on this backend (`jax.jit(..., compiler_options=...)`): on CPU,
    convolutions through Eigen rather than YNNPACK (see the module's docstring); none elsewhere, nor where this
    jaxlib lacks the option (checked once by compiling a trivial function with it)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(jnp.float32(0)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option" or an enum value this jaxlib does not have
        return {}
    return dict(_CPU_OPTIONS)


def _taps(xp: jax.Array, kh: int, kw: int, oh: int, ow: int, strides: int):
    """(i, j, strided slice of the padded input that tap (i, j) multiplies), for every kernel tap."""
    n, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            limit = (n, i + (oh - 1) * strides + 1, j + (ow - 1) * strides + 1, c)
            yield i, j, jax.lax.slice(xp, (0, i, j, 0), limit, (1, strides, strides, 1))


def _shifted_sum(xp: jax.Array, kernel: jax.Array, strides: int, out_shape: tuple[int, int]) -> jax.Array:
    """sum over taps of slice * kernel[i, j], accumulated in float32 (or wider)."""
    acc = jnp.promote_types(xp.dtype, jnp.float32)
    out = None
    for i, j, tap in _taps(xp, *kernel.shape[:2], *out_shape, strides):
        term = tap.astype(acc) * kernel[i, j, 0].astype(acc)
        out = term if out is None else out + term
    return out


def patches(x: jax.Array, kernel: jax.Array, strides: int, pads) -> jax.Array:
    """NHWC x HWIO convolution as one product: every output pixel's receptive field [rows, kh*kw*C] (the taps'
    strided slices of the padded input, side by side) times the kernel as [kh*kw*C, O]."""
    kh, kw, c, o = kernel.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh, ow = _output_size(x.shape[1:3], (kh, kw), strides, pads)
    fields = jnp.concatenate([tap for _, _, tap in _taps(xp, kh, kw, oh, ow, strides)], axis=-1)
    return matmul(fields, kernel.reshape(kh * kw * c, o))


def _output_size(spatial: Sequence[int], kernel: Sequence[int], strides: int, pads) -> tuple[int, int]:
    """(height, width) of a convolution's output."""
    return tuple((n + before + after - k) // strides + 1 for n, k, (before, after) in zip(spatial, kernel, pads))


def matmul(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """x [..., C] times kernel [C, D] over x's last axis, as one product of x flattened to [rows, C].

    The same product taken over the last axis of the N-D array has a kernel gradient that contracts over all of its
    leading axes, which XLA's CPU runtime computes 1.2-4x slower than the flattened matrix's (ResNet-50's 1x1
    convolution 64->256 at 40x40 px, batch 32: 84 against 18 ms); forward and input gradient cost the same."""
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel, precision=precision)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise(x: jax.Array, kernel: jax.Array, strides: int, pads) -> jax.Array:
    """Depthwise convolution (kernel HW1C) as the sum over taps of a strided slice of the padded input times the
    tap's per-channel weights. Its gradient is written out too: the input gradient is the same shifted sum over the
    (strided-dilated) output gradient with the flipped kernel, the kernel gradient one reduction per tap."""
    return _depthwise_forward(x, kernel, strides, pads)[0]


def _depthwise_forward(x, kernel, strides, pads):
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_shape = _output_size(x.shape[1:3], kernel.shape[:2], strides, pads)
    return _shifted_sum(xp, kernel, strides, out_shape).astype(x.dtype), (x, kernel)


def _depthwise_backward(strides, pads, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (top, _), (left, _) = pads
    _, h, w, _ = x.shape
    oh, ow = g.shape[1:3]
    # dx[h] = sum_i g[o] k[i] over o*s + i = h + top: dilate g by the stride, pad it so that row h + top - i of the
    # dilated g lines up with tap i, and correlate with the flipped kernel (negative padding crops).
    config = [(0, 0, 0),
              (kh - 1 - top, h + top - (oh - 1) * strides - 1, strides - 1),
              (kw - 1 - left, w + left - (ow - 1) * strides - 1, strides - 1),
              (0, 0, 0)]
    g_dilated = jax.lax.pad(g, jnp.zeros((), g.dtype), config)
    dx = _shifted_sum(g_dilated, kernel[::-1, ::-1], 1, (h, w)).astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    acc = jnp.promote_types(x.dtype, jnp.float32)

    def per_example(args):  # one example at a time: its taps are re-read from cache, not from memory
        xe, ge = args
        return jnp.stack([jnp.sum(tap.astype(acc) * ge.astype(acc), axis=(0, 1, 2))
                          for _, _, tap in _taps(xe, kh, kw, oh, ow, strides)])

    dk = jnp.sum(jax.lax.map(per_example, (xp[:, None], g[:, None])), axis=0)
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise.defvjp(_depthwise_forward, _depthwise_backward)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: Padding = 0, groups: int = 1) -> jax.Array:
    """NHWC x HWIO convolution (I = in_channels / groups) with PyTorch (int), TF ("SAME") or explicit padding."""
    mode = _mode()
    kh, kw = kernel.shape[:2]
    pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
    if mode != "native" and (kh, kw) == (1, 1) and groups == 1 and pads == ((0, 0), (0, 0)):
        if strides > 1:
            x = x[:, ::strides, ::strides, :]
        return matmul(x, kernel[0, 0])
    is_depthwise = groups == x.shape[-1] == kernel.shape[3] and kernel.shape[2] == 1
    fast = mode == "fast" or (mode == "auto" and jax.default_backend() == "cpu")
    if is_depthwise and fast:
        return depthwise(x, kernel, strides, pads)
    if fast and groups == 1 and math.prod(_output_size(x.shape[1:3], (kh, kw), strides, pads)) <= SMALL_OUTPUT:
        return patches(x, kernel, strides, pads)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(strides, strides), padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )
