"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) of a train batch, as pure JAX functions with timm's
batch-mode semantics (`timm.data.Mixup(mode="batch")`).

Example i of a global batch of B is paired with example B-1-i (the batch reversed). One draw per batch, from one
PRNG key:
- with probability 1 - mix_prob the batch is left as it is (lambda = 1);
- otherwise CutMix with probability mix_switch_prob when both alphas are > 0 (else whichever is > 0), Mixup if not;
- lambda ~ Beta(alpha, alpha) with that method's alpha;
- Mixup: image = lambda * image + (1 - lambda) * paired image;
- CutMix: a box with sides int(H sqrt(1 - lambda)) x int(W sqrt(1 - lambda)) (rounded down to even, as timm cuts
  half a side each way from the centre), centred on a uniform random pixel, clipped to the image, is pasted from the
  paired image; lambda then becomes the share of the image left outside the box, 1 - box area / (H W), so the
  targets weigh what each image really shows;
- targets = lambda * onehot(y) + (1 - lambda) * onehot(y paired), with label smoothing applied to both one-hots (a
  one-hot becomes 1 - s + s / K on its class and s / K elsewhere, K classes) when it is on, as timm does.
Images are mixed as the step receives them (normalised): for the per-channel affine normalisations this is the same
as mixing the pixels; for the per-image ones (minmax_sample, standardize_sample) it is not.

The key comes from `step_key(rng, step)`: the randomness depends only on the run's seed and the global step, so a
resumed run mixes exactly as an uninterrupted one, and every device draws the same lambda and box. Under jit the
batch is the global batch (sharded or not), so the pairing is global; under pmap each device holds its slice, and
`axis_name` makes the pairing global too (see `mix`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

_STREAM = 0x6D6978  # "mix": keeps the mixing keys apart from the dropout keys derived from the same rng and step


@dataclasses.dataclass(frozen=True)
class Settings:
    """The mixing fields of `config.data` (hashable: can be bound into a jitted step as a static value)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        """From `config.data` (an ml_collections.ConfigDict, or anything with these attributes)."""
        return cls(float(cfg.mixup_alpha), float(cfg.cutmix_alpha), float(cfg.mix_prob), float(cfg.mix_switch_prob))

    @property
    def enabled(self) -> bool:
        """Does this mix at all (an alpha > 0)?"""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class Draw(NamedTuple):
    """One batch's random choices: mixed at all, CutMix (else Mixup), lambda (after the box correction for CutMix),
    and the CutMix box rows [top, bottom) and columns [left, right) (empty for Mixup)."""

    mixed: jax.Array
    cutmix: jax.Array
    lam: jax.Array
    top: jax.Array
    bottom: jax.Array
    left: jax.Array
    right: jax.Array


def step_key(rng: jax.Array, step: jax.Array | int) -> jax.Array:
    """The mixing key of global step `step` from the run's PRNG key (TrainState.rng): the same on every device (do
    not fold in a device index) and after a resume."""
    return jax.random.fold_in(jax.random.fold_in(rng, _STREAM), step)


def draw(key: jax.Array, settings: Settings, height: int, width: int) -> Draw:
    """The batch's choices from `key`: split into 5 keys (apply, switch, lambda, box row, box column), then
    uniform < mix_prob, uniform < mix_switch_prob, Beta(alpha, alpha), and the box centre as randint in [0, H) and
    [0, W) (see the module docstring)."""
    k_apply, k_switch, k_lam, k_row, k_col = jax.random.split(key, 5)
    mixed = jax.random.uniform(k_apply) < settings.mix_prob
    if settings.mixup_alpha > 0 and settings.cutmix_alpha > 0:
        cutmix = jax.random.uniform(k_switch) < settings.mix_switch_prob
    else:
        cutmix = jnp.asarray(settings.cutmix_alpha > 0)
    alpha = jnp.where(cutmix, settings.cutmix_alpha, settings.mixup_alpha)
    lam = jnp.where(mixed, jax.random.beta(k_lam, alpha, alpha), 1.0)
    ratio = jnp.sqrt(1.0 - lam)
    half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
    half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
    row = jax.random.randint(k_row, (), 0, height)
    col = jax.random.randint(k_col, (), 0, width)
    top, bottom = jnp.clip(row - half_h, 0, height), jnp.clip(row + half_h, 0, height)
    left, right = jnp.clip(col - half_w, 0, width), jnp.clip(col + half_w, 0, width)
    box = cutmix & mixed
    zero = jnp.zeros((), jnp.int32)
    top, bottom, left, right = (jnp.where(box, v, zero) for v in (top, bottom, left, right))
    lam = jnp.where(box, 1.0 - (bottom - top) * (right - left) / (height * width), lam)
    return Draw(mixed, box, lam, top, bottom, left, right)


def soft_targets(labels: jax.Array, paired: jax.Array, lam: jax.Array, num_classes: int,
                 smoothing: float = 0.0) -> jax.Array:
    """lam * onehot(labels) + (1 - lam) * onehot(paired), each one-hot label-smoothed by `smoothing`: [B, classes]."""
    def one_hot(y: jax.Array) -> jax.Array:
        return optax.smooth_labels(jax.nn.one_hot(y, num_classes), smoothing)

    return lam * one_hot(labels) + (1.0 - lam) * one_hot(paired)


def _paired(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Each example's partner: the batch reversed; under pmap (`axis_name`), the global batch reversed, this device's
    slice of it: device d receives the slice of device n-1-d (one `ppermute`) and reverses it."""
    if axis_name is None:
        return x[::-1]
    n = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(x, axis_name, perm=[(d, n - 1 - d) for d in range(n)])[::-1]


def mix(images: jax.Array, labels: jax.Array, key: jax.Array, num_classes: int, cfg: Any, smoothing: float = 0.0,
        axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Mixup / CutMix of a train batch: (mixed images [B, H, W, C], soft targets [B, classes] summing to 1).

    images: the batch, NHWC; labels: int [B]; key: `step_key(state.rng, state.step)`; cfg: `config.data` or a
    `Settings`; smoothing: the phase's label smoothing, applied to both one-hots. With both alphas 0 (or when the
    draw skips the batch, probability 1 - mix_prob) the images come back unchanged and the targets are the
    (smoothed) one-hots.

    axis_name: under pmap, the device axis. Each device holds its slice of the global batch and the pairing must be
    global to give jit's result: each device sends its slice to its mirror device (one collective permute of a
    local batch of images and labels per step, a memory copy on one host) and every device draws the same lambda
    and box from the shared key. Under jit (sharded or not) leave it None: the batch is global already.
    """
    settings = cfg if isinstance(cfg, Settings) else Settings.from_config(cfg)
    if not settings.enabled:
        return images, soft_targets(labels, labels, jnp.ones(()), num_classes, smoothing)
    d = draw(key, settings, images.shape[1], images.shape[2])
    paired_images, paired_labels = _paired(images, axis_name), _paired(labels, axis_name)
    rows = jnp.arange(images.shape[1])[:, None]
    cols = jnp.arange(images.shape[2])[None, :]
    in_box = ((rows >= d.top) & (rows < d.bottom) & (cols >= d.left) & (cols < d.right))[None, :, :, None]
    lam = d.lam.astype(images.dtype)
    blended = jnp.where(d.cutmix, jnp.where(in_box, paired_images, images), lam * images + (1 - lam) * paired_images)
    mixed = jnp.where(d.mixed, blended, images)
    return mixed, soft_targets(labels, paired_labels, d.lam, num_classes, smoothing)
