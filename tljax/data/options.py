"""`config.data`: every field with its default, and the checks that refuse a setting that cannot work before any data
is read or anything compiles."""

from __future__ import annotations

import math
import numbers
from typing import Any

import ml_collections

from tljax.data import normalize, randaugment


class ConfigError(ValueError):
    """A config that cannot work, reported before any data is read or anything compiles."""


def default_config() -> ml_collections.ConfigDict:
    """Every `config.data` field with its default."""
    c = ml_collections.ConfigDict()
    c.source = "animal_mnist"  # a tfds name ("tf_flowers"), "animal_mnist", or "folder:/path/to/root"
    c.data_dir = ""  # tfds data_dir; "" = tfds's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.download = False  # let tfds download a data set that is not prepared in data_dir (needs internet)
    c.train_split = ""  # split strings; "" = auto: the data set's own splits, or carved (sources.auto_splits)
    c.val_split = ""
    c.test_split = ""
    c.val_percent = 10  # % of train carved off as validation when the data set has no validation split
    c.test_percent = 10  # % of train carved off as test when the data set has neither validation nor test
    c.image_size = 224  # the model's input resolution
    c.batch_size = 32  # global train batch: all devices of all processes
    c.eval_batch_size = 0  # global eval batch; 0 = batch_size
    c.augment = True  # train: random-resized crop and flip as set below; False: the eval transform
    c.random_crop = True  # augment with an Inception-style random-resized crop (else the eval centre crop)
    c.crop_scale = (0.08, 1.0)  # random crop: range of the fraction of the image area kept
    c.crop_ratio = (3 / 4, 4 / 3)  # random crop: range of aspect ratios
    c.flip = True  # augment with random horizontal flips
    # augment: RandAugment after crop and flip, a timm spec string ("rand-m9-n2-mstd0.5", see
    # tljax.data.randaugment); "" = off
    c.randaugment = ""
    # Mixup / CutMix of each train batch with its reverse (tljax.training.mixing, timm's batch mode); alpha 0 = off.
    c.mixup_alpha = 0.0  # lambda ~ Beta(alpha, alpha); images and one-hot labels blended
    c.cutmix_alpha = 0.0  # a box of area 1 - lambda pasted from the paired image; lambda = its area after clipping
    c.mix_prob = 1.0  # probability that a batch is mixed at all
    c.mix_switch_prob = 0.5  # both alphas > 0: probability of CutMix (else Mixup) for a batch
    c.crop_fraction = 0.0  # eval: resize shorter side to image_size / crop_fraction, centre-crop; 0 = the prep's
    c.normalization = "pretrained"  # see tljax.data.normalize: pretrained | minmax_train | standardize_train |
    #                                 minmax_sample | standardize_sample | none
    c.stats_scope = "channel"  # *_train statistics per channel, or "global" over all channels
    c.skip_corrupt = False  # False: an undecodable image is an error naming it; True: skip such images (logged)
    c.threads = 0  # tf.data thread pool size; 0 = TF's default (one per core)
    # eval transform: let the JPEG decoder downscale by 2, 4 or 8 (in the DCT) when the resize shrinks by that much;
    # faster; 1-2 levels of 0..255 away from the full decode on average, single pixels up to ~50 (README, Data)
    c.jpeg_dct_scaling = False
    return c


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_number(value: Any, field: str, minimum: float, integer: bool = False) -> None:
    """Raises ConfigError naming `field` unless `value` is a finite number (an int if `integer`) >= `minimum`."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{field} must be {'an integer' if integer else 'a number'} >= {minimum}, not {value!r}")


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first `config.data` field that cannot work, whatever the weights and devices."""
    unknown = sorted(set(cfg.keys()) - set(default_config().keys()))
    _require(not unknown, f"unknown config.data field(s) {unknown}; known: {sorted(default_config().keys())}")
    _require(cfg.normalization in normalize.STRATEGIES,
             f"unknown normalization {cfg.normalization!r}; choose one of {', '.join(normalize.STRATEGIES)}")
    _require(cfg.stats_scope in normalize.SCOPES, f"stats_scope {cfg.stats_scope!r} is not one of {normalize.SCOPES}")
    _require(isinstance(cfg.source, str) and bool(cfg.source), "config.data.source is empty")
    for name, minimum in (("image_size", 1), ("batch_size", 1), ("eval_batch_size", 0), ("threads", 0)):
        check_number(cfg[name], f"config.data.{name}", minimum, integer=True)
    for name in ("crop_scale", "crop_ratio"):
        _require(len(cfg[name]) == 2, f"config.data.{name} must be a (low, high) pair, not {cfg[name]!r}")
        for value in cfg[name]:
            check_number(value, f"config.data.{name}", 0)
    _require(0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1, f"crop_scale {cfg.crop_scale}: need 0 < lo <= hi <= 1")
    _require(0 < cfg.crop_ratio[0] <= cfg.crop_ratio[1], f"crop_ratio {cfg.crop_ratio}: need 0 < lo <= hi")
    check_number(cfg.crop_fraction, "config.data.crop_fraction", 0)
    _require(cfg.crop_fraction <= 1, f"crop_fraction {cfg.crop_fraction}: need 0 (the prep's) or (0, 1]")
    for name in ("val_percent", "test_percent"):
        check_number(cfg[name], f"config.data.{name}", 0)
    _require(0 < cfg.val_percent and 0 < cfg.test_percent and cfg.val_percent + cfg.test_percent < 100,
             f"val_percent {cfg.val_percent} and test_percent {cfg.test_percent}: each > 0, together < 100")
    if cfg.randaugment != "":
        try:
            randaugment.parse(cfg.randaugment)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(cfg.augment, f"config.data.randaugment {cfg.randaugment!r} augments training images, but "
                 "config.data.augment is False; set augment=True, or randaugment='' ")
    _check_mixing(cfg)


def _check_mixing(cfg: ml_collections.ConfigDict) -> None:
    for name in ("mixup_alpha", "cutmix_alpha"):
        check_number(cfg[name], f"config.data.{name}", 0)
    for name in ("mix_prob", "mix_switch_prob"):
        check_number(cfg[name], f"config.data.{name}", 0)
        _require(cfg[name] <= 1, f"config.data.{name} must be a probability in [0, 1], not {cfg[name]!r}")
    _require(not (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) or cfg.batch_size >= 2,
             f"config.data.mixup_alpha / cutmix_alpha mix each example with another of its batch, but "
             f"config.data.batch_size is {cfg.batch_size}: it would be mixed with itself; use a batch of >= 2")


def check_layout(cfg: ml_collections.ConfigDict, prep: Any, seed: int, num_devices: int, process_index: int,
                 process_count: int) -> None:
    """Raises ConfigError if `cfg` cannot work with these weights (`prep`) and this device and process layout."""
    _require(cfg.normalization != "pretrained" or prep is not None,
             "normalization 'pretrained' needs the weights' Preprocessing; with random weights choose another one")
    check_number(seed, "seed", 0, integer=True)
    _require(num_devices >= 1 and process_count >= 1, f"{num_devices} devices, {process_count} processes")
    _require(0 <= process_index < process_count, f"process_index {process_index} not in [0, {process_count})")
    for name in ("batch_size", "eval_batch_size"):
        value = cfg[name] or cfg.batch_size
        _require(value % num_devices == 0, f"{name} {value} (global) is not divisible by the {num_devices} devices")
        _require(value % process_count == 0,
                 f"{name} {value} (global) is not divisible by the {process_count} processes")
