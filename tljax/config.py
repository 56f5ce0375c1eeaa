"""The run configuration: defaults for every field, a phase constructor, and validation before anything compiles.

Config files (`configs/*.py`) start from `defaults()` and change what they need; the command line overrides any
field (`--config.phases[1].optimizer.learning_rate=1e-5`). `validate` refuses a field that does not exist (a typo
in a config file would otherwise be silently ignored), unknown names (model, optimizer, schedule, convention, ...),
bad optimizer/schedule arguments, impossible numbers (a zero checkpoint interval, a negative batch size or learning
rate) and impossible combinations, with a message naming the field.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tljax import data, models
from tljax.models.head import ACTIVATIONS
from tljax.pretrained import mappings
from tljax.training import mixing, optim

PARALLELISM = ("jit", "pmap")
# The image size of the abstract initialisations that validation traces: the parameter paths do not depend on it, and
# every model takes it (ViT patch sizes 14, 16 and 32 divide it).
_PROBE_SIZE = 224


def phase(**overrides: Any) -> ml_collections.ConfigDict:
    """One training phase. Fields (all overridable):

    name; epochs; steps (> 0 overrides epochs); trainable (regex over parameter paths like
    "backbone/stage4_block0/conv1/kernel": "^head/" = head only, "." = everything); optimizer (`name` of an optax
    optimizer + its kwargs); schedule (`name` of an optax schedule + kwargs, "constant" = none; a kwarg set to
    "learning_rate" takes optimizer.learning_rate, one set to "phase_steps" the phase's length in steps);
    backbone_lr_multiplier; clip_grad_norm (0 = off); weight_decay (L2 on kernels, 0 = off); bn ("frozen": the
    backbone runs in inference mode, the Keras guide's advice; "train": the BatchNorm layers whose parameters the
    phase trains use batch statistics and update their running statistics, the others stay in inference mode;
    refused for a backbone without BatchNorm: ViT, ConvNeXt, VGG); cache_features (run the frozen backbone once per
    example and train the head on stored features; needs augment off, bn="frozen" and a trainable pattern that
    matches no backbone parameter); ema_decay (in [0, 1), 0 = off:
    keep an exponential moving average of the weights the phase trains, and of the BatchNorm statistics that move,
    starting at the phase's initial weights; each epoch's validation scores the raw and the averaged weights);
    ema_warmup (the average's decay at the phase's t-th step is min(ema_decay, (1 + t) / (10 + t)), TensorFlow's
    warm-up); ema_eval (with ema_decay > 0, the averaged weights are the phase's result: the test
    split, predict, evaluate and export use them; on by default, meaningless without an EMA); layer_decay (in
    (0, 1], 1 = off: layer-wise learning-rate decay as in BEiT and timm: a trainable backbone parameter's learning
    rate is the phase's (times backbone_lr_multiplier) times layer_decay ** (D - depth), where depth counts blocks
    from the stem: the stem at 0, each ResNet residual block, EfficientNet MBConv block or VGG convolution one
    deeper, and the head, with the backbone's layers after its last block (EfficientNet's head_conv/head_bn, VGG's
    fc1/fc2), at the top depth D, whose factor is 1; see `models.layer_depths`); label_smoothing (s in [0, 1),
    0 = off: the training loss is the cross-entropy against (1 - s) * onehot + s / K for K classes; evaluation
    stays plain cross-entropy); l2sp (alpha >= 0, 0 = off: L2-SP, Li et al. 2018: the penalty alpha / 2 *
    ||w - w0||^2 on the backbone kernels that train, where w0 is the backbone the run loaded, not the phase's
    starting point; the run's optimizer state carries w0 through every phase and checkpoint, so a resume reads it
    back from the checkpoint).
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
        "ema_decay": 0.0,
        "ema_warmup": False,
        "ema_eval": True,
        "layer_decay": 1.0,
        "label_smoothing": 0.0,
        "l2sp": 0.0,
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
    cfg.features_in_memory_mb = 1024.0  # cache_features: larger feature arrays go to memory-mapped files
    cfg.log_every_steps = 50  # train_step_* scalars: train loss/accuracy averaged over this many steps
    # A resume refuses a config whose recipe (optimizer, schedule, phase length, augmentation, ...) differs from
    # the checkpoint's; True accepts it and records the change in the run's history (see checkpoint.recipe).
    cfg.allow_recipe_change = False
    return cfg


def unfreeze_schedule(model_name: str, stages: int, epochs: int, optimizer: dict[str, Any],
                      **fields: Any) -> list[ml_collections.ConfigDict]:
    """Gradual unfreezing (ULMFiT, Howard & Ruder 2018) as phases that open the backbone stage by stage, from the top.

    Phase 0 "head" trains the head only; phase k ("top<k>", k = 1..stages) the head and the backbone's top k stages,
    with one `trainable` regex each ("^head/|^backbone/(?:stage4_block\\d+|stage3_block\\d+)/"). The stages are the
    family's (`models.unfreeze_stages`: ResNet stage1-4, EfficientNet stage1-7 with head_conv/head_bn in stage7, VGG
    block1-5 with fc1/fc2 in block5; the stem opens with the first stage, so opening them all trains everything).
    Every phase runs `epochs` epochs with `optimizer`; `fields` are further phase fields for every phase (schedule,
    bn, layer_decay, ...). Change one phase afterwards where it differs (`phases[0].cache_features = True`).
    """
    available = models.unfreeze_stages(model_name)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= len(available):
        raise ValueError(f"unfreeze_schedule: stages must be an integer from 1 to {len(available)} (the stages of "
                         f"{model_name}), not {stages!r}")
    phases = [phase(name="head", epochs=epochs, optimizer=optimizer, **fields)]
    for k in range(1, stages + 1):
        opened = "|".join(reversed(available[-k:]))
        phases.append(phase(name=f"top{k}", epochs=epochs, trainable=f"^head/|^backbone/(?:{opened})/",
                            optimizer=optimizer, **fields))
    return phases


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
    """Raises data.ConfigError naming the first problem found, before anything is read or compiled.

    Only the user's mistakes become a ConfigError: the checks raise ValueError for them. Anything else (an
    AttributeError or KeyError from tljax itself) is a bug and propagates as it is. The one check that builds
    anything is that of `cache_features`, which needs the model's parameter paths: an abstract initialisation
    (tracing, no compilation).
    """
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
    _check_model(cfg.model)
    if cfg.parallelism not in PARALLELISM:
        raise ValueError(f"config.parallelism must be one of {PARALLELISM}, not {cfg.parallelism!r}")
    for name, minimum in (("seed", 0), ("checkpoint_every_steps", 1), ("keep_checkpoints", 1),
                          ("log_every_steps", 1)):
        data.check_number(cfg[name], f"config.{name}", minimum, integer=True)
    data.check_number(cfg.features_in_memory_mb, "config.features_in_memory_mb", 0)
    data.check_config(cfg.data)
    patch = getattr(models.create(cfg.model.name, 1).backbone, "patch_size", 1)
    if cfg.data.image_size % patch:
        raise ValueError(f"config.data.image_size {cfg.data.image_size} is not a multiple of {cfg.model.name}'s "
                         f"patch size {patch}: choose e.g. {cfg.data.image_size // patch * patch or patch}")
    backbone_parameters = None  # computed for the first phase with cache_features
    for i, p in enumerate(cfg.phases):
        where = f"config.phases[{i}]"
        try:
            optim.validate(p)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if p.bn == "train" and not _has_batchnorm(cfg.model.name):
            raise ValueError(f"{where}.bn='train' puts BatchNorm layers in training mode, and {cfg.model.name} "
                             f"has none: set {where}.bn='frozen'")
        for name in ("epochs", "steps"):
            data.check_number(p[name], f"{where}.{name}", 0, integer=True)
        if p.epochs == 0 and p.steps == 0:
            raise ValueError(f"{where}: give epochs > 0 or steps > 0")
        for name in ("backbone_lr_multiplier", "clip_grad_norm", "weight_decay"):
            data.check_number(p[name], f"{where}.{name}", 0)
        data.check_number(p.optimizer.get("learning_rate"), f"{where}.optimizer.learning_rate", 0)
        data.check_number(p.ema_decay, f"{where}.ema_decay", 0)
        if not p.ema_decay < 1:
            raise ValueError(f"{where}.ema_decay must be in [0, 1) (0 = no EMA; e.g. 0.999), not {p.ema_decay!r}")
        for name in ("ema_warmup", "ema_eval"):
            if not isinstance(p[name], bool):
                raise ValueError(f"{where}.{name} must be True or False, not {p[name]!r}")
        for name in ("layer_decay", "label_smoothing", "l2sp"):
            data.check_number(p[name], f"{where}.{name}", 0)
        if not 0 < p.layer_decay <= 1:
            raise ValueError(f"{where}.layer_decay must be in (0, 1] (1 = off; e.g. 0.75), not {p.layer_decay!r}")
        if not p.label_smoothing < 1:
            raise ValueError(f"{where}.label_smoothing must be in [0, 1) (0 = off; e.g. 0.1), not "
                             f"{p.label_smoothing!r}")
        if not p.cache_features:
            continue
        if mixing.Settings.from_config(cfg.data).enabled:
            raise ValueError(f"{where}.cache_features cannot be used with mixup or CutMix (config.data.mixup_alpha "
                             f"{cfg.data.mixup_alpha}, cutmix_alpha {cfg.data.cutmix_alpha}): cached features are "
                             "computed once per example from unmixed images, so they cannot follow mixed images; set "
                             "cache_features=False for this phase, or both alphas to 0")
        if cfg.data.augment:
            raise ValueError(f"{where}.cache_features needs config.data.augment=False: cached features are computed "
                             "once per example, so they cannot follow random augmentation")
        if backbone_parameters is None:
            backbone_parameters = _backbone_parameters(cfg.model.name)
        trained = [path for path in backbone_parameters if re.search(p.trainable, path)]
        if p.bn != "frozen" or trained:
            why = f"bn={p.bn!r}" if p.bn != "frozen" else f"trainable {p.trainable!r} matches {trained[0]}"
            raise ValueError(f"{where}.cache_features needs the whole backbone frozen (bn='frozen' and a trainable "
                             f"pattern that matches no backbone parameter), but {why}")


def _check_model(model: ml_collections.ConfigDict) -> None:
    family = models.family(model.name)
    if model.dtype not in models.DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(models.DTYPES)}, not {model.dtype!r}")
    known = mappings.conventions(family)
    if model.convention and model.convention not in known:
        raise ValueError(f"config.model.convention {model.convention!r} is not a {family} weight convention; "
                         f"choose one of {', '.join(known)} (or '' to detect it from the file)")
    if model.head.activation not in ACTIVATIONS:
        raise ValueError(f"config.model.head.activation must be one of {sorted(ACTIVATIONS)}, not "
                         f"{model.head.activation!r}")
    for width in model.head.hidden:
        data.check_number(width, "config.model.head.hidden (each width)", 1, integer=True)
    if not model.head.dropout < 1:  # NaN too
        raise ValueError(f"config.model.head.dropout must be < 1 (< 0: the family's default), not "
                         f"{model.head.dropout}")


def _has_batchnorm(name: str) -> bool:
    """Whether model `name` keeps BatchNorm statistics (an abstract initialisation: traced, never compiled)."""
    model = models.create(name, 1)
    image = jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
    return "batch_stats" in jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)


def _backbone_parameters(name: str) -> list[str]:
    """Every backbone parameter path ("backbone/stem_conv/kernel") model `name` can have, whichever convention its
    weights follow (Keras's ResNets add convolution biases): abstract initialisations, traced, never compiled."""
    default = models.create(name, 1)
    variants = [default]
    for convention in mappings.conventions(models.family(name)).values():
        variant = models.create(name, 1, **convention.backbone_kwargs)
        if variant not in variants:
            variants.append(variant)
    image = jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
    paths = set()
    for model in variants:
        try:
            params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)["params"]
        except ValueError:  # a layout this model does not exist in (Keras has no ResNet-18): it adds no paths
            if model is default:
                raise
            continue
        paths |= {optim.path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    return sorted(path for path in paths if path.startswith("backbone/"))
