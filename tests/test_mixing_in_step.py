"""Mixup / CutMix inside the train step: it trains on `mixing.mix`'s images and soft targets for the key of the
run's seed and the global step, and counts hits against the original labels; evaluation stays plain
cross-entropy."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import config as config_lib
from tljax import mixing, models, optim, parallel, steps

K, N = 5, 8
ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def check_pmap_equals_jit_with_every_technique_on() -> None:
    """Mixup / CutMix, label smoothing, the EMA, layer decay and L2-SP together in the train step: on 4 devices, pmap
    (the pairing across devices by a collective permute, each device its slice) gives sharded jit's parameters, EMA
    and metrics."""
    assert jax.device_count() == 4
    model = models.create("resnet_tiny", K, head_dropout=0.0)  # dropout keys differ per device under pmap
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
    phase = config_lib.phase(trainable=".", optimizer={"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
                             label_smoothing=0.1, ema_decay=0.9, ema_warmup=True, layer_decay=0.7, l2sp=0.5)
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10, depths=models.layer_depths(model),
                     anchor=optim.l2sp_anchor([phase], variables["params"]))
    rng = np.random.default_rng(1)
    batches = [{"image": rng.normal(size=(N, 16, 16, 3)).astype(np.float32),
                "label": rng.integers(0, K, N).astype(np.int32)} for _ in range(3)]
    results = []
    for mode in parallel.MODES:
        par = parallel.create(mode)
        fn = par.compile(functools.partial(
            steps.train_step, model=model, tx=tx, labels=labels, bn_train=False, ema=steps.phase_ema(phase, 0),
            label_smoothing=phase.label_smoothing, mixing=mixing.Settings(mixup_alpha=0.4, cutmix_alpha=1.0)),
            donate=False)
        state = par.put_state(steps.create_state(variables, tx, jax.random.PRNGKey(0), ema=True))
        losses = []
        for batch in batches:
            state, sums = fn(state, par.put_batch(batch))
            losses.append(float(np.ravel(jax.device_get(sums["loss"]))[0]))
        results.append((jax.device_get(par.get_state(state)), losses))
    (pmapped, pmap_losses), (jitted, jit_losses) = results
    np.testing.assert_allclose(pmap_losses, jit_losses, rtol=1e-5)
    assert len(set(np.round(jit_losses, 4))) == 3  # each step mixed another way
    for a, b in zip(jax.tree.leaves((pmapped.params, pmapped.ema)), jax.tree.leaves((jitted.params, jitted.ema))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(e, p) for e, p in zip(jax.tree.leaves(jitted.ema["params"]),
                                                            jax.tree.leaves(jitted.params))]
    assert sum(moved) > 10  # the average lags behind the weights
    print("pmap == jit with every technique")


def test_pmap_equals_jit_with_every_technique_on_four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    script = "from tests import test_mixing_in_step as t; t.check_pmap_equals_jit_with_every_technique_on()"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pmap == jit with every technique" in result.stdout
