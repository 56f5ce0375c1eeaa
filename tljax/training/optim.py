"""Optimizers from config names, and freezing by parameter-path patterns.

A phase says which parameters train with a regular expression over their paths ("head/out/kernel",
"backbone/stage4_block2/conv1/kernel", ...). Every leaf gets one label:
  * "head"     - trainable, outside the backbone;
  * "backbone" - trainable, inside the backbone (its learning rate may be scaled by `backbone_lr_multiplier`);
  * "frozen"   - not trainable: `optax.set_to_zero()`, and no optimizer state at all.
The labels feed `optax.multi_transform`. The train step differentiates only the trainable leaves (`split`), so a
frozen backbone costs no backward pass whatever the optimizer chain reads (clipping, norms).

Two fine-tuning techniques act per leaf, both fixed when the phase's optimizer is built, so that the compiled step
holds them as constants (layer decay) or state (L2-SP) and no Python runs per leaf at each step:
  * layer-wise learning-rate decay (`layer_decay`): a backbone leaf's learning rate is the phase's (times
    `backbone_lr_multiplier`) times layer_decay ** (D - depth), with depths from `models.layer_depths`;
  * L2-SP (`l2sp`): the gradient of alpha / 2 * ||w - w0||^2 is added for the backbone kernels that train, where w0,
    the backbone the run loaded, is optimizer state (`L2SPState`) carried from phase to phase.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import optax

PyTree = Any
LABELS = ("head", "backbone", "frozen")
PHASE_STEPS = "phase_steps"  # a schedule argument with this value becomes the phase's length in steps
LEARNING_RATE = "learning_rate"  # ... and with this value, the optimizer's learning rate


def path_name(path: tuple) -> str:
    """A tree path as the "a/b/c" string the trainable patterns match."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_labels(params: PyTree, trainable: str) -> PyTree:
    """Labels every leaf "head", "backbone" or "frozen" by whether `trainable` matches its path (re.search)."""
    pattern = re.compile(trainable)

    def label(path, _):
        name = path_name(path)
        if not pattern.search(name):
            return "frozen"
        return "backbone" if name.startswith("backbone/") else "head"

    return jax.tree_util.tree_map_with_path(label, params)


def trained_modules(labels: PyTree) -> frozenset[str]:
    """The paths ("backbone/stage4_block0/bn1") of the modules with at least one trainable parameter."""
    return frozenset(path_name(path[:-1]) for path, label in jax.tree_util.tree_leaves_with_path(labels)
                     if label != "frozen")


def split(params: PyTree, labels: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): two trees of `params`' structure with None where the other side's leaves are."""
    trainable = jax.tree.map(lambda p, l: None if l == "frozen" else p, params, labels)
    frozen = jax.tree.map(lambda p, l: p if l == "frozen" else None, params, labels)
    return trainable, frozen


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `split`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def count(params: PyTree, labels: PyTree | None = None) -> int:
    """Number of parameters (only the non-frozen ones when labels are given)."""
    if labels is None:
        return sum(x.size for x in jax.tree.leaves(params))
    return sum(p.size for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l != "frozen")


def _kwargs(section: ml_collections.ConfigDict, phase_steps: int, learning_rate: Any,
            numbers: Mapping[str, Any] | None = None, prefix: str = "") -> dict:
    """The section's optax arguments (all fields but its name), the substitutions made; `numbers` (see `build`)
    replace the values of the fields at `prefix + field`."""
    numbers = numbers or {}
    values = {k: numbers.get(prefix + k, v) for k, v in section.items() if k != "name"}
    substitutes = {PHASE_STEPS: phase_steps, LEARNING_RATE: learning_rate}
    return {k: substitutes.get(v, v) if isinstance(v, str) else v for k, v in values.items()}


def _factory(name: str, kind: str) -> Callable:
    fn = getattr(optax, name, None)
    if not callable(fn):
        raise ValueError(f"unknown optax {kind} {name!r}: it must name a function in optax (e.g. 'adamw', "
                         f"'sgd' / 'cosine_decay_schedule', 'warmup_cosine_decay_schedule')")
    return fn


def learning_rate(phase: ml_collections.ConfigDict, phase_steps: int,
                  numbers: Mapping[str, Any] | None = None) -> optax.Schedule | float:
    """The phase's learning rate: `optimizer.learning_rate`, or the named optax schedule ("constant" = none);
    `numbers` as in `build`."""
    lr = (numbers or {}).get("optimizer.learning_rate", phase.optimizer.learning_rate)
    if phase.schedule.name == "constant":
        return lr
    return _factory(phase.schedule.name, "schedule")(**_kwargs(phase.schedule, phase_steps, lr, numbers,
                                                                "schedule."))


def validate(phase: ml_collections.ConfigDict) -> None:
    """Checks optimizer and schedule names and arguments without building anything heavy."""
    for section, kind in ((phase.optimizer, "optimizer"), (phase.schedule, "schedule")):
        if kind == "schedule" and section.name == "constant":
            continue
        fn = _factory(section.name, kind)
        try:
            inspect.signature(fn).bind(**_kwargs(section, 1, 1.0))
        except TypeError as e:
            raise ValueError(f"phase {phase.name!r}: bad arguments for optax.{section.name}: {e}") from None
    if phase.bn not in ("frozen", "train"):
        raise ValueError(f"phase {phase.name!r}: bn must be 'frozen' or 'train', not {phase.bn!r}")
    if not isinstance(phase.trainable, str):
        raise ValueError(f"phase {phase.name!r}: trainable must be a regular expression, not {phase.trainable!r}")
    try:
        re.compile(phase.trainable)
    except re.error as e:
        raise ValueError(f"phase {phase.name!r}: trainable {phase.trainable!r} is not a regular expression: "
                         f"{e}") from None


class L2SPState(NamedTuple):
    """L2-SP's optimizer state: `anchor`, w0, the "backbone" subtree of the parameters the run loaded."""

    anchor: PyTree


def l2sp(alpha: float, anchor: PyTree, mask: PyTree) -> optax.GradientTransformation:
    """Adds alpha * (w - w0) to the gradient of each backbone leaf that `mask` marks: the gradient of the L2-SP
    penalty alpha / 2 * ||w - w0||^2 (Li et al., 2018), like `optax.add_decayed_weights` but toward w0, not zero.

    Works on whole parameter trees ({"backbone": ..., "head": ...}). anchor: w0 (the "backbone" subtree). `init`
    stores it whatever parameters it is given, so a phase that starts from trained weights still pulls toward the
    loaded ones, and every checkpoint holds it. mask: the backbone's structure, True where the penalty applies.
    alpha = 0 adds nothing: the transformation then only carries the anchor to the next phase.
    """
    def init(params: PyTree) -> L2SPState:
        del params
        return L2SPState(anchor)

    def update(updates: PyTree, state: L2SPState, params: PyTree | None = None) -> tuple[PyTree, L2SPState]:
        if alpha == 0:
            return updates, state
        if params is None:
            raise ValueError("l2sp needs the parameters: call update(updates, state, params)")
        pulled = jax.tree.map(lambda g, w, w0, marked: g + alpha * (w - w0) if marked else g,
                              updates["backbone"], params["backbone"], state.anchor, mask)
        return {**updates, "backbone": pulled}, state

    return optax.GradientTransformation(init, update)


def l2sp_anchor(phases: Sequence[ml_collections.ConfigDict], params: PyTree) -> PyTree | None:
    """The L2-SP anchor of a run that starts from `params` (the weights it loaded): host copies of their "backbone"
    subtree when any phase has l2sp > 0 (then every phase carries it, see `build`), else None."""
    if not any(p.l2sp > 0 for p in phases):
        return None
    return jax.tree.map(np.array, params["backbone"])


def carried_anchor(opt_state: PyTree) -> PyTree | None:
    """The anchor an optimizer state of `build` carries (None if it carries none): the next phase's `anchor`."""
    states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, L2SPState))
    anchors = [s.anchor for s in states if isinstance(s, L2SPState)]
    return anchors[0] if anchors else None


def _layer_factors(decay: float, labels: PyTree, depths: dict[str, int]) -> PyTree:
    """Per leaf: decay ** (D - depth) for trainable backbone leaves (depth: that of the leaf's top-level module,
    "backbone/<module>", in `depths`; D = depths["head"]), 1.0 for the others."""
    top = depths["head"]

    def factor(path: tuple, label: str) -> float:
        if label != "backbone":
            return 1.0
        module = "/".join(path_name(path).split("/")[:2])
        if module not in depths:
            raise ValueError(f"parameter {path_name(path)} has no depth: {module!r} is not in the backbone's "
                             "depth_order")
        return decay ** (top - depths[module])

    return jax.tree_util.tree_map_with_path(factor, labels)


def _scale_leaves(tx: optax.GradientTransformation, factors: PyTree) -> optax.GradientTransformation:
    """`tx` with each leaf's update multiplied by its factor (static floats; leaves with 1.0 are left as they are).
    The state is `tx`'s own, so turning layer decay on or off leaves the optimizer state's structure unchanged."""
    def update(updates: PyTree, state: PyTree, params: PyTree | None = None) -> tuple[PyTree, PyTree]:
        updates, state = tx.update(updates, state, params)
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors), state

    return optax.GradientTransformation(tx.init, update)


def build(phase: ml_collections.ConfigDict, labels: PyTree, phase_steps: int, *, depths: dict[str, int] | None = None,
          anchor: PyTree | None = None, numbers: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """The phase's optimizer over the whole parameter tree: multi_transform by `param_labels`.

    The "backbone" group's learning rate is the phase's times `backbone_lr_multiplier`. With layer_decay < 1, each
    trainable backbone leaf's update is then multiplied by layer_decay ** (D - depth) (`depths`:
    `models.layer_depths`; the head and the backbone's layers at the top depth D keep the factor 1). That is the
    same as a per-leaf learning rate for every optimizer whose learning rate scales its update linearly, after which
    at most linear steps follow (checked for optax's sgd with or without momentum or nesterov, adam, adamw, nadam,
    adamax, amsgrad, radam, adabelief, yogi, rmsprop, adagrad, adafactor, sm3, novograd, lamb, lars and lion; the
    decoupled weight decay of adamw and the like is scaled with the rate, as it is by a smaller rate). For an
    optimizer whose learning rate enters elsewhere (schedule_free_*, fromage) or that has none (polyak_sgd,
    prodigy), it scales the step instead.
    anchor: the L2-SP anchor (`l2sp_anchor`, then `carried_anchor` of the previous phase's state), None when no
    phase of the run uses L2-SP. With it, the chain starts with `l2sp` (alpha = the phase's l2sp, 0 in a phase
    without it), applied after gradient clipping and before the optimizer, on the backbone kernels (ndim > 1) that
    train, as `weight_decay` is.
    numbers: values, traced ones included, that replace the phase's numeric fields named by their paths in the
    phase ("optimizer.learning_rate", "schedule.alpha", "weight_decay", "clip_grad_norm") where they enter the
    arithmetic, while the chain's structure follows the phase's own values: `tljax.training.heads` builds one optimizer
    per head inside a vmapped step this way.
    """
    numbers = numbers or {}
    lr = learning_rate(phase, phase_steps, numbers)
    scale = phase.backbone_lr_multiplier
    backbone_lr = (lambda step: scale * lr(step)) if callable(lr) else scale * lr
    optimizer = _factory(phase.optimizer.name, "optimizer")

    def group(rate):
        kwargs = _kwargs(phase.optimizer, phase_steps, rate, numbers, "optimizer.")
        kwargs["learning_rate"] = rate
        if phase.weight_decay > 0:  # L2 on kernels only (not biases / BatchNorm scales), added to the gradients
            decay = optax.add_decayed_weights(numbers.get("weight_decay", phase.weight_decay),
                                              mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
            return optax.chain(decay, optimizer(**kwargs))
        return optimizer(**kwargs)

    tx = optax.multi_transform({"head": group(lr), "backbone": group(backbone_lr), "frozen": optax.set_to_zero()},
                               labels)
    if anchor is not None:
        mask = jax.tree.map(lambda label, w0: label == "backbone" and np.ndim(w0) > 1, labels["backbone"], anchor)
        tx = optax.chain(l2sp(phase.l2sp, anchor, mask), tx)
    elif phase.l2sp > 0:
        raise ValueError(f"phase {phase.name!r}: l2sp needs the run's anchor (optim.l2sp_anchor)")
    if phase.clip_grad_norm > 0:
        # Frozen leaves' gradients are zeros the step never computes, so the norm covers the trainable ones.
        tx = optax.chain(optax.clip_by_global_norm(numbers.get("clip_grad_norm", phase.clip_grad_norm)), tx)
    if phase.layer_decay != 1:
        if depths is None:
            raise ValueError(f"phase {phase.name!r}: layer_decay needs the model's depths (models.layer_depths)")
        tx = _scale_leaves(tx, _layer_factors(phase.layer_decay, labels, depths))
    return tx
