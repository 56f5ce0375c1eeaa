"""Models exported by `python -m tljax.export`: one `.safetensors` file per trained run, read back as weights.

The tensors are the checkpoint's variables keyed by their Flax paths (`params/backbone/stem_conv/kernel`,
`batch_stats/...`); the metadata (strings, structured values as JSON) holds what rebuilds the model and feeds it:

    format         "tljax": what tells an export from a PyTorch state dict
    model          the model name (`models.create`)
    model_kwargs   its `models.create` arguments: the backbone's, and the head's (`HEAD_KWARGS`)
    class_names    the classifier's classes, in logit order
    prep           the run's Preprocessing at the run's evaluation geometry (image size, crop fraction, resize)
    normalization  the run's normalization.json: strategy, settings, per-channel training statistics
    step           the checkpoint's step

`pretrained.read(name, file)` reads an export through `convention`: the model is rebuilt from the file's arguments,
keeping its head (num_classes=None) or putting a new one on its backbone, and `input_prep` is the input it expects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np
import safetensors

from tljax.pretrained import mappings
from tljax.pretrained.convert import WeightsMismatchError
from tljax.pretrained.prep import Preprocessing
from tljax.pretrained.readers import WeightsFileError

log = logging.getLogger(__name__)

FORMAT = "tljax"
# `models.create` arguments that belong to the head (dtype too: a new head takes the caller's); the rest build the
# backbone.
HEAD_KWARGS = ("head_hidden", "head_activation", "head_dropout", "dtype")


@dataclasses.dataclass(frozen=True)
class Export:
    """An export's metadata (see the module docstring)."""

    model: str
    model_kwargs: dict[str, Any]
    class_names: tuple[str, ...]
    prep: Preprocessing
    normalization: dict[str, Any]
    step: int

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata: strings only, structured values as JSON."""
        return {"format": FORMAT, "model": self.model, "model_kwargs": json.dumps(self.model_kwargs),
                "class_names": json.dumps(list(self.class_names)), "prep": self.prep.to_json(),
                "normalization": json.dumps(self.normalization), "step": str(self.step)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Export:
        kwargs = json.loads(metadata["model_kwargs"])
        return cls(metadata["model"], {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()},
                   tuple(json.loads(metadata["class_names"])), Preprocessing.from_json(metadata["prep"]),
                   json.loads(metadata["normalization"]), int(metadata["step"]))


def read(path: str | os.PathLike) -> Export:
    """The metadata of the export at `path`; WeightsFileError if the file is no readable tljax export."""
    try:
        with safetensors.safe_open(path, "np") as f:
            metadata = f.metadata() or {}
    except (OSError, safetensors.SafetensorError) as e:
        raise WeightsFileError(f"cannot read {path} (truncated or corrupt?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise WeightsFileError(f"{path} is not a model exported by tljax.export (no format {FORMAT!r} in its metadata)")
    try:
        return Export.from_metadata(metadata)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsFileError(f"{path}: incomplete or malformed metadata for a tljax export: {e!r}") from e


def input_prep(export: Export, path: str | os.PathLike) -> Preprocessing:
    """The input the exported model was trained on, as a Preprocessing at the run's evaluation geometry.

    "pretrained": the saved prep; "standardize_train" / "minmax_train": the run's training statistics (scoped as
    the run used them) as mean and std on 0..255 values; "none": the identity. The per-image strategies have no
    fixed mean and std: the geometry is kept with the identity, and a warning says to set the strategy instead.
    """
    from tljax.data import normalize  # here, not at the top: tljax.data imports TensorFlow, other weights need none

    strategy = export.normalization["normalization"]
    if strategy == "pretrained":
        return export.prep
    mean, std = 0.0, 1.0
    if strategy in normalize.TRAIN_STRATEGIES:
        stats = normalize.Stats.from_dict(export.normalization["stats"]).scoped(export.normalization["stats_scope"])
        if strategy == "standardize_train":
            mean, spread = stats.mean, stats.std
        else:
            mean, spread = stats.min, np.subtract(stats.max, stats.min)
        std = np.maximum(spread, normalize.EPS)
    elif strategy != "none":
        log.warning("%s was trained with per-image normalization %r, which no fixed mean and std express: its prep "
                    "only sets the input geometry. Set config.data.normalization=%s (or apply it to the images "
                    "yourself) to feed the model as it was trained.", path, strategy, strategy)
    # float64 as the normalizer computes them; one value for all channels with stats_scope "global"
    mean, std = (tuple(float(v) for v in np.broadcast_to(np.asarray(x, np.float64), 3)) for x in (mean, std))
    return dataclasses.replace(export.prep, mean=mean, std=std, scale=1.0, bgr=False)


def convention(name: str, path: str | os.PathLike, requested: str | None = None) -> mappings.Convention:
    """How `pretrained.read` builds model `name` from the export at `path`: the file's backbone arguments, its head
    arguments when its classifier is kept, its variables by path (no table), and `input_prep` as the prep."""
    export = read(path)
    if export.model != name:
        raise WeightsMismatchError(f"{path} holds an exported {export.model}, not a {name}: build {export.model} "
                                   f"(config.model.name={export.model}) to load it")
    if requested not in (None, FORMAT):
        raise WeightsMismatchError(f"{path} is a tljax export, whose keys follow no naming convention: leave the "
                                   f"convention unset (not {requested!r})")
    backbone = {k: v for k, v in export.model_kwargs.items() if k not in HEAD_KWARGS}
    head = {k: v for k, v in export.model_kwargs.items() if k in HEAD_KWARGS}
    prep = input_prep(export, path)
    return mappings.Convention(FORMAT, FORMAT, None, lambda backbone_module: iter(()), backbone,
                               lambda arrays, backbone_module: prep, head)
