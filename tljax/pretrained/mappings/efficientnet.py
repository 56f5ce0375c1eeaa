"""EfficientNet(-Lite) weight tables: timm, torchvision, lukemelas `efficientnet_pytorch`, Keras Applications.

All conventions share one skeleton (stem, the MBConv blocks in order, head conv, classifier) and differ only in
their names, so each is written as a naming function for one block; `_table` walks the backbone's blocks.
Block roles, in the order every source defines them: expand conv/BN (absent when the expansion ratio is 1),
depthwise conv/BN, squeeze-excite reduce/expand (absent in Lite), project conv/BN.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from tljax.models.efficientnet import BlockSpec, EfficientNet
from tljax.pretrained.convert import Layer, WeightsMismatchError
from tljax.pretrained.mappings import Convention
from tljax.pretrained.prep import IMAGENET_STD, TF_INCEPTION, TORCHVISION, Preprocessing

KINDS = {
    "expand_conv": "conv",
    "expand_bn": "bn",
    "dw_conv": "conv",
    "dw_bn": "bn",
    "se_reduce": "conv",
    "se_expand": "conv",
    "project_conv": "conv",
    "project_bn": "bn",
}
BlockNames = Callable[[int, BlockSpec], dict[str, str]]


def _roles(spec: BlockSpec) -> list[str]:
    """The roles present in a block, in source order."""
    roles = list(KINDS)
    if spec.expand_ratio == 1:
        roles = [role for role in roles if not role.startswith("expand_")]
    if not spec.se_features:
        roles = [role for role in roles if not role.startswith("se_")]
    return roles


def _table(
    backbone: EfficientNet,
    stem: tuple[str, str],
    block_names: BlockNames,
    head: tuple[str, str],
    classifier: str,
    depthwise_kind: str = "conv",
) -> Iterator[Layer]:
    """Stem conv/BN, every block's layers (named by `block_names(global index, spec)`), head conv/BN, classifier."""
    yield Layer(stem[0], "backbone/stem_conv", "conv")
    yield Layer(stem[1], "backbone/stem_bn", "bn")
    for n, spec in enumerate(backbone.blocks()):
        names = block_names(n, spec)
        for role in _roles(spec):
            kind = depthwise_kind if role == "dw_conv" else KINDS[role]
            yield Layer(names[role], f"backbone/{spec.name}/{role}", kind)
    yield Layer(head[0], "backbone/head_conv", "conv")
    yield Layer(head[1], "backbone/head_bn", "bn")
    yield Layer(classifier, "head/out", "dense")


def _timm_block(n: int, spec: BlockSpec) -> dict[str, str]:
    # timm's first stage is a DepthwiseSeparableConv (dw, se, pw); the others are InvertedResiduals (pw, dw, se, pwl).
    if spec.expand_ratio == 1:
        names = {"dw_conv": "conv_dw", "dw_bn": "bn1", "project_conv": "conv_pw", "project_bn": "bn2"}
    else:
        names = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
                 "project_conv": "conv_pwl", "project_bn": "bn3"}
    names.update(se_reduce="se.conv_reduce", se_expand="se.conv_expand")
    return {role: f"blocks.{spec.stage}.{spec.index}.{name}" for role, name in names.items()}


def timm(backbone: EfficientNet) -> Iterator[Layer]:
    """timm `efficientnet_*` / `tf_efficientnet_*` (and `*_lite*`) state dicts."""
    return _table(backbone, ("conv_stem", "bn1"), _timm_block, ("conv_head", "bn2"), "classifier")


def _torchvision_block(n: int, spec: BlockSpec) -> dict[str, str]:
    # `block` is a Sequential of the present units: conv+BN pairs (`K.0`, `K.1`) and the SE module (`fc1`, `fc2`).
    roles = _roles(spec)
    units = [roles[i:i + 2] for i in range(0, len(roles), 2)]
    prefix = f"features.{spec.stage + 1}.{spec.index}.block"
    names = {}
    for k, (first, second) in enumerate(units):
        a, b = ("fc1", "fc2") if first == "se_reduce" else ("0", "1")
        names[first], names[second] = f"{prefix}.{k}.{a}", f"{prefix}.{k}.{b}"
    return names


def torchvision(backbone: EfficientNet) -> Iterator[Layer]:
    """torchvision `efficientnet_b0..b7` state dicts (`features.0` stem, `features.1..7` stages, `features.8` head)."""
    last = f"features.{backbone.blocks()[-1].stage + 2}"
    return _table(backbone, ("features.0.0", "features.0.1"), _torchvision_block, (f"{last}.0", f"{last}.1"),
                  "classifier.1")


_LUKEMELAS_BLOCK = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "dw_conv": "_depthwise_conv",
    "dw_bn": "_bn1",
    "se_reduce": "_se_reduce",
    "se_expand": "_se_expand",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}


def lukemelas(backbone: EfficientNet) -> Iterator[Layer]:
    """lukemelas `efficientnet_pytorch` (B0..B7), `efficientnet_lite_pytorch` (Lite0..4): blocks numbered globally."""
    def block(n: int, spec: BlockSpec) -> dict[str, str]:
        return {role: f"_blocks.{n}.{name}" for role, name in _LUKEMELAS_BLOCK.items()}

    return _table(backbone, ("_conv_stem", "_bn0"), block, ("_conv_head", "_bn1"), "_fc")


# Keras names a block's layers `block2b_<role>`, with two roles spelled differently.
_KERAS_SPELLING = {"dw_conv": "dwconv", "dw_bn": "bn"}


def keras(backbone: EfficientNet) -> Iterator[Layer]:
    """Keras Applications `EfficientNetB0..B7`, in the order of the Keras model's `layers` (blocks `block2b_...`)."""
    def block(n: int, spec: BlockSpec) -> dict[str, str]:
        prefix = f"block{spec.stage + 1}{chr(ord('a') + spec.index)}_"
        return {role: prefix + _KERAS_SPELLING.get(role, role) for role in KINDS}

    yield Layer("normalization", "prep", "prep")  # mean / variance of the input, read by `_keras_prep`
    yield from _table(backbone, ("stem_conv", "stem_bn"), block, ("top_conv", "top_bn"), "predictions", "dwconv")


def _at_native_size(base: Preprocessing, backbone: EfficientNet) -> Preprocessing:
    """`base` at the variant's resolution, evaluated as Google's reference does: bicubic, crop = size / (size + 32)."""
    size = backbone.native_size
    return dataclasses.replace(base, image_size=size, crop_fraction=size / (size + 32), interpolation="bicubic")


def _imagenet_prep(arrays: dict[str, np.ndarray], backbone: EfficientNet) -> Preprocessing:
    """PyTorch-trained weights (timm, torchvision): ImageNet mean/std."""
    return _at_native_size(TORCHVISION, backbone)


def _tf_prep(arrays: dict[str, np.ndarray], backbone: EfficientNet) -> Preprocessing:
    """Google's TF checkpoints: B0..B7 expect ImageNet mean/std, the Lite models inputs in [-1, 1]."""
    return _at_native_size(TF_INCEPTION if backbone.lite else TORCHVISION, backbone)


def _keras_prep(arrays: dict[str, np.ndarray], backbone: EfficientNet) -> Preprocessing:
    """The model's own Rescaling(1/255) + Normalization(mean, variance), read from the file."""
    if "normalization/0" not in arrays or "normalization/1" not in arrays:
        raise WeightsMismatchError("a Keras EfficientNet file without its `normalization` layer (mean, variance)")
    mean = np.asarray(arrays["normalization/0"], np.float64).reshape(-1)
    variance = np.asarray(arrays["normalization/1"], np.float64).reshape(-1)
    std = np.maximum(np.sqrt(variance), 1e-7)  # Keras divides by max(sqrt(variance), epsilon)
    if np.allclose(variance, IMAGENET_STD, rtol=1e-3):
        # Keras's released ImageNet files store the ImageNet *standard deviation* as the Normalization's variance,
        # so their model divides by sqrt(std) only; Keras builds it with a second Rescaling(1 / sqrt(std)) that is
        # in no file. Folding that in makes the whole (x/255 - mean) / std.
        std = std * np.sqrt(IMAGENET_STD)
    base = Preprocessing(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), scale=1 / 255)
    return _at_native_size(base, backbone)


CONVENTIONS = (
    Convention("timm", "torch", r"^blocks\.0\.0\.conv_dw\.weight$", timm, {"style": "torch"}, _imagenet_prep),
    # timm's ports of Google's TF weights: the same names, so never detected; chosen with convention="timm_tf".
    Convention("timm_tf", "torch", None, timm, {"style": "tf"}, _tf_prep),
    Convention("torchvision", "torch", r"^features\.1\.0\.block\.0\.0\.weight$", torchvision,
               {"style": "torchvision"}, _imagenet_prep),
    Convention("lukemelas", "torch", r"^_conv_stem\.weight$", lukemelas, {"style": "tf"}, _tf_prep),
    Convention("keras", "keras", r"^stem_conv/0$", keras, {"style": "tf"}, _keras_prep),
)
