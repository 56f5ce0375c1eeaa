"""RandAugment (`tljax.data.randaugment`): each op's effect on known images, the magnitude mapping, timm's spec
strings, per-example determinism inside the pipeline, and (with the parity extra) every op against timm's PIL op."""

from __future__ import annotations

import random

import numpy as np
import pytest
import tensorflow as tf

from tests.test_data_pipeline import collect, config
from tests.test_data_sources import write_folder
from tljax import data
from tljax.data import randaugment as ra

RAMP = np.broadcast_to(np.arange(256, dtype=np.float32).reshape(16, 16)[..., None], (16, 16, 3))


def run(fn, image, *args) -> np.ndarray:
    return fn(tf.constant(image, tf.float32), *[tf.constant(a, tf.float32) for a in args]).numpy()


def natural(height: int = 12, width: int = 14, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise, integers 0..255: an image every op changes."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).normal(0, 20, (height, width, 3))
    return np.clip(np.stack([xx * 15, yy * 17, (xx + yy) * 8], -1) + noise, 0, 255).round().astype(np.float32)


def test_pixel_ops_on_a_gradient():
    np.testing.assert_array_equal(run(ra.invert, RAMP), 255 - RAMP)
    np.testing.assert_array_equal(run(ra.solarize, RAMP, 128), np.where(RAMP < 128, RAMP, 255 - RAMP))
    np.testing.assert_array_equal(run(ra.solarize, RAMP, 256), RAMP)  # threshold 256: nothing inverted
    np.testing.assert_array_equal(run(ra.solarize_add, RAMP, 100), np.where(RAMP < 128, np.minimum(RAMP + 100, 255),
                                                                           RAMP))
    for bits in range(5):
        np.testing.assert_array_equal(run(ra.posterize, RAMP, bits), RAMP.astype(np.uint8) & ((0xFF << (8 - bits)) &
        0xFF))
    assert len(np.unique(run(ra.posterize, RAMP, 3))) == 8


def test_equalize_flattens_the_histogram_of_a_narrow_ramp():
    narrow = np.repeat(np.arange(64, dtype=np.float32), 85)[:, None, None].repeat(3, -1)  # 64 values x 85 pixels
    out = run(ra.equalize, narrow)[..., 0].ravel()
    # PIL's rule: step = (5440 - 85) // 255 = 21; value v -> (21 // 2 + 85 v) // 21.
    np.testing.assert_array_equal(out, (10 + 85 * np.repeat(np.arange(64), 85)) // 21)
    values, counts = np.unique(out, return_counts=True)
    assert len(values) == 64 and set(counts) == {85} and values[-1] >= 250  # spread over 0..255, equally often
    assert np.all(np.diff(values) >= 4)
    np.testing.assert_array_equal(run(ra.equalize, np.full((8, 8, 3), 77.0)), np.full((8, 8, 3), 77.0))  # one value


def test_auto_contrast_stretches_each_channel_and_keeps_a_flat_one():
    image = np.stack([np.linspace(50, 100, 64).reshape(8, 8), np.full((8, 8), 30.0),
                      np.linspace(0, 255, 64).reshape(8, 8)], -1).round()
    out = run(ra.auto_contrast, image)
    np.testing.assert_array_equal(out[..., 0], np.floor((image[..., 0] - 50) * 255 / 50))
    np.testing.assert_array_equal(out[..., 1], image[..., 1])
    np.testing.assert_array_equal(out[..., 2], image[..., 2])
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255


def test_enhancements_at_factor_0_and_1():
    image = natural()
    for op in (ra.color, ra.contrast, ra.brightness, ra.sharpness):
        np.testing.assert_array_equal(run(op, image, 1.0), image)  # factor 1: unchanged
    gray = np.round(image @ np.array([0.299, 0.587, 0.114]))[..., None]
    np.testing.assert_array_equal(run(ra.color, image, 0.0), np.repeat(gray, 3, -1))
    np.testing.assert_array_equal(run(ra.contrast, image, 0.0), np.full(image.shape, np.floor(gray.mean() + 0.5)))
    np.testing.assert_array_equal(run(ra.brightness, image, 0.0), np.zeros_like(image))
    np.testing.assert_array_equal(run(ra.brightness, image, 0.5), np.floor(image * 0.5))
    np.testing.assert_array_equal(run(ra.brightness, image, 1.5), np.minimum(np.floor(image * 1.5), 255))
    smooth = image.copy()  # PIL's SMOOTH filter inside, the border kept
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    for y in range(1, image.shape[0] - 1):
        for x in range(1, image.shape[1] - 1):
            smooth[y, x] = np.round(np.tensordot(kernel, image[y - 1 : y + 2, x - 1 : x + 2], axes=2))
    np.testing.assert_array_equal(run(ra.sharpness, image, 0.0), smooth)
    sharpened = run(ra.sharpness, image, 2.0)
    np.testing.assert_array_equal(sharpened, np.clip(np.floor(2 * image - smooth), 0, 255))


def test_rotate_by_90_degrees_is_rot90_and_small_angles_keep_the_centre():
    image = natural(11, 11)
    np.testing.assert_array_equal(run(ra.rotate, image, 90.0), np.rot90(image))  # counter-clockwise
    np.testing.assert_array_equal(run(ra.rotate, image, -90.0), np.rot90(image, -1))
    np.testing.assert_array_equal(run(ra.rotate, image, 0.0), image)
    turned = run(ra.rotate, image, 30.0)
    np.testing.assert_array_equal(turned[5, 5], image[5, 5])  # the centre pixel stays
    assert np.all(turned[0, 0] == ra.FILL) and np.all(turned[-1, -1] == ra.FILL)  # corners leave the image: grey


def test_translate_shifts_the_content_and_fills_grey():
    image = natural()
    left = run(ra.translate_x, image, 3.0)
    np.testing.assert_array_equal(left[:, :-3], image[:, 3:])
    assert np.all(left[:, -3:] == ra.FILL)
    right = run(ra.translate_x, image, -2.0)
    np.testing.assert_array_equal(right[:, 2:], image[:, :-2])
    down = run(ra.translate_y, image, -4.0)
    np.testing.assert_array_equal(down[4:], image[:-4])
    assert np.all(down[:4] == ra.FILL)


def affine_reference(image: np.ndarray, matrix) -> np.ndarray:
    """PIL's bilinear AFFINE transform from its definition, in float64: sample (a x + b y + c, d x + e y + f) at
    every output pixel centre; outside [0, W) x [0, H): grey; inside: bilinear between pixel centres, edges extended;
    truncated."""
    a, b, c, d, e, f = matrix
    height, width = image.shape[:2]
    out = np.full(image.shape, ra.FILL)
    for y in range(height):
        for x in range(width):
            u, v = a * (x + 0.5) + b * (y + 0.5) + c, d * (x + 0.5) + e * (y + 0.5) + f
            if not (0 <= u < width and 0 <= v < height):
                continue
            u, v = u - 0.5, v - 0.5
            x0, y0 = int(np.floor(u)), int(np.floor(v))
            dx, dy = u - x0, v - y0
            xs, ys = np.clip([x0, x0 + 1], 0, width - 1), np.clip([y0, y0 + 1], 0, height - 1)
            top = image[ys[0], xs[0]] * (1 - dx) + image[ys[0], xs[1]] * dx
            bottom = image[ys[1], xs[0]] * (1 - dx) + image[ys[1], xs[1]] * dx
            out[y, x] = np.floor(top * (1 - dy) + bottom * dy)
    return out


@pytest.mark.parametrize("op, arg, matrix", [
    (ra.shear_x, 0.27, (1, 0.27, 0, 0, 1, 0)),
    (ra.shear_x, -0.3, (1, -0.3, 0, 0, 1, 0)),
    (ra.shear_y, 0.15, (1, 0, 0, 0.15, 1, 0)),
    (ra.translate_x, 2.6, (1, 0, 2.6, 0, 1, 0)),
    (ra.rotate, 27.0, None),
])
def test_geometric_ops_equal_the_affine_definition(op, arg, matrix):
    image = natural()
    if matrix is None:  # PIL's rotate: about the centre (W/2, H/2), counter-clockwise
        angle = -np.deg2rad(arg)
        cx, cy = image.shape[1] / 2, image.shape[0] / 2
        cos, sin = np.cos(angle), np.sin(angle)
        matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    got, want = run(op, image, arg), affine_reference(image, matrix)
    assert np.abs(got - want).max() <= 1  # float32 against float64 at truncation boundaries
    assert np.abs(got - want).mean() < 0.05
    assert np.abs(got - image).mean() > 5  # and the op did move the image


def test_magnitudes_map_as_in_timm():
    """level = magnitude / 10; the same image through `ops` and through the op at timm's argument."""
    image = natural()
    level, sign = tf.constant(0.9, tf.float64), tf.constant(-1.0, tf.float64)
    plain, increasing = ra.ops(False), ra.ops(True)
    expected = {  # op: (its function, timm's argument at magnitude 9, the increasing set's)
        "Rotate": (ra.rotate, -27.0, -27.0),
        "Posterize": (ra.posterize, 3, 1),
        "Solarize": (ra.solarize, 230, 26),
        "SolarizeAdd": (ra.solarize_add, 99, 99),
        "Color": (ra.color, 1.72, 0.19),
        "Contrast": (ra.contrast, 1.72, 0.19),
        "Brightness": (ra.brightness, 1.72, 0.19),
        "Sharpness": (ra.sharpness, 1.72, 0.19),
        "ShearX": (ra.shear_x, -0.27, -0.27),
        "ShearY": (ra.shear_y, -0.27, -0.27),
        "TranslateXRel": (ra.translate_x, -0.405 * 14, -0.405 * 14),
        "TranslateYRel": (ra.translate_y, -0.405 * 12, -0.405 * 12),
    }
    assert list(plain) == list(increasing) == ["AutoContrast", "Equalize", "Invert", *expected]
    for name, (fn, arg, arg_increasing) in expected.items():
        for table, value in ((plain, arg), (increasing, arg_increasing)):
            np.testing.assert_allclose(table[name](tf.constant(image), level, sign).numpy(), run(fn, image, value),
                                       atol=1, err_msg=name)


@pytest.mark.parametrize("spec, expected", [
    ("rand-m9-n2-mstd0.5", ra.Spec(magnitude=9, num_ops=2, magnitude_std=0.5)),
    ("rand-m9-mstd0.5-inc1", ra.Spec(magnitude=9, magnitude_std=0.5, increasing=True)),
    ("rand-n3-m10-p1.0", ra.Spec(magnitude=10, num_ops=3, prob=1.0)),
    ("rand", ra.Spec()),
])
def test_spec_strings(spec, expected):
    assert ra.parse(spec) == expected


@pytest.mark.parametrize("spec, why", [
    ("rand-m11", "magnitude m11"), ("rand-m9.5", "magnitude m9.5"), ("rand-n0", "n0"), ("rand-p1.5", "p1.5"),
    ("rand-inc2", "inc2"), ("rand-tweights", "unknown part 'tweights'"), ("rand-mmax12", "unknown part 'mmax12'"),
    ("rand-m9-m8", "m given twice"), ("augmix-m5", "not a RandAugment spec"), ("rand-m9--n2", "unknown part ''"),
])
def test_unknown_specs_are_refused_naming_the_field_and_the_form(tmp_path, spec, why):
    cfg = config(tmp_path / "does-not-exist", normalization="none", augment=True, randaugment=spec)
    with pytest.raises(data.ConfigError, match=rf"config\.data\.randaugment '{spec}': {why}.*accepted form: 'rand'"):
        data.build(cfg, None)


def test_randaugment_needs_augment(tmp_path):
    cfg = config(tmp_path / "does-not-exist", normalization="none", augment=False, randaugment="rand-m9")
    with pytest.raises(data.ConfigError, match="config.data.randaugment 'rand-m9' .* config.data.augment is False"):
        data.build(cfg, None)


def test_apply_is_a_function_of_the_seed_and_magnitude_noise_stays_in_range():
    image = natural()
    spec = ra.parse("rand-m9-n3-mstd0.5-p1.0")
    fn = tf.function(lambda seed: ra.apply(tf.constant(image), spec, seed))
    outs = [fn(tf.constant([s, 1], tf.int64)).numpy() for s in range(6)]
    np.testing.assert_array_equal(fn(tf.constant([0, 1], tf.int64)).numpy(), outs[0])
    assert len({o.tobytes() for o in outs}) == 6 and not any(np.array_equal(o, image) for o in outs)
    unchanged = ra.apply(tf.constant(image), ra.parse("rand-m9-p0"), tf.constant([0, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(unchanged, image)  # p0: every drawn op skipped (the paper's Identity)
    noisy = [float(ra._magnitude(ra.parse("rand-m9-mstd3"), tf.constant([s, 0], tf.int64))) for s in range(30)]
    uniform = [float(ra._magnitude(ra.parse("rand-m6-mstd101"), tf.constant([s, 0], tf.int64))) for s in range(30)]
    assert min(noisy) >= 0 and max(noisy) == 10 and len(set(noisy)) > 10  # clipped at 10, not constant
    assert 0 <= min(uniform) and max(uniform) <= 6 and len(set(uniform)) == 30  # U(0, 6)


def test_pipeline_randaugment_is_per_example_deterministic_and_train_only(tmp_path):
    root = tmp_path / "images"
    write_folder(root, {"a": 6, "b": 6}, size=12)
    cfg = config(root, normalization="none", augment=True, batch_size=4, random_crop=False, flip=False,
                 randaugment="rand-m9-n2-mstd0.5-p1.0", image_size=12)
    ds = data.build(cfg, None, seed=1)
    plain = data.build(config(root, normalization="none", augment=True, batch_size=4, random_crop=False, flip=False,
                              image_size=12), None, seed=1)
    epoch0 = collect(ds.train(0))["image"]
    again = collect(data.build(cfg, None, seed=1).train(0))["image"]
    np.testing.assert_array_equal(again, epoch0)  # same (seed, epoch, index): same images
    assert ds.steps_per_epoch == 2
    resumed = next(ds.train(0, start_step=1))["image"]
    np.testing.assert_array_equal(resumed, epoch0[4:8])
    unaugmented = collect(plain.train(0))["image"]
    assert all(not np.array_equal(a, b) for a, b in zip(epoch0, unaugmented))
    np.testing.assert_array_equal(epoch0, np.round(epoch0))  # integer-valued, as on uint8 images
    # Epoch 1 shows the same examples (another order) with other augmentations.
    order0, order1 = ds.train_order(0).ravel(), ds.train_order(1).ravel()
    epoch1 = collect(ds.train(1))["image"]
    by_index0 = dict(zip(order0, epoch0))
    assert all(not np.array_equal(image, by_index0[i]) for i, image in zip(order1, epoch1) if i in by_index0)
    # Evaluation never augments.
    for split in ("val", "test", "train"):
        np.testing.assert_array_equal(collect(ds.eval(split))["image"], collect(plain.eval(split))["image"])


def test_every_op_matches_timms_pil_op_within_one_level():
    """The parity extra's timm: each op of both sets at magnitudes 1..10, both signs, against timm's own level
    function and PIL op (bilinear, grey fill), within one grey level."""
    aa = pytest.importorskip("timm.data.auto_augment")
    from PIL import Image

    image = natural(24, 30).astype(np.uint8)
    pil = Image.fromarray(image)
    hparams = dict(aa._HPARAMS_DEFAULT)
    for increasing, names in ((False, aa._RAND_TRANSFORMS), (True, aa._RAND_INCREASING_TRANSFORMS)):
        ours = ra.ops(increasing)
        assert list(ours) == [name.replace("Increasing", "") for name in names]
        for name in names:
            for magnitude in range(1, 11):
                for draw in (1, 2):  # random.seed(1) / (2): timm negates a signed argument, or not
                    random.seed(draw)
                    args = aa.LEVEL_TO_ARG[name](magnitude, hparams) if aa.LEVEL_TO_ARG[name] else ()
                    random.seed(draw)
                    sign = -1.0 if random.random() > 0.5 else 1.0
                    if name.startswith("Posterize") and args[0] == 0:
                        continue  # Pillow >= 11 refuses 0 bits; ours gives black, as the TF reference
                    want = np.asarray(aa.NAME_TO_OP[name](pil, *args, fillcolor=(128,) * 3, resample=Image.BILINEAR))
                    got = ours[name.replace("Increasing", "")](tf.constant(image, tf.float32),
                                                              tf.constant(magnitude / 10, tf.float64),
                                                              tf.constant(sign, tf.float64))
                    diff = np.abs(got.numpy() - want)
                    assert diff.max() <= 1 and diff.mean() < 0.2, (name, magnitude, args)
