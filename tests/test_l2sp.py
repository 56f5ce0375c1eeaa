"""L2-SP: one step against the formula, pmap against jit, the anchor through a phase change and a resume, and the
validation of `l2sp`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import train_util
from tests.configs import tiny
from tljax import config as config_lib
from tljax import data, models
from tljax.training import checkpoint, optim, parallel, preemption, steps, train

LR, ALPHA = 0.1, 0.5


@functools.cache
def _variables(seed: int = 0) -> tuple[models.Classifier, dict]:
    """resnet_tiny with 3 classes and its initial variables, as `train.run` makes them for the tiny config."""
    model = models.create("resnet_tiny", 3)
    return model, jax.device_get(jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(seed), jnp.zeros((1, 16, 16, 3))))


def test_one_sgd_step_follows_the_formula():
    """update = -lr * (grad + alpha * (w - w0)) on the backbone kernels that train, -lr * grad on every other
    trainable leaf (head, biases, BatchNorm scales), nothing on frozen leaves."""
    w0 = _variables()[1]["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), w0)  # trained away from w0
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), w0)
    phase = config_lib.phase(trainable="stage2|^head/", optimizer={"name": "sgd", "learning_rate": LR}, l2sp=ALPHA)
    labels = optim.param_labels(params, phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10, anchor=optim.l2sp_anchor([phase], w0))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    kinds = set()
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = optim.path_name(path)
        g, w, anchor = (train_util.flat(tree)[name] for tree in (grads, params, w0))
        if "stage2" not in name and not name.startswith("head/"):
            kind, expected = "frozen", np.zeros_like(g)
        elif name.startswith("backbone/") and g.ndim > 1:
            kind, expected = "anchored", -LR * (g + ALPHA * (w - anchor))
        else:
            kind, expected = "plain", -LR * g
        kinds.add(kind)
        np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert kinds == {"frozen", "anchored", "plain"}


def test_pmap_equals_jit_with_l2sp_and_layer_decay():
    """The anchor (optimizer state, replicated with it) and the layer factors (constants) under both strategies."""
    model, variables = _variables()
    phase = config_lib.phase(trainable=".", optimizer={"name": "sgd", "learning_rate": LR, "momentum": 0.9},
                             l2sp=ALPHA, layer_decay=0.7)
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10, depths=models.layer_depths(model),
                     anchor=optim.l2sp_anchor([phase], variables["params"]))
    rng = np.random.default_rng(1)
    batches = [{"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                "label": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(2)]
    results = []
    for mode in parallel.MODES:
        par = parallel.create(mode)
        fn = par.compile(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=False),
                         donate=False)
        state = par.put_state(steps.create_state(variables, tx, jax.random.PRNGKey(0)))
        for batch in batches:
            state, _ = fn(state, par.put_batch(batch))
        results.append(jax.device_get(par.get_state(state)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    anchor = optim.carried_anchor(results[0].opt_state)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, anchor, variables["params"]["backbone"])))


def _anchor_and_params(workdir, step: int) -> tuple[dict, dict]:
    """(the anchor in checkpoint `step`'s optimizer state, its backbone parameters), flat."""
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        ckpt.close()
    found = []

    def search(tree):
        if isinstance(tree, dict):
            if "anchor" in tree:
                found.append(tree["anchor"])
            for value in tree.values():
                search(value)
        elif isinstance(tree, (list, tuple)):
            for value in tree:
                search(value)

    search(state["opt_state"])
    assert len(found) == 1
    return train_util.flat(found[0]), train_util.flat(state["params"]["backbone"])


def test_the_anchor_is_the_loaded_backbone_across_phases_and_resumes(tmp_path, monkeypatch):
    """Phase 1 trains the whole network without L2-SP, phase 2 with it: its anchor is still the initial backbone,
    not phase 2's starting point, in every checkpoint, also after SIGTERM at the phase boundary and mid-phase and
    the resumes; and the resumed run ends with the uninterrupted run's parameters (with layer decay and label
    smoothing on in phase 2 too: all three resume exactly)."""
    folder = train_util.image_folder(tmp_path / "images")
    cfg = tiny.get_config(str(folder))
    cfg.phases[0].trainable = "."
    cfg.phases[1].update({"l2sp": ALPHA, "layer_decay": 0.8, "label_smoothing": 0.1})
    cfg.keep_checkpoints = 100
    _, variables = _variables(cfg.seed)
    initial = train_util.flat(variables["params"]["backbone"])
    with train_util.compile_cache(tmp_path / "jax-cache"):
        train.run(cfg, str(tmp_path / "reference"))
        for stop in (12, 15):  # phase 1's last step, then a step inside phase 2
            monkeypatch.setenv(preemption.TEST_SIGNAL_VARIABLE, str(stop))
            with pytest.raises(preemption.Preempted):
                train.run(cfg, str(tmp_path / "run"))
            anchor, backbone = _anchor_and_params(tmp_path / "run", stop)
            assert anchor.keys() == initial.keys()
            assert all(np.array_equal(anchor[k], initial[k]) for k in initial), stop
            assert not all(np.array_equal(backbone[k], initial[k]) for k in initial)  # the weights did move
        monkeypatch.delenv(preemption.TEST_SIGNAL_VARIABLE)
        train.run(cfg, str(tmp_path / "run"))
    anchor, _ = _anchor_and_params(tmp_path / "run", 24)
    assert all(np.array_equal(anchor[k], initial[k]) for k in initial)
    train_util.assert_same_params(train_util.final_state(tmp_path / "reference"),
                                  train_util.final_state(tmp_path / "run"), atol=0)


@pytest.mark.parametrize("value", [-0.1, float("inf")])
def test_a_negative_or_infinite_l2sp_is_refused(value):
    cfg = config_lib.defaults()
    cfg.phases[1].l2sp = value
    with pytest.raises(data.ConfigError, match=r"config\.phases\[1\]\.l2sp must be a number >= 0"):
        config_lib.validate(cfg)
