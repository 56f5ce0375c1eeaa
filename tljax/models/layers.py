"""Building blocks shared by every model family: the convolution helper and BatchNorm.

All convolutions in tljax go through `Conv`/`conv2d`, so that the fastest way to compute each kind of convolution on
the current backend lives in one place and the model files only describe architecture.

Padding follows the framework the weights come from:
  * an int `p` is PyTorch's symmetric `padding=p`;
  * "SAME" is TensorFlow/Keras "same" padding (asymmetric for stride 2 on even inputs), which Flax/XLA "SAME" matches;
  * an explicit `((top, bottom), (left, right))` pair for anything else.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = str | int | Sequence[tuple[int, int]]
Dtype = Any

# He-normal over fan-out, the initialisation torchvision and Keras use for ImageNet convnets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _explicit_padding(padding: Padding) -> str | Sequence[tuple[int, int]]:
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: Padding = 0, groups: int = 1) -> jax.Array:
    """NHWC x HWIO convolution with PyTorch (int), TF ("SAME") or explicit padding.

    A 1x1 convolution without padding is a matrix product and is written as one (XLA's CPU matmul is several times
    faster than its convolution kernel for the same FLOPs, forward and backward; the numbers are identical).
    """
    kh, kw = kernel.shape[:2]
    pad = _explicit_padding(padding)
    if (kh, kw) == (1, 1) and groups == 1 and pad in ("SAME", "VALID", ((0, 0), (0, 0))):
        if strides > 1:
            x = x[:, ::strides, ::strides, :]
        return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


class Conv(nn.Module):
    """2D convolution over NHWC inputs; `groups == in_channels` makes it depthwise.

    Parameters are float32 ("kernel" HWIO with I = in_channels / groups, "bias"); the computation runs in `dtype`.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Padding = 0
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels are not divisible by groups={self.groups}")
        kernel = self.param("kernel", conv_init, (k, k, in_features // self.groups, self.features), jnp.float32)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding, self.groups)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def batch_norm(train: bool, epsilon: float, name: str | None = None, axis_name: str | None = None) -> nn.BatchNorm:
    """BatchNorm whose mode is given explicitly: batch statistics (and their update) only when `train` is true.

    The statistics and the normalisation run in float32 whatever the compute dtype (mixed precision keeps BN exact).
    `axis_name`: under `pmap`, the device axis over which batch statistics are averaged, so that data-parallel
    training normalises with the statistics of the whole global batch, as one device would.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=epsilon, dtype=jnp.float32, axis_name=axis_name,
        name=name,
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes, in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


max_pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
