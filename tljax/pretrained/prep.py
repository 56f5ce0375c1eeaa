"""What input a set of pretrained weights expects, and the function that produces it.

`Preprocessing.normalize` maps RGB images with values in 0..255 (NHWC, any float array: numpy, jax or tf) to the
model's input: optional RGB->BGR, `x * scale`, then `(x - mean) / std` per channel. The input pipeline applies the
same object, and it is saved with a run so evaluation and prediction see identical inputs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keras "caffe" mode: BGR order, the ImageNet mean subtracted from 0..255 values, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Input convention of a set of weights.

    mean/std are per channel, in the model's channel order and after `scale`. `image_size` is the resolution the
    weights were trained at; evaluation resizes to `image_size / crop_fraction` and centre-crops `image_size`.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1 / 255
    bgr: bool = False
    image_size: int = 224
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"

    def normalize(self, images: Any) -> Any:
        """RGB images in 0..255 (..., H, W, 3) -> the model's input, in the array type given."""
        x = images[..., ::-1] if self.bgr else images
        mean = np.asarray(self.mean, np.float32)
        inv_std = np.asarray(1.0 / np.asarray(self.std, np.float64), np.float32)
        return (x * np.float32(self.scale) - mean) * inv_std

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        fields = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


TORCHVISION = Preprocessing()
# Google's TF EfficientNet(-Lite) checkpoints: inputs in [-1, 1], bicubic resize.
TF_INCEPTION = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
KERAS_CAFFE = Preprocessing(mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0), scale=1.0, bgr=True)
# Google's augreg ViTs, as timm and Google evaluate them: inputs in [-1, 1], bicubic, crop 0.9.
VIT_AUGREG = dataclasses.replace(TF_INCEPTION, crop_fraction=0.9)
# ImageNet mean/std with bicubic resizing: timm's ConvNeXt weights (crop 0.875), and DINOv2 (timm's pretrained
# config: no crop, at the 518 px it was trained at).
TIMM_BICUBIC = dataclasses.replace(TORCHVISION, interpolation="bicubic")
DINOV2 = dataclasses.replace(TIMM_BICUBIC, crop_fraction=1.0, image_size=518)
