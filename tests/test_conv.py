"""The fast convolution forms give XLA's numbers: values and gradients, every padding convention and stride; the
flattened products of `Dense` give flax's."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from tljax.models import conv, layers

CASES = [  # (size, channels in, kernel, stride, padding, groups == channels: depthwise)
    (8, 6, 1, 1, 0, False), (9, 6, 1, 2, 0, False), (8, 6, 1, 2, "SAME", False),
    (8, 5, 3, 1, 1, True), (9, 5, 3, 2, "SAME", True), (8, 5, 3, 2, "SAME", True), (10, 4, 5, 1, 2, True),
    (7, 4, 3, 2, 1, True), (8, 4, 5, 2, "SAME", True), (11, 3, 5, 2, ((1, 3), (2, 2)), True),
    # outputs of at most conv.SMALL_OUTPUT pixels: the product of the receptive fields
    (2, 6, 3, 1, 1, False), (1, 6, 3, 1, 1, False), (4, 6, 3, 2, 1, False), (3, 6, 3, 2, "SAME", False),
    (3, 4, 7, 2, 3, False), (2, 5, 3, 1, ((0, 1), (1, 0)), False),
]


def _run(mode, monkeypatch, x, w, stride, padding, groups):
    monkeypatch.setenv("TLJAX_CONV", mode)

    def loss(x, w):
        return jnp.sum(jnp.sin(conv.conv2d(x, w, stride, padding, groups)))

    return conv.conv2d(x, w, stride, padding, groups), jax.grad(loss, argnums=(0, 1))(x, w)


@pytest.mark.parametrize("size, cin, k, stride, padding, depthwise", CASES)
def test_fast_forms_match_xla(monkeypatch, size, cin, k, stride, padding, depthwise):
    rng = np.random.default_rng(size * k + stride)
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
    cout, groups = (cin, cin) if depthwise else (7, 1)
    w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
    native, native_grads = _run("native", monkeypatch, x, w, stride, padding, groups)
    fast, fast_grads = _run("fast", monkeypatch, x, w, stride, padding, groups)
    assert fast.shape == native.shape
    np.testing.assert_allclose(fast, native, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, native_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size, stride, patches", [(2, 1, True), (1, 1, True), (4, 2, True), (3, 1, False),
                                                  (5, 2, False)])
def test_small_outputs_are_one_product_of_receptive_fields(monkeypatch, size, stride, patches):
    monkeypatch.setenv("TLJAX_CONV", "fast")  # the forms "auto" takes on CPU
    x, w = jnp.zeros((2, size, size, 4)), jnp.zeros((3, 3, 4, 8))
    forms = {e.primitive.name for e in jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, stride, 1))(x, w).eqns}
    assert ("conv_general_dilated" not in forms and "dot_general" in forms) == patches


def test_depthwise_in_bfloat16_accumulates_in_float32(monkeypatch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(5, 5, 1, 8)), jnp.bfloat16)
    fast, _ = _run("fast", monkeypatch, x, w, 1, 2, 8)
    reference = conv.conv2d(x.astype(jnp.float32), w.astype(jnp.float32), 1, 2, 8)
    assert fast.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(fast, np.float32), reference, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 9, 7), (4, 7)])
def test_dense_is_flax_dense_with_the_same_parameters_values_and_gradients(shape):
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = nn.Dense(11).init(jax.random.key(0), x)
    variables = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), variables)

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    ours, theirs = layers.Dense(11), nn.Dense(11)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(variables, x)),
                    jax.tree.leaves(jax.grad(loss(theirs), argnums=(0, 1))(variables, x))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("TLJAX_CONV", "cudnn")
    with pytest.raises(ValueError, match="TLJAX_CONV"):
        conv.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 3)))


@pytest.mark.parametrize("size", [(9, 10), (8, 8)])
def test_max_pool_matches_reduce_window_with_its_fast_gradient(size):
    from tljax.models.layers import max_pool

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *size, 3)), jnp.float32)
    padding = ((1, 1), (1, 1))

    def reference(y):
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), *padding, (0, 0)))

    np.testing.assert_array_equal(max_pool(x, padding), reference(x))
    grads = [jax.grad(lambda y, f=f: jnp.sum(jnp.sin(f(y))))(x) for f in (lambda y: max_pool(y, padding), reference)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_window_as_pytorch_does():
    """Windows full of ties (constant regions, repeated values, -inf padding at the border): each output's gradient
    lands on one input, the first maximal one in row-major order, as torch's max_pool2d backward puts it."""
    torch = pytest.importorskip("torch")
    from tljax.models.layers import max_pool

    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(2, 9, 10, 3)).astype(np.float32)  # three values: most windows hold ties
    g = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    ours = jax.vjp(lambda y: max_pool(y, ((1, 1), (1, 1))), jnp.asarray(x))[1](jnp.asarray(g))[0]
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    torch.nn.functional.max_pool2d(xt, 3, 2, 1).backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(ours), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    # the windows do hold ties; XLA's select-and-scatter (reduce_window's gradient) also picks the first maximum
    taps = [x[:, i::2, j::2][:, :4, :4] for i in range(3) for j in range(3)]  # 16 windows inside the input
    top = np.max(taps, axis=0)
    assert (np.sum([t == top for t in taps], axis=0) > 1).mean() > 0.5
    np.testing.assert_allclose(ours, jax.grad(lambda y: jnp.sum(jax.lax.reduce_window(
        y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))) * g))(x), atol=1e-6)


def _entry(hlo: str) -> str:
    """The ENTRY computation of a compiled module's text: the operations XLA's CPU runtime calls itself."""
    return hlo[hlo.index("\nENTRY"):]


def test_steps_compile_their_convolutions_for_eigen_and_their_products_for_ynnpack_on_cpu():
    """`conv.compiler_options` (which `parallel.Jit` compiles with) takes the k x k convolutions from YNNPACK, where
    XLA's defaults put them in a YNNPACK fusion, and leaves them to Eigen, a convolution of the entry computation;
    the products stay YNNPACK fusions and the numbers agree."""
    from tljax.training import parallel

    assert conv.compiler_options(), "this jaxlib should accept the option"
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 12, 12, 32)), jnp.float32)  # > 16 channels: YNNPACK takes it by default
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
    d = jnp.asarray(rng.normal(size=(32, 32)), jnp.float32)

    def step(x, w, d):
        kernel_grad = jax.grad(lambda w: jnp.sum(jnp.sin(conv.conv2d(x, w, 1, 1))))(w)
        return kernel_grad, conv.matmul(x, d)

    default, ours = jax.jit(step), parallel.Jit().compile(step, donate=False)
    default_hlo, our_hlo = (_entry(f.lower(x, w, d).compile().as_text()) for f in (default, ours))
    assert " convolution(" not in default_hlo and "__ynn_fusion" in default_hlo
    assert our_hlo.count(" convolution(") == 2  # forward and kernel gradient
    assert "__ynn_fusion" in our_hlo  # the product
    for a, b in zip(ours(x, w, d), default(x, w, d)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_compiler_options_are_none_where_this_jaxlib_lacks_them(monkeypatch):
    monkeypatch.setattr(conv, "_CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NONE"})
    conv.compiler_options.cache_clear()
    try:
        assert conv.compiler_options() == {}
    finally:
        conv.compiler_options.cache_clear()
