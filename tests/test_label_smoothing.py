"""Label smoothing: the loss a train step reports and the head update it makes follow the cross-entropy against
(1 - s) * onehot + s / K; `label_smoothing` outside [0, 1) is refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import config as config_lib
from tljax import data, models
from tljax.training import optim, steps

LR, K, N = 0.5, 4, 8


@functools.cache
def _variables() -> tuple[models.Classifier, dict]:
    model = models.create("resnet_tiny", K)
    return model, jax.device_get(jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3))))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_step_trains_on_the_cross_entropy_with_smoothed_targets(smoothing):
    model, variables = _variables()
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(N, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, K, N).astype(np.int32)}
    phase = config_lib.phase(trainable="^head/", optimizer={"name": "sgd", "learning_rate": LR})
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10)
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=False,
                                   label_smoothing=smoothing))
    state, sums = fn(steps.create_state(variables, tx, jax.random.PRNGKey(0)), batch)

    # The formula in float64: the head is one dense layer on the (frozen, inference-mode) backbone's features.
    features = np.asarray(model.apply(variables, batch["image"], method="features"), np.float64)
    kernel, bias = (np.asarray(variables["params"]["head"]["out"][k], np.float64) for k in ("kernel", "bias"))
    logits = features @ kernel + bias
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    targets = (1 - smoothing) * np.eye(K)[batch["label"]] + smoothing / K
    np.testing.assert_allclose(sums["loss"], -np.sum(targets * log_p), rtol=1e-5)
    error = (np.exp(log_p) - targets) / N  # d(mean loss) / d(logits)
    head = jax.device_get(state.params["head"]["out"])
    np.testing.assert_allclose(head["kernel"], kernel - LR * features.T @ error, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head["bias"], bias - LR * error.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value, message", [(-0.1, "must be a number >= 0"), (1.0, r"must be in \[0, 1\)"),
                                            (1.5, r"must be in \[0, 1\)")])
def test_label_smoothing_outside_zero_one_is_refused(value, message):
    cfg = config_lib.defaults()
    cfg.phases[0].label_smoothing = value
    with pytest.raises(data.ConfigError, match=r"config\.phases\[0\]\.label_smoothing " + message):
        config_lib.validate(cfg)
