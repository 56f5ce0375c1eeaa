"""ConvNeXt-T/S/B/L/XL backbones (timm, torchvision and Keras Applications weights: the same network in all three).

    stem: 4x4 convolution, stride 4 -> LayerNorm
    stage s = 1..4: [s > 1: LayerNorm -> 2x2 convolution, stride 2 (downsampling)] -> blocks of
        x + gamma * fc2(gelu(fc1(norm(dw_conv(x)))))   (7x7 depthwise convolution; fc1 widens 4x)
    global average pooling -> LayerNorm (head_norm): the features

LayerNorms normalise each pixel's channels (epsilon 1e-6) and run in float32 (float64 for float64 inputs) whatever
the compute dtype, as does the residual stream; parameters are float32. Stochastic depth grows linearly from 0 at
the first block to `drop_path_rate` at the last (training mode only).
Parameter names: `stem_conv`, `stem_norm`, `stage{s}_downsample_norm`, `stage{s}_downsample_conv`,
`stage{s}_block{j}` (`dw_conv`, `norm`, `fc1`, `fc2`, `gamma`), `head_norm`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.layers import Conv, Dense, drop_path, global_avg_pool, layer_norm

EPS = 1e-6
LAYER_SCALE_INIT = 1e-6
MIN_SIZE = 32  # the stem and three downsamplings divide the image by 32


class Block(nn.Module):
    """A ConvNeXt block: depthwise 7x7 -> LayerNorm -> 4x MLP (exact GELU) -> layer scale, plus the identity."""

    drop_rate: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        y = Conv(c, 7, padding=3, groups=c, use_bias=True, dtype=self.dtype, name="dw_conv")(x)
        y = Dense(4 * c, dtype=self.dtype, name="fc1")(layer_norm(EPS, "norm")(y))
        y = Dense(c, dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))
        y = y * self.param("gamma", nn.initializers.constant(LAYER_SCALE_INIT), (c,), jnp.float32)
        return x + drop_path(self, y, self.drop_rate, train)


class ConvNeXt(nn.Module):
    """Images (NHWC, at least 32x32) -> normalised, globally average-pooled features (widths[-1]), float32."""

    depths: Sequence[int]
    widths: Sequence[int]
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"ConvNeXt needs inputs of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {x.shape[1:3]}")
        x = Conv(self.widths[0], 4, strides=4, use_bias=True, dtype=self.dtype, name="stem_conv")(x)
        x = layer_norm(EPS, "stem_norm")(x)
        rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)))
        for s, (depth, width) in enumerate(zip(self.depths, self.widths)):
            if s > 0:
                x = layer_norm(EPS, f"stage{s + 1}_downsample_norm")(x)
                x = Conv(width, 2, strides=2, use_bias=True, dtype=self.dtype, name=f"stage{s + 1}_downsample_conv")(x)
            for j in range(depth):
                x = Block(float(next(rates)), self.dtype, name=f"stage{s + 1}_block{j}")(x, train)
        return layer_norm(EPS, "head_norm")(global_avg_pool(x))

    def depth_order(self) -> list[tuple[str, ...]]:
        """The top-level modules by depth, for layer-wise learning-rate decay (`models.layer_depths`): the stem at 0,
        each block one deeper in the order the image passes them, a stage's downsampling layers with its first
        block, and the final LayerNorm at the top depth, which the head shares."""
        order = [("stem_conv", "stem_norm")]
        for s, depth in enumerate(self.depths):
            for j in range(depth):
                down = (f"stage{s + 1}_downsample_norm", f"stage{s + 1}_downsample_conv") if s > 0 and j == 0 else ()
                order.append((*down, f"stage{s + 1}_block{j}"))
        return [*order, ("head_norm",)]

    def unfreeze_stages(self) -> list[str]:
        """One regular expression over the top-level module names per stage, from the stem up, for gradual
        unfreezing (`config.unfreeze_schedule`): stage1 (with the stem) to stage4 (with head_norm)."""
        stages = [rf"stage{s + 1}_\w+" for s in range(len(self.depths))]
        return [r"stem_(?:conv|norm)|" + stages[0], *stages[1:-1], stages[-1] + "|head_norm"]


def _variant(depths: Sequence[int], widths: Sequence[int]) -> functools.partial:
    return functools.partial(ConvNeXt, depths=tuple(depths), widths=tuple(widths))


# (blocks per stage, widths per stage) from the ConvNeXt paper.
PRESETS = {
    "convnext_tiny": _variant((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": _variant((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": _variant((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": _variant((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": _variant((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
