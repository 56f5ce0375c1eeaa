"""The training run: phases in order, an evaluation after every epoch, checkpoints, logs, summary and plots.

    summary = train.run(config, workdir)

Re-running with the same workdir resumes from the newest checkpoint (mid-phase or across a phase boundary) and
ends with the same parameters and summary as an uninterrupted run: the data order is a function of (seed, epoch),
and the checkpoint stores the step within the phase, from which the epoch and the batch follow, and the metric sums
of the epoch in progress. A phase's last step records the phase's result and saves, so a run stopped there resumes
into the next phase with nothing lost. SIGTERM saves at a step all processes agree on and raises
`preemption.Preempted` (see tljax.preemption). A resume refuses another run's checkpoints (`checkpoint.identity`)
and a changed recipe unless `config.allow_recipe_change` (`checkpoint.recipe`; the change is then recorded in the
checkpoint meta's `recipe_changes`, and the report shows it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from tljax import checkpoint, config as config_lib, data, metrics, models, optim, parallel, plots, preemption
from tljax import pretrained, steps, workdir as workdir_lib
from tljax.features import FeatureCache


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class Run:
    """What stays fixed across phases."""

    config: ml_collections.ConfigDict
    workdir: str
    model: models.Classifier
    data: Any
    par: parallel.Pmap | parallel.Jit
    ckpt: checkpoint.Checkpointer
    writer: metrics.Writer
    is_main: bool
    preemption: preemption.Preemption
    eval_fn: Any
    eval_features_fn: Any


def _build_model(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[Any, dict, pretrained.Preprocessing, Any,
                                                                        dict]:
    """Model, initial variables, preprocessing, data and the model's description (`restore.MODEL_FILE`), in the
    order each needs the other."""
    head = cfg.model.head
    kwargs = dict(head_hidden=tuple(head.hidden), head_activation=head.activation, dtype=cfg.model.dtype,
                  head_dropout=None if head.dropout < 0 else head.dropout)
    if cfg.parallelism == "pmap":
        kwargs["bn_axis_name"] = parallel.AXIS
    weights = None
    if cfg.model.weights != "none":
        weights = pretrained.read(cfg.model.name, cfg.model.weights, convention=cfg.model.convention or None, **kwargs)
        prep = weights.prep
    else:
        prep = pretrained.Preprocessing(image_size=cfg.data.image_size)
    ds = data.build(cfg.data, prep, seed=cfg.seed, workdir=workdir, num_devices=jax.device_count(),
                    process_index=jax.process_index(), process_count=jax.process_count())
    if weights is not None:
        model, variables = weights.build(ds.num_classes, seed=cfg.seed)
        kwargs = weights.create_kwargs
    else:
        model = models.create(cfg.model.name, ds.num_classes, **kwargs)
        image = np.zeros((1, cfg.data.image_size, cfg.data.image_size, 3), np.float32)
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(cfg.seed), image)
    description = {"name": cfg.model.name, "class_names": list(ds.class_names),
                   "kwargs": {k: v for k, v in kwargs.items() if k != "bn_axis_name"}}
    return model, jax.device_get(variables), prep, ds, description


def phase_steps(phase: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    return phase.steps if phase.steps > 0 else phase.epochs * steps_per_epoch


def _epoch_offsets(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
    """The first data epoch of each phase (phases see fresh permutations of the data)."""
    offsets, total = [], 0
    for p in cfg.phases:
        offsets.append(total)
        total += math.ceil(phase_steps(p, steps_per_epoch) / steps_per_epoch)
    return offsets


def evaluate(run: Run, state: Any, split: str, with_predictions: bool = False,
             cache: FeatureCache | None = None) -> tuple[dict, Any]:
    """Average metrics over every example of `split` exactly once (padded batches, masked).

    With `with_predictions`, also (labels, predictions) of every example, gathered from all processes. With a
    feature cache, the head runs on the cached features of the (frozen) backbone.
    """
    total, gathered = None, []
    fn = run.eval_fn if cache is None else run.eval_features_fn
    for batch in (run.data if cache is None else cache).eval(split):
        batch = run.par.put_batch(batch)
        sums, pred = fn(state, batch)
        total = metrics.add(total, sums)
        if with_predictions:
            gathered.append([run.par.gather(x) for x in (batch["label"], pred, batch["mask"])])
    result = metrics.averages(run.par.get_metrics(total))
    if not with_predictions:
        return result, None
    labels, pred, mask = (np.concatenate(x) for x in zip(*gathered))
    return result, (labels[mask > 0], pred[mask > 0])


def _check_finite(sums: dict[str, Any], where: str, last_saved: int | None, run: Run) -> None:
    if not np.isfinite(float(sums["loss"])):
        kept = f"the last good checkpoint (step {last_saved})" if last_saved is not None else "no checkpoint"
        raise TrainingDivergedError(
            f"the loss became {float(sums['loss'])} at {where}; training stopped. {kept} is kept in "
            f"{run.ckpt.manager.directory}. Lower the learning rate or enable clip_grad_norm and rerun."
        )


def _save(run: Run, state: Any, meta: dict[str, Any]) -> int:
    host = run.par.get_state(state)
    if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(host.params))):
        raise TrainingDivergedError("parameters became NaN/inf; the last good checkpoint is kept")
    step = int(jax.device_get(host.step))
    run.ckpt.save(step, host, meta)
    return step


def _floats(sums: dict[str, Any] | None) -> dict[str, float]:
    """Metric sums as JSON numbers for the checkpoint meta ({} for none)."""
    return {m: float(v) for m, v in (sums or {}).items()}


def _train_phase(run: Run, k: int, state: Any, labels: Any, tx: Any, start: int, first_step: int,
                 meta: dict[str, Any], last_saved: int | None) -> Any:
    """Runs phase k (parameter labels and optimizer given) from step `start` of the phase; returns the final state.

    first_step: the global step before the phase's first step. Every `log_every_steps` global steps, the train
    metrics since the last such point (or the phase's start) are written as train_step_*. The phase's last step
    records the phase's result in `meta` and saves. After SIGTERM (on any process) every process saves the same
    step and raises preemption.Preempted.
    """
    cfg, phase, ds, par = run.config, run.config.phases[k], run.data, run.par
    total, spe = phase_steps(phase, ds.steps_per_epoch), ds.steps_per_epoch
    offset = _epoch_offsets(cfg, spe)[k]
    bn_train = phase.bn == "train"
    cache = None
    if phase.cache_features:  # config.validate made sure that the phase trains no backbone parameter
        cache = FeatureCache(ds, par, state, run.model, os.path.join(run.workdir, "features"),
                             cfg.features_in_memory_mb * 2**20)
    fn = functools.partial(steps.train_step, model=run.model, tx=tx, labels=labels, bn_train=bn_train,
                           on_features=cache is not None,
                           micro_batches=parallel.micro_batches(ds.batch_size // jax.device_count()))
    train_fn = par.compile(fn, donate=True)
    batches: Iterator[dict] = iter(())
    progress = metrics.Progress(f"phase {k + 1}/{len(cfg.phases)} {phase.name}", total, start, run.is_main)
    # A resumed phase keeps the sums of its epoch's and its log window's steps before the checkpoint (none saved
    # where they had just been written, e.g. at the old end of a lengthened phase).
    epoch_sums = (meta.get("epoch_sums") or None) if start % spe else None
    window_sums = (meta.get("window_sums") or None) if start else None
    pending = None
    top5 = ds.num_classes >= 5

    def collect(device_sums: Any, step_done: int) -> None:
        """Adds a step's metric sums to the epoch's and the log window's."""
        nonlocal epoch_sums, window_sums
        sums = par.get_metrics(device_sums)
        _check_finite(sums, f"step {step_done} of phase {phase.name!r}", last_saved, run)
        epoch_sums, window_sums = metrics.add(epoch_sums, sums), metrics.add(window_sums, sums)
        avg = metrics.averages(epoch_sums)
        progress.update(step_done, f"loss {avg['loss']:.4f} acc {avg['accuracy']:.3f}")

    clock = [time.perf_counter(), 0]  # start of the timed stretch of this epoch, images trained since
    try:
        for s in range(start, total):
            epoch, b = divmod(s, spe)
            step = first_step + s + 1  # the global step this iteration completes
            if b == 0 or s == start:
                batches = (cache or ds).train(offset + epoch, start_step=b)
                clock = [time.perf_counter(), 0]
            state, sums = train_fn(state, par.put_batch(next(batches)))
            stop = run.preemption.poll(step)
            if s == start:  # the phase's first step compiles: keep it out of the images/s figure
                jax.block_until_ready(sums)
                clock = [time.perf_counter(), 0]
            else:
                clock[1] += ds.batch_size
            if pending is not None:  # the previous step's: fetching it does not wait for this step
                collect(*pending)
            pending = (sums, s + 1)
            end_of_epoch = b == spe - 1 or s + 1 == total
            log_due = step % cfg.log_every_steps == 0
            save_due = (s + 1) % cfg.checkpoint_every_steps == 0 or s + 1 == total
            if end_of_epoch or log_due or save_due or stop:
                collect(*pending)
                pending = None
            if log_due:
                run.writer.write(step, metrics.averages(window_sums, "train_step_"), top5=top5)
                window_sums = None
            if end_of_epoch:
                rate = clock[1] / (time.perf_counter() - clock[0]) if clock[1] else None
                _end_epoch(run, k, state, epoch_sums, s + 1, meta, cache, rate)
                epoch_sums = None
            if s + 1 == total:  # the phase ended with an epoch's validation
                val = meta["history"][-1]
                result = {"name": phase.name, "steps": total, "val_accuracy": val["val_accuracy"],
                          "val_loss": val["val_loss"]}
                meta["phase_results"] = meta["phase_results"][:k] + [result]  # a lengthened phase: replaced
            if save_due or stop:
                position = {"epoch": offset + (s + 1) // spe, "batch": (s + 1) % spe}
                last_saved = _save(run, state, {**meta, "phase": k, "phase_step": s + 1, "data_position": position,
                                                "epoch_sums": _floats(epoch_sums),
                                                "window_sums": _floats(window_sums)})
            if stop:
                logging.warning("SIGTERM: saved checkpoint at step %d; rerun the same command to resume", step)
                raise preemption.Preempted(step)
    finally:
        if cache is not None:
            cache.close()
    return state


def _end_epoch(run: Run, k: int, state: Any, epoch_sums: dict, phase_step: int, meta: dict[str, Any],
               cache: FeatureCache | None, images_per_s: float | None) -> None:
    """Validation after an epoch; appends to the history kept in the checkpoint meta.

    images_per_s: the epoch's training throughput (global images per second, the phase's compilation excluded;
    None when the epoch had no step besides the compiling one).
    """
    val, _ = evaluate(run, state, "val", cache=cache)
    train = metrics.averages(epoch_sums)
    entry = {"phase": k, "phase_step": phase_step, **{f"train_{m}": v for m, v in train.items()},
             **{f"val_{m}": v for m, v in val.items()}}
    if images_per_s is not None:
        entry["train_images_per_s"] = images_per_s
    meta["history"].append(entry)
    step = int(np.asarray(jax.device_get(run.par.get_state(state).step)))
    run.writer.write(step, {key: v for key, v in entry.items() if key not in ("phase", "phase_step")},
                     top5=run.data.num_classes >= 5)


def data_summary(ds: data.InputPipeline) -> dict[str, Any]:
    """What the run trains and is scored on: the source, its classes, and each split's string and example count."""
    return {"source": ds.source, "classes": list(ds.class_names),
            "splits": {split: {"split": ds.specs[split], "examples": ds.sizes[split]} for split in ds.sizes}}


def _log_data(summary: dict[str, Any]) -> None:
    classes = summary["classes"]
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes) - 20} more)" if len(classes) > 20 else "")
    splits = "; ".join(f"{name} {s['split']!r}: {s['examples']} examples" for name, s in summary["splits"].items())
    logging.info("data: %s; %s; %d classes: %s", summary["source"], splits, len(classes), shown)


def _resume(cfg: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer,
            params: Any) -> tuple[int | None, dict[str, Any], bool]:
    """(newest checkpoint's step or None, its meta or a fresh one, whether an allowed recipe change was recorded).

    Refuses another run's checkpoints (CheckpointMismatchError) and a changed recipe unless
    config.allow_recipe_change (RecipeChangedError); an allowed change joins the meta's `recipe_changes`.
    """
    identity, recipe = checkpoint.identity(cfg, params), checkpoint.recipe(cfg)
    latest = ckpt.latest_meta()
    if latest is None:
        return None, {"identity": identity, "recipe": recipe, "recipe_changes": [], "history": [],
                      "phase_results": [], "phase": 0, "phase_step": 0}, False
    step, meta = latest
    checkpoint.check_identity(meta["identity"], identity, ckpt.manager.directory)
    if "recipe" not in meta:  # written before tljax recorded recipes: nothing to compare with
        logging.warning("checkpoint %d records no recipe (an older tljax wrote it); resuming with this config's",
                        step)
        meta.update(recipe=recipe, recipe_changes=[])
    changes = checkpoint.recipe_changes(meta["recipe"], recipe)
    listing = checkpoint.format_changes(changes)
    if changes and not cfg.allow_recipe_change:
        raise checkpoint.RecipeChangedError(
            f"the config changes the recipe of the run in {ckpt.manager.directory} (checkpoint {step}):\n{listing}"
            "\nRestore those values, use a new --workdir, or pass --config.allow_recipe_change=True to continue "
            "with the new recipe (the change is recorded in the run's history)."
        )
    if changes:
        logging.warning("recipe changed at step %d (config.allow_recipe_change):\n%s", step, listing)
        meta["recipe"] = recipe
        meta["recipe_changes"].append({"step": step, "changes": changes})
    logging.info("resuming from step %d (phase %d, step %d of it)", step, meta["phase"], meta["phase_step"])
    return step, meta, bool(changes)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains every phase of `cfg` in `workdir` (resuming if it holds checkpoints); returns the summary.

    Raises preemption.Preempted after saving when SIGTERM arrives, and checkpoint.CheckpointMismatchError (or
    RecipeChangedError) for a workdir whose checkpoints another run or recipe wrote.
    """
    config_lib.validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    par = parallel.create(cfg.parallelism)
    model, variables, prep, ds, description = _build_model(cfg, workdir)
    _log_data(data_summary(ds))
    is_main = jax.process_index() == 0
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
    writer = None
    try:
        latest, meta, recipe_changed = _resume(cfg, ckpt, variables["params"])
        if is_main and (latest is None or recipe_changed):
            workdir_lib.write_description(workdir, cfg, prep, description)
        writer = metrics.Writer(workdir, is_main, resume_step=latest)
        micro = parallel.micro_batches(ds.eval_batch_size // jax.device_count())
        eval_fns = [par.compile(functools.partial(steps.eval_step, model=model, on_features=f, micro_batches=micro),
                                donate=False) for f in (False, True)]
        with preemption.Preemption(par) as notice:
            run_ = Run(cfg, workdir, model, ds, par, ckpt, writer, is_main, notice, *eval_fns)
            state = _run_phases(run_, variables, meta, latest)
            return _finish(run_, state, variables, meta)
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()


def _run_phases(run: Run, variables: dict, meta: dict[str, Any], latest: int | None) -> Any:
    """Trains the phases from the checkpoint `latest` (None: from the start); returns the final state."""
    cfg, ds = run.config, run.data
    host = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    rng, step = jax.random.PRNGKey(cfg.seed), 0
    last_saved, state = latest, None
    for k, phase in enumerate(cfg.phases):
        if latest is not None and k < meta["phase"]:
            continue
        total = phase_steps(phase, ds.steps_per_epoch)
        labels = optim.param_labels(host["params"], phase.trainable)
        tx = optim.build(phase, labels, total)
        fresh = steps.create_state(host, tx, rng, step)
        start = 0
        if latest is not None and k == meta["phase"]:
            fresh = run.ckpt.restore_state(latest, fresh)
            start = meta["phase_step"]
            step = int(fresh.step) - start
        state = run.par.put_state(fresh)
        if start < total:
            state = _train_phase(run, k, state, labels, tx, start, step, meta, last_saved)
            last_saved = step + total
        host_state = jax.device_get(run.par.get_state(state))
        host = {"params": host_state.params, "batch_stats": host_state.batch_stats}
        rng, step = host_state.rng, int(host_state.step)
    return state


def _finish(run: Run, state: Any, variables: dict, meta: dict[str, Any]) -> dict[str, Any]:
    """Test evaluation, summary.json and plots."""
    test, (labels, predictions) = evaluate(run, state, "test", with_predictions=True)
    cfg = run.config
    params = variables["params"]
    summary = {
        "data": data_summary(run.data),
        "phases": meta["phase_results"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_top5_accuracy": test["top5_accuracy"] if run.data.num_classes >= 5 else None,
        "num_params": optim.count(params),
        "num_trainable_params_per_phase": [optim.count(params, optim.param_labels(params, p.trainable))
                                           for p in cfg.phases],
    }
    if run.is_main:
        metrics.write_summary(run.workdir, summary)
        figures = os.path.join(run.workdir, "plots")
        os.makedirs(figures, exist_ok=True)
        names = [p.name for p in cfg.phases]
        plots.learning_curves(os.path.join(figures, "learning_curves.png"), meta["history"], names)
        matrix = metrics.confusion_matrix(labels, predictions, run.data.num_classes)
        plots.confusion_matrix(os.path.join(figures, "confusion_matrix.png"), matrix, run.data.class_names)
    return summary
