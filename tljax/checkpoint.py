"""Orbax checkpoints that make a run resumable exactly, and refuse to resume a different run.

A checkpoint (one orbax `CheckpointManager` step = the global optimizer step) holds two items:
  * "state": params, batch_stats, optimizer state, step and RNG (`steps.TrainState`, as host arrays);
  * "meta" (JSON): the phase index and the step within it (which is the data iterator's position: epoch and batch
    follow from it), the run's identity (model, classes, parameter shapes, the config fields that change what is
    trained), and the history the summary and plots are made from.
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

PyTree = Any


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint belongs to another model or config."""


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
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

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
        """The saved state, in `target`'s structure (a state of the same phase; its values are not used)."""
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), _host(target))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

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
