"""A trained run loaded back from its workdir: the model, its variables, class names and input transform.

Training writes, beside the checkpoints, all that is needed to use the model without the data set or the pretrained
weights file: `model.json` (architecture, its arguments and the class names), `prep.json` (the weights' input
convention), `normalization.json` (the strategy and training statistics) and `config.json`. Prediction,
evaluation, export and reports start from `load(workdir)`, which only reads: nothing in the workdir is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from tljax import models
from tljax.data import normalize, pipeline
from tljax.models import conv
from tljax.pretrained.prep import Preprocessing
from tljax.runs import tta
from tljax.training import checkpoint, parallel, steps

MODEL_FILE = "model.json"
RUN_FILES = ("config.json", "prep.json", normalize.FILENAME, MODEL_FILE)


class RunNotFoundError(FileNotFoundError):
    """The workdir holds no trained run (no checkpoint, or files a run writes are missing)."""


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A checkpoint of a run with everything needed to feed it images.

    variables: {"params", "batch_stats"} at checkpoint `step`: the moving average of the weights when the phase of
    the checkpoint scores with it (`weights` "ema", see `steps.eval_weights`: a phase with ema_decay > 0 and
    ema_eval on), else the weights themselves (`weights` "raw"); meta: that checkpoint's meta (phase, history);
    stats: the training statistics in the scope the run used (None for strategies that need none).
    """

    workdir: str
    config: ml_collections.ConfigDict
    description: dict[str, Any]
    model: models.Classifier
    variables: dict[str, Any]
    step: int
    meta: dict[str, Any]
    prep: Preprocessing
    normalization: dict[str, Any]
    stats: normalize.Stats | None
    weights: str

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.description["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def eval_batch_size(self) -> int:
        return int(self.config.data.eval_batch_size or self.config.data.batch_size)

    def transform(self, image: tf.Tensor) -> tf.Tensor:
        """A decoded RGB image (uint8 [H, W, 3]) -> the model's input, exactly as the run's evaluation made it."""
        return self.views(image)[0]

    def views(self, image: tf.Tensor, names: Sequence[str] = ()) -> tf.Tensor:
        """A decoded RGB image -> the model's inputs for the test-time augmentation `names` (`tljax.runs.tta`; none: the
        evaluation view alone): [tta.count(names), S, S, 3], each normalised as the run's evaluation normalises."""
        crop_fraction, method = pipeline.eval_geometry(self.config.data, self.prep)
        views = tta.views(image, names, self.image_size, crop_fraction, method)
        return normalize.normalizer(self.config.data.normalization, self.prep, self.stats)(views)

    def logits_fn(self, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
        """A compiled function: normalised images [batch_size, S, S, 3] -> logits [batch_size, classes] (numpy)."""
        fn = jax.jit(functools.partial(steps.predict_logits, model=self.model,
                                       micro_batches=parallel.micro_batches(batch_size)),
                     compiler_options=conv.compiler_options())
        variables = jax.device_put(self.variables)
        return lambda images: np.asarray(fn(variables, images))

    def probabilities_fn(self, batch_size: int, num_views: int = 1) -> Callable[[np.ndarray], np.ndarray]:
        """A compiled function: normalised views [batch_size, num_views, S, S, 3] (`views`) -> class probabilities
        [batch_size, classes], float64: the softmax averaged over each image's views. One forward pass of
        batch_size * num_views images."""
        logits_fn = self.logits_fn(batch_size * num_views)
        return lambda views: tta.mean_probabilities(logits_fn(views.reshape(-1, *views.shape[2:])), num_views)


def _read_json(workdir: str, name: str) -> Any:
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def load(workdir: str, step: int | None = None) -> TrainedRun:
    """The run in `workdir` at checkpoint `step` (None: the newest); raises RunNotFoundError with what is missing."""
    directory = os.path.join(workdir, "checkpoints")
    how = f"train one first: python -m tljax.main --config=... --workdir={workdir}"
    if not os.path.isdir(directory):
        raise RunNotFoundError(f"{workdir} holds no checkpoints ({directory} does not exist); {how}")
    missing = [name for name in RUN_FILES if not os.path.isfile(os.path.join(workdir, name))]
    if missing:
        raise RunNotFoundError(f"{workdir} lacks {', '.join(missing)}: not a workdir written by tljax.main; {how}")
    ckpt = checkpoint.Checkpointer(directory, read_only=True)
    try:
        saved = ckpt.manager.all_steps()
        if not saved:
            raise RunNotFoundError(f"{directory} holds no complete checkpoint; {how}")
        if step is None:
            step = max(saved)
        elif step not in saved:
            raise RunNotFoundError(f"{directory} has no checkpoint of step {step}; it has {sorted(saved)}")
        fields = _read_json(workdir, "config.json")
        config = ml_collections.ConfigDict({**fields,
                                            "phases": [ml_collections.ConfigDict(p) for p in fields["phases"]]})
        meta = ckpt.meta(step)
        weights = steps.eval_weights(config.phases[meta["phase"]])
        variables = ckpt.restore_variables(step, weights)
    finally:
        ckpt.close()
    description = _read_json(workdir, MODEL_FILE)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in description["kwargs"].items()}
    model = models.create(description["name"], len(description["class_names"]), **kwargs)
    with open(os.path.join(workdir, "prep.json")) as f:
        prep = Preprocessing.from_json(f.read())
    settings, stats = normalize.read(os.path.join(workdir, normalize.FILENAME))
    if stats is not None:
        stats = stats.scoped(config.data.stats_scope)
    return TrainedRun(workdir, config, description, model, variables, step, meta, prep, settings, stats, weights)
