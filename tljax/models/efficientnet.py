"""EfficientNet-B0..B7 and EfficientNet-Lite0..4 backbones, in the conventions their pretrained weights use.

Every variant scales one base network of seven stages of MBConv blocks (inverted residuals with depthwise convs):
width multiplies the channels (rounded to multiples of 8), depth the repeats per stage (rounded up). Lite variants
drop squeeze-excite, use ReLU6 instead of swish, keep the stem (32) and head (1280) widths, and do not scale the
repeats of the first and last stage (easier to quantise).

`style` is the framework the weights come from; it fixes padding and the BatchNorm epsilon:
  * "torch": timm `efficientnet_*`: PyTorch's symmetric padding k // 2, epsilon 1e-5;
  * "torchvision": the same, except that torchvision defines B5-B7 (ports of Google's TF weights) with epsilon 1e-3
    (`torchvision_bn_eps` in their presets);
  * "tf": Keras Applications, lukemelas `efficientnet_pytorch` / `efficientnet_lite_pytorch`, timm
    `tf_efficientnet_*`: TF "SAME" padding (asymmetric at stride 2), epsilon 1e-3.
Parameter names: `stem_conv`, `stem_bn`, `stage{1..7}_block{j}` (`expand_conv`, `expand_bn`, `dw_conv`, `dw_bn`,
`se_reduce`, `se_expand`, `project_conv`, `project_bn`), `head_conv`, `head_bn`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.layers import Conv, Padding, at_least_f32, batch_norm, global_avg_pool

STYLES = ("torch", "torchvision", "tf")


class Stage(NamedTuple):
    """One stage of the base network (B0 / Lite0): its blocks' expansion, kernel, first stride, width, repeats."""

    expand_ratio: int
    kernel_size: int
    strides: int
    features: int
    repeats: int


BASE_STAGES = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)
SE_RATIO = 0.25  # squeeze-excite width, relative to the block's input channels


class BlockSpec(NamedTuple):
    """One MBConv block of a scaled network, as the weight tables and the backbone both need it."""

    stage: int  # 0-based
    index: int  # 0-based, within the stage
    in_features: int
    features: int
    expand_ratio: int
    kernel_size: int
    strides: int
    se_features: int  # 0: no squeeze-excite
    drop_rate: float  # stochastic depth (training only)

    @property
    def hidden(self) -> int:
        return self.in_features * self.expand_ratio

    @property
    def name(self) -> str:
        """The block's module name in the backbone."""
        return f"stage{self.stage + 1}_block{self.index}"


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """`channels * width` rounded to the nearest multiple of `divisor`, never more than 10% below it."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0, 6)


def _padding(kernel_size: int, tf: bool) -> Padding:
    """TF "SAME" or PyTorch's symmetric k // 2 (the same at stride 1; at stride 2 TF pads more at the end)."""
    return "SAME" if tf else kernel_size // 2


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> [squeeze-excite] -> 1x1 project, + identity if shapes allow.

    With `expand_ratio == 1` there is no expand conv (the first stage). The residual branch is dropped per sample
    with probability `drop_rate` when training (stochastic depth, "dropout" RNG stream).
    """

    spec: BlockSpec
    activation: Callable[[jax.Array], jax.Array]
    tf_padding: bool
    bn_eps: float
    dtype: Any
    bn_axis_name: str | None
    trained_modules: frozenset[str] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        conv = functools.partial(Conv, dtype=self.dtype)
        norm = functools.partial(batch_norm, train, self.bn_eps, axis_name=self.bn_axis_name,
                                 trained_modules=self.trained_modules)

        y = x
        if spec.expand_ratio != 1:
            y = conv(spec.hidden, 1, name="expand_conv")(y)
            y = self.activation(norm("expand_bn")(y)).astype(self.dtype)
        pad = _padding(spec.kernel_size, self.tf_padding)
        y = conv(spec.hidden, spec.kernel_size, spec.strides, pad, groups=spec.hidden, name="dw_conv")(y)
        y = self.activation(norm("dw_bn")(y)).astype(self.dtype)
        if spec.se_features:
            s = jnp.mean(at_least_f32(y), axis=(1, 2), keepdims=True)
            s = self.activation(conv(spec.se_features, 1, use_bias=True, name="se_reduce")(s))
            s = nn.sigmoid(conv(spec.hidden, 1, use_bias=True, name="se_expand")(s))
            y = y * s.astype(self.dtype)
        y = norm("project_bn")(conv(spec.features, 1, name="project_conv")(y)).astype(self.dtype)

        if spec.strides != 1 or spec.in_features != spec.features:
            return y
        if train and spec.drop_rate > 0:
            keep = 1.0 - spec.drop_rate
            alive = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
            y = jnp.where(alive, y / keep, 0).astype(self.dtype)
        return x + y


class EfficientNet(nn.Module):
    """Images (NHWC) -> globally average-pooled features (1280 x width for B*, 1280 for Lite), float32.

    `native_size` is the resolution compound scaling pairs with this width and depth (what the pretrained weights
    were trained at); it does not change the computation.
    """

    width: float = 1.0
    depth: float = 1.0
    lite: bool = False
    native_size: int = 224
    style: str = "torch"
    drop_connect_rate: float = 0.2
    torchvision_bn_eps: float = 1e-5
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None  # the pmap axis to average BatchNorm batch statistics over
    trained_modules: frozenset[str] | None = None  # BatchNorm in training mode only there (layers.BatchNorm)

    @property
    def stem_features(self) -> int:
        return 32 if self.lite else round_channels(32, self.width)

    @property
    def head_features(self) -> int:
        return 1280 if self.lite else round_channels(1280, self.width)

    def blocks(self) -> list[BlockSpec]:
        """Every MBConv block of this variant, in order (stochastic-depth rate growing linearly from 0)."""
        last = len(BASE_STAGES) - 1
        repeats = [
            stage.repeats if self.lite and s in (0, last) else math.ceil(stage.repeats * self.depth)
            for s, stage in enumerate(BASE_STAGES)
        ]
        total = sum(repeats)
        specs, in_features = [], self.stem_features
        for s, (stage, count) in enumerate(zip(BASE_STAGES, repeats)):
            features = round_channels(stage.features, self.width)
            for j in range(count):
                se = 0 if self.lite else max(1, int(in_features * SE_RATIO))
                rate = self.drop_connect_rate * len(specs) / total
                strides = stage.strides if j == 0 else 1
                specs.append(BlockSpec(s, j, in_features, features, stage.expand_ratio, stage.kernel_size, strides,
                                       se, rate))
                in_features = features
        return specs

    @property
    def bn_eps(self) -> float:
        """BatchNorm epsilon of the framework the weights come from (see the module docstring)."""
        return {"torch": 1e-5, "torchvision": self.torchvision_bn_eps, "tf": 1e-3}[self.style]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.style not in STYLES:
            raise ValueError(f"unknown EfficientNet style {self.style!r}; choose one of {STYLES}")
        activation = _relu6 if self.lite else nn.silu
        tf = self.style == "tf"
        norm = functools.partial(batch_norm, train, self.bn_eps, axis_name=self.bn_axis_name,
                                 trained_modules=self.trained_modules)
        x = Conv(self.stem_features, 3, strides=2, padding=_padding(3, tf), dtype=self.dtype, name="stem_conv")(x)
        x = activation(norm("stem_bn")(x)).astype(self.dtype)
        for spec in self.blocks():
            x = MBConv(spec, activation, tf, self.bn_eps, self.dtype, self.bn_axis_name, self.trained_modules,
                       name=spec.name)(x, train)
        x = Conv(self.head_features, 1, dtype=self.dtype, name="head_conv")(x)
        x = activation(norm("head_bn")(x))
        return global_avg_pool(x)

    def depth_order(self) -> list[tuple[str, ...]]:
        """The top-level modules by depth, for layer-wise learning-rate decay (`models.layer_depths`): entry d names
        the modules at depth d. The stem is at 0, each MBConv block one deeper, in the order the image passes them;
        the last entry, the top depth that the head shares, holds the head convolution and its BatchNorm."""
        return [("stem_conv", "stem_bn"), *[(spec.name,) for spec in self.blocks()], ("head_conv", "head_bn")]

    def unfreeze_stages(self) -> list[str]:
        """One regular expression over the top-level module names per stage, from the stem up, for gradual
        unfreezing (`config.unfreeze_schedule`): stage1 (with the stem, so that opening every stage trains the
        whole backbone) to stage7 (with head_conv and head_bn, which come after it)."""
        stages = [rf"stage{s + 1}_block\d+" for s in range(len(BASE_STAGES))]
        return [r"stem_(?:conv|bn)|" + stages[0], *stages[1:-1], stages[-1] + r"|head_(?:conv|bn)"]


def _variant(width: float, depth: float, size: int, **kwargs: Any) -> Callable[..., EfficientNet]:
    return functools.partial(EfficientNet, width=width, depth=depth, native_size=size, **kwargs)


# (width, depth, native resolution) from the EfficientNet and EfficientNet-Lite papers / reference code.
PRESETS = {
    "efficientnet_b0": _variant(1.0, 1.0, 224),
    "efficientnet_b1": _variant(1.0, 1.1, 240),
    "efficientnet_b2": _variant(1.1, 1.2, 260),
    "efficientnet_b3": _variant(1.2, 1.4, 300),
    "efficientnet_b4": _variant(1.4, 1.8, 380),
    "efficientnet_b5": _variant(1.6, 2.2, 456, torchvision_bn_eps=1e-3),
    "efficientnet_b6": _variant(1.8, 2.6, 528, torchvision_bn_eps=1e-3),
    "efficientnet_b7": _variant(2.0, 3.1, 600, torchvision_bn_eps=1e-3),
    "efficientnet_lite0": _variant(1.0, 1.0, 224, lite=True),
    "efficientnet_lite1": _variant(1.0, 1.1, 240, lite=True),
    "efficientnet_lite2": _variant(1.1, 1.2, 260, lite=True),
    "efficientnet_lite3": _variant(1.2, 1.4, 280, lite=True),
    "efficientnet_lite4": _variant(1.4, 1.8, 300, lite=True),
}

# Dropout before the classifier in the reference training recipes.
HEAD_DROPOUT = {
    "efficientnet_b0": 0.2,
    "efficientnet_b1": 0.2,
    "efficientnet_b2": 0.3,
    "efficientnet_b3": 0.3,
    "efficientnet_b4": 0.4,
    "efficientnet_b5": 0.4,
    "efficientnet_b6": 0.5,
    "efficientnet_b7": 0.5,
    "efficientnet_lite0": 0.2,
    "efficientnet_lite1": 0.2,
    "efficientnet_lite2": 0.3,
    "efficientnet_lite3": 0.3,
    "efficientnet_lite4": 0.3,
}
