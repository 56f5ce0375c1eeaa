"""The normalization strategies, as pure functions on tf tensors, and the training-set statistics they use.

`config.data.normalization` names one strategy; x is an RGB image (H, W, 3) with values 0..255 at the model's input
resolution, X_train all training images the same way (eval transform, before augmentation):

    pretrained          prep.normalize(x): what the loaded weights expect (mean/std, [-1, 1], caffe BGR, ...)
    minmax_train        (x - min(X_train)) / max(max(X_train) - min(X_train), EPS)
    standardize_train   (x - mean(X_train)) / max(std(X_train), EPS)
    minmax_sample       (x - min(x)) / max(max(x) - min(x), EPS)        over the whole image (all channels)
    standardize_sample  (x - mean(x)) / max(std(x), EPS)                 over the whole image (all channels)
    none                x

Training statistics are per channel ("channel" scope, default) or over all channels ("global"); std is the
population standard deviation. They are computed once, from the train split only, and saved as JSON in the workdir
(`save`/`load`) beside the settings they depend on, so evaluation, prediction and resumed runs reuse them.
EPS keeps constant images and channels from dividing by zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import numpy as np
import tensorflow as tf

STRATEGIES = ("pretrained", "minmax_train", "standardize_train", "minmax_sample", "standardize_sample", "none")
TRAIN_STRATEGIES = ("minmax_train", "standardize_train")
SCOPES = ("channel", "global")
EPS = 1e-6
FILENAME = "normalization.json"

_IMAGE_AXES = (-3, -2, -1)


@dataclasses.dataclass(frozen=True)
class Stats:
    """Pixel statistics of the training split (0..255 scale): one value per channel, or one for all channels.

    count: the number of values each statistic summarises (pixels per channel, or all values for "global").
    """

    count: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]

    def scoped(self, scope: str) -> Stats:
        """These per-channel statistics, or the exact statistics of all channels together for scope "global"."""
        if scope == "channel" or len(self.mean) == 1:
            return self
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        total_mean = float(mean.mean())  # every channel has the same count
        total_var = float(np.mean(std**2 + mean**2) - total_mean**2)
        return Stats(self.count * len(mean), (total_mean,), (float(np.sqrt(max(total_var, 0.0))),),
                     (min(self.min),), (max(self.max),))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Stats:
        return cls(int(fields["count"]), *(tuple(float(v) for v in fields[k]) for k in ("mean", "std", "min", "max")))


class StatsAccumulator:
    """Streaming per-channel count, mean, variance (Chan et al.'s pairwise update), min and max in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = self.m2 = self.min = self.max = None

    def update(self, images: np.ndarray) -> None:
        """Adds a batch of images [..., C] (values in any range)."""
        x = np.asarray(images, np.float64).reshape(-1, np.shape(images)[-1])
        if not len(x):
            return
        n, mean = len(x), x.mean(axis=0)
        m2 = np.square(x - mean).sum(axis=0)
        if self.count == 0:
            self.count, self.mean, self.m2, self.min, self.max = n, mean, m2, x.min(axis=0), x.max(axis=0)
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.min, self.max = np.minimum(self.min, x.min(axis=0)), np.maximum(self.max, x.max(axis=0))
        self.count = total

    def result(self) -> Stats:
        if self.count == 0:
            raise ValueError("no pixels to compute statistics from")
        as_tuple = lambda a: tuple(float(v) for v in a)  # noqa: E731
        return Stats(self.count, as_tuple(self.mean), as_tuple(np.sqrt(self.m2 / self.count)),
                     as_tuple(self.min), as_tuple(self.max))


def compute_stats(batches: Iterable[np.ndarray]) -> Stats:
    """Per-channel statistics of all images in `batches` (arrays [B, H, W, C]), in one streaming pass."""
    acc = StatsAccumulator()
    for images in batches:
        acc.update(images)
    return acc.result()


def minmax(x: tf.Tensor, lo: Any, hi: Any) -> tf.Tensor:
    """(x - lo) / max(hi - lo, EPS), lo and hi broadcast over the last axis."""
    lo = np.asarray(lo, np.float64)
    scale = 1.0 / np.maximum(np.asarray(hi, np.float64) - lo, EPS)
    return (x - lo.astype(np.float32)) * scale.astype(np.float32)


def standardize(x: tf.Tensor, mean: Any, std: Any) -> tf.Tensor:
    """(x - mean) / max(std, EPS), mean and std broadcast over the last axis."""
    scale = 1.0 / np.maximum(np.asarray(std, np.float64), EPS)
    return (x - np.asarray(mean, np.float32)) * scale.astype(np.float32)


def minmax_sample(x: tf.Tensor) -> tf.Tensor:
    """Each image (the last three axes) scaled to [0, 1] by its own min and max."""
    lo = tf.reduce_min(x, axis=_IMAGE_AXES, keepdims=True)
    hi = tf.reduce_max(x, axis=_IMAGE_AXES, keepdims=True)
    return (x - lo) / tf.maximum(hi - lo, EPS)


def standardize_sample(x: tf.Tensor) -> tf.Tensor:
    """Each image (the last three axes) shifted and scaled to mean 0, std 1 by its own statistics."""
    mean, var = tf.nn.moments(x, axes=_IMAGE_AXES, keepdims=True)
    return (x - mean) / tf.maximum(tf.sqrt(var), EPS)


def normalizer(strategy: str, prep: Any = None, stats: Stats | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """The function that applies `strategy` to float32 images in 0..255.

    prep: a `tljax.pretrained.Preprocessing` (needed for "pretrained"); stats: scoped training statistics (needed
    for the *_train strategies).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown normalization {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "pretrained":
        if prep is None:
            raise ValueError("normalization 'pretrained' needs the weights' Preprocessing (prep); with random "
                             "weights choose minmax_train, standardize_train, minmax_sample, standardize_sample "
                             "or none")
        return prep.normalize
    if strategy in TRAIN_STRATEGIES and stats is None:
        raise ValueError(f"normalization {strategy!r} needs the training-set statistics")
    return {
        "minmax_train": lambda x: minmax(x, stats.min, stats.max),
        "standardize_train": lambda x: standardize(x, stats.mean, stats.std),
        "minmax_sample": minmax_sample,
        "standardize_sample": standardize_sample,
        "none": lambda x: x,
    }[strategy]


def save(path: str | os.PathLike, settings: dict[str, Any], stats: Stats | None) -> None:
    """Writes the settings and the per-channel statistics (or null) as JSON, atomically."""
    text = json.dumps({**settings, "stats": stats.to_dict() if stats else None}, indent=1)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load(path: str | os.PathLike, settings: dict[str, Any]) -> Stats | None:
    """The statistics saved at `path`, after checking that they were made with the same `settings`.

    A mismatch (another source, split, resolution, strategy, scope or prep) is an error rather than a silent
    recomputation: the run in that workdir was trained on inputs normalised with the saved values.
    """
    saved, stats = read(path)
    current = json.loads(json.dumps(settings))
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(f"{path} was written for other data settings ({'; '.join(diffs)}); use a fresh workdir, "
                         f"or delete the file to recompute the statistics")
    return stats


def read(path: str | os.PathLike) -> tuple[dict[str, Any], Stats | None]:
    """(settings, per-channel statistics or None) as `save` wrote them: a trained run's normalization, reused as is."""
    with open(path) as f:
        saved = json.load(f)
    return saved, Stats.from_dict(saved["stats"]) if saved.get("stats") else None
