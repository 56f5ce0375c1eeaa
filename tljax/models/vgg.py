"""VGG16 backbone (torchvision `vgg16` / Keras Applications `VGG16` layout: both compute the same network).

Five blocks of 3x3 convolutions (padding 1, bias, ReLU), each followed by a 2x2 max-pool. Two ways to end:

* `fc=False` (default): global average pooling of the last block -> 512 features. The Keras transfer-learning
  guide's recipe for putting a new head on VGG16, and far cheaper than the ImageNet classifier's 120M parameters.
* `fc=True`: the ImageNet classifier's hidden layers stay in the backbone: average pooling to a fixed 7x7 grid
  (PyTorch's AdaptiveAvgPool2d, the identity for 224x224 inputs), flatten in HWC order, then `fc1` and `fc2`
  (4096 units, ReLU, dropout 0.5 while training) -> 4096 features. The checkpoint's 1000-way layer is the head.

Parameter names: `block{1..5}_conv{i}`, `fc1`, `fc2` (Keras's layer names).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.layers import Conv, at_least_f32, global_avg_pool

# (width, number of 3x3 convs) per block: VGG's configuration "D".
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# The spatial grid the classifier's first layer reads (7x7 for a 224 input after five 2x2 max-pools).
POOLED = 7
MIN_SIZE = 32  # five 2x2 max-pools need at least 32 pixels for a non-empty feature map


def _adaptive_mean(x: jax.Array, axis: int, size: int) -> jax.Array:
    """PyTorch's adaptive average pooling along one axis: bin i averages [floor(i*n/size), ceil((i+1)*n/size))."""
    n = x.shape[axis]
    bins = [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
    return jnp.stack([jnp.mean(jax.lax.slice_in_dim(x, lo, hi, axis=axis), axis=axis) for lo, hi in bins], axis)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """NHWC -> (N, size, size, C), exactly as PyTorch's `AdaptiveAvgPool2d(size)` (a 2D bin mean is separable)."""
    return _adaptive_mean(_adaptive_mean(x, 1, size), 2, size)


class VGG(nn.Module):
    """Images (NHWC, at least 32x32) -> float32 features: 512 (`fc=False`) or `hidden` (`fc=True`)."""

    blocks: Sequence[tuple[int, int]]
    fc: bool = False
    hidden: int = 4096
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"VGG needs inputs of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {x.shape[1:3]}")
        for b, (width, convs) in enumerate(self.blocks):
            for i in range(convs):
                conv = Conv(width, 3, padding=1, use_bias=True, dtype=self.dtype, name=f"block{b + 1}_conv{i + 1}")
                x = nn.relu(conv(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        if not self.fc:
            return global_avg_pool(x)
        x = adaptive_avg_pool(x, POOLED)
        x = x.reshape(x.shape[0], -1)
        for name in ("fc1", "fc2"):
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name=name)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return at_least_f32(x)

    def depth_order(self) -> list[tuple[str, ...]]:
        """The top-level modules by depth, for layer-wise learning-rate decay (`models.layer_depths`): entry d names
        the modules at depth d. VGG has no stem: depth 0 is empty and each convolution is one deeper than the one
        before (block1_conv1 at 1); the last entry, the top depth that the head shares, holds fc1 and fc2 (with
        `fc`)."""
        convs = [(f"block{b + 1}_conv{i + 1}",) for b, (_, count) in enumerate(self.blocks) for i in range(count)]
        return [(), *convs, ("fc1", "fc2") if self.fc else ()]

    def unfreeze_stages(self) -> list[str]:
        """One regular expression over the top-level module names per block of convolutions, from the input up,
        for gradual unfreezing (`config.unfreeze_schedule`): block1 to block5, the last with fc1 and fc2 (which a
        model name does not say whether it has: they match nothing without `fc`)."""
        stages = [rf"block{b + 1}_conv\d+" for b in range(len(self.blocks))]
        return [*stages[:-1], stages[-1] + "|fc1|fc2"]


PRESETS = {"vgg16": functools.partial(VGG, blocks=VGG16_BLOCKS)}
