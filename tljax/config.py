"""The run configuration: defaults for every field, a phase constructor, and validation before anything compiles.

Config files (`configs/*.py`) start from `defaults()` and change what they need; the command line overrides any
field (`--config.phases[1].optimizer.learning_rate=1e-5`). `validate` refuses a field that does not exist (a typo
in a config file would otherwise be silently ignored), unknown optimizer/schedule names and bad arguments, and
impossible combinations, with a message naming the field.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from tljax import data, models, optim

PARALLELISM = ("jit", "pmap")


def phase(**overrides: Any) -> ml_collections.ConfigDict:
    """One training phase. Fields (all overridable):

    name; epochs; steps (> 0 overrides epochs); trainable (regex over parameter paths like
    "backbone/stage4_block0/conv1/kernel": "^head/" = head only, "." = everything); optimizer (`name` of an optax
    optimizer + its kwargs); schedule (`name` of an optax schedule + kwargs, "constant" = none; a kwarg set to
    "learning_rate" takes optimizer.learning_rate, one set to "phase_steps" the phase's length in steps);
    backbone_lr_multiplier; clip_grad_norm (0 = off); weight_decay (L2 on kernels, 0 = off); bn ("frozen": the
    backbone runs in inference mode, the Keras guide's advice; "train"); cache_features (phase 1 only: run the
    frozen backbone once per example and train the head on stored features; needs augment off).
    """
    cfg = ml_collections.ConfigDict({
        "name": "head",
        "epochs": 1,
        "steps": 0,
        "trainable": "^head/",
        "optimizer": {"name": "adam", "learning_rate": 1e-3},
        "schedule": {"name": "constant"},
        "backbone_lr_multiplier": 1.0,
        "clip_grad_norm": 0.0,
        "weight_decay": 0.0,
        "bn": "frozen",
        "cache_features": False,
    })
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"unknown phase field {key!r}")
        if isinstance(value, dict):
            cfg[key] = ml_collections.ConfigDict(value)  # optimizer / schedule: replaced whole, kwargs are free
        else:
            cfg[key] = value
    return cfg


def defaults() -> ml_collections.ConfigDict:
    """Every field with its default: head-only phase, then everything at a small learning rate."""
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict({
        "name": "resnet50",
        "weights": "none",  # a known weight name, a local file, or "none" (random init)
        "convention": "",  # weight naming convention; "" = detect from the file
        "dtype": "float32",  # compute dtype: "float32" or "bfloat16" (params and BN statistics stay float32)
        "head": {"hidden": (), "activation": "relu", "dropout": -1.0},  # dropout < 0: the family's default
    })
    cfg.data = data.default_config()
    cfg.phases = [
        phase(name="head", epochs=5),
        phase(name="finetune", epochs=5, trainable=".", optimizer={"name": "adam", "learning_rate": 1e-5}),
    ]
    cfg.parallelism = "jit"  # "jit" (Mesh + NamedSharding) or "pmap"
    cfg.seed = 0
    cfg.checkpoint_every_steps = 500
    cfg.keep_checkpoints = 3
    cfg.log_every_steps = 50
    return cfg


def _unknown_fields(actual: Any, reference: Any, where: str) -> list[str]:
    errors = []
    for key in actual.keys():
        if key not in reference:
            hint = difflib.get_close_matches(key, list(reference.keys()), n=1)
            errors.append(f"{where}.{key}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        elif isinstance(reference[key], ml_collections.ConfigDict) and key not in ("optimizer", "schedule"):
            errors += _unknown_fields(actual[key], reference[key], f"{where}.{key}")
    return errors


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises data.ConfigError naming the problems found; cheap (nothing is read, built or compiled)."""
    try:
        _check(cfg)
    except ValueError as e:
        raise data.ConfigError(str(e)) from None


def _check(cfg: ml_collections.ConfigDict) -> None:
    reference = defaults()
    errors = _unknown_fields(cfg, reference, "config")
    if not cfg.get("phases"):
        errors.append("config.phases is empty")
    for i, p in enumerate(cfg.get("phases", [])):
        errors += _unknown_fields(p, phase(), f"config.phases[{i}]")
        for section in ("optimizer", "schedule"):
            if "name" not in p.get(section, {}):
                errors.append(f"config.phases[{i}].{section} needs a name")
    if errors:
        raise ValueError("unknown or incomplete config fields:\n  " + "\n  ".join(errors))
    models.family(cfg.model.name)
    if cfg.model.dtype not in models.DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(models.DTYPES)}, not {cfg.model.dtype!r}")
    if cfg.parallelism not in PARALLELISM:
        raise ValueError(f"config.parallelism must be one of {PARALLELISM}, not {cfg.parallelism!r}")
    for i, p in enumerate(cfg.phases):
        try:
            optim.validate(p)
        except Exception as e:  # noqa: BLE001 - re-raised with the phase's place in the config
            raise ValueError(f"config.phases[{i}]: {e}") from None
        if p.epochs <= 0 and p.steps <= 0:
            raise ValueError(f"config.phases[{i}]: give epochs > 0 or steps > 0")
        if p.cache_features and cfg.data.augment:
            raise ValueError(f"config.phases[{i}].cache_features needs config.data.augment=False: cached features "
                             "are computed once per example, so they cannot follow random augmentation")
