"""ConvNeXt weight tables: timm `convnext_*`, torchvision `convnext_tiny..large` and Keras Applications
`ConvNeXtTiny..XLarge`.

All three hold the same layers (see `models.convnext`): the stem, per stage the downsampling (from the second stage)
and the blocks (depthwise conv, LayerNorm, two pointwise Linear/Dense layers, layer scale), the final LayerNorm and
the classifier. torchvision stores a block's layer scale as (C, 1, 1); Keras nests the stem and each downsampling in
a Sequential, whose layers the readers key as `sequential/layer/index`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from tljax.models.convnext import ConvNeXt
from tljax.pretrained.convert import Layer, WeightsMismatchError
from tljax.pretrained.mappings import Convention
from tljax.pretrained.prep import TIMM_BICUBIC, TORCHVISION

# A block's source names: (dw_conv, norm, fc1, fc2, gamma).
BlockNames = Callable[[int, int], tuple[str, str, str, str, str]]


def _table(backbone: ConvNeXt, stem: tuple[str, str], downsample: Callable[[int], tuple[str, str]],
           block: BlockNames, head: tuple[str, str], gamma: Callable[[np.ndarray], np.ndarray] | None = None
           ) -> Iterator[Layer]:
    """Stem conv/norm; per stage s (0-based) the downsampling norm/conv (s > 0) and the blocks; the final norm and
    the classifier. `downsample(s)` and `block(s, j)` name the source layers; `gamma` reshapes the layer scales."""
    yield Layer(stem[0], "backbone/stem_conv", "conv")
    yield Layer(stem[1], "backbone/stem_norm", "ln")
    for s, depth in enumerate(backbone.depths):
        if s > 0:
            norm, conv = downsample(s)
            yield Layer(norm, f"backbone/stage{s + 1}_downsample_norm", "ln")
            yield Layer(conv, f"backbone/stage{s + 1}_downsample_conv", "conv")
        for j in range(depth):
            dst = f"backbone/stage{s + 1}_block{j}"
            names = block(s, j)
            for name, role, kind in zip(names, ("dw_conv", "norm", "fc1", "fc2", "gamma"),
                                        ("conv", "ln", "dense", "dense", "param")):
                yield Layer(name, f"{dst}/{role}", kind, gamma if role == "gamma" else None)
    yield Layer(head[0], "backbone/head_norm", "ln")
    yield Layer(head[1], "head/out", "dense")


def timm(backbone: ConvNeXt) -> Iterator[Layer]:
    """timm `convnext_*` state dicts (`stem.0/1`, `stages.{s}.downsample.0/1`, `stages.{s}.blocks.{j}`, `head`)."""
    def block(s: int, j: int) -> tuple[str, str, str, str, str]:
        src = f"stages.{s}.blocks.{j}"
        return f"{src}.conv_dw", f"{src}.norm", f"{src}.mlp.fc1", f"{src}.mlp.fc2", f"{src}.gamma"

    return _table(backbone, ("stem.0", "stem.1"), lambda s: (f"stages.{s}.downsample.0", f"stages.{s}.downsample.1"),
                  block, ("head.norm", "head.fc"))


def torchvision(backbone: ConvNeXt) -> Iterator[Layer]:
    """torchvision `convnext_*` state dicts: `features.{2s+1}` holds stage s's blocks, `features.{2s}` its
    downsampling; a block is a Sequential (0 dw conv, 2 LayerNorm, 3 and 5 Linear) plus its `layer_scale`."""
    def block(s: int, j: int) -> tuple[str, str, str, str, str]:
        src = f"features.{2 * s + 1}.{j}"
        return f"{src}.block.0", f"{src}.block.2", f"{src}.block.3", f"{src}.block.5", f"{src}.layer_scale"

    return _table(backbone, ("features.0.0", "features.0.1"), lambda s: (f"features.{2 * s}.0", f"features.{2 * s}.1"),
                  block, ("classifier.0", "classifier.2"), gamma=lambda g: g.reshape(-1))


# Keras Applications names its ConvNeXt variants' layers after the model: (depths, widths) -> that name.
KERAS_NAMES = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny",
    ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
    ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
    ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large",
    ((3, 3, 27, 3), (256, 512, 1024, 2048)): "convnext_xlarge",
}


def keras(backbone: ConvNeXt) -> Iterator[Layer]:
    """Keras Applications `ConvNeXtTiny..XLarge`, in the order of the Keras model's `layers` (the stem and the
    downsamplings are nested Sequentials; the input Normalization holds no weights)."""
    name = KERAS_NAMES.get((tuple(backbone.depths), tuple(backbone.widths)))
    if name is None:
        raise WeightsMismatchError(f"Keras Applications has no ConvNeXt with {backbone.depths} blocks of widths "
                                   f"{backbone.widths}")

    def block(s: int, j: int) -> tuple[str, str, str, str, str]:
        src = f"{name}_stage_{s}_block_{j}"
        return (f"{src}_depthwise_conv", f"{src}_layernorm", f"{src}_pointwise_conv_1", f"{src}_pointwise_conv_2",
                f"{src}_layer_scale")

    def downsample(s: int) -> tuple[str, str]:
        group = f"{name}_downsampling_block_{s - 1}"
        return f"{group}/{name}_downsampling_layernorm_{s - 1}", f"{group}/{name}_downsampling_conv_{s - 1}"

    stem = f"{name}_stem"
    return _table(backbone, (f"{stem}/{stem}_conv", f"{stem}/{stem}_layernorm"), downsample, block,
                  (f"{name}_head_layernorm", f"{name}_head_dense"))


CONVENTIONS = (
    Convention("timm", "torch", r"^stages\.0\.blocks\.0\.conv_dw\.weight$", timm, {},
               lambda arrays, backbone: TIMM_BICUBIC),
    Convention("torchvision", "torch", r"^features\.1\.0\.block\.0\.weight$", torchvision, {},
               lambda arrays, backbone: TORCHVISION),
    # The model normalises its 0..255 input with ImageNet's mean and std (x * 255 scaled), as TORCHVISION does.
    Convention("keras", "keras", r"^convnext_[a-z]+_stem/convnext_[a-z]+_stem_conv/0$", keras, {},
               lambda arrays, backbone: TORCHVISION),
)
