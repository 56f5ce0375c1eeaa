"""Orbax checkpoints that make a run resumable exactly, and refuse to resume a different run.

A checkpoint (one orbax `CheckpointManager` step = the global optimizer step) holds two items:
  * "state": params, batch_stats, optimizer state, step and RNG (`steps.TrainState`, as host arrays);
  * "meta" (JSON): the phase index and the step within it (which is the data iterator's position: epoch and batch
    follow from it), the run's identity (model, classes, parameter shapes, the config fields that change what is
    trained), its recipe (`recipe`) with the changes a resume was allowed to make (`recipe_changes`), and the history
    the summary and plots are made from.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a process killed while
saving leaves the previous checkpoint as the latest usable one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint belongs to another model or config."""


class RecipeChangedError(CheckpointMismatchError):
    """The config changes how the checkpoint's run trains, and config.allow_recipe_change is not set."""


# Config fields that may differ between a run and its resume: where and how often it writes, how it reads, caches
# and parallelises. They change neither the parameters trained nor the data seen. Any other field is part of the
# identity or of the recipe, new fields included.
FREE_FIELDS = frozenset({"checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "parallelism",
                         "allow_recipe_change", "features_in_memory_mb", "data.data_dir", "data.download",
                         "data.threads", "data.eval_batch_size"})
# Fields compared by `identity` (a difference is never allowed), as are each phase's name, trainable and bn.
IDENTITY_FIELDS = frozenset({"model.name", "model.weights", "data.source", "data.image_size", "data.batch_size",
                             "seed"})


def identity(config: Any, params: PyTree) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run: model, data order, phases, parameter shapes."""
    shapes = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.shape, params))[0]
    digest = hashlib.sha256(repr(sorted((jax.tree_util.keystr(p), s) for p, s in shapes)).encode()).hexdigest()
    return {
        "model": config.model.name,
        "weights": str(config.model.weights),
        "source": config.data.source,
        "image_size": config.data.image_size,
        "batch_size": config.data.batch_size,
        "seed": config.seed,
        "phases": [(p.name, p.trainable, p.bn) for p in config.phases],
        "parameter_shapes_sha256": digest[:16],
    }


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    """Adds a config's leaves to `out` under their dotted paths, list entries of `phases` as phases[i]."""
    if hasattr(value, "items"):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else key, out)
    elif prefix == "phases":
        for i, item in enumerate(value):
            _flatten(item, f"phases[{i}]", out)
    else:
        out[prefix] = json.loads(json.dumps(value))  # tuples as lists: as the value reads back from the meta


def recipe(config: Any) -> dict[str, Any]:
    """How the run trains, beyond its identity: every config field but FREE_FIELDS and the identity's, flat
    ("phases[1].optimizer.learning_rate": 1e-05): optimizers, schedules, phase lengths, augmentation,
    normalization, splits, dtype, head activation and dropout."""
    flat: dict[str, Any] = {}
    _flatten(config, "", flat)
    excluded = FREE_FIELDS | IDENTITY_FIELDS | {f"phases[{i}].{field}" for i in range(len(config.phases))
                                                for field in ("name", "trainable", "bn")}
    return {k: v for k, v in flat.items() if k not in excluded}


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    """[{"field", "old", "new"}] for every recipe field that differs (None: the field is unset on that side)."""
    return [{"field": k, "old": saved.get(k), "new": current.get(k)}
            for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]


def format_changes(changes: list[dict[str, Any]]) -> str:
    """One line per change: `field: old -> new`."""
    return "\n".join(f"  {c['field']}: {c['old']!r} -> {c['new']!r}" for c in changes)


def _array_shapes(tree: PyTree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of a tree's arrays, each key as a string: a live optimizer state (named tuples) and its saved
    metadata (dicts and lists) give the same result when they hold the same arrays."""
    def name(key: Any) -> str:
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _host(tree: PyTree) -> PyTree:
    """Host copies of (replicated) device arrays; one shard suffices as every device holds the same values."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.array(x)

    return jax.tree.map(fetch, tree)


class Checkpointer:
    """Saves and restores `TrainState` + meta under `directory`, keeping the last `keep` checkpoints.

    `read_only` opens an existing directory for restoring only (prediction, evaluation, export): nothing is created,
    written or deleted.
    """

    def __init__(self, directory: str, keep: int = 1, read_only: bool = False) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                               read_only=read_only, save_interval_steps=0 if read_only else 1,
                                               enable_async_checkpointing=False)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """Writes checkpoint `step` (synchronously: the state's device buffers are donated to the next step)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_host(state)), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def latest_meta(self) -> tuple[int, dict[str, Any]] | None:
        """(step, meta) of the newest complete checkpoint, or None for a fresh workdir."""
        step = self.manager.latest_step()
        if step is None:
            return None
        return step, self.meta(step)

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_variables(self, step: int) -> dict[str, PyTree]:
        """{"params", "batch_stats"} of checkpoint `step` as host arrays, without needing the optimizer's structure."""
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}

    def restore_state(self, step: int, target: PyTree) -> PyTree:
        """The saved state, in `target`'s structure (a fresh state of the same phase; its values are not used).

        When the saved optimizer state has another structure (an allowed recipe change gave the phase in progress
        another optimizer), everything else is restored and the optimizer starts from `target`'s fresh state.
        """
        host = _host(target)
        saved = self.manager.item_metadata(step)["state"].tree["opt_state"]
        if _array_shapes(saved) == _array_shapes(host.opt_state):
            abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), host)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            return self.manager.restore(step, args=args)["state"]
        logging.warning("checkpoint %d: the phase's optimizer state has another structure (its optimizer changed); "
                        "the optimizer starts afresh from the checkpoint's parameters", step)
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return host.replace(step=state["step"], params=state["params"], batch_stats=state.get("batch_stats", {}),
                            rng=state["rng"])

    def close(self) -> None:
        self.manager.close()


def check_identity(saved: dict[str, Any], current: dict[str, Any], directory: str) -> None:
    """Raises CheckpointMismatchError listing every identity field that differs."""
    saved = json.loads(json.dumps(saved))
    current = json.loads(json.dumps(current))
    diffs = [f"  {k}: checkpoint {saved.get(k)!r}, config {current[k]!r}"
             for k in current if saved.get(k) != current[k]]
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoints in {directory} belong to another model or config:\n" + "\n".join(diffs)
            + "\nUse a new --workdir, or restore the config that wrote them."
        )
