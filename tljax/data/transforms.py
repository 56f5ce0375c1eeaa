"""Pure per-image tf transforms: decode, grayscale -> RGB, resize, centre crop, random-resized crop, flip.

Every function maps one image tensor to another and holds no state; random ones take an explicit stateless seed
(a [2] int tensor), so the same seed gives the same crop on any process and after any resume. Outputs of the
resizing functions are float32 RGB in 0..255 with a static (size, size, 3) shape.
"""

from __future__ import annotations

import tensorflow as tf

# tf.image.resize methods by the names `Preprocessing.interpolation` uses.
METHODS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "area": "area",
           "lanczos3": "lanczos3", "lanczos5": "lanczos5"}


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes -> uint8 RGB [H, W, 3] (grayscale expanded, alpha dropped, first GIF frame)."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def to_rgb(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 1 or 3] -> [H, W, 3]."""
    return tf.image.grayscale_to_rgb(pixels) if pixels.shape[-1] == 1 else pixels


def resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor, method: str) -> tf.Tensor:
    """Resize to (height, width) with antialiasing (as PIL does when shrinking); float32, clipped to 0..255."""
    out = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), method=METHODS[method],
                          antialias=True)
    return tf.clip_by_value(out, 0.0, 255.0)


def center_crop(image: tf.Tensor, size: int, crop_fraction: float, method: str) -> tf.Tensor:
    """Evaluation transform: resize the shorter side to round(size / crop_fraction), then take the central size^2."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = float(round(size / crop_fraction))
    scale = short / tf.reduce_min(shape)
    height = tf.maximum(tf.cast(tf.round(shape[0] * scale), tf.int32), size)
    width = tf.maximum(tf.cast(tf.round(shape[1] * scale), tf.int32), size)
    resized = resize(image, height, width, method)
    top, left = (height - size) // 2, (width - size) // 2
    return tf.ensure_shape(resized[top : top + size, left : left + size], (size, size, 3))


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float], method: str) -> tf.Tensor:
    """Inception-style crop: a random box covering `scale` of the area with aspect ratio in `ratio`, resized to
    size x size. Falls back to the whole image when no box fits in 10 attempts."""
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, extent)
    return tf.ensure_shape(resize(crop, size, size, method), (size, size, 3))


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def example_seeds(seed: int, epoch: int, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Two independent stateless seeds (crop, flip) for example `index` of `epoch`: the same in every process."""
    base = tf.constant([seed, epoch], tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))
    pair = tf.random.experimental.stateless_split(key, num=2)
    return pair[0], pair[1]
