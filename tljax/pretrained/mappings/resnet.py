"""ResNet weight tables: torchvision/timm state dicts and Keras Applications (ResNet50/101/152)."""

from __future__ import annotations

from typing import Iterator

from tljax.models.resnet import ResNet
from tljax.pretrained.convert import Layer
from tljax.pretrained.mappings import Convention
from tljax.pretrained.prep import KERAS_CAFFE, TORCHVISION


def _has_projection(backbone: ResNet, stage: int, block: int) -> bool:
    return block == 0 and (stage > 0 or backbone.bottleneck)


def torchvision(backbone: ResNet) -> Iterator[Layer]:
    """torchvision `resnetNN` / timm `resnetNN.*` state dicts (identical names)."""
    yield Layer("conv1", "backbone/stem_conv", "conv")
    yield Layer("bn1", "backbone/stem_bn", "bn")
    convs = 3 if backbone.bottleneck else 2
    for s, size in enumerate(backbone.stage_sizes):
        for b in range(size):
            src, dst = f"layer{s + 1}.{b}", f"backbone/stage{s + 1}_block{b}"
            for i in range(1, convs + 1):
                yield Layer(f"{src}.conv{i}", f"{dst}/conv{i}", "conv")
                yield Layer(f"{src}.bn{i}", f"{dst}/bn{i}", "bn")
            if _has_projection(backbone, s, b):
                yield Layer(f"{src}.downsample.0", f"{dst}/proj_conv", "conv")
                yield Layer(f"{src}.downsample.1", f"{dst}/proj_bn", "bn")
    yield Layer("fc", "head/out", "dense")


def keras(backbone: ResNet) -> Iterator[Layer]:
    """Keras Applications `ResNet50/101/152`, in the order of the Keras model's `layers`."""
    yield Layer("conv1_conv", "backbone/stem_conv", "conv")
    yield Layer("conv1_bn", "backbone/stem_bn", "bn")
    for s, size in enumerate(backbone.stage_sizes):
        for b in range(size):
            src, dst = f"conv{s + 2}_block{b + 1}", f"backbone/stage{s + 1}_block{b}"
            for i in (1, 2):
                yield Layer(f"{src}_{i}_conv", f"{dst}/conv{i}", "conv")
                yield Layer(f"{src}_{i}_bn", f"{dst}/bn{i}", "bn")
            if _has_projection(backbone, s, b):  # Keras orders the two branches' layers by graph depth
                yield Layer(f"{src}_0_conv", f"{dst}/proj_conv", "conv")
                yield Layer(f"{src}_3_conv", f"{dst}/conv3", "conv")
                yield Layer(f"{src}_0_bn", f"{dst}/proj_bn", "bn")
                yield Layer(f"{src}_3_bn", f"{dst}/bn3", "bn")
            else:
                yield Layer(f"{src}_3_conv", f"{dst}/conv3", "conv")
                yield Layer(f"{src}_3_bn", f"{dst}/bn3", "bn")
    yield Layer("predictions", "head/out", "dense")


CONVENTIONS = (
    Convention("torchvision", "torch", r"^layer1\.0\.conv1\.weight$", torchvision, {"style": "torch"},
               lambda arrays, backbone: TORCHVISION),
    Convention("keras", "keras", r"^conv1_conv/0$", keras, {"style": "keras"},
               lambda arrays, backbone: KERAS_CAFFE),
)
