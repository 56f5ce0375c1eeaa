"""Layer-wise learning-rate decay: each depth's rate, for every family, its composition with backbone_lr_multiplier,
its equality with per-leaf learning rates for stateful optimizers, and the validation of `layer_decay`."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_efficientnet import SMALL
from tljax import config as config_lib
from tljax import data, models
from tljax.training import optim

LR = 0.1
# name, create kwargs, image size: the smallest variant of each family (VGG's fc layers 8 units wide).
FAMILIES = {"resnet": ("resnet_tiny", {}, 16), "efficientnet": ("efficientnet_b0", SMALL, 32),
            "vgg": ("vgg16", {"fc": True, "hidden": 8}, 32)}


def _params(family: str) -> tuple[models.Classifier, dict]:
    """The model and its parameters (zeros: one step's update does not depend on them)."""
    name, kwargs, size = FAMILIES[family]
    model = models.create(name, 5, **kwargs)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)["params"]
    return model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _expected_depths(family: str, modules: list[str]) -> tuple[dict[str, int], int]:
    """The definition, written out from the module names: the stem at 0, then each block (VGG: each convolution)
    one deeper in the order of its stage and index; the head, EfficientNet's head_conv/head_bn and VGG's fc1/fc2 at
    the top depth D."""
    pattern = {"resnet": r"stage(\d+)_block(\d+)", "efficientnet": r"stage(\d+)_block(\d+)",
               "vgg": r"block(\d+)_conv(\d+)"}[family]
    blocks = sorted((tuple(int(g) for g in re.fullmatch(pattern, m).groups()), m) for m in modules
                    if re.fullmatch(pattern, m))
    depths = {m: i + 1 for i, (_, m) in enumerate(blocks)}
    top = len(blocks) + 1
    for m in modules:
        if m not in depths:
            assert m in ("stem_conv", "stem_bn", "head_conv", "head_bn", "fc1", "fc2"), m
            depths[m] = 0 if m.startswith("stem_") else top
    return depths, top


def _one_sgd_step(model, params, **phase_kwargs) -> dict[str, np.ndarray]:
    """{path: update} of one plain SGD step (no momentum) on a gradient of ones for every parameter."""
    phase = config_lib.phase(trainable=".", optimizer={"name": "sgd", "learning_rate": LR}, **phase_kwargs)
    labels = optim.param_labels(params, phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10, depths=models.layer_depths(model))
    updates, _ = jax.jit(tx.update)(jax.tree.map(np.ones_like, params), tx.init(params), params)
    return {optim.path_name(p): np.asarray(u) for p, u in jax.tree_util.tree_leaves_with_path(updates)}


@pytest.mark.parametrize("multiplier", [1.0, 0.3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_depth_trains_at_the_rate_times_decay_to_the_distance_from_the_top(family, multiplier):
    decay = 0.7
    model, params = _params(family)
    updates = _one_sgd_step(model, params, layer_decay=decay, backbone_lr_multiplier=multiplier)
    depths, top = _expected_depths(family, list(params["backbone"]))
    by_depth: dict[int, set[float]] = {}
    for path, update in updates.items():
        assert np.all(update == update.flat[0]), path  # one rate per parameter
        if path.startswith("head/"):
            assert update.flat[0] == np.float32(-LR), path  # the head: the phase's rate, untouched
            continue
        depth = depths[path.split("/")[1]]
        by_depth.setdefault(depth, set()).add(float(update.flat[0]))
        np.testing.assert_allclose(update.flat[0], -LR * multiplier * decay ** (top - depth), rtol=1e-6,
                                   err_msg=path)
    assert all(len(rates) == 1 for rates in by_depth.values())  # one rate per depth
    rates = {d: rates.pop() for d, rates in by_depth.items()}
    first = 0 if family != "vgg" else 1  # VGG has no stem
    assert sorted(rates) == list(range(first, top)) + ([top] if family != "resnet" else [])
    for d in range(first, top):
        ratio = rates[d] / rates[d + 1] if d + 1 in rates else rates[d] / (-LR * multiplier)
        assert ratio == pytest.approx(decay, rel=1e-6), (d, ratio)


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "learning_rate": LR, "momentum": 0.9},
                                       {"name": "adam", "learning_rate": LR},
                                       {"name": "adamw", "learning_rate": LR, "weight_decay": 0.05}])
def test_scaling_the_update_is_a_per_leaf_learning_rate(optimizer):
    """For optimizers whose learning rate is their last scaling, the factor on the update equals running each leaf
    at its own rate, over several steps of momentum or moment estimates (and adamw's decoupled decay)."""
    decay = 0.6
    model, zeros = _params("resnet")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), zeros)
    phase = config_lib.phase(trainable=".", optimizer=optimizer, layer_decay=decay)
    labels = optim.param_labels(params, phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10, depths=models.layer_depths(model))
    depths, top = _expected_depths("resnet", list(params["backbone"]))
    rate_of = jax.tree_util.tree_map_with_path(
        lambda path, _: LR * (decay ** (top - depths[path[1].key]) if path[0].key == "backbone" else 1.0), params)
    kwargs = {k: v for k, v in optimizer.items() if k not in ("name", "learning_rate")}
    per_leaf = optax.multi_transform({rate: getattr(optax, optimizer["name"])(rate, **kwargs)
                                      for rate in set(jax.tree.leaves(rate_of))}, rate_of)
    ours, reference = params, params
    ours_state, reference_state = tx.init(params), per_leaf.init(params)
    assert jax.tree.structure(ours_state) == jax.tree.structure(
        optim.build(config_lib.phase(trainable=".", optimizer=optimizer), labels, 10).init(params))
    def step(tx, grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step_ours, step_reference = jax.jit(functools.partial(step, tx)), jax.jit(functools.partial(step, per_leaf))
    for _ in range(3):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        ours, ours_state = step_ours(grads, ours_state, ours)
        reference, reference_state = step_reference(grads, reference_state, reference)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=optim.path_name(path))


def call_order(name: str) -> tuple[list[str], dict]:
    """(the backbone's top-level modules with parameters, in the order the forward pass first calls them, as
    "backbone/<module>"; the parameter shapes) of model `name` at 224 px, recorded while its initialisation is
    traced."""
    model = models.create(name, 5)
    called: list[str] = []

    def record(next_fn, args, kwargs, context):
        path = "/".join(context.module.path)
        if len(context.module.path) == 2 and path.startswith("backbone/") and path not in called:
            called.append(path)
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
    return [m for m in called if m.split("/")[1] in shapes["backbone"]], shapes


@pytest.mark.parametrize("family", list(models.FAMILIES))
def test_every_family_orders_its_modules_as_the_image_passes_them(family):
    """Every backbone module has a depth, and depths never decrease along the forward pass (each registered
    family, its first preset)."""
    name = next(iter(models.FAMILIES[family].PRESETS))
    called, shapes = call_order(name)
    depths = models.layer_depths(models.create(name, 5))
    assert set(called) == {f"backbone/{m}" for m in shapes["backbone"]} == set(depths) - {"head"}
    assert [depths[m] for m in called] == sorted(depths[m] for m in called)
    assert depths["head"] == max(depths.values()) >= depths[called[-1]]


@pytest.mark.parametrize("value, message", [(0.0, r"must be in \(0, 1\] \(1 = off"), (-0.5, "must be a number >= 0"),
                                            (1.5, r"must be in \(0, 1\] \(1 = off"),
                                            (float("nan"), "must be a number")])
def test_layer_decay_outside_zero_one_is_refused(value, message):
    cfg = config_lib.defaults()
    cfg.phases[1].layer_decay = value
    with pytest.raises(data.ConfigError, match=r"config\.phases\[1\]\.layer_decay " + message):
        config_lib.validate(cfg)
