"""Mixup and CutMix (`tljax.training.mixing`): the mixed batch and soft targets against a numpy reference written from
timm's definitions, lambda equal to the pasted box's real area, mix_prob, and pmap equal to jit on four devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tljax import config as config_lib
from tljax import data
from tljax.training import mixing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, H, W, K = 6, 7, 9, 5


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, H, W, 3)).astype(np.float32), rng.integers(0, K, B).astype(np.int32)


def reference(images, labels, key, s: mixing.Settings, smoothing: float):
    """timm's batch mode from its definitions, drawing from the same jax.random calls as the module documents:
    the key split in 5 (apply, switch, lambda, box row, box column). Returns (images, targets, lam, used_cutmix)."""
    k_apply, k_switch, k_lam, k_row, k_col = jax.random.split(key, 5)
    off = smoothing / K
    one_hot = np.full((B, K), off)
    one_hot[np.arange(B), labels] = 1 - smoothing + off
    if not float(jax.random.uniform(k_apply)) < s.mix_prob:
        return images, one_hot, 1.0, False
    if s.mixup_alpha > 0 and s.cutmix_alpha > 0:
        cutmix = bool(float(jax.random.uniform(k_switch)) < s.mix_switch_prob)
    else:
        cutmix = s.cutmix_alpha > 0
    alpha = s.cutmix_alpha if cutmix else s.mixup_alpha
    lam = float(jax.random.beta(k_lam, alpha, alpha))
    x = images.astype(np.float64)
    if cutmix:  # timm's rand_bbox: sides int(H sqrt(1 - lam)), half of each on both sides of a uniform centre
        ratio = np.sqrt(np.float32(1) - np.float32(lam))
        cut_h, cut_w = int(np.float32(H) * ratio), int(np.float32(W) * ratio)
        cy, cx = int(jax.random.randint(k_row, (), 0, H)), int(jax.random.randint(k_col, (), 0, W))
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, H)
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, W)
        out = x.copy()
        out[:, y0:y1, x0:x1] = x[::-1, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        out = lam * x + (1 - lam) * x[::-1]
    return out, lam * one_hot + (1 - lam) * one_hot[::-1], lam, cutmix


SETTINGS = {
    "mixup": mixing.Settings(mixup_alpha=0.8),
    "cutmix": mixing.Settings(cutmix_alpha=1.0),
    "both": mixing.Settings(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.7, mix_switch_prob=0.5),
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_images_and_targets_equal_the_numpy_reference(name, smoothing):
    settings = SETTINGS[name]
    images, labels = batch()
    fn = jax.jit(lambda x, y, k: mixing.mix(x, y, k, K, settings, smoothing))
    seen = set()
    for i in range(16):
        key = jax.random.key(i)
        got_images, got_targets = fn(images, labels, key)
        want_images, want_targets, lam, cutmix = reference(images, labels, key, settings, smoothing)
        seen.add("unmixed" if lam == 1.0 else "cutmix" if cutmix else "mixup")
        np.testing.assert_allclose(got_images, want_images, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_targets, want_targets, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got_targets).sum(-1), 1.0, rtol=1e-6)
        assert float(mixing.draw(key, settings, H, W).lam) == pytest.approx(lam, rel=1e-6)
    # The keys reached every branch the settings allow.
    assert seen == {"mixup": {"mixup"}, "cutmix": {"cutmix"}, "both": {"mixup", "cutmix", "unmixed"}}[name]


def test_cutmix_lambda_is_the_share_of_the_image_outside_the_clipped_box():
    """Constant images: the pixels that changed are exactly the box; lambda is 1 - their share, and boxes that the
    image border clipped are among the draws."""
    settings = mixing.Settings(cutmix_alpha=1.0)
    images = np.broadcast_to(np.arange(1, B + 1, dtype=np.float32)[:, None, None, None], (B, H, W, 3))
    labels = np.arange(B) % K
    clipped = 0
    for i in range(40):
        key = jax.random.key(100 + i)
        mixed, targets = mixing.mix(jnp.asarray(images), labels, key, K, settings)
        d = mixing.draw(key, settings, H, W)
        changed = np.asarray(mixed)[0, :, :, 0] != images[0, :, :, 0]
        lam = 1 - changed.mean()
        assert float(d.lam) == pytest.approx(lam, abs=1e-6)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        if changed.any():  # a rectangle: its bounding box is all changed
            assert changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
            assert np.all(np.asarray(mixed)[0][changed] == images[-1, 0, 0, 0])  # pasted from the paired example
        # Example 0's target: lambda on its own label, 1 - lambda on its partner's (B - 1).
        want = np.zeros(K)
        want[labels[0]] += lam
        want[labels[-1]] += 1 - lam
        np.testing.assert_allclose(targets[0], want, atol=1e-6)
        ratio = np.sqrt(np.float32(1) - np.float32(jax.random.beta(jax.random.split(key, 5)[2], 1.0, 1.0)))
        full_h, full_w = 2 * (int(np.float32(H) * ratio) // 2), 2 * (int(np.float32(W) * ratio) // 2)
        clipped += int(d.bottom - d.top) < full_h or int(d.right - d.left) < full_w
    assert clipped > 0


@pytest.mark.parametrize("settings", [mixing.Settings(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0),
                                      mixing.Settings()])
def test_a_batch_that_is_not_mixed_comes_back_unchanged_with_smoothed_one_hot_targets(settings):
    images, labels = batch(1)
    for i in range(5):
        mixed, targets = mixing.mix(jnp.asarray(images), labels, jax.random.key(i), K, settings, smoothing=0.2)
        np.testing.assert_array_equal(mixed, images)
        want = np.full((B, K), 0.2 / K)
        want[np.arange(B), labels] = 0.8 + 0.2 / K
        np.testing.assert_allclose(targets, want, rtol=1e-6)


def test_settings_from_config_and_step_keys():
    cfg = ml_collections.ConfigDict({"mixup_alpha": 0.2, "cutmix_alpha": 0, "mix_prob": 1, "mix_switch_prob": 0.5})
    settings = mixing.Settings.from_config(cfg)
    assert settings == mixing.Settings(mixup_alpha=0.2) and settings.enabled
    assert not mixing.Settings().enabled
    images, labels = batch()
    key = mixing.step_key(jax.random.PRNGKey(0), 7)
    a = mixing.mix(jnp.asarray(images), labels, key, K, cfg)
    b = mixing.mix(jnp.asarray(images), labels, key, K, settings)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # the config and its Settings mix alike
    keys = {tuple(np.asarray(jax.random.key_data(mixing.step_key(jax.random.PRNGKey(s), t))).ravel())
            for s in (0, 1) for t in (0, 1)}
    assert len(keys) == 4  # seed and step both change the draw


PMAP_CHECK = textwrap.dedent("""
    import functools
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from tljax.training import mixing
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 6, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 8).astype(np.int32)
    sharded = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec("data"))
    settings = mixing.Settings(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.8)
    fn = functools.partial(mixing.mix, num_classes=4, cfg=settings, smoothing=0.1)
    one = jax.jit(fn)
    pmap = jax.pmap(functools.partial(fn, axis_name="batch"), axis_name="batch", in_axes=(0, 0, None))
    seen = set()
    for step in range(12):
        key = mixing.step_key(jax.random.PRNGKey(3), step)
        want = one(images, labels, key)
        by_jit = one(jax.device_put(images, sharded), jax.device_put(labels, sharded), key)
        by_pmap = pmap(images.reshape(4, 2, 6, 5, 3), labels.reshape(4, 2), key)
        for a, b, c in zip(want, by_jit, by_pmap):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
            np.testing.assert_array_equal(np.asarray(c).reshape(np.shape(a)), np.asarray(a))
        d = mixing.draw(key, settings, 6, 5)
        seen.add("unmixed" if not d.mixed else "cutmix" if d.cutmix else "mixup")
    assert seen == {"unmixed", "cutmix", "mixup"}, seen
    print("pmap == jit == one device")
""")


def test_pmap_and_sharded_jit_equal_one_device_on_four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", PMAP_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pmap == jit == one device" in result.stdout


@pytest.mark.parametrize("fields, message", [
    ({"mixup_alpha": -0.2}, r"config\.data\.mixup_alpha must be a number >= 0, not -0.2"),
    ({"cutmix_alpha": float("nan")}, r"config\.data\.cutmix_alpha must be a number >= 0, not nan"),
    ({"mix_prob": 1.5}, r"config\.data\.mix_prob must be a probability in \[0, 1\], not 1.5"),
    ({"mix_switch_prob": -0.1}, r"config\.data\.mix_switch_prob must be a number >= 0"),
    ({"cutmix_alpha": 1.0, "batch_size": 1}, r"config\.data\.batch_size is 1: it would be mixed with itself"),
])
def test_impossible_mixing_fields_are_refused_before_anything_compiles(fields, message):
    cfg = config_lib.defaults()
    cfg.data.update(fields)
    with pytest.raises(data.ConfigError, match=message):
        config_lib.validate(cfg)


def test_mixing_is_refused_with_cached_features():
    cfg = config_lib.defaults()
    cfg.data.update({"augment": False, "mixup_alpha": 0.2})
    cfg.phases[0].cache_features = True
    with pytest.raises(data.ConfigError, match=r"config\.phases\[0\]\.cache_features cannot be used with mixup or "
                                               r"CutMix \(config\.data\.mixup_alpha 0.2, cutmix_alpha 0.0\)"):
        config_lib.validate(cfg)
    cfg.data.mixup_alpha = 0.0
    config_lib.validate(cfg)  # without mixing, the same config is fine
