"""Freezing, the phase-1 step's cost, and the optimizer built from config names."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tljax import config as config_lib
from tljax import models
from tljax.training import optim, steps


def _setup(trainable: str, bn: str = "frozen", name: str = "resnet_tiny", size: int = 16, **phase_kwargs):
    model = models.create(name, 5)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    phase = config_lib.phase(trainable=trainable, bn=bn, **phase_kwargs)
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10)
    state = steps.create_state(variables, tx, jax.random.PRNGKey(1))
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=bn == "train"))
    return variables, labels, state, fn


def _batch(seed: int, n: int = 8, size: int = 16, classes: int = 5):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def test_labels_follow_the_pattern():
    variables, labels, *_ = _setup("^head/|stage2")
    flat = {optim.path_name(p): l for p, l in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert flat["head/out/kernel"] == "head"
    assert flat["backbone/stage2_block0/conv1/kernel"] == "backbone"
    assert flat["backbone/stage1_block0/conv1/kernel"] == "frozen"
    assert flat["backbone/stem_conv/kernel"] == "frozen"


def test_phase1_keeps_the_backbone_bit_identical_and_holds_no_state_for_it():
    # clip_grad_norm reads every gradient: it must still not bring the backbone's gradients (or changes) back.
    variables, labels, state, fn = _setup("^head/", clip_grad_norm=1.0, weight_decay=1e-4)
    for seed in range(3):
        state, sums = fn(state, _batch(seed))
    after = jax.device_get(state)
    same = jax.tree.map(np.array_equal, variables["params"]["backbone"], after.params["backbone"])
    assert all(jax.tree.leaves(same))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables["batch_stats"], after.batch_stats)))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, variables["params"]["head"], after.params["head"])))
    # Optimizer state: arrays only for the head's parameters (Adam's mu and nu + a step count).
    state_arrays = [x for x in jax.tree.leaves(after.opt_state) if np.ndim(x) > 0]
    head_sizes = sorted(x.size for x in jax.tree.leaves(variables["params"]["head"]))
    assert sorted(x.size for x in state_arrays) == sorted(head_sizes * 2)


def test_phase2_changes_the_backbone_and_its_statistics():
    variables, labels, state, fn = _setup(".", bn="train")
    state, _ = fn(state, _batch(0))
    after = jax.device_get(state)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), variables["params"]["backbone"],
                           after.params["backbone"])
    assert all(jax.tree.leaves(changed))
    assert not np.array_equal(variables["batch_stats"]["backbone"]["stem_bn"]["mean"],
                              after.batch_stats["backbone"]["stem_bn"]["mean"])


def test_phase1_step_costs_under_half_of_a_full_step():
    flops = {}
    for trainable, bn in (("^head/", "frozen"), (".", "frozen")):
        _, _, state, fn = _setup(trainable, bn, name="resnet18", size=32, clip_grad_norm=1.0)
        compiled = fn.lower(state, _batch(0, size=32)).compile()
        flops[trainable] = compiled.cost_analysis()["flops"]
    assert flops["^head/"] < 0.5 * flops["."], flops


def test_schedule_from_config_names():
    phase = config_lib.phase(optimizer={"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
                             schedule={"name": "warmup_cosine_decay_schedule", "init_value": 0.0,
                                       "peak_value": "learning_rate", "warmup_steps": 2, "decay_steps": "phase_steps"})
    lr = optim.learning_rate(phase, phase_steps=10)
    assert lr(0) == 0.0 and lr(2) == pytest.approx(0.1) and lr(10) == pytest.approx(0.0, abs=1e-7)
    assert isinstance(optim.build(phase, {"w": "head"}, 10), optax.GradientTransformation)


@pytest.mark.parametrize("section, bad", [("optimizer", {"name": "adamm", "learning_rate": 1.0}),
                                          ("schedule", {"name": "cosine_decay_schedul"}),
                                          ("optimizer", {"name": "sgd", "learning_rate": 1.0, "momentun": 0.9})])
def test_unknown_optimizer_or_schedule_is_a_clear_error(section, bad):
    cfg = config_lib.defaults()
    cfg.phases[0][section] = bad
    with pytest.raises(ValueError, match=bad["name"] if "momentun" not in bad else "momentun"):
        config_lib.validate(cfg)


def test_misspelt_config_field_is_named():
    cfg = config_lib.defaults()
    cfg.phases[1].lerning_rate = 1e-4
    cfg.data.batchsize = 3
    with pytest.raises(ValueError) as e:
        config_lib.validate(cfg)
    assert "config.phases[1].lerning_rate" in str(e.value) and "config.data.batchsize" in str(e.value)
    assert "batch_size" in str(e.value)


def test_micro_batched_backbone_gives_the_numbers_of_one_pass():
    """Inference-mode BatchNorm treats examples independently: slicing the batch changes nothing but speed."""
    variables, labels, state, _ = _setup(".")
    model = models.create("resnet_tiny", 5)
    tx = optim.build(config_lib.phase(trainable="."), labels, phase_steps=10)
    states = []
    for micro in (1, 4):
        fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=False,
                                       micro_batches=micro))
        s = steps.create_state(variables, tx, jax.random.PRNGKey(1))
        for seed in range(2):
            s, _ = fn(s, _batch(seed))
        states.append(jax.device_get(s.params))
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    batch = {**_batch(0), "mask": np.ones(8, np.float32)}
    evals = [jax.jit(functools.partial(steps.eval_step, model=model, micro_batches=m))(
        steps.variables_of(state), batch)[0]["loss"] for m in (1, 2)]
    np.testing.assert_allclose(evals[0], evals[1], rtol=1e-6)


def test_micro_batches_divide_the_batch_on_cpu():
    from tljax.training import parallel

    assert [parallel.micro_batches(n) for n in (32, 64, 12, 8, 6)] == [4, 8, 1, 1, 1]
