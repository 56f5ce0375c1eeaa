"""Decoding: the JPEG crop-window decode gives the full decode's pixels, the train pipeline's batches equal the
decode-then-crop path bit for bit, consecutive epochs share one iterator without changing a batch, and DCT
downscaling (config.data.jpeg_dct_scaling) keeps the eval geometry and stays within a few levels on average."""

import numpy as np
import pytest
import tensorflow as tf

from tests.test_data_pipeline import config
from tljax import data
from tljax.data import pipeline, transforms


def photo(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    """Smooth colour fields with edges and noise: JPEG blocks and chroma subsampling matter, as in photos."""
    coarse = rng.normal(128, 60, (1, 4, 5, channels)).astype(np.float32)
    image = tf.image.resize(coarse, (height, width), "bicubic")[0].numpy()
    image[: height // 2, width // 3 :] += 40
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


ENCODINGS = {
    "jpeg 4:2:0": lambda x: tf.io.encode_jpeg(x, quality=90),
    "jpeg 4:4:4": lambda x: tf.io.encode_jpeg(x, quality=95, chroma_downsampling=False),
    "jpeg progressive": lambda x: tf.io.encode_jpeg(x, quality=75, progressive=True),
    "jpeg grayscale": lambda x: tf.io.encode_jpeg(x[..., :1], quality=85),
    "png": lambda x: tf.io.encode_png(x),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_window_decode_equals_full_decode_then_slice(encoding):
    rng = np.random.default_rng(0)
    encoded = ENCODINGS[encoding](photo(rng, 77, 203))
    full = transforms.decode(encoded).numpy()
    windows = [(0, 0, 77, 203), (76, 202, 1, 1), (33, 150, 44, 53), (1, 17, 31, 15)]
    windows += [tuple(int(v) for v in (rng.integers(0, 60), rng.integers(0, 180), rng.integers(1, 18),
                                       rng.integers(1, 24))) for _ in range(40)]
    for top, left, height, width in windows:
        got = transforms.decode_window(encoded, tf.constant([top, left, height, width])).numpy()
        np.testing.assert_array_equal(got, full[top : top + height, left : left + width])


def test_train_batches_equal_the_decode_then_crop_path(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    sizes = [(61, 90), (90, 61), (48, 48), (130, 97), (33, 140)]
    for i in range(12):
        path = root / f"c{i % 2}" / f"{i}.{'png' if i == 5 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = photo(rng, *sizes[i % len(sizes)])
        tf.io.write_file(str(path), tf.io.encode_png(pixels) if i == 5 else tf.io.encode_jpeg(pixels, quality=90))
    cfg = config(root, normalization="none", augment=True, batch_size=4, image_size=24, crop_scale=(0.1, 1.0),
                 train_split="train", val_split="train", test_split="train")
    ds = data.build(cfg, None, seed=5)
    files = ds.records["train"].data
    for epoch in (0, 1):
        batches = list(ds.train(epoch))
        for batch, indices in zip(batches, ds.train_order(epoch)):
            for image, label, index in zip(batch["image"], batch["label"], indices):
                crop_seed, flip_seed, _ = transforms.example_seeds(5, epoch, tf.constant(index))
                decoded = transforms.decode(tf.io.read_file(files[index]))
                expected = transforms.random_resized_crop(decoded, 24, crop_seed, (0.1, 1.0), (3 / 4, 4 / 3),
                                                          "bilinear")
                np.testing.assert_array_equal(image, transforms.random_flip(expected, flip_seed).numpy())
                assert label == ds.records["train"].labels[index]


def test_consecutive_epochs_share_one_iterator_with_the_same_batches(tmp_path, monkeypatch):
    root = tmp_path / "images"
    rng = np.random.default_rng(2)
    for i in range(10):
        path = root / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(path), tf.io.encode_jpeg(photo(rng, 40, 52)))
    cfg = config(root, normalization="none", augment=True, batch_size=4, image_size=16,
                 train_split="train", val_split="train", test_split="train")
    fresh = {e: list(data.build(cfg, None, seed=1).train(e)) for e in range(3)}
    ds = data.build(cfg, None, seed=1)
    started = []
    make = pipeline.InputPipeline._train_stream
    monkeypatch.setattr(pipeline.InputPipeline, "_train_stream",
                        lambda self, epoch, step: started.append((epoch, step)) or make(self, epoch, step))

    def take(it, n=None):
        return [next(it) for _ in range(n)] if n is not None else list(it)

    # The loop's pattern: exactly steps_per_epoch batches per epoch, the next epoch asked for after the last one.
    got = {e: take(ds.train(e), ds.steps_per_epoch) for e in range(3)}
    assert started == [(0, 0)]
    resumed = take(ds.train(1, start_step=1))  # another position: a fresh iterator, the same batches
    abandoned = ds.train(2)
    next(abandoned)
    concurrent = take(ds.train(2))  # epoch 2 is still being read from the previous iterator: another one
    assert started == [(0, 0), (1, 1), (2, 0)]
    for e in range(3):
        for a, b in zip(got[e], fresh[e]):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(resumed, fresh[1][1:]):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(concurrent, fresh[2]):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_dct_scaling_keeps_the_eval_geometry_within_a_few_levels(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "images"
    for i, (height, width) in enumerate([(300, 400), (410, 260), (150, 200)]):
        path = root / "a" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(path), tf.io.encode_jpeg(photo(rng, height, width), quality=90))
    tf.io.write_file(str(root / "b" / "p.png"), tf.io.encode_png(photo(rng, 300, 400)))
    cfg = config(root, normalization="none", image_size=32, crop_fraction=0.875, batch_size=1,
                 train_split="train", val_split="train", test_split="train")
    full = np.concatenate([b["image"] for b in data.build(cfg, None).eval("train")])
    cfg.jpeg_dct_scaling = True
    dct = np.concatenate([b["image"] for b in data.build(cfg, None).eval("train")])
    diff = np.abs(full - dct)
    assert diff[:3].max() > 0  # the three JPEGs shrink by 4x or more: decoded at 1/4 or 1/8 size
    assert diff[:3].mean() < 2.0 and diff[:3].max() < 24
    np.testing.assert_array_equal(dct[3], full[3])  # a PNG is decoded in full either way
    assert transforms.dct_ratio_index(tf.constant([200, 260]), 37, 49).numpy() == 2  # 1/4: 200 >= 4 * 37, < 8 * 37
    assert transforms.dct_ratio_index(tf.constant([30, 40]), 37, 49).numpy() == 0  # an upscaled image
