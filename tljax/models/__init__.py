"""Model registry: `create(name, num_classes)` builds a backbone + head `Classifier`.

Each family file (resnet, efficientnet, vgg, vit, convnext) holds one architecture and its presets, and its
backbone says in which order its modules lie (`depth_order`, for layer-wise learning-rate decay) and what its stages
are (`unfreeze_stages`, for gradual unfreezing); this module only looks names up.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Sequence

import jax.numpy as jnp

from tljax.models import convnext, efficientnet, resnet, vgg, vit
from tljax.models.head import Classifier, Head

FAMILIES: dict[str, ModuleType] = {"resnet": resnet, "efficientnet": efficientnet, "vgg": vgg, "vit": vit,
                                   "convnext": convnext}
_FAMILY_OF = {name: family for family, module in FAMILIES.items() for name in module.PRESETS}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def names() -> list[str]:
    """All model names `create` accepts."""
    return sorted(_FAMILY_OF)


def family(name: str) -> str:
    """The family ("resnet", "efficientnet", "vgg", "vit", "convnext") a model name belongs to; a clear error for
    unknown names."""
    if name not in _FAMILY_OF:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return _FAMILY_OF[name]


def create(
    name: str,
    num_classes: int,
    *,
    head_hidden: Sequence[int] = (),
    head_activation: str = "relu",
    head_dropout: float | None = None,
    dtype: str = "float32",
    bn_axis_name: str | None = None,
    **backbone_kwargs: Any,
) -> Classifier:
    """Builds `name`'s backbone with a fresh `Head` of `num_classes` outputs.

    `head_dropout=None` takes the family's default for that model (e.g. 0.2 for EfficientNet-B0, 0 for ResNet).
    `dtype` is the compute dtype ("float32" or "bfloat16"); parameters and BatchNorm statistics stay float32.
    `bn_axis_name`: the pmap axis BatchNorm averages batch statistics over (ignored by backbones without BN).
    `backbone_kwargs` go to the backbone (e.g. `style="keras"` for the Keras Applications layout).
    """
    module = FAMILIES[family(name)]
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if head_dropout is None:
        head_dropout = getattr(module, "HEAD_DROPOUT", {}).get(name, 0.0)
    preset = module.PRESETS[name]
    if bn_axis_name is not None and "bn_axis_name" in {f.name for f in dataclasses.fields(preset.func)}:
        backbone_kwargs["bn_axis_name"] = bn_axis_name
    backbone = preset(dtype=DTYPES[dtype], **backbone_kwargs)
    head = Head(num_classes, tuple(head_hidden), head_activation, head_dropout, dtype=DTYPES[dtype])
    return Classifier(backbone=backbone, head=head)


def layer_depths(model: Classifier) -> dict[str, int]:
    """Each top-level module's depth, for layer-wise learning-rate decay: {"backbone/stage1_block0": 1, ...,
    "head": D}.

    Depth counts blocks from the stem: the stem is at 0, each block (a ResNet residual block, an EfficientNet MBConv
    block, a VGG convolution, a ViT or ConvNeXt block) one deeper, in the order the image passes them, and the head is
    at the top depth D, together with the backbone's layers after its last block (EfficientNet's head_conv and
    head_bn, VGG's fc1 and fc2, the final LayerNorm of ViT and ConvNeXt). A ViT's stem is its embedding (patches,
    tokens, position embeddings); a ConvNeXt stage's downsampling shares its first block's depth. The backbone's
    `depth_order` defines its part.
    """
    order = model.backbone.depth_order()
    depths = {f"backbone/{name}": depth for depth, group in enumerate(order) for name in group}
    return {**depths, "head": len(order) - 1}


def unfreeze_stages(name: str) -> list[str]:
    """Model `name`'s stages from the stem up, each a regular expression over its backbone's top-level module names
    (matched whole), for gradual unfreezing (`config.unfreeze_schedule`); the stem opens with the first stage."""
    return create(name, 1).backbone.unfreeze_stages()


__all__ = ["Classifier", "Head", "create", "family", "layer_depths", "names", "unfreeze_stages"]
