"""The files a training run keeps beside its checkpoints, each written atomically.

A file is written to a temporary name in the same directory and renamed over the old one (`os.replace`), so a run
killed while writing leaves the previous complete file, never half of one. The run's description (`config.json`,
`model.json`, `prep.json`) is written when a run starts in an empty workdir, and again only when a resume with
`allow_recipe_change=True` changed the recipe: a plain resume leaves it as the run that made the checkpoints wrote
it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from tljax.pretrained.prep import Preprocessing
from tljax.runs import restore


def temporary_path(path: str) -> str:
    """A name beside `path` for writing its next version (hidden, so that no reader takes it for the real file)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def write_text(path: str, text: str) -> None:
    """Replaces `path` with `text` atomically."""
    temporary = temporary_path(path)
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def write_json(path: str, value: Any) -> None:
    """Replaces `path` with `value` as indented JSON, atomically."""
    write_text(path, json.dumps(value, indent=1))


def write_description(workdir: str, cfg: ml_collections.ConfigDict, prep: Preprocessing,
                      model: dict[str, Any]) -> None:
    """config.json, prep.json and model.json (`restore.MODEL_FILE`): what tools after training rebuild the run
    from."""
    write_text(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=1))
    write_text(os.path.join(workdir, "prep.json"), prep.to_json())
    write_json(os.path.join(workdir, restore.MODEL_FILE), model)
