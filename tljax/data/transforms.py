"""Pure per-image tf transforms: decode, grayscale -> RGB, resize, centre and corner crops, random-resized crop, flip.

Every function maps one image tensor to another and holds no state; random ones take an explicit stateless seed
(a [2] int tensor), so the same seed gives the same crop on any process and after any resume. Outputs of the
resizing functions are float32 RGB in 0..255 with a static (size, size, 3) shape.

Encoded images go through `decode_random_resized_crop` and `decode_center_crop`, which read a JPEG's size from its
header first. The random-resized crop then decodes only its window (plus a margin of one 16-pixel block, so that
chroma upsampling sees the same neighbours), which gives exactly the pixels of decoding everything and slicing.
The centre crop can let the JPEG decoder downscale by 2, 4 or 8 in the DCT (`dct_scaling`) when the eval resize
shrinks the image at least that much: faster, and different numbers (the decoder averages each 2x2, 4x4 or 8x8
block before the antialiased resize): on photos a mean difference of 1-2 levels of 0..255, single pixels up to ~50
(README, Data).
"""
from __future__ import annotations

import functools

import tensorflow as tf

# tf.image.resize methods by the names `Preprocessing.interpolation` uses.
METHODS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "area": "area",
           "lanczos3": "lanczos3", "lanczos5": "lanczos5"}
DCT_RATIOS = (1, 2, 4, 8)  # the downscaling factors the JPEG decoder offers
_BLOCK = 16  # the largest JPEG block (MCU) side: 4:2:0 chroma subsampling


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


def eval_resize_shape(shape: tf.Tensor, size: int, crop_fraction: float) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) the evaluation transform resizes an image of `shape` ([H, W, ...]) to: the shorter side
    round(size / crop_fraction), aspect ratio kept, each side at least `size`."""
    hw = tf.cast(shape[:2], tf.float32)
    scale = float(round(size / crop_fraction)) / tf.reduce_min(hw)
    height = tf.maximum(tf.cast(tf.round(hw[0] * scale), tf.int32), size)
    width = tf.maximum(tf.cast(tf.round(hw[1] * scale), tf.int32), size)
    return height, width


def resize_for_crop(image: tf.Tensor, size: int, crop_fraction: float, method: str) -> tf.Tensor:
    """The evaluation transform's resize (`eval_resize_shape`)."""
    return resize(image, *eval_resize_shape(tf.shape(image), size, crop_fraction), method)


def crop(image: tf.Tensor, size: int, where: str) -> tf.Tensor:
    """The size x size crop of `image` at `where`: "center" ((H - size) // 2, (W - size) // 2 from the top left),
    or a corner: "top_left", "top_right", "bottom_left", "bottom_right"."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    top = {"center": (height - size) // 2, "top_left": 0, "top_right": 0}.get(where, height - size)
    left = {"center": (width - size) // 2, "top_left": 0, "bottom_left": 0}.get(where, width - size)
    return tf.ensure_shape(image[top : top + size, left : left + size], (size, size, 3))


def center_crop(image: tf.Tensor, size: int, crop_fraction: float, method: str) -> tf.Tensor:
    """Evaluation transform: resize the shorter side to round(size / crop_fraction), then take the central size^2."""
    return crop(resize_for_crop(image, size, crop_fraction, method), size, "center")


def dct_ratio_index(shape: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """The index in `DCT_RATIOS` of the largest ratio r by which the JPEG decoder can downscale an image of `shape`
    ([H, W, ...]) and still give at least (height, width) pixels (its output is ceil(H / r) x ceil(W / r)); 0 (no
    downscaling) when none fits."""
    ratios = tf.constant(DCT_RATIOS)
    fits = (shape[0] >= ratios * height) & (shape[1] >= ratios * width)  # monotone: r fits if 2r does
    return tf.maximum(tf.reduce_sum(tf.cast(fits, tf.int32)) - 1, 0)


def decode_center_crop(encoded: tf.Tensor, size: int, crop_fraction: float, method: str,
                       dct_scaling: bool) -> tf.Tensor:
    """`center_crop(decode(encoded), ...)`. With `dct_scaling`, a JPEG that the resize shrinks by 2x or more is
    decoded at 1/2, 1/4 or 1/8 size (`dct_ratio_index`) first, then resized to the same (height, width) and cropped
    alike: the same geometry, 1-2 levels of 0..255 apart on average (module docstring)."""
    if not dct_scaling:
        return center_crop(decode(encoded), size, crop_fraction, method)

    def jpeg() -> tf.Tensor:
        shape = tf.io.extract_jpeg_shape(encoded)
        height, width = eval_resize_shape(shape, size, crop_fraction)
        branches = [functools.partial(tf.io.decode_jpeg, encoded, channels=3, ratio=r) for r in DCT_RATIOS]
        image = tf.switch_case(dct_ratio_index(shape, height, width), branches)
        return crop(resize(image, height, width, method), size, "center")

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: center_crop(decode(encoded), size, crop_fraction, method))


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tf.Tensor:
    """Inception-style box in an image of `shape` ([H, W, ...]): covering `scale` of the area with aspect ratio in
    `ratio`, or the whole image when no box fits in 10 attempts. int32 [4]: top, left, height, width."""
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([tf.cast(shape[:2], tf.int32), [3]], 0), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.concat([begin[:2], extent[:2]], 0)


def crop_window(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """The pixels of `image` in `window` (top, left, height, width)."""
    return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]


def decode_window(encoded: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """`crop_window(decode(encoded), window)`, exactly; a JPEG is decoded only around the window.

    The JPEG decoder is asked for the window grown by one 16-pixel block on each side and aligned to blocks (clipped
    to the image), so every pixel kept is decoded with the same neighbours (chroma upsampling reaches one sample
    beyond a block) as in a full decode.
    """
    def jpeg() -> tf.Tensor:
        shape = tf.io.extract_jpeg_shape(encoded)[:2]
        start = tf.maximum(window[:2] - _BLOCK, 0) // _BLOCK * _BLOCK
        end = tf.minimum((window[:2] + window[2:] + 2 * _BLOCK - 1) // _BLOCK * _BLOCK, shape)
        part = tf.io.decode_and_crop_jpeg(encoded, tf.concat([start, end - start], 0), channels=3)
        return crop_window(part, tf.concat([window[:2] - start, window[2:]], 0))

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: crop_window(decode(encoded), window))


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float], method: str) -> tf.Tensor:
    """Inception-style crop of a decoded image (`random_crop_window`), resized to size x size."""
    window = random_crop_window(tf.shape(image), seed, scale, ratio)
    return tf.ensure_shape(resize(crop_window(image, window), size, size, method), (size, size, 3))


def decode_random_resized_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor, scale: tuple[float, float],
                               ratio: tuple[float, float], method: str) -> tf.Tensor:
    """`random_resized_crop(decode(encoded), ...)`, bit for bit; a JPEG is decoded only around the crop window,
    whose box is drawn from the size in its header."""
    def jpeg() -> tf.Tensor:
        return decode_window(encoded, random_crop_window(tf.io.extract_jpeg_shape(encoded), seed, scale, ratio))

    def other() -> tf.Tensor:
        image = decode(encoded)
        return crop_window(image, random_crop_window(tf.shape(image), seed, scale, ratio))

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(resize(crop, size, size, method), (size, size, 3))


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def example_seeds(seed: int, epoch: int | tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Three independent stateless seeds (crop, flip, RandAugment) for example `index` of `epoch`: the same in every
    process. (Splitting into three keeps the first two as a split into two gave them.)"""
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    key = tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))
    crop_seed, flip_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(key, num=3))
    return crop_seed, flip_seed, augment_seed
