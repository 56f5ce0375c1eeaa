"""Mixed precision: `dtype="bfloat16"` makes the convolutions and matrix products bfloat16, in the forward pass and in
the training step's backward pass, while parameters, BatchNorm, pooling, logits and the loss stay float32.

Float32 outputs alone prove nothing (pooling casts to float32 whatever ran before), so the tests read the lowered
programs and compare with float32 numbers: bfloat16 must move them by bfloat16's rounding, not more, not less.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import config as config_lib
from tljax import models
from tljax.training import optim, steps

SIZE = 32
# A 10-block, 8-to-80-channel EfficientNet-Lite with every kind of layer (expand, depthwise, strides, residuals).
MODELS = {"resnet_tiny": {}, "efficientnet_lite0": {"width": 0.25, "depth": 0.4}}
# A convolution or matrix product in StableHLO text, with the element types of its operands and result.
PRODUCT = re.compile(r"stablehlo\.(?:convolution|dot_general)\b.*:\s*\((.*)\)\s*->\s*(.*)$")


def _product_types(program: str) -> list[set[str]]:
    """Per convolution / dot_general of the lowered program: the element types it reads and writes."""
    found = [PRODUCT.search(line) for line in program.splitlines()]
    return [set(re.findall(r"x(bf16|f16|f32|f64)>", m.group(1) + m.group(2))) for m in found if m]


def _batch(seed: int = 0, n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, 5, n).astype(np.int32)}


def _train_step(model, variables, trainable: str = ".", bn: str = "frozen"):
    phase = config_lib.phase(trainable=trainable, bn=bn, optimizer={"name": "sgd", "learning_rate": 0.1})
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10)
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=bn == "train"))
    return fn, steps.create_state(variables, tx, jax.random.PRNGKey(1))


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_convolutions_and_products_in_forward_and_backward(name):
    types = {}
    for dtype in ("float32", "bfloat16"):
        model = models.create(name, 5, dtype=dtype, **MODELS[name])
        image = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
        variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
        forward = jax.jit(functools.partial(model.apply, train=False)).lower(variables, _batch()["image"])
        fn, state = _train_step(model, variables, bn="train")
        step = fn.lower(jax.eval_shape(lambda s: s, state), _batch())
        types[dtype] = [_product_types(forward.as_text()), _product_types(step.as_text())]
    for forward, step in types.values():
        assert 0 < len(forward) < len(step)  # the step adds the backward pass's products
    assert [len(t) for t in types["float32"]] == [len(t) for t in types["bfloat16"]]
    assert all(t == {"f32"} for program in types["float32"] for t in program)
    assert all(t == {"bf16"} for program in types["bfloat16"] for t in program)


@pytest.fixture(scope="module")
def tiny():
    """resnet_tiny in both dtypes, and one set of float32 variables for both."""
    f32, bf16 = (models.create("resnet_tiny", 5, dtype=d) for d in ("float32", "bfloat16"))
    return f32, bf16, jax.device_get(jax.jit(f32.init)(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))


def _relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def test_bfloat16_features_are_float32_off_by_bfloat16_rounding(tiny):
    f32, bf16, variables = tiny
    images = _batch()["image"]
    features = [jax.jit(functools.partial(m.apply, method="features"))(variables, images) for m in (f32, bf16)]
    assert features[1].dtype == jnp.float32 and features[1].shape == features[0].shape
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 = 2e-3): far above float32's 6e-8, below 1e-2.
    assert 5e-4 < _relative(features[1], features[0]) < 1e-2


def test_a_bfloat16_training_step_updates_float32_parameters_like_float32_does(tiny):
    f32, bf16, variables = tiny
    results = {}
    for name, model in (("float32", f32), ("bfloat16", bf16)):
        fn, state = _train_step(model, variables)
        new, sums = fn(state, _batch())
        results[name] = jax.device_get((new, sums))
    (new16, sums16), (new32, sums32) = results["bfloat16"], results["float32"]
    assert np.isfinite(sums16["loss"]) and 0 < abs(sums16["loss"] - sums32["loss"]) < 1e-2 * abs(sums32["loss"])
    assert {x.dtype for x in jax.tree.leaves(new16.params)} == {np.dtype(np.float32)}
    updates = [np.concatenate([(p - p0).ravel() for p, p0 in zip(jax.tree.leaves(new.params),
                                                                 jax.tree.leaves(variables["params"]))])
               for new in (new16, new32)]
    # The float32 step's update, give or take bfloat16's rounding of the activations and of the gradients' sums
    # (float32 compute would be ~1e-6 off; measured here: 2-5%).
    assert 1e-3 < _relative(updates[0], updates[1]) < 0.1


def test_bfloat16_batchnorm_statistics_stay_float32(tiny):
    _, bf16, variables = tiny
    fn, state = _train_step(bf16, variables, bn="train")
    new, sums = jax.device_get(fn(state, _batch()))
    stats = jax.tree.leaves(new.batch_stats)
    assert {x.dtype for x in stats} == {np.dtype(np.float32)} and all(np.isfinite(x).all() for x in stats)
    assert np.isfinite(sums["loss"])
    assert not np.array_equal(new.batch_stats["backbone"]["stem_bn"]["mean"],
                              variables["batch_stats"]["backbone"]["stem_bn"]["mean"])
