"""Pure training and evaluation steps: no I/O, no globals; everything static is bound with functools.partial.

`train_step` differentiates only the parameters the phase trains (`optim.split`): with the backbone frozen, its
backward pass is never built, whatever reads the gradients later (clipping included). Frozen parameters come out
untouched (the same buffers' values), and so do BatchNorm statistics unless the phase trains them (`bn_train`). With
`bn_train`, BatchNorm follows Keras's rule: a layer whose parameters the phase freezes runs in inference mode (its
running statistics normalise, and stay untouched); only the layers that train use and update batch statistics.

The training loss is the cross-entropy against the phase's targets: the labels, smoothed with `label_smoothing`
(y * (1 - s) + s / K), or with `mixing` the soft targets of mixup/CutMix (`tljax.training.mixing.mix`, which smooths
them too), drawn with a key of (seed, global step) only (`mixing.step_key`), the same on every device, so pmap, jit and
a resume train on the very same mixed batches. Evaluation is plain cross-entropy against the labels.

With an `Ema`, the state also carries an exponential moving average of the weights the phase trains (and of the
BatchNorm statistics that move): after every optimizer step, ema += (1 - decay_t) * (new - ema), inside the
compiled step; the weights the phase does not train are the raw ones, untouched. `eval_weights` says which weights a
phase is scored with.

Metrics are sums over the batch (loss, top-1 and top-5 hits, example count), reduced over devices, so an epoch's
or a split's averages are exact however the examples were batched and padded. A training batch's loss is the loss
trained on; its hits count the original labels, also when the images were mixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from tljax.training import mixing as mixing_lib
from tljax.training import optim

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Everything a step changes. `step` counts optimizer steps over all phases; `rng` (the seed's key, the same
    on every device) seeds dropout and mixing; `ema` is the phase's moving average of the variables,
    {"params", "batch_stats"} ({} without an EMA)."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array
    ema: PyTree


@dataclasses.dataclass(frozen=True)
class Ema:
    """An exponential moving average of the weights over a phase's steps.

    decay: in (0, 1). warmup: the decay of the phase's t-th update (t = 0, 1, ..., the steps of the phase done
    before it) is min(decay, (1 + t) / (10 + t)), as in TensorFlow's ExponentialMovingAverage with num_updates (timm's
    ModelEmaV3 warm-up serves the same purpose with another curve), so that the average soon leaves the phase's
    starting weights; otherwise `decay` throughout.
    start_step: the global step before the phase's first step (t = state.step - start_step).
    """

    decay: float
    warmup: bool = False
    start_step: int = 0

    def decay_at(self, step: jax.Array) -> jax.Array:
        """The decay of the update that the step from global step `step` makes."""
        if not self.warmup:
            return jnp.float32(self.decay)
        t = (step - self.start_step).astype(jnp.float32)
        return jnp.minimum(jnp.float32(self.decay), (1 + t) / (10 + t))


def phase_ema(phase: ml_collections.ConfigDict, start_step: int) -> Ema | None:
    """The phase's `Ema` (None when its ema_decay is 0: no average kept)."""
    return Ema(phase.ema_decay, phase.ema_warmup, start_step) if phase.ema_decay > 0 else None


def eval_weights(phase: ml_collections.ConfigDict) -> str:
    """The weights that score a phase and that the test split, prediction, evaluation and export use after it:
    "ema" when the phase keeps an EMA (ema_decay > 0) and ema_eval is on (its default), else "raw". Phases of
    configs written before the EMA existed have neither field: "raw"."""
    return "ema" if phase.get("ema_decay", 0.0) > 0 and phase.get("ema_eval", True) else "raw"


def create_state(variables: dict, tx: optax.GradientTransformation, rng: jax.Array, step: int = 0,
                 ema: bool = False) -> TrainState:
    """A fresh state for a phase: the given variables, `tx`'s initial optimizer state and, with `ema`, an average
    that starts at the variables (host copies: its buffers are never the parameters')."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=rng,
        ema=jax.tree.map(np.array, {"params": params, "batch_stats": batch_stats}) if ema else {},
    )


def variables_of(state: TrainState, weights: str = "raw") -> dict[str, PyTree]:
    """{"params", "batch_stats"} of the state: its own ("raw") or its moving average ("ema")."""
    if weights == "ema":
        return state.ema
    return {"params": state.params, "batch_stats": state.batch_stats}


def _metric_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, losses: jax.Array) -> dict[str, jax.Array]:
    """Sums over the examples with mask 1: `losses`, top-1 and top-5 hits against `labels`, and their count."""
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "correct5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def _train_losses(logits: jax.Array, labels: jax.Array, targets: jax.Array | None,
                  smoothing: float | jax.Array) -> jax.Array:
    """Per-example cross-entropy against `targets` (mixed soft targets), else against the labels smoothed by
    `smoothing` (none at 0; a traced value, one per head in `tljax.training.heads`, always smooths)."""
    if targets is None and not isinstance(smoothing, jax.Array) and smoothing == 0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if targets is None:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _moving(tree: PyTree, trained_modules: frozenset[str]) -> PyTree:
    """`tree` (of batch_stats' structure) with None outside the modules that train (whose statistics stay)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if optim.path_name(path[:-1]) in trained_modules else None, tree)


def _lerp(average: PyTree, new: PyTree, decay: jax.Array) -> PyTree:
    """average + (1 - decay) * (new - average), leaf by leaf (None leaves, the ones not averaged, skipped)."""
    return jax.tree.map(lambda a, n: a + (1 - decay) * (n - a), average, new)


def backbone_features(model: nn.Module, variables: dict, images: jax.Array, micro_batches: int = 1) -> jax.Array:
    """The backbone's features in inference mode, computed on `micro_batches` independent slices of the batch.

    Inference-mode BatchNorm treats every example on its own, so the numbers are those of one pass; on CPU, XLA
    overlaps the slices' operations across the cores (measured on 2 cores, batch 32 in 4 slices: ResNet-50
    forward +14% and fine-tuning step +19%, EfficientNet-B0 forward +24%). See `parallel.micro_batches`.
    """
    if micro_batches == 1:
        return model.apply(variables, images, method="features")
    return jnp.concatenate([model.apply(variables, x, method="features") for x in jnp.split(images, micro_batches)])


def _reduce(tree: PyTree, axis_name: str | None, op=jax.lax.psum) -> PyTree:
    return tree if axis_name is None else op(tree, axis_name)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    labels: PyTree,
    bn_train: bool,
    on_features: bool = False,
    micro_batches: int = 1,
    axis_name: str | None = None,
    ema: Ema | None = None,
    label_smoothing: float | jax.Array = 0.0,
    mixing: mixing_lib.Settings | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch {"image", "label"}; returns the new state and the batch's metric sums.

    labels: `optim.param_labels` of the phase. bn_train: the backbone runs in training mode (stochastic depth, and
    batch statistics in the BatchNorm layers whose parameters train, whose running statistics are updated; frozen
    BatchNorm layers stay in inference mode); otherwise all of it in inference mode while the head trains.
    on_features: the batch holds cached backbone features {"features", "label"}: only the head runs (the same
    numbers as the image path with a frozen backbone in inference mode).
    micro_batches: slices the inference-mode backbone runs on independently (see `backbone_features`).
    axis_name: the pmap axis to average gradients and statistics over (None under jit / one device).
    ema: the phase's moving average, updated after the optimizer step (None: `state.ema` stays as it is).
    label_smoothing: s in [0, 1): the loss's targets are the labels as y * (1 - s) + s / K.
    mixing: mixup / CutMix settings that mix (`tljax.training.mixing.mix` mixes the image batch with the key of the
    seed and the global step, and gives the soft targets, smoothed by label_smoothing); None: off.
    """
    images, targets = batch.get("image"), None
    if mixing is not None:
        key = mixing_lib.step_key(state.rng, state.step)
        images, targets = mixing_lib.mix(images, batch["label"], key, model.head.num_classes, mixing,
                                         label_smoothing, axis_name=axis_name)
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    trainable, frozen = optim.split(state.params, labels)
    trained_modules = optim.trained_modules(labels)

    def loss_fn(trainable_params):
        variables = {"params": optim.merge(trainable_params, frozen), "batch_stats": state.batch_stats}
        if bn_train:
            logits, updated = model.training_only(trained_modules).apply(
                variables, images, train=True, backbone_train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            batch_stats = updated["batch_stats"]
        else:
            features = batch["features"] if on_features else backbone_features(model, variables, images,
                                                                                 micro_batches)
            logits = model.apply(variables, features, train=True, method="classify", rngs={"dropout": rng})
            batch_stats = state.batch_stats
        losses = _train_losses(logits, batch["label"], targets, label_smoothing)
        return jnp.mean(losses), (logits, losses, batch_stats)

    (_, (logits, losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = _reduce(grads, axis_name, jax.lax.pmean)
    if bn_train:  # average the statistics of the layers in training mode; the others keep their very buffers
        moved = _reduce(_moving(batch_stats, trained_modules), axis_name, jax.lax.pmean)
        batch_stats = optim.merge(moved, state.batch_stats)
    zeros = jax.tree.map(jnp.zeros_like, frozen)  # never computed: set_to_zero ignores them
    updates, opt_state = tx.update(optim.merge(grads, zeros), state.opt_state, state.params)
    new_trainable = optax.apply_updates(trainable, optim.split(updates, labels)[0])
    average = state.ema
    if ema is not None:  # only what trains moves: the other leaves keep their buffers, equal to the raw ones
        decay = ema.decay_at(state.step)
        ema_trained, ema_frozen = optim.split(average["params"], labels)
        ema_stats = average["batch_stats"]
        if bn_train:
            ema_stats = optim.merge(_lerp(_moving(ema_stats, trained_modules), moved, decay), ema_stats)
        average = {"params": optim.merge(_lerp(ema_trained, new_trainable, decay), ema_frozen),
                   "batch_stats": ema_stats}
    new_state = state.replace(
        step=state.step + 1,
        params=optim.merge(new_trainable, frozen),
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema=average,
    )
    sums = _metric_sums(logits, batch["label"], jnp.ones(logits.shape[0], jnp.float32), losses)
    return new_state, _reduce(sums, axis_name)


def eval_step(
    variables: dict[str, PyTree], batch: dict[str, jax.Array], *, model: nn.Module, on_features: bool = False,
    micro_batches: int = 1, axis_name: str | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Inference with `variables` ({"params", "batch_stats"}: `variables_of` a state) on a padded batch {"image" or
    "features", "label", "mask"}: (metric sums over real examples, predictions)."""
    if on_features:
        logits = model.apply(variables, batch["features"], train=False, method="classify")
    else:
        logits = predict_logits(variables, batch["image"], model=model, micro_batches=micro_batches)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return _reduce(_metric_sums(logits, batch["label"], batch["mask"], losses), axis_name), jnp.argmax(logits, -1)


def predict_logits(variables: dict, images: jax.Array, *, model: nn.Module, micro_batches: int = 1) -> jax.Array:
    """The model's logits for a batch of (normalised) images, in inference mode: what prediction reports."""
    features = backbone_features(model, variables, images, micro_batches)
    return model.apply(variables, features, train=False, method="classify")


def feature_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module, micro_batches: int = 1,
                 axis_name: str | None = None) -> jax.Array:
    """The backbone's pooled features of a batch of images, in inference mode (for caching)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return backbone_features(model, variables, batch["image"], micro_batches)
