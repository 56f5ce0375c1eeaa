"""Many heads in one step: the variants of a sweep that differ only in numbers of a cached-features phase train that
phase together.

With `cache_features`, a phase trains the head alone on stored backbone features. Variants that agree on everything
else (`group_key`) see the same features in the same order, so their heads can share each batch: their trained
parameters, optimizer states and EMAs are stacked on a leading axis of size K, and one `jax.vmap`ped step
(`train_step`) reads the batch once for all K heads. The numbers that differ (`numbers`: the learning rate, the float
arguments of the optimizer and schedule, weight_decay, label_smoothing, clip_grad_norm) enter as arrays, one value
per head: inside the vmapped function each head builds its own optimizer with `optim.build(..., numbers=...)`, so
its optimizer state has the structure its own run's has, and `steps.train_step` runs unchanged. Everything else
(the frozen backbone, BatchNorm statistics, the RNG key, the step count) is shared, unbatched.

`train_group` trains phase k of K runs that way, with each run's own bookkeeping (`train.PhaseLog`: the train_step_*
points, the validation after every epoch, the phase's result, the checkpoints), so that each run's workdir ends as
its own run's would and resumes from there (later phases, test, summary) with the same numbers, to float rounding.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from tljax import models
from tljax.training import checkpoint, optim, parallel, preemption, steps, train

PyTree = Any
_STRUCTURAL = ("weight_decay", "clip_grad_norm")  # at 0 their transformation is left out of the optimizer


class NotBatchable(ValueError):
    """A number that differs between the heads steers Python control flow in optax (a schedule that branches on
    it): the heads cannot share one traced step; train them one by one."""


def numbers(phase: ml_collections.ConfigDict) -> dict[str, float]:
    """The phase's numbers a head may take as an array, by path within the phase: the float arguments of its
    optimizer and schedule, weight_decay, label_smoothing and clip_grad_norm."""
    out = {field: phase[field] for field in ("weight_decay", "label_smoothing", "clip_grad_norm")}
    for section in ("optimizer", "schedule"):
        out.update({f"{section}.{k}": v for k, v in phase[section].items() if isinstance(v, float)})
    return out


def group_key(config: ml_collections.ConfigDict, k: int) -> str | None:
    """A hash shared by the configs whose phase k may train together as heads: equal in everything phases 0..k
    depend on (`checkpoint.trained_fields`) except phase k's `numbers`, of which only whether weight_decay and
    clip_grad_norm are 0 must agree (at 0 their transformation is left out, another optimizer structure);
    None when phase k caches no features."""
    if not config.phases[k].cache_features:
        return None
    fields = checkpoint.trained_fields(config, k + 1)
    fields.update({f"phases[{k}].{path}": value == 0 if path in _STRUCTURAL else None
                   for path, value in numbers(config.phases[k]).items()})
    return hashlib.sha256(json.dumps({"heads_phase": k, **fields}, sort_keys=True).encode()).hexdigest()[:16]


def axes(state: steps.TrainState, labels: PyTree) -> steps.TrainState:
    """The state's vmap axes: 0 for each head's own leaves (trained parameters, optimizer state, the EMA of the
    trained parameters), None for the shared ones."""
    own = jax.tree.map(lambda label: None if label == "frozen" else 0, labels)
    return state.replace(step=None, params=own, batch_stats=None, opt_state=0, rng=None,
                         ema={"params": own, "batch_stats": None} if state.ema else {})


def stack(states: Sequence[steps.TrainState], state_axes: steps.TrainState) -> steps.TrainState:
    """K host states as one: each head's own leaves stacked on a leading axis, the shared ones the first's."""
    def join(axis, *trees):
        return trees[0] if axis is None else jax.tree.map(lambda *xs: np.stack(xs), *trees)

    return jax.tree.map(join, state_axes, *states, is_leaf=lambda x: x is None)


def head(stacked: steps.TrainState, state_axes: steps.TrainState, i: int, lead: int = 0) -> steps.TrainState:
    """Head i's state out of a stacked one; `lead` leading axes (a device axis under pmap) come first."""
    index = (slice(None),) * lead + (i,)
    return jax.tree.map(lambda axis, tree: tree if axis is None else jax.tree.map(lambda x: x[index], tree),
                        state_axes, stacked, is_leaf=lambda x: x is None)


def train_step(states: steps.TrainState, batch: dict[str, jax.Array], values: dict[str, jax.Array], *,
               state_axes: steps.TrainState, phase: ml_collections.ConfigDict, phase_steps: int, depths: dict,
               anchor: PyTree, kwargs: dict[str, Any], axis_name: str | None = None) -> tuple[steps.TrainState, dict]:
    """`steps.train_step` of K heads on one batch of features: (the stacked new states, metric sums of shape (K,)).

    values: the `numbers` that differ between the heads, one array of K values each; the others are `phase`'s.
    kwargs: `train.step_kwargs` of the phase (its label_smoothing replaced by the head's where it differs).
    """
    def one(state, head_values):
        tx = optim.build(phase, kwargs["labels"], phase_steps, depths=depths, anchor=anchor, numbers=head_values)
        smoothing = head_values.get("label_smoothing", kwargs["label_smoothing"])
        return steps.train_step(state, batch, tx=tx, axis_name=axis_name, **{**kwargs, "label_smoothing": smoothing})

    return jax.vmap(one, in_axes=(state_axes, 0), out_axes=(state_axes, 0))(states, values)


def _at_start(run: train.Run, k: int, meta: dict[str, Any], latest: int | None) -> bool:
    """Whether the run's checkpoint is at phase k's start: none for phase 0, else the end of phase k-1."""
    if latest is None:
        return k == 0
    return k > 0 and meta["phase"] == k - 1 and meta["phase_step"] == train.phase_steps(
        run.config.phases[k - 1], run.data.steps_per_epoch)


def train_group(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], k: int) -> list[int]:
    """Trains phase k of each config in its workdir as one head of a vmapped step (see the module docstring);
    returns the indices of the runs it trained.

    The configs share a `group_key`. A run takes part when its workdir stands at phase k's start (empty for k = 0,
    else a checkpoint at the end of phase k-1, such as a sweep's shared prefix); the others are left as they are.
    Each trained workdir then holds what its own run writes during phase k (checkpoints, metrics.jsonl,
    TensorBoard) and resumes from it. Raises NotBatchable (before training) when the numbers cannot be traced,
    train.TrainingDivergedError when a head's loss becomes NaN, and preemption.Preempted after saving every head
    on SIGTERM.
    """
    if len({group_key(cfg, k) for cfg in configs}) != 1 or group_key(configs[0], k) is None:
        raise ValueError(f"phase {k} of these configs cannot train as heads of one step: see heads.group_key")
    par, built = train.build(configs[0], workdirs[0])
    model, ds = built[0], built[3]
    evals = train.eval_fns(par, model, ds)
    with preemption.Preemption(par) as notice, contextlib.ExitStack() as stack_:
        runs, metas, carries, chosen = [], [], [], []
        for i, (cfg, workdir) in enumerate(zip(configs, workdirs)):
            run, variables, meta, latest = stack_.enter_context(train.opened(cfg, workdir, par, built, notice, evals))
            if not _at_start(run, k, meta, latest):
                continue
            state = train.run_phases(run, variables, meta, latest, k)
            runs.append(run), metas.append(meta), chosen.append(i)
            carries.append(train.Carry.initial(run, variables) if state is None else train.Carry.after(run, state))
        if runs:
            _train(runs, k, metas, carries)
    return chosen


def _train(runs: list[train.Run], k: int, metas: list[dict], carries: list[train.Carry]) -> None:
    """The loop of `train_group` over phase k's steps, for runs at its start (`carries`: what each starts from)."""
    first, par = runs[0], runs[0].par
    phase = first.config.phases[k]
    starts = [train.phase_state(run, k, carry, meta, None) for run, carry, meta in zip(runs, carries, metas)]
    device_state, labels, _, _, first_step = starts[0]
    hosts = [jax.device_get(par.get_state(s[0])) for s in starts]
    state_axes = axes(hosts[0], labels)
    table = [numbers(run.config.phases[k]) for run in runs]
    values = {path: np.asarray([t[path] for t in table], np.float32) for path in table[0]
              if len({t[path] for t in table}) > 1}
    log_list = [train.PhaseLog(run, k, meta, 0, None, show=i == 0) for i, (run, meta) in enumerate(zip(runs, metas))]
    total, spe, offset = log_list[0].total, log_list[0].spe, log_list[0].offset
    kwargs = train.step_kwargs(first, k, labels, first_step, on_features=True)
    fn = functools.partial(train_step, state_axes=state_axes, phase=phase, phase_steps=total,
                           depths=models.layer_depths(first.model), anchor=carries[0].anchor, kwargs=kwargs)
    cache = train.feature_cache(first, device_state)
    try:
        batch = {"features": jax.ShapeDtypeStruct((first.data.batch_size, cache.features["train"].shape[1]),
                                                  np.float32),
                 "label": jax.ShapeDtypeStruct((first.data.batch_size,), np.int32)}
        stacked = stack(hosts, state_axes)
        try:
            jax.eval_shape(fn, stacked, batch, values)
        except jax.errors.ConcretizationTypeError as e:
            raise NotBatchable(f"phase {phase.name!r}: the values of {sorted(values)} cannot be traced: {e}") from None
        train_fn = par.compile(fn, donate=True)
        state, values = par.put_state(stacked), par.put_state(values)
        del hosts, starts, device_state, stacked
        lead = 1 if isinstance(par, parallel.Pmap) else 0
        batches = parallel.prefetch(par, train._phase_batches(cache, spe, offset, 0, total))
        train.step_loop(first, log_list, lambda state, batch: train_fn(state, batch, values), state, batches, 0,
                        first_step, cache, split=lambda sums: [{m: v[i] for m, v in sums.items()} for i in
                                                               range(len(runs))],
                        view=lambda state, i: head(state, state_axes, i, lead))
    finally:
        cache.close()
