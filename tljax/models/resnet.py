"""ResNet-18/34/50/101/152 backbones in the two layouts ImageNet weights come in.

* `style="torch"`: torchvision / timm (ResNet v1.5): the stride of a bottleneck sits on its 3x3 conv, convolutions
  have no bias, BatchNorm epsilon 1e-5.
* `style="keras"`: Keras Applications ResNet50/101/152 (v1): the stride sits on the first 1x1 conv, every
  convolution has a bias, BatchNorm epsilon 1.001e-5.

Both pad like their source (PyTorch's symmetric padding=3 on the 7x7 stem; Keras's ZeroPadding2D(3) is the same).
Parameter names: `stem_conv`, `stem_bn`, `stage{1..4}_block{i}` with `conv1..3`, `bn1..3`, `proj_conv`, `proj_bn`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.layers import Conv, batch_norm, global_avg_pool, max_pool

STYLES = ("torch", "keras")


class Block(nn.Module):
    """A residual block: basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 with 4x expansion)."""

    width: int
    strides: int
    bottleneck: bool
    style: str
    dtype: Any
    bn_axis_name: str | None
    trained_modules: frozenset[str] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        keras = self.style == "keras"
        conv = functools.partial(Conv, use_bias=keras, dtype=self.dtype)
        norm = functools.partial(batch_norm, train, 1.001e-5 if keras else 1e-5, axis_name=self.bn_axis_name,
                                 trained_modules=self.trained_modules)
        out_features = self.width * (4 if self.bottleneck else 1)

        if self.bottleneck:
            # v1.5 (torch) strides the 3x3 conv; v1 (keras) strides the first 1x1.
            s1, s2 = (self.strides, 1) if keras else (1, self.strides)
            y = nn.relu(norm("bn1")(conv(self.width, 1, strides=s1, name="conv1")(x)))
            y = nn.relu(norm("bn2")(conv(self.width, 3, strides=s2, padding=1, name="conv2")(y)))
            y = norm("bn3")(conv(out_features, 1, name="conv3")(y))
        else:
            y = nn.relu(norm("bn1")(conv(self.width, 3, strides=self.strides, padding=1, name="conv1")(x)))
            y = norm("bn2")(conv(self.width, 3, padding=1, name="conv2")(y))

        if self.strides != 1 or x.shape[-1] != out_features:
            x = norm("proj_bn")(conv(out_features, 1, strides=self.strides, name="proj_conv")(x))
        return nn.relu(x + y).astype(self.dtype)


class ResNet(nn.Module):
    """Images (NHWC) -> globally average-pooled features (2048 for bottleneck ResNets, 512 otherwise)."""

    stage_sizes: Sequence[int]
    bottleneck: bool
    style: str = "torch"
    width: int = 64
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None  # the pmap axis to average BatchNorm batch statistics over
    trained_modules: frozenset[str] | None = None  # BatchNorm in training mode only there (layers.BatchNorm)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.style not in STYLES:
            raise ValueError(f"unknown ResNet style {self.style!r}; choose one of {STYLES}")
        if self.style == "keras" and not self.bottleneck:
            raise ValueError("Keras Applications has no ResNet-18/34; use style='torch'")
        keras = self.style == "keras"
        x = Conv(self.width, 7, strides=2, padding=3, use_bias=keras, dtype=self.dtype, name="stem_conv")(x)
        stem_bn = batch_norm(train, 1.001e-5 if keras else 1e-5, "stem_bn", self.bn_axis_name, self.trained_modules)
        x = nn.relu(stem_bn(x)).astype(self.dtype)
        # PyTorch pads the max-pool with -inf, Keras with zeros; after the ReLU both give the same maxima.
        x = max_pool(x, ((1, 1), (1, 1)))
        for s, size in enumerate(self.stage_sizes):
            for b in range(size):
                strides = 2 if s > 0 and b == 0 else 1
                block = Block(self.width * 2**s, strides, self.bottleneck, self.style, self.dtype, self.bn_axis_name,
                              self.trained_modules, name=f"stage{s + 1}_block{b}")
                x = block(x, train)
        return global_avg_pool(x)

    def depth_order(self) -> list[tuple[str, ...]]:
        """The top-level modules by depth, for layer-wise learning-rate decay (`models.layer_depths`): entry d names
        the modules at depth d. The stem is at 0, each residual block one deeper, in the order the image passes
        them; the last entry, the top depth that the head shares, holds no ResNet module (pooling has no weights)."""
        blocks = [(f"stage{s + 1}_block{b}",) for s, size in enumerate(self.stage_sizes) for b in range(size)]
        return [("stem_conv", "stem_bn"), *blocks, ()]

    def unfreeze_stages(self) -> list[str]:
        """One regular expression over the top-level module names per stage, from the stem up, for gradual
        unfreezing (`config.unfreeze_schedule`): stage1 (with the stem, so that opening every stage trains the
        whole backbone), stage2, ..."""
        stages = [rf"stage{s + 1}_block\d+" for s in range(len(self.stage_sizes))]
        return [r"stem_(?:conv|bn)|" + stages[0], *stages[1:]]


PRESETS = {
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=False),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True),
    "resnet101": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), bottleneck=True),
    "resnet152": functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), bottleneck=True),
    # Two stages of one basic block, 8 channels wide: compiles in a second, for tests and smoke runs.
    "resnet_tiny": functools.partial(ResNet, stage_sizes=(1, 1), bottleneck=False, width=8),
}
