"""Normalization strategies and training statistics, against numpy computations of the formulas."""

import numpy as np
import pytest
import tensorflow as tf

from tljax.data import normalize
from tljax.pretrained.prep import KERAS_CAFFE


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (6, 5, 7, 3))
    x[..., 2] = x[..., 2] * 0.2 + 100  # channels with different ranges
    return x.astype(np.float32)


def test_streaming_statistics_equal_numpy_over_all_images(images):
    stats = normalize.compute_stats([images[:1], images[1:4], images[4:]])
    flat = images.reshape(-1, 3).astype(np.float64)
    assert stats.count == flat.shape[0]
    np.testing.assert_allclose(stats.mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, flat.std(0), rtol=1e-12)
    np.testing.assert_array_equal(stats.min, flat.min(0))
    np.testing.assert_array_equal(stats.max, flat.max(0))
    overall = stats.scoped("global")
    np.testing.assert_allclose(overall.mean, [flat.mean()], rtol=1e-12)
    np.testing.assert_allclose(overall.std, [flat.std()], rtol=1e-12)
    assert overall.min == (flat.min(),) and overall.max == (flat.max(),)
    assert normalize.Stats.from_dict(stats.to_dict()) == stats


def test_train_statistic_formulas(images):
    stats = normalize.compute_stats([images])
    x = images.astype(np.float64)
    lo, hi, mean, std = (np.asarray(v) for v in (stats.min, stats.max, stats.mean, stats.std))
    got = normalize.normalizer("minmax_train", stats=stats)(tf.constant(images)).numpy()
    np.testing.assert_allclose(got, (x - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    got = normalize.normalizer("standardize_train", stats=stats)(tf.constant(images)).numpy()
    np.testing.assert_allclose(got, (x - mean) / std, rtol=1e-5, atol=1e-5)


def test_per_sample_formulas(images):
    x = images.astype(np.float64)
    axes = (1, 2, 3)
    lo, hi = x.min(axes, keepdims=True), x.max(axes, keepdims=True)
    got = normalize.normalizer("minmax_sample")(tf.constant(images)).numpy()
    np.testing.assert_allclose(got, (x - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    got = normalize.normalizer("standardize_sample")(tf.constant(images)).numpy()
    np.testing.assert_allclose(got, (x - x.mean(axes, keepdims=True)) / x.std(axes, keepdims=True), atol=1e-4)
    single = normalize.standardize_sample(tf.constant(images[0])).numpy()  # one image [H, W, C]
    np.testing.assert_allclose(single, got[0], atol=1e-5)


def test_constant_images_and_channels_do_not_divide_by_zero():
    constant = tf.fill((2, 4, 4, 3), 7.0)
    for strategy in ("minmax_sample", "standardize_sample"):
        np.testing.assert_array_equal(normalize.normalizer(strategy)(constant).numpy(), 0.0)
    stats = normalize.compute_stats([np.full((2, 4, 4, 3), 7.0, np.float32)])
    assert stats.std == (0.0, 0.0, 0.0) and stats.min == stats.max
    for strategy in normalize.TRAIN_STRATEGIES:
        np.testing.assert_array_equal(normalize.normalizer(strategy, stats=stats)(constant).numpy(), 0.0)


def test_pretrained_and_none(images):
    got = normalize.normalizer("pretrained", prep=KERAS_CAFFE)(tf.constant(images)).numpy()
    np.testing.assert_allclose(got, images[..., ::-1] - np.asarray(KERAS_CAFFE.mean), rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(normalize.normalizer("none")(tf.constant(images)).numpy(), images)


def test_bad_strategy_or_missing_inputs():
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        normalize.normalizer("zscore")
    with pytest.raises(ValueError, match="needs the weights' Preprocessing"):
        normalize.normalizer("pretrained")
    with pytest.raises(ValueError, match="needs the training-set statistics"):
        normalize.normalizer("minmax_train")


def test_saved_statistics_round_trip_and_refuse_other_settings(tmp_path, images):
    stats = normalize.compute_stats([images])
    path = tmp_path / normalize.FILENAME
    settings = {"normalization": "minmax_train", "image_size": 32, "crop": (0.875, "bicubic")}
    normalize.save(path, settings, stats)
    assert normalize.load(path, settings) == stats
    with pytest.raises(ValueError, match="image_size: saved 32, now 64"):
        normalize.load(path, {**settings, "image_size": 64})
