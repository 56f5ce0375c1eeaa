"""VGG16 weight tables: torchvision `vgg16` state dicts and Keras Applications `VGG16`.

The classifier's hidden layers (torchvision `classifier.0/3`, Keras `fc1/fc2`) fill the backbone's `fc1/fc2` when
it is built with `fc=True`. Without them (`fc=False`, a new head on pooled features) they are listed under `head/`:
they belong to the checkpoint's classifier, which the loader reads past when it puts a new head on the backbone.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from tljax.models.vgg import POOLED, VGG
from tljax.pretrained.convert import Layer, Transform
from tljax.pretrained.mappings import Convention
from tljax.pretrained.prep import KERAS_CAFFE, TORCHVISION


def _chw_linear_to_hwc_kernel(weight: np.ndarray) -> np.ndarray:
    """torchvision's first classifier layer, (out, C*7*7) over a CHW flatten -> a Dense kernel over an HWC flatten."""
    out = weight.shape[0]
    return weight.reshape(out, -1, POOLED, POOLED).transpose(2, 3, 1, 0).reshape(-1, out)


def _blocks(backbone: VGG) -> Iterator[list[str]]:
    """The Flax names of each block's convolutions."""
    for b, (_, convs) in enumerate(backbone.blocks):
        yield [f"block{b + 1}_conv{i + 1}" for i in range(convs)]


def _classifier(
    backbone: VGG, fc1: str, fc2: str, out: str, fc1_transform: Transform | None = None
) -> Iterator[Layer]:
    """The checkpoint's classifier: hidden layers in the backbone (fc=True) or read past with the head, then out."""
    where = "backbone" if backbone.fc else "head"
    yield Layer(fc1, f"{where}/fc1", "dense", fc1_transform)
    yield Layer(fc2, f"{where}/fc2", "dense")
    yield Layer(out, "head/out", "dense")


def torchvision(backbone: VGG) -> Iterator[Layer]:
    """torchvision `vgg16` state dicts: `features.N` (each conv, ReLU and max-pool takes an index), `classifier.K`."""
    index = 0
    for names in _blocks(backbone):
        for name in names:
            yield Layer(f"features.{index}", f"backbone/{name}", "conv")
            index += 2  # the conv and its ReLU
        index += 1  # the block's max-pool
    yield from _classifier(backbone, "classifier.0", "classifier.3", "classifier.6", _chw_linear_to_hwc_kernel)


def keras(backbone: VGG) -> Iterator[Layer]:
    """Keras Applications `VGG16`, in the order of the Keras model's `layers` (its kernels are already HWC)."""
    for names in _blocks(backbone):
        yield from (Layer(name, f"backbone/{name}", "conv") for name in names)
    yield from _classifier(backbone, "fc1", "fc2", "predictions")


CONVENTIONS = (
    Convention("torchvision", "torch", r"^features\.0\.weight$", torchvision, {},
               lambda arrays, backbone: TORCHVISION, classifier_kwargs={"fc": True}),
    Convention("keras", "keras", r"^block1_conv1/0$", keras, {},
               lambda arrays, backbone: KERAS_CAFFE, classifier_kwargs={"fc": True}),
)
