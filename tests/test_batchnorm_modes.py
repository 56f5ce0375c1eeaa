"""BatchNorm under `bn="train"` follows Keras's rule: a layer whose parameters the phase freezes runs in inference
mode. Training only `stage4` of a ResNet must leave every other BatchNorm layer on its running statistics, which
stay bit-identical, while stage 4's layers normalise with batch statistics and update theirs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tljax import config as config_lib
from tljax import models
from tljax.training import optim, steps

SIZE = 32
TRAINABLE = "stage4|^head/"


@pytest.fixture(scope="module")
def setup():
    """A four-stage ResNet (one basic block per stage, 8 channels wide) whose running statistics are far from any
    batch's, and its phase."""
    model = models.create("resnet18", 5, width=8, stage_sizes=(1, 1, 1, 1))
    variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
    rng = np.random.default_rng(0)
    stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    stats = {k: (rng.normal(0, 0.2, v.shape) if k.endswith("mean") else rng.uniform(0.5, 2, v.shape))
             .astype(np.float32) for k, v in stats.items()}
    variables = {"params": variables["params"], "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}
    phase = config_lib.phase(trainable=TRAINABLE, bn="train", optimizer={"name": "sgd", "learning_rate": 0.1})
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10)
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=True))
    return model, variables, labels, tx, step


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(8, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, 5, 8).astype(np.int32)}


def _bn_stats(batch_stats: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(batch_stats, sep="/").items()}


def test_frozen_layers_keep_their_statistics_and_trained_ones_update(setup):
    model, variables, _, tx, step = setup
    state = steps.create_state(variables, tx, jax.random.PRNGKey(1))
    for seed in range(2):
        state, _ = step(state, _batch(seed))
    before, after = _bn_stats(variables["batch_stats"]), _bn_stats(jax.device_get(state.batch_stats))
    frozen = [k for k in before if "stage4" not in k]
    trained = [k for k in before if "stage4" in k]
    assert len(frozen) == 2 * 9 and len(trained) == 2 * 3  # stem + stages 1-3: 9 layers; stage 4: 3
    for key in frozen:
        assert after[key].tobytes() == before[key].tobytes(), key
    for key in trained:
        assert np.abs(after[key] - before[key]).max() > 1e-3, key


def test_frozen_layers_normalise_with_their_running_statistics(setup):
    """The step's loss depends on a frozen layer's running statistics (inference mode) and not on a trained layer's
    (batch statistics)."""
    model, variables, _, tx, step = setup

    def loss_with(key: str, shift: float) -> float:
        stats = _bn_stats(variables["batch_stats"])
        stats[key] = stats[key] + shift
        shifted = {"params": variables["params"], "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}
        return float(step(steps.create_state(shifted, tx, jax.random.PRNGKey(1)), _batch(0))[1]["loss"])

    reference = loss_with("backbone/stage1_block0/bn1/mean", 0.0)
    assert abs(loss_with("backbone/stage1_block0/bn1/mean", -1.0) - reference) > 1e-3
    assert loss_with("backbone/stage4_block0/bn1/mean", -1.0) == reference


def test_frozen_layer_outputs_equal_an_inference_mode_forward(setup):
    model, variables, labels, *_ = setup
    capture = functools.partial(jax.jit, static_argnames="train")(
        lambda v, x, train: model.training_only(optim.trained_modules(labels)).apply(
            v, x, train=train, mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: module.name is not None and "bn" in module.name)[1])
    images = _batch(0)["image"]
    training = traverse_util.flatten_dict(capture(variables, images, True)["intermediates"], sep="/")
    inference = traverse_util.flatten_dict(capture(variables, images, False)["intermediates"], sep="/")
    assert training.keys() == inference.keys() and len(training) == 12
    for key in training:
        gap = float(np.abs(np.asarray(training[key][0]) - np.asarray(inference[key][0])).max())
        if "stage4" in key:
            assert gap > 0.1, key  # batch statistics instead of the (deliberately far-off) running ones
        else:
            assert gap < 1e-5, key
