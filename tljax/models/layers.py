"""Building blocks shared by every model family: the convolution and dense modules, BatchNorm and pooling.

All convolutions in tljax go through `Conv` (-> `conv.conv2d`) and all dense layers over images or tokens through
`Dense` (-> `conv.matmul`), so that the fastest way to compute each lives in one place and the model files only
describe architecture.

Padding follows the framework the weights come from:
  * an int `p` is PyTorch's symmetric `padding=p`;
  * "SAME" is TensorFlow/Keras "same" padding (asymmetric for stride 2 on even inputs);
  * an explicit `((top, bottom), (left, right))` pair for anything else.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.conv import Padding, conv2d, matmul

Dtype = Any

# He-normal over fan-out, the initialisation torchvision and Keras use for ImageNet convnets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """2D convolution over NHWC inputs; `groups == in_channels` makes it depthwise.

    Parameters are float32 ("kernel" HWIO with I = in_channels / groups, "bias"); the computation runs in `dtype`.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Padding = 0
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels are not divisible by groups={self.groups}")
        kernel = self.param("kernel", conv_init, (k, k, in_features // self.groups, self.features), jnp.float32)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding, self.groups)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def _last_axis_product(x: jax.Array, kernel: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None) -> jax.Array:
    """`nn.Dense`'s product (x's last axis with the kernel's first) as `conv.matmul`, whose kernel gradient XLA
    computes faster on CPU for inputs of more than two dimensions (ConvNeXt's pixels, ViT's tokens)."""
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or preferred_element_type is not None:
        raise ValueError(f"Dense: unexpected product {dimension_numbers}, preferred {preferred_element_type}")
    return matmul(x, kernel, precision)


# flax's Dense (parameters "kernel" [in, out] and "bias") with its product computed by `conv.matmul`.
Dense = functools.partial(nn.Dense, dot_general=_last_axis_product)


def at_least_f32(x: jax.Array) -> jax.Array:
    """`x` in float32, or in its own dtype when that is wider (float64 reference checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (the same variables and names) whose mode follows its own parameters' trainability.

    In training mode (`train`), it normalises with the batch's statistics and updates its running statistics only
    when its parameters train: `trained_modules` holds the paths of the modules whose parameters the phase trains
    ("backbone/stage4_block0/bn1": the module's path from the root module being applied), and a layer outside it
    runs in inference mode, on its running statistics, which stay untouched. That is Keras's rule (a layer that does
    not train runs in inference mode): unfreezing the last stage does not re-normalise the frozen stages beneath it.
    `trained_modules=None`: every layer follows `train`.
    """

    train: bool = False
    trained_modules: frozenset[str] | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        trains = self.train and (self.trained_modules is None or "/".join(self.scope.path) in self.trained_modules)
        return super().__call__(x, use_running_average=not trains)


def batch_norm(train: bool, epsilon: float, name: str | None = None, axis_name: str | None = None,
               trained_modules: frozenset[str] | None = None) -> BatchNorm:
    """A `BatchNorm` with momentum 0.9: batch statistics (and their update) only when `train` is true and its
    parameters train (see `BatchNorm`).

    The statistics and the normalisation run in float32 (float64 for float64 inputs) whatever the compute dtype:
    mixed precision keeps BN exact.
    `axis_name`: under `pmap`, the device axis over which batch statistics are averaged, so that data-parallel
    training normalises with the statistics of the whole global batch, as one device would.
    """
    return BatchNorm(momentum=0.9, epsilon=epsilon, dtype=None, axis_name=axis_name, name=name, train=train,
                     trained_modules=trained_modules)


def layer_norm(epsilon: float, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis (Flax names: `scale`, `bias`), as PyTorch and Keras compute it: two-pass
    statistics (no E[x^2] - E[x]^2 shortcut, which loses digits when a token's mean dwarfs its spread).

    It computes and returns float32 (float64 for float64 inputs) whatever the compute dtype: the parameters are
    float32 and `dtype=None` promotes to them, so mixed precision keeps the normalisation exact.
    """
    return nn.LayerNorm(epsilon=epsilon, dtype=None, use_fast_variance=False, name=name)


def drop_path(module: nn.Module, branch: jax.Array, rate: float, train: bool) -> jax.Array:
    """Stochastic depth on a residual branch: in training mode each example's branch is dropped with probability
    `rate` and kept ones are scaled by 1 / (1 - rate) (timm's and Keras's DropPath), drawn from `module`'s "dropout"
    RNG stream; the identity in inference mode."""
    if not train or rate == 0:
        return branch
    keep = 1.0 - rate
    alive = jax.random.bernoulli(module.make_rng("dropout"), keep, (branch.shape[0],) + (1,) * (branch.ndim - 1))
    return jnp.where(alive, branch / keep, 0).astype(branch.dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes, in float32 (or wider)."""
    return jnp.mean(at_least_f32(x), axis=(1, 2))


def _pool_taps(xp: jax.Array, oh: int, ow: int):
    """The nine strided slices of the padded input that a 3x3, stride-2 window reads, in row-major tap order."""
    n, _, _, c = xp.shape
    for i in range(3):
        for j in range(3):
            yield jax.lax.slice(xp, (0, i, j, 0), (n, i + 2 * (oh - 1) + 1, j + 2 * (ow - 1) + 1, c), (1, 2, 2, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """3x3 max-pool with stride 2 (ResNet's stem), padding with -inf: the maximum of nine strided slices.

    The same values as `reduce_window`. The gradient goes to the first maximal tap of each window (PyTorch's rule;
    JAX's own splits exact ties) through the tap's index, kept from the forward pass as int8: the backward pass
    reads neither the input nor the activations before it, which XLA otherwise recomputes inside the gradient's
    fusion (select-and-scatter, or the chain of maxima's selects, cost 8% of a ResNet-50 fine-tuning step on CPU).
    """
    return _max_pool_forward(x, padding)[0]


def _max_pool_forward(x, padding):
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    oh, ow = (xp.shape[1] - 3) // 2 + 1, (xp.shape[2] - 3) // 2 + 1
    out, index = None, None
    for t, tap in enumerate(_pool_taps(xp, oh, ow)):
        if out is None:
            out, index = tap, jnp.zeros(tap.shape, jnp.int8)
        else:
            larger = tap > out
            out, index = jnp.where(larger, tap, out), jnp.where(larger, jnp.int8(t), index)
    return out, (index, x.shape[1:3])


def _max_pool_backward(padding, residuals, g):
    index, (h, w) = residuals
    (top, bottom), (left, right) = padding
    oh, ow = g.shape[1:3]
    dxp = None
    for t in range(9):  # tap (i, j) read padded rows i, i + 2, ...: put its share of g back there
        i, j = divmod(t, 3)
        config = [(0, 0, 0), (i, h + top + bottom - i - 2 * (oh - 1) - 1, 1),
                  (j, w + left + right - j - 2 * (ow - 1) - 1, 1), (0, 0, 0)]
        share = jax.lax.pad(jnp.where(index == t, g, 0), jnp.zeros((), g.dtype), config)
        dxp = share if dxp is None else dxp + share
    return (dxp[:, top:top + h, left:left + w, :],)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)
