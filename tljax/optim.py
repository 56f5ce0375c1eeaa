"""Optimizers from config names, and freezing by parameter-path patterns.

A phase says which parameters train with a regular expression over their paths ("head/out/kernel",
"backbone/stage4_block2/conv1/kernel", ...). Every leaf gets one label:
  * "head"     - trainable, outside the backbone;
  * "backbone" - trainable, inside the backbone (its learning rate may be scaled by `backbone_lr_multiplier`);
  * "frozen"   - not trainable: `optax.set_to_zero()`, and no optimizer state at all.
The labels feed `optax.multi_transform`. The train step differentiates only the trainable leaves (`split`), so a
frozen backbone costs no backward pass whatever the optimizer chain reads (clipping, norms).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import jax
import ml_collections
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


def _kwargs(section: ml_collections.ConfigDict, phase_steps: int, learning_rate: Any) -> dict:
    values = {k: v for k, v in section.items() if k != "name"}
    substitutes = {PHASE_STEPS: phase_steps, LEARNING_RATE: learning_rate}
    return {k: substitutes.get(v, v) if isinstance(v, str) else v for k, v in values.items()}


def _factory(name: str, kind: str) -> Callable:
    fn = getattr(optax, name, None)
    if not callable(fn):
        raise ValueError(f"unknown optax {kind} {name!r}: it must name a function in optax (e.g. 'adamw', "
                         f"'sgd' / 'cosine_decay_schedule', 'warmup_cosine_decay_schedule')")
    return fn


def learning_rate(phase: ml_collections.ConfigDict, phase_steps: int) -> optax.Schedule | float:
    """The phase's learning rate: `optimizer.learning_rate`, or the named optax schedule ("constant" = none)."""
    lr = phase.optimizer.learning_rate
    if phase.schedule.name == "constant":
        return lr
    return _factory(phase.schedule.name, "schedule")(**_kwargs(phase.schedule, phase_steps, lr))


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


def build(phase: ml_collections.ConfigDict, labels: PyTree, phase_steps: int) -> optax.GradientTransformation:
    """The phase's optimizer over the whole parameter tree: multi_transform by `param_labels`."""
    lr = learning_rate(phase, phase_steps)
    scale = phase.backbone_lr_multiplier
    backbone_lr = (lambda step: scale * lr(step)) if callable(lr) else scale * lr
    optimizer = _factory(phase.optimizer.name, "optimizer")

    def group(rate):
        kwargs = _kwargs(phase.optimizer, phase_steps, rate)
        kwargs["learning_rate"] = rate
        if phase.weight_decay > 0:  # L2 on kernels only (not biases / BatchNorm scales), added to the gradients
            decay = optax.add_decayed_weights(phase.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
            return optax.chain(decay, optimizer(**kwargs))
        return optimizer(**kwargs)

    tx = optax.multi_transform({"head": group(lr), "backbone": group(backbone_lr), "frozen": optax.set_to_zero()},
                               labels)
    if phase.clip_grad_norm > 0:
        # Frozen leaves' gradients are zeros the step never computes, so the norm covers the trainable ones.
        tx = optax.chain(optax.clip_by_global_norm(phase.clip_grad_norm), tx)
    return tx
