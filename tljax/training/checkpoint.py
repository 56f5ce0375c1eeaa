"""Orbax checkpoints that make a run resumable exactly, and refuse to resume a different run.

A checkpoint (one orbax `CheckpointManager` step = the global optimizer step) holds two items:
  * "state": params, batch_stats, optimizer state, step, RNG and the phase's EMA of the weights, if it keeps one
    (`steps.TrainState`, as host arrays);
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
import re
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


def fields(config: Any) -> dict[str, Any]:
    """Every field of a config (a ConfigDict, or the dict config.json holds), flat:
    {"phases[1].optimizer.learning_rate": 1e-05, "data.image_size": 112, ...}, tuples as lists."""
    flat: dict[str, Any] = {}
    _flatten(config, "", flat)
    return flat


def phase_of(field: str) -> int | None:
    """The phase a flat field belongs to ("phases[2].epochs" -> 2), None for a run-wide field."""
    match = re.match(r"phases\[(\d+)\]\.", field)
    return int(match.group(1)) if match else None


def keeps_anchor(flat: dict[str, Any]) -> bool:
    """Whether any phase of a flat config (`fields`, or a `recipe`) uses L2-SP: then every phase's optimizer state
    carries its anchor (`optim.l2sp_anchor`), so the switch concerns every phase, not only the one that sets it."""
    return any(phase_of(k) is not None and k.endswith(".l2sp") and v > 0 for k, v in flat.items())


def trained_fields(config: Any, phases: int | None = None) -> dict[str, Any]:
    """What training the first `phases` phases (None: all) depends on, flat: every field but FREE_FIELDS and those
    of later phases, and whether the optimizer states carry L2-SP's anchor ("l2sp_anchor", set by any phase).

    Configs with equal `trained_fields(., k)` train phases 0..k-1 to the same state, bit for bit: a sweep trains
    those phases once for all its variants that agree on them (`tljax.research.sweeps`)."""
    flat = fields(config)
    kept = {k: v for k, v in flat.items()
            if k not in FREE_FIELDS and (phases is None or phase_of(k) is None or phase_of(k) < phases)}
    return {**kept, "l2sp_anchor": keeps_anchor(flat)}


def recipe(config: Any) -> dict[str, Any]:
    """How the run trains, beyond its identity: every config field but FREE_FIELDS and the identity's, flat
    ("phases[1].optimizer.learning_rate": 1e-05): optimizers, schedules, phase lengths, augmentation,
    normalization, splits, dtype, head activation and dropout."""
    excluded = FREE_FIELDS | IDENTITY_FIELDS | {f"phases[{i}].{field}" for i in range(len(config.phases))
                                                for field in ("name", "trainable", "bn")}
    return {k: v for k, v in fields(config).items() if k not in excluded}


def default_recipe(phases: int) -> dict[str, Any]:
    """The recipe of the default config (`config.defaults()`) with `phases` default phases."""
    from tljax import config as config_lib  # config imports the model and data code; only resuming needs it

    cfg = config_lib.defaults()
    cfg.phases = [config_lib.phase() for _ in range(phases)]
    return recipe(cfg)


def recipe_changes(saved: dict[str, Any], current: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """[{"field", "old", "new"}] for every recipe field that differs (None: the field is unset on that side).

    A field the saved recipe lacks while the current one holds its value in `defaults` (`default_recipe`) is no
    change: an older tljax, which did not have the field yet, wrote the checkpoint, and trained as the default
    does (a new technique's field is off by default)."""
    defaults = defaults or {}
    return [{"field": k, "old": saved.get(k), "new": current.get(k)}
            for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)
            and not (k not in saved and k in defaults and current[k] == defaults[k])]


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


def _rebuilt(saved: PyTree, target: PyTree) -> PyTree | None:
    """`target`'s structure holding `saved`'s arrays, matched by path (a saved tree reads back as dicts and lists
    where the live one has named tuples); None when their arrays differ in paths or shapes."""
    if _array_shapes(saved) != _array_shapes(target):
        return None
    arrays = dict(zip(_array_shapes(saved), jax.tree.leaves(saved)))
    return jax.tree.unflatten(jax.tree.structure(target), [arrays[path] for path in _array_shapes(target)])


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

    def restore_variables(self, step: int, weights: str = "raw") -> dict[str, PyTree]:
        """{"params", "batch_stats"} of checkpoint `step` as host arrays, without needing the optimizer's structure:
        the state's own ("raw") or its moving average ("ema", `steps.TrainState.ema`)."""
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        if weights == "ema":
            if not state.get("ema"):
                raise ValueError(f"checkpoint {step} holds no EMA of the weights (its phase has ema_decay=0)")
            return {"params": state["ema"]["params"], "batch_stats": state["ema"].get("batch_stats", {})}
        return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}

    def restore_state(self, step: int, target: PyTree) -> PyTree:
        """The saved state, in `target`'s structure (a fresh state of the same phase; its values are not used).

        Parts whose saved arrays do not fit the target's (an allowed recipe change gave the phase in progress
        another optimizer, or turned its EMA on or off) start from the target's fresh values: the optimizer state
        afresh, an EMA at the checkpoint's weights.
        """
        host = _host(target)
        saved = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        params, batch_stats = saved["params"], saved.get("batch_stats", {})
        opt_state = _rebuilt(saved["opt_state"], host.opt_state)
        if opt_state is None:
            logging.warning("checkpoint %d: the phase's optimizer state has another structure (its optimizer "
                            "changed); the optimizer starts afresh from the checkpoint's parameters", step)
            opt_state = host.opt_state
        ema = _rebuilt(saved.get("ema", {}), host.ema)
        if ema is None:
            change = "on: it starts at the checkpoint's weights" if host.ema else "off: the saved one is dropped"
            logging.warning("checkpoint %d: the phase's EMA was turned %s", step, change)
            ema = jax.tree.map(np.copy, {"params": params, "batch_stats": batch_stats}) if host.ema else {}
        return host.replace(step=saved["step"], params=params, batch_stats=batch_stats,
                            opt_state=opt_state, rng=saved["rng"], ema=ema)

    def resume(self, config: Any, params: PyTree) -> tuple[int | None, dict[str, Any], bool]:
        """(newest checkpoint's step or None, its meta or a fresh one, whether the config differs from the one the
        checkpoint recorded, so that the run's description is rewritten) for a run of `config` whose initial
        parameters are `params`.

        Refuses another run's checkpoints (CheckpointMismatchError) and a changed recipe unless
        config.allow_recipe_change (RecipeChangedError); an allowed change joins the meta's `recipe_changes`.
        Phases the checkpoint has not started yet (after `meta["phase"]`) trained nothing, so any of their fields,
        identity fields included, may differ: the run continues with this config's (what a sweep's variants do
        from their shared phases, `tljax.research.sweeps`), unless the difference turns L2-SP on or off for the run,
        which every phase's optimizer state reflects (`keeps_anchor`).
        """
        current_identity, current_recipe = identity(config, params), recipe(config)
        latest = self.latest_meta()
        if latest is None:
            return None, {"identity": current_identity, "recipe": current_recipe, "recipe_changes": [],
                          "history": [], "phase_results": [], "phase": 0, "phase_step": 0}, False
        step, meta = latest
        started = meta["phase"] + 1
        check_identity(meta["identity"], current_identity, self.manager.directory, started)
        if "recipe" not in meta:  # written before tljax recorded recipes: nothing to compare with
            logging.warning("checkpoint %d records no recipe (an older tljax wrote it); resuming with this config's",
                            step)
            meta.update(recipe=current_recipe, recipe_changes=[])
        changes = recipe_changes(meta["recipe"], current_recipe, default_recipe(len(config.phases)))
        anchor_kept = keeps_anchor(meta["recipe"]) == keeps_anchor(current_recipe)
        trained = [c for c in changes if not anchor_kept or phase_of(c["field"]) is None
                   or phase_of(c["field"]) < started]
        listing = format_changes(trained)
        if trained and not config.allow_recipe_change:
            raise RecipeChangedError(
                f"the config changes the recipe of the run in {self.manager.directory} (checkpoint {step}):\n"
                f"{listing}\nRestore those values, use a new --workdir, or pass --config.allow_recipe_change=True to "
                "continue with the new recipe (the change is recorded in the run's history)."
            )
        if trained:
            logging.warning("recipe changed at step %d (config.allow_recipe_change):\n%s", step, listing)
            meta["recipe_changes"].append({"step": step, "changes": trained})
        # The identity matched in the started phases: any difference left is in phases not started yet.
        pending = [c for c in changes if c not in trained]
        identity_changed = json.loads(json.dumps(meta["identity"])) != json.loads(json.dumps(current_identity))
        if pending or identity_changed:
            logging.info("checkpoint %d has not started phase %d: the config's values for it and later phases "
                         "apply%s", step, started + 1, "\n" + format_changes(pending) if pending else "")
        meta.update(recipe=current_recipe, identity=current_identity)
        logging.info("resuming from step %d (phase %d, step %d of it)", step, meta["phase"], meta["phase_step"])
        return step, meta, bool(changes) or identity_changed

    def close(self) -> None:
        self.manager.close()


def check_identity(saved: dict[str, Any], current: dict[str, Any], directory: str, started: int | None = None) -> None:
    """Raises CheckpointMismatchError listing every identity field that differs; with `started`, only the first
    `started` phases' names, trainable patterns and bn count (the checkpoint trained none of the later ones)."""
    saved = json.loads(json.dumps(saved))
    current = json.loads(json.dumps(current))
    if started is not None:
        saved["phases"], current["phases"] = saved["phases"][:started], current["phases"][:started]
    diffs = [f"  {k}: checkpoint {saved.get(k)!r}, config {current[k]!r}"
             for k in current if saved.get(k) != current[k]]
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoints in {directory} belong to another model or config:\n" + "\n".join(diffs)
            + "\nUse a new --workdir, or restore the config that wrote them."
        )
