"""Test-time augmentation (TTA) for `tljax.evaluate` and `tljax.predict` (`--tta=flip`, `--tta=flip,crops5`): the
model sees several views of each image and its softmax is averaged over them.

Views, from the decoded image and the run's evaluation geometry (size S, crop fraction f, resize method):
- none (`--tta=`): the evaluation transform's single view: the shorter side resized to round(S / f), aspect ratio
  kept, and the central S x S crop.
- "crops5": five S x S crops of that same resized image instead of the central one (torchvision's / timm's FiveCrop):
  top left, top right, bottom left, bottom right, centre (the last equals the evaluation view). With f = 1 and a
  square image the five crops coincide: pick f < 1 (the usual 0.875) for crops that differ.
- "flip": adds the horizontal mirror image of every view above (2 views, or 10 with crops5, torchvision's TenCrop).
Each view is normalised as the run normalises its inputs; probabilities are averaged with equal weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from tljax.data import transforms

NAMES = ("flip", "crops5")
FIVE_CROPS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


class TTAError(ValueError):
    """A TTA name that does not exist."""


def parse(spec: str, field: str = "--tta") -> tuple[str, ...]:
    """The views named in `spec` ("", "flip", "crops5", "flip,crops5" in any order) in NAMES order; raises TTAError
    naming `field` and the accepted values for anything else."""
    names = [name.strip() for name in spec.split(",")] if spec.strip() else []
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise TTAError(f"{field}={spec!r}: unknown test-time augmentation {unknown[0]!r}; accepted: a comma-separated "
                       f"list of {', '.join(NAMES)} (or '' for none)")
    return tuple(name for name in NAMES if name in names)


def count(names: Sequence[str]) -> int:
    """How many views `names` give each image."""
    return (5 if "crops5" in names else 1) * (2 if "flip" in names else 1)


def views(image: tf.Tensor, names: Sequence[str], size: int, crop_fraction: float, method: str) -> tf.Tensor:
    """The views of one decoded image (uint8 or float [H, W, 3]): float32 [count(names), size, size, 3] in 0..255,
    crops first (in FIVE_CROPS order), then their mirror images."""
    resized = transforms.resize_for_crop(image, size, crop_fraction, method)
    out = [transforms.crop(resized, size, where) for where in (FIVE_CROPS if "crops5" in names else ("center",))]
    if "flip" in names:
        out += [tf.image.flip_left_right(view) for view in out]
    return tf.stack(out)


def mean_probabilities(logits: np.ndarray, num_views: int) -> np.ndarray:
    """Logits [N * num_views, classes], each example's views in consecutive rows -> the softmax averaged over each
    example's views, float64 [N, classes]."""
    logits = np.asarray(logits, np.float64).reshape(-1, num_views, logits.shape[-1])
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    return probabilities.mean(1)
