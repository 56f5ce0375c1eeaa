"""The training run: phases in order, an evaluation after every epoch, checkpoints, logs, summary and plots.

    summary = train.run(config, workdir)

Re-running with the same workdir resumes from the newest checkpoint (mid-phase or across a phase boundary) and
ends with the same parameters and summary as an uninterrupted run: the data order is a function of (seed, epoch),
and the checkpoint stores the step within the phase, from which the epoch and the batch follow, and the metric sums
of the epoch in progress. A phase's last step records the phase's result and saves, so a run stopped there resumes
into the next phase with nothing lost. SIGTERM saves at a step all processes agree on and raises
`preemption.Preempted` (see tljax.training.preemption). A resume refuses another run's checkpoints
(`checkpoint.identity`) and a changed recipe unless `config.allow_recipe_change` (`checkpoint.recipe`; the change is
then recorded in the checkpoint meta's `recipe_changes`, and the report shows it).

A phase with an EMA of the weights (`steps.Ema`) validates both the weights and their EMA after every epoch
(val_* and val_ema_*); the test split is scored with the weights `steps.eval_weights` picks for the last phase, and
summary.json's "weights" names them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from tljax import config as config_lib
from tljax import data, models, pretrained
from tljax.reporting import plots
from tljax.training import checkpoint, metrics, mixing, optim, parallel, preemption, steps
from tljax.training import workdir as workdir_lib
from tljax.training.features import FeatureCache

# What a phase's result (summary.json's "phases") keeps of its last validation; val_ema_* with an EMA.
VAL_RESULTS = ("val_accuracy", "val_loss", "val_ema_accuracy", "val_ema_loss")


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
        model, variables = weights.build(ds.num_classes, seed=cfg.seed, image_size=cfg.data.image_size)
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


def evaluate(run: Run, variables: dict[str, Any], split: str, with_predictions: bool = False,
             cache: FeatureCache | None = None) -> tuple[dict, Any]:
    """Average metrics of `variables` (on the devices: `steps.variables_of` the state) over every example of
    `split` exactly once (padded batches, masked).

    With `with_predictions`, also (labels, predictions) of every example, gathered from all processes. With a
    feature cache, the head runs on the cached features of the (frozen) backbone.
    """
    total, gathered = None, []
    fn = run.eval_fn if cache is None else run.eval_features_fn
    for batch in parallel.prefetch(run.par, (run.data if cache is None else cache).eval(split)):
        sums, pred = fn(variables, batch)
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


def step_kwargs(run: Run, k: int, labels: Any, first_step: int, on_features: bool) -> dict[str, Any]:
    """The keyword arguments of `steps.train_step` for phase k, all but its optimizer `tx` (which `tljax.training.heads`
    builds per head inside its vmapped step)."""
    cfg, phase = run.config, run.config.phases[k]
    mix = mixing.Settings.from_config(cfg.data)  # config.validate refuses it with cached features
    return dict(model=run.model, labels=labels, bn_train=phase.bn == "train", on_features=on_features,
                micro_batches=parallel.micro_batches(run.data.batch_size // jax.device_count()),
                ema=steps.phase_ema(phase, first_step), label_smoothing=phase.label_smoothing,
                mixing=mix if mix.enabled else None)


def feature_cache(run: Run, state: Any) -> FeatureCache:
    """The features of the frozen backbone of `state` (on the devices) for a cache_features phase."""
    return FeatureCache(run.data, run.par, state, run.model, os.path.join(run.workdir, "features"),
                        run.config.features_in_memory_mb * 2**20)


class PhaseLog:
    """One run's account of phase k from its step `start`: the metric sums of the epoch and of the log window in
    progress, the progress line (shown if `show`), the train_step_* points, the validation after every epoch, the
    phase's result and the checkpoints. `tljax.training.heads` keeps one per head of a phase that trains several at
    once."""

    def __init__(self, run: Run, k: int, meta: dict[str, Any], start: int, last_saved: int | None,
                 show: bool = True) -> None:
        phase, spe = run.config.phases[k], run.data.steps_per_epoch
        self.run, self.k, self.meta, self.last_saved = run, k, meta, last_saved
        self.total, self.spe, self.offset = phase_steps(phase, spe), spe, _epoch_offsets(run.config, spe)[k]
        # A resumed phase keeps the sums of its epoch's and its log window's steps before the checkpoint (none
        # saved where they had just been written, e.g. at the old end of a lengthened phase).
        self.epoch_sums = (meta.get("epoch_sums") or None) if start % spe else None
        self.window_sums = (meta.get("window_sums") or None) if start else None
        self.progress = metrics.Progress(f"phase {k + 1}/{len(run.config.phases)} {phase.name}", self.total, start,
                                         run.is_main and show)

    def collect(self, sums: dict[str, Any], step_done: int) -> None:
        """Adds a step's metric sums (host values) to the epoch's and the log window's."""
        _check_finite(sums, f"step {step_done} of phase {self.run.config.phases[self.k].name!r}", self.last_saved,
                      self.run)
        self.epoch_sums, self.window_sums = metrics.add(self.epoch_sums, sums), metrics.add(self.window_sums, sums)
        avg = metrics.averages(self.epoch_sums)
        self.progress.update(step_done, f"loss {avg['loss']:.4f} acc {avg['accuracy']:.3f}")

    def due(self, s: int, step: int, stop: bool) -> bool:
        """Whether step s of the phase (global step `step` done) logs, ends an epoch or saves: its sums are
        needed now."""
        return (s % self.spe == self.spe - 1 or s + 1 == self.total or step % self.run.config.log_every_steps == 0
                or (s + 1) % self.run.config.checkpoint_every_steps == 0 or stop)

    def record(self, s: int, step: int, stop: bool, state: Callable[[], Any], cache: FeatureCache | None,
               speed: dict[str, float]) -> None:
        """After step s of the phase (global step `step`): the train_step_* point, the epoch's validation, the
        phase's result and the checkpoint that are due; `state()` gives the run's state on the devices."""
        run, meta, k, total = self.run, self.meta, self.k, self.total
        if step % run.config.log_every_steps == 0:
            run.writer.write(step, metrics.averages(self.window_sums, "train_step_"), top5=run.data.num_classes >= 5)
            self.window_sums = None
        if s % self.spe == self.spe - 1 or s + 1 == total:
            _end_epoch(run, k, state(), self.epoch_sums, s + 1, meta, cache, speed)
            self.epoch_sums = None
        if s + 1 == total:  # the phase ended with an epoch's validation
            val = meta["history"][-1]
            result = {"name": run.config.phases[k].name, "steps": total,
                      **{key: val[key] for key in VAL_RESULTS if key in val}}
            meta["phase_results"] = meta["phase_results"][:k] + [result]  # a lengthened phase: replaced
        if (s + 1) % run.config.checkpoint_every_steps == 0 or s + 1 == total or stop:
            position = {"epoch": self.offset + (s + 1) // self.spe, "batch": (s + 1) % self.spe}
            self.last_saved = _save(run, state(), {**meta, "phase": k, "phase_step": s + 1, "data_position": position,
                                                   "epoch_sums": _floats(self.epoch_sums),
                                                   "window_sums": _floats(self.window_sums)})


def _train_phase(run: Run, k: int, state: Any, labels: Any, tx: Any, start: int, first_step: int,
                 meta: dict[str, Any], last_saved: int | None) -> Any:
    """Runs phase k (parameter labels and optimizer given) from step `start` of the phase; returns the final state.

    first_step: the global step before the phase's first step. Every `log_every_steps` global steps, the train
    metrics since the last such point (or the phase's start) are written as train_step_*. The phase's last step
    records the phase's result in `meta` and saves. After SIGTERM (on any process) every process saves the same
    step and raises preemption.Preempted.
    """
    phase, ds, par = run.config.phases[k], run.data, run.par
    # config.validate made sure that a cache_features phase trains no backbone parameter
    cache = feature_cache(run, state) if phase.cache_features else None
    fn = functools.partial(steps.train_step, tx=tx, **step_kwargs(run, k, labels, first_step, cache is not None))
    log = PhaseLog(run, k, meta, start, last_saved)
    batches = parallel.prefetch(par, _phase_batches(cache or ds, log.spe, log.offset, start, log.total))
    try:
        return step_loop(run, [log], par.compile(fn, donate=True), state, batches, start, first_step, cache)
    finally:
        if cache is not None:
            cache.close()


# How many dispatched steps' metrics may wait to be fetched: the host runs this far ahead of the devices.
METRICS_LAG = 2


def _ready(tree: Any) -> bool:
    return all(x.is_ready() for x in jax.tree.leaves(tree))


class Clock:
    """The timed stretch of an epoch's training steps: its wall time and the CPU time of the loop's own thread."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.wall, self.cpu, self.steps = time.perf_counter(), time.thread_time(), 0

    def speed(self, batch_size: int) -> dict[str, float]:
        """{} before any timed step; else train_images_per_s (global images per second) and
        train_host_ms_per_step: the loop thread's CPU time per step (batches placed, steps dispatched, metrics
        fetched and logged; not its waits), the host time that would hold back an accelerator."""
        if not self.steps:
            return {}
        return {"train_images_per_s": self.steps * batch_size / (time.perf_counter() - self.wall),
                "train_host_ms_per_step": 1e3 * (time.thread_time() - self.cpu) / self.steps}


def step_loop(run: Run, logs: list[PhaseLog], train_fn: Callable, state: Any, batches: Iterator[Any], start: int,
              first_step: int, cache: FeatureCache | None,
              split: Callable[[dict[str, Any]], list[dict[str, Any]]] = lambda sums: [sums],
              view: Callable[[Any, int], Any] = lambda state, i: state) -> Any:
    """Steps start..total-1 of a phase (`logs[0]` gives total and the epoch length): `train_fn(state, batch)` on
    each of `batches`; returns the final state.

    Several logs (one per head of `tljax.training.heads`) take their part of each step's metric sums from `split`
    and of the state from `view(state, i)`. A step's metrics are fetched once the devices have them, never more
    than METRICS_LAG steps behind, and all before a log point, an epoch's validation or a checkpoint needs them,
    so the host never waits for a step it does not need. A non-finite loss raises TrainingDivergedError there,
    before anything is saved.
    """
    first = logs[0]
    pending: collections.deque = collections.deque()  # (metric sums on the devices, phase steps done)
    clock = Clock()
    for s in range(start, first.total):
        step = first_step + s + 1  # the global step this iteration completes
        if s % first.spe == 0 or s == start:
            clock.restart()
        state, sums = train_fn(state, next(batches))
        stop = run.preemption.poll(step)
        if s == start:  # the phase's first step compiles: keep it out of the images/s figure
            jax.block_until_ready(sums)
            clock.restart()
        else:
            clock.steps += 1
        pending.append((sums, s + 1))
        due = any(log.due(s, step, stop) for log in logs)
        while pending and (due or len(pending) > METRICS_LAG or _ready(pending[0][0])):
            sums_, done = pending.popleft()
            for log, part in zip(logs, split(run.par.get_metrics(sums_))):
                log.collect(part, done)
        if due:
            speed = clock.speed(run.data.batch_size)
            for i, log in enumerate(logs):
                log.record(s, step, stop, functools.partial(view, state, i), cache, speed)
        if stop:
            logging.warning("SIGTERM: saved checkpoint at step %d; rerun the same command to resume", step)
            raise preemption.Preempted(step)
    return state


def _phase_batches(source: data.InputPipeline | FeatureCache, spe: int, offset: int, start: int,
                   total: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches of a phase's steps start..total-1 (`spe` steps per epoch, its data epochs numbered from
    `offset`), epoch after epoch."""
    s = start
    while s < total:
        epoch, b = divmod(s, spe)
        n = min(spe - b, total - s)
        yield from itertools.islice(source.train(offset + epoch, start_step=b), n)
        s += n


def _end_epoch(run: Run, k: int, state: Any, epoch_sums: dict, phase_step: int, meta: dict[str, Any],
               cache: FeatureCache | None, speed: dict[str, float]) -> None:
    """Validation after an epoch (of the raw weights, and of the EMA as val_ema_* when the phase keeps one);
    appends to the history kept in the checkpoint meta.

    speed: the epoch's `Clock.speed` (the phase's compilation excluded; {} when the epoch had no step besides the
    compiling one).
    """
    entry = {"phase": k, "phase_step": phase_step,
             **{f"train_{m}": v for m, v in metrics.averages(epoch_sums).items()}}
    for weights, prefix in (("raw", "val_"), ("ema", "val_ema_")):
        if weights == "raw" or run.config.phases[k].ema_decay > 0:
            val, _ = evaluate(run, steps.variables_of(state, weights), "val", cache=cache)
            entry.update({f"{prefix}{m}": v for m, v in val.items()})
    entry.update(speed)
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


def run(cfg: ml_collections.ConfigDict, workdir: str, phases: int | None = None) -> dict[str, Any] | None:
    """Trains every phase of `cfg` in `workdir` (resuming if it holds checkpoints); returns the summary.

    phases: train only the first `phases` phases, up to the checkpoint their last step saves, and return None
    (no test evaluation, summary or plots): the phases a sweep shares between its variants (`tljax.research.sweeps`),
    each of which resumes a copy of that checkpoint with its own later phases (`checkpoint.Checkpointer.resume`).

    Raises preemption.Preempted after saving when SIGTERM arrives, and checkpoint.CheckpointMismatchError (or
    RecipeChangedError) for a workdir whose checkpoints another run or recipe wrote.
    """
    par, built = build(cfg, workdir)
    _log_data(data_summary(built[3]))
    with preemption.Preemption(par) as notice, opened(cfg, workdir, par, built, notice) as (run_, variables, meta,
                                                                                             latest):
        state = run_phases(run_, variables, meta, latest, len(cfg.phases) if phases is None else phases)
        return _finish(run_, state, variables, meta) if phases is None else None


def build(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[parallel.Pmap | parallel.Jit, tuple]:
    """The parallelism and the built model and data (`opened`'s `par` and `built`) of a run of `cfg` in
    `workdir`, for runs that share them (the heads of `tljax.training.heads`: one model, one data pipeline)."""
    config_lib.validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    return parallel.create(cfg.parallelism), _build_model(cfg, workdir)


def eval_fns(par: parallel.Pmap | parallel.Jit, model: models.Classifier, ds: Any) -> list[Any]:
    """The compiled evaluation steps on images and on cached features (`Run.eval_fn`, `Run.eval_features_fn`)."""
    micro = parallel.micro_batches(ds.eval_batch_size // jax.device_count())
    return [par.compile(functools.partial(steps.eval_step, model=model, on_features=f, micro_batches=micro),
                        donate=False) for f in (False, True)]


@contextlib.contextmanager
def opened(cfg: ml_collections.ConfigDict, workdir: str, par: parallel.Pmap | parallel.Jit, built: tuple,
           notice: preemption.Preemption, evals: list[Any] | None = None) -> Iterator[tuple[Run, dict, dict,
                                                                                               int | None]]:
    """The run of `cfg` in `workdir` ready to train, with the model and data `built` (`_build_model`): yields
    (run, initial variables, checkpoint meta, newest checkpoint's step or None) with its checkpoints resumed
    (`checkpoint.Checkpointer.resume`), its description written, its metrics writer open; closes them after.
    evals: `eval_fns` to share with other runs (None: compiled for this one)."""
    model, variables, prep, ds, description = built
    is_main = jax.process_index() == 0
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
    writer = None
    try:
        latest, meta, config_changed = ckpt.resume(cfg, variables["params"])
        if is_main and (latest is None or config_changed):
            workdir_lib.write_description(workdir, cfg, prep, description)
        writer = metrics.Writer(workdir, is_main, resume_step=latest)
        run_ = Run(cfg, workdir, model, ds, par, ckpt, writer, is_main, notice, *(evals or eval_fns(par, model, ds)))
        yield run_, variables, meta, latest
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()


@dataclasses.dataclass
class Carry:
    """What a phase hands to the next: the variables (host), the RNG key, the global step and L2-SP's anchor."""

    variables: dict[str, Any]
    rng: Any
    step: int
    anchor: Any

    @classmethod
    def initial(cls, run: Run, variables: dict) -> Carry:
        """What the run's first phase starts from: the loaded (or initialised) variables."""
        host = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        # L2-SP's w0, the loaded backbone: each phase's optimizer state carries it to the next (and into every
        # checkpoint, from which a resumed phase restores it).
        return cls(host, jax.random.PRNGKey(run.config.seed), 0, optim.l2sp_anchor(run.config.phases, host["params"]))

    @classmethod
    def after(cls, run: Run, state: Any) -> Carry:
        """What follows a phase that ended with `state` (on the devices)."""
        host = jax.device_get(run.par.get_state(state))
        return cls({"params": host.params, "batch_stats": host.batch_stats}, host.rng, int(host.step),
                   optim.carried_anchor(host.opt_state))


def phase_state(run: Run, k: int, carry: Carry, meta: dict[str, Any],
                latest: int | None) -> tuple[Any, Any, Any, int, int]:
    """Phase k's start: (state on the devices, parameter labels, optimizer, step within the phase, global step
    before the phase's first step), restored from the checkpoint `latest` when that is within phase k."""
    phase = run.config.phases[k]
    total = phase_steps(phase, run.data.steps_per_epoch)
    labels = optim.param_labels(carry.variables["params"], phase.trainable)
    tx = optim.build(phase, labels, total, depths=models.layer_depths(run.model), anchor=carry.anchor)
    fresh = steps.create_state(carry.variables, tx, carry.rng, carry.step, ema=phase.ema_decay > 0)
    start, step = 0, carry.step
    if latest is not None and k == meta["phase"]:
        fresh = run.ckpt.restore_state(latest, fresh)
        start = meta["phase_step"]
        step = int(fresh.step) - start
    return run.par.put_state(fresh), labels, tx, start, step


def run_phases(run: Run, variables: dict, meta: dict[str, Any], latest: int | None, count: int) -> Any:
    """Trains the first `count` phases from the checkpoint `latest` (None: from the start); returns the final
    state (None when there is none: no phase, or none before the checkpoint's)."""
    carry, last_saved, state = Carry.initial(run, variables), latest, None
    for k in range(count):
        if latest is not None and k < meta["phase"]:
            continue
        state, labels, tx, start, step = phase_state(run, k, carry, meta, latest)
        total = phase_steps(run.config.phases[k], run.data.steps_per_epoch)
        if start < total:
            state = _train_phase(run, k, state, labels, tx, start, step, meta, last_saved)
            last_saved = step + total
        carry = Carry.after(run, state)
    return state


def _finish(run: Run, state: Any, variables: dict, meta: dict[str, Any]) -> dict[str, Any]:
    """Test evaluation (of the weights `steps.eval_weights` gives for the last phase), summary.json and plots."""
    cfg = run.config
    weights = steps.eval_weights(cfg.phases[-1])
    test, (labels, predictions) = evaluate(run, steps.variables_of(state, weights), "test", with_predictions=True)
    params = variables["params"]
    summary = {
        "data": data_summary(run.data),
        "phases": meta["phase_results"],
        "weights": weights,
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
