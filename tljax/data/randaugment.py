"""RandAugment (Cubuk et al., 2019) as TensorFlow ops for the tf.data pipeline: timm's spec strings, op set and
magnitudes, stateless and seeded per example.

Spec (`config.data.randaugment`, timm's `--aa` form): "rand" then dash-separated parts in any order, e.g.
"rand-m9-n2-mstd0.5":
  m<int 0..10>   magnitude (default 10, timm's maximum)
  n<int >= 1>    ops applied one after the other to each image (default 2), each drawn uniformly from the op set
                 (with replacement)
  mstd<float>    std of Gaussian noise added to the magnitude at each op (default 0); above 100, the magnitude is
                 drawn uniformly from [0, m] instead (timm's rule); the result is clipped to [0, 10]
  p<float 0..1>  probability that a drawn op is applied at all (default 0.5, timm's)
  inc<0|1>       1: the "increasing" op set, where every op gets stronger with the magnitude (default 0)
timm's other parts (t: weighted op sets, mmax: magnitudes above 10) are refused, as is anything else.

Op set (timm's `_RAND_TRANSFORMS`): AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color,
Contrast, Brightness, Sharpness, ShearX, ShearY, TranslateXRel, TranslateYRel; with inc1 Posterize, Solarize and the
four enhancements become their "Increasing" variants. The paper's Identity is the op skipped with probability 1 - p.
Magnitude M maps to each op's argument as in timm (and big_vision / the TF TPU code for the non-increasing set),
with level = M / 10: Rotate +-30 level degrees; Shear +-0.3 level; Translate +-0.45 level of the image side;
Posterize keeps int(4 level) bits (increasing: 4 - that; 0 bits give black, as in the TF reference, where recent
Pillow, and so timm, refuses 0 bits); Solarize inverts pixels >= int(256 level) (increasing: >= 256 - that);
SolarizeAdd adds int(110 level) below 128; Color / Contrast / Brightness / Sharpness blend with factor
1.8 level + 0.1 (increasing: 1 +- 0.9 level, at least 0.1). The sign of a signed argument is a fair coin.

Pixels follow PIL (what timm runs): the image is rounded to integers 0..255 first, colour ops truncate as PIL's
lookup tables and `Image.blend` do, geometric ops sample bilinearly with PIL's pixel-centre convention (rotation
about the image centre, shear and translation about the top-left corner) and fill uncovered pixels with grey 128
(timm's default fill; timm also picks bicubic at random). The output is float32 0..255, integer-valued.

Why not a library: keras 3's `keras.layers.RandAugment` runs in tf.data, but draws from a stateful SeedGenerator
(not per example from a seed, so a resumed run or another process layout would see other images) and has its own
op set and magnitude scale, not timm's; tf-models-official is a large dependency for one function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128.0
FORM = ("'rand' then dash-separated parts: m<magnitude 0..10>, n<ops per image >= 1>, mstd<magnitude noise std "
        ">= 0>, p<probability 0..1 of applying each op>, inc<0|1>; e.g. 'rand-m9-n2-mstd0.5' ('' = off)")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed RandAugment spec string (see the module docstring)."""

    magnitude: int = 10
    num_ops: int = 2
    magnitude_std: float = 0.0
    prob: float = 0.5
    increasing: bool = False


_PART = re.compile(r"(mstd|m|n|p|inc)(\d+(?:\.\d*)?)")


def parse(spec: str, field: str = "config.data.randaugment") -> Spec:
    """The Spec of a timm RandAugment string; ValueError naming `field` and the accepted form if it is not one."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"{field} {spec!r}: {why}; accepted form: {FORM}")

    parts = spec.split("-") if isinstance(spec, str) else []
    if not parts or parts[0] != "rand":
        raise refuse("not a RandAugment spec")
    values: dict[str, str] = {}
    for part in parts[1:]:
        match = _PART.fullmatch(part)
        if not match:
            raise refuse(f"unknown part {part!r}")
        key, value = match.groups()
        if key in values:
            raise refuse(f"{key} given twice")
        values[key] = value
    fields = {}
    if "m" in values:
        if "." in values["m"] or not 0 <= int(values["m"]) <= MAX_LEVEL:
            raise refuse(f"magnitude m{values['m']} is not an integer in 0..10")
        fields["magnitude"] = int(values["m"])
    if "n" in values:
        if "." in values["n"] or int(values["n"]) < 1:
            raise refuse(f"n{values['n']} is not an integer >= 1")
        fields["num_ops"] = int(values["n"])
    if "mstd" in values:
        fields["magnitude_std"] = float(values["mstd"])
    if "p" in values:
        if not float(values["p"]) <= 1:
            raise refuse(f"p{values['p']} is not a probability in [0, 1]")
        fields["prob"] = float(values["p"])
    if "inc" in values:
        if values["inc"] not in ("0", "1"):
            raise refuse(f"inc{values['inc']} is not inc0 or inc1")
        fields["increasing"] = values["inc"] == "1"
    return Spec(**fields)


# ---- The ops: float32 [H, W, 3] integer-valued 0..255 -> the same. ----------------------------------------------

def _lut_floor(x: tf.Tensor) -> tf.Tensor:
    """Clip to 0..255 and truncate, as a PIL lookup table or `Image.blend` writes uint8."""
    return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped and truncated (factor 1: image)."""
    return _lut_floor(degenerate + factor * (image - degenerate))


def gray(image: tf.Tensor) -> tf.Tensor:
    """PIL's convert("L"): round(0.299 R + 0.587 G + 0.114 B), [H, W, 1]."""
    return tf.round(tf.tensordot(image, tf.constant([0.299, 0.587, 0.114]), axes=1))[..., None]


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """Each channel stretched linearly so its darkest pixel becomes 0 and its brightest 255 (flat: unchanged)."""
    lo = tf.reduce_min(image, axis=(0, 1), keepdims=True)
    hi = tf.reduce_max(image, axis=(0, 1), keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.where(hi > lo, _lut_floor((image - lo) * scale), image)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation per channel: lut[v] = (step // 2 + #pixels below v) // step, where step is
    (#pixels - #pixels of the brightest value) // 255; unchanged when step is 0 (one value, or too few pixels)."""
    channels = []
    for c in range(3):
        values = tf.cast(image[..., c], tf.int32)
        histogram = tf.math.bincount(values, minlength=256, maxlength=256)
        step = (tf.reduce_sum(histogram) - histogram[tf.reduce_max(values)]) // 255
        below = tf.cumsum(histogram, exclusive=True)
        lut = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
        channels.append(tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.float32), image[..., c]))
    return tf.stack(channels, -1)


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255.0 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keep the `bits` most significant bits of every value (0 bits: black)."""
    step = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
    return tf.floor(image / step) * step


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Invert the values >= threshold (256: unchanged)."""
    return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
    """Add `add` to the values below `threshold`, clipped at 255."""
    return tf.where(image < threshold, tf.minimum(image + tf.cast(add, tf.float32), 255.0), image)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Saturation: blend with the grey image (0: grey, 1: unchanged)."""
    return blend(tf.broadcast_to(gray(image), tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with a flat image at the grey image's mean, rounded (0: flat, 1: unchanged)."""
    mean = tf.floor(tf.reduce_mean(gray(image)) + 0.5)
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with black (0: black, 1: unchanged)."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; border pixels kept): 0 smooths,
    1 is unchanged, 2 sharpens."""
    kernel = tf.tile(tf.reshape(tf.constant([1.0, 1, 1, 1, 5, 1, 1, 1, 1]) / 13.0, [3, 3, 1, 1]), [1, 1, 3, 1])
    smooth = tf.round(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0])
    inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
    degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return blend(degenerate, image, factor)


def affine(image: tf.Tensor, matrix: list[tf.Tensor]) -> tf.Tensor:
    """PIL's `Image.transform(size, AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=FILL)`: output pixel (x, y)
    samples the input at (a x + b y + c, d x + e y + f), in coordinates from the top-left corner of the top-left
    pixel (pixel centres at +0.5); a sample outside the image is grey (FILL), one inside interpolates bilinearly
    between the nearest pixel centres (the edge pixels extended); truncated to integers as PIL writes uint8."""
    a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in matrix)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    y, x = tf.meshgrid(tf.range(tf.cast(height, tf.float32)) + 0.5, tf.range(tf.cast(width, tf.float32)) + 0.5,
                       indexing="ij")
    u, v = a * x + b * y + c, d * x + e * y + f
    inside = (u >= 0) & (u < tf.cast(width, tf.float32)) & (v >= 0) & (v < tf.cast(height, tf.float32))
    # TF's pixel coordinates are PIL's minus one half (TF puts pixel centres on integers); "NEAREST" clamps the
    # sample to the edge pixel centres, as PIL does inside the image.
    transform = tf.stack([a, b, (a + b) / 2 + c - 0.5, d, e, (d + e) / 2 + f - 0.5, 0.0, 0.0])[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=tf.stack([height, width]), fill_value=FILL,
        interpolation="BILINEAR", fill_mode="NEAREST")[0]
    return tf.where(inside[..., None], _lut_floor(out), FILL)


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Counter-clockwise rotation by `degrees` about the image centre (PIL's `Image.rotate`, whose matrix rounds to
    15 decimals: a quarter turn moves pixels exactly)."""
    angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
    cos, sin = (tf.round(v * 1e15) / 1e15 for v in (tf.cos(angle), tf.sin(angle)))
    size = tf.cast(tf.shape(image), tf.float64)
    cx, cy = size[1] / 2, size[0] / 2
    return affine(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def shear_x(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Output (x, y) shows input (x + factor y, y)."""
    return affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Output (x, y) shows input (x, y + factor x)."""
    return affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0])


def translate_x(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
    """Output (x, y) shows input (x + pixels, y): the content moves left by `pixels`."""
    return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
    """Output (x, y) shows input (x, y + pixels): the content moves up by `pixels`."""
    return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


# ---- Magnitude -> argument (timm's level functions), level = magnitude / 10, sign = +-1. --------------------------
# Levels are float64, as Python computes timm's arguments: int(0.9 * 110) is 99 there, 98 in float32.

Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]  # (image, level, sign) -> image


def _f32(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def _enhance(fn: Callable, increasing: bool) -> Op:
    if increasing:
        return lambda image, level, sign: fn(image, _f32(tf.maximum(1.0 + sign * level * 0.9, 0.1)))
    return lambda image, level, sign: fn(image, _f32(level * 1.8 + 0.1))


def _posterize_bits(level: tf.Tensor, increasing: bool) -> tf.Tensor:
    bits = tf.floor(level * 4.0)
    return _f32(4.0 - bits if increasing else bits)


def _solarize_threshold(level: tf.Tensor, increasing: bool) -> tf.Tensor:
    threshold = tf.minimum(tf.floor(level * 256.0), 256.0)
    return _f32(256.0 - threshold if increasing else threshold)


def _translate(image: tf.Tensor, level: tf.Tensor, sign: tf.Tensor, axis: int) -> tf.Tensor:
    pixels = _f32(sign * level * 0.45 * tf.cast(tf.shape(image)[1 - axis], tf.float64))  # timm: pct * side
    return translate_x(image, pixels) if axis == 0 else translate_y(image, pixels)


def ops(increasing: bool) -> dict[str, Op]:
    """timm's RandAugment op set (`inc1`: the increasing variants), in timm's order, as functions of (image, level,
    sign), level and sign float64 scalars."""
    return {
        "AutoContrast": lambda image, level, sign: auto_contrast(image),
        "Equalize": lambda image, level, sign: equalize(image),
        "Invert": lambda image, level, sign: invert(image),
        "Rotate": lambda image, level, sign: rotate(image, _f32(sign * level * 30.0)),
        "Posterize": lambda image, level, sign: posterize(image, _posterize_bits(level, increasing)),
        "Solarize": lambda image, level, sign: solarize(image, _solarize_threshold(level, increasing)),
        "SolarizeAdd": lambda image, level, sign: solarize_add(image, _f32(tf.minimum(tf.floor(level * 110.0), 128.0))),
        "Color": _enhance(color, increasing),
        "Contrast": _enhance(contrast, increasing),
        "Brightness": _enhance(brightness, increasing),
        "Sharpness": _enhance(sharpness, increasing),
        "ShearX": lambda image, level, sign: shear_x(image, _f32(sign * level * 0.3)),
        "ShearY": lambda image, level, sign: shear_y(image, _f32(sign * level * 0.3)),
        "TranslateXRel": lambda image, level, sign: _translate(image, level, sign, 0),
        "TranslateYRel": lambda image, level, sign: _translate(image, level, sign, 1),
    }


def _magnitude(spec: Spec, seed: tf.Tensor) -> tf.Tensor:
    """This op's magnitude (float64): M, M + mstd * N(0, 1), or U(0, M) when mstd > 100; clipped to [0, 10]."""
    magnitude = tf.constant(float(spec.magnitude), tf.float64)
    if spec.magnitude_std > 100:
        magnitude = tf.random.stateless_uniform([], seed, 0.0, magnitude, dtype=tf.float64)
    elif spec.magnitude_std > 0:
        magnitude += spec.magnitude_std * tf.random.stateless_normal([], seed, dtype=tf.float64)
    return tf.clip_by_value(magnitude, 0.0, MAX_LEVEL)


def apply(image: tf.Tensor, spec: Spec, seed: tf.Tensor) -> tf.Tensor:
    """RandAugment of one float32 [H, W, 3] image in 0..255, from a stateless seed ([2] int): `spec.num_ops` draws,
    each an op chosen uniformly, applied with probability `spec.prob` at a (noisy) magnitude with a random sign.
    The same seed gives the same image on any process and after any resume."""
    table = list(ops(spec.increasing).values())
    image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num=spec.num_ops)):
        choice, gate, noise, coin = tf.unstack(tf.random.experimental.stateless_split(layer_seed, num=4))
        index = tf.random.stateless_uniform([], choice, 0, len(table), dtype=tf.int32)
        skipped = tf.random.stateless_uniform([], gate) >= spec.prob
        level = _magnitude(spec, noise) / MAX_LEVEL
        sign = tf.where(tf.random.stateless_uniform([], coin) < 0.5, tf.constant(-1.0, tf.float64), 1.0)
        branches = [functools.partial(fn, image, level, sign) for fn in table]
        branches.append(functools.partial(tf.identity, image))  # skipped: the paper's Identity
        image = tf.ensure_shape(tf.switch_case(tf.where(skipped, len(table), index), branches), image.shape)
    return image
