"""Mixup / CutMix inside the train step: it trains on `mixing.mix`'s images and soft targets for the key of the
run's seed and the global step, and counts hits against the original labels; evaluation stays plain
cross-entropy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import config as config_lib
from tljax import models
from tljax.training import mixing, optim, steps

K, N = 5, 8


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    log_p = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    return float(np.mean(-np.sum(targets * log_p, -1)))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_step_trains_on_the_mixed_batch_of_its_seed_and_step(smoothing):
    model = models.create("resnet_tiny", K, head_dropout=0.0)  # no dropout: the logits are the model's by hand
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
    labels = optim.param_labels(variables["params"], "^head/")
    tx = optim.build(config_lib.phase(), labels, phase_steps=10)
    settings = mixing.Settings(mixup_alpha=0.4, cutmix_alpha=1.0)
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=False,
                                   label_smoothing=smoothing, mixing=settings))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(N, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, K, N).astype(np.int32)}
    losses = []
    for step in (5, 6):
        state = steps.create_state(variables, tx, jax.random.PRNGKey(3), step=step)
        mixed, targets = mixing.mix(batch["image"], batch["label"], mixing.step_key(state.rng, step), K, settings,
                                    smoothing)
        assert not np.allclose(mixed, batch["image"])  # these keys mix
        logits = np.asarray(model.apply(variables, mixed), np.float64)
        _, sums = fn(state, batch)
        losses.append(float(sums["loss"]) / N)
        assert losses[-1] == pytest.approx(_cross_entropy(logits, np.asarray(targets, np.float64)), rel=1e-5)
        assert int(sums["correct"]) == int(np.sum(np.argmax(logits, -1) == batch["label"]))
        assert int(sums["count"]) == N
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # another step, another mix
    # Evaluation: plain cross-entropy of the unmixed images against their labels.
    eval_sums, _ = steps.eval_step(variables, {**batch, "mask": np.ones(N, np.float32)}, model=model)
    plain = np.asarray(model.apply(variables, batch["image"]), np.float64)
    assert float(eval_sums["loss"]) / N == pytest.approx(_cross_entropy(plain, np.eye(K)[batch["label"]]), rel=1e-5)

