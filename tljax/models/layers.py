"""Building blocks shared by every model family: the convolution module, BatchNorm and pooling.

All convolutions in tljax go through `Conv` (-> `conv.conv2d`), so that the fastest way to compute each kind of
convolution on the current backend lives in one place and the model files only describe architecture.

Padding follows the framework the weights come from:
  * an int `p` is PyTorch's symmetric `padding=p`;
  * "SAME" is TensorFlow/Keras "same" padding (asymmetric for stride 2 on even inputs);
  * an explicit `((top, bottom), (left, right))` pair for anything else.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.conv import Padding, conv2d

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


def max_pool(x: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """3x3 max-pool with stride 2 (ResNet's stem), padding with -inf: the maximum of nine strided slices.

    The same values as `reduce_window`, and a 4x faster gradient on CPU (XLA's select-and-scatter is slow).
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    n, h, w, c = xp.shape
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    out = None
    for i in range(3):
        for j in range(3):
            tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + 2 * (oh - 1) + 1, j + 2 * (ow - 1) + 1, c), (1, 2, 2, 1))
            out = tap if out is None else jnp.maximum(out, tap)
    return out
