"""Errors that must come first and look like the user's: config validation before anything runs, and a weights file
of another architecture reported by the CLI in one error, without a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
from ml_collections import ConfigDict

from tests import train_util
from tests.configs import tiny
from tljax import config as config_lib
from tljax import data
from tljax.training import optim, train


def _set(cfg: ConfigDict, path: str, value) -> None:
    """cfg at a dotted path with list indices ("phases[0].optimizer") set to value."""
    *parents, leaf = path.replace("[", ".").replace("]", "").split(".")
    for part in parents:
        cfg = cfg[int(part)] if part.isdigit() else cfg[part]
    cfg[leaf] = value


@pytest.mark.parametrize("path, value, message", [
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps must be an integer >= 1, not 0"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be an integer >= 1"),
    ("log_every_steps", -5, "config.log_every_steps must be an integer >= 1"),
    ("seed", -1, "config.seed must be an integer >= 0"),
    ("features_in_memory_mb", -1.0, "config.features_in_memory_mb must be a number >= 0"),
    ("data.batch_size", 0, "config.data.batch_size must be an integer >= 1"),
    ("data.image_size", -224, "config.data.image_size must be an integer >= 1"),
    ("phases[0].epochs", -1, r"config.phases\[0\].epochs must be an integer >= 0"),
    ("phases[1].steps", -10, r"config.phases\[1\].steps must be an integer >= 0"),
    ("phases[0].optimizer", ConfigDict({"name": "adam", "learning_rate": "fast"}),
     r"config.phases\[0\].optimizer.learning_rate must be a number >= 0, not 'fast'"),
    ("phases[0].optimizer", ConfigDict({"name": "sgd", "learning_rate": float("nan")}),
     r"config.phases\[0\].optimizer.learning_rate must be a number >= 0, not nan"),
    ("phases[1].optimizer", ConfigDict({"name": "sgd"}),
     r"config.phases\[1\].* missing a required argument: 'learning_rate'"),
    ("phases[1].weight_decay", -1e-4, r"config.phases\[1\].weight_decay must be a number >= 0"),
    ("phases[1].clip_grad_norm", -1.0, r"config.phases\[1\].clip_grad_norm must be a number >= 0"),
    ("phases[1].backbone_lr_multiplier", -0.1, r"config.phases\[1\].backbone_lr_multiplier must be a number >= 0"),
    ("model.head.hidden", (128, 0), r"config.model.head.hidden \(each width\) must be an integer >= 1, not 0"),
    ("model.head.dropout", 1.0, "config.model.head.dropout must be < 1"),
    ("model.head.activation", "swish", "config.model.head.activation must be one of"),
    ("model.convention", "pytorch", "config.model.convention 'pytorch' is not a resnet weight convention"),
])
def test_impossible_values_are_refused_naming_the_field(path, value, message):
    cfg = config_lib.defaults()
    _set(cfg, path, value)
    with pytest.raises(data.ConfigError, match=message):
        config_lib.validate(cfg)


@pytest.mark.parametrize("bug", [KeyError("phase"), AttributeError("'NoneType' object has no attribute 'name'")])
def test_a_bug_is_not_disguised_as_a_config_error(monkeypatch, bug):
    def broken(phase):
        raise bug

    monkeypatch.setattr(optim, "validate", broken)
    with pytest.raises(type(bug)) as raised:
        config_lib.validate(config_lib.defaults())
    assert not isinstance(raised.value, data.ConfigError)


def _cached(model: str, trainable: str, bn: str = "frozen") -> ConfigDict:
    cfg = config_lib.defaults()
    cfg.model.name = model
    cfg.data.augment = False
    cfg.phases[0].cache_features = True
    cfg.phases[0].trainable = trainable
    cfg.phases[0].bn = bn
    return cfg


@pytest.mark.parametrize("model, trainable, bn, refused", [
    ("resnet50", "^head/", "frozen", None),
    ("resnet50", "^head/|stage4", "frozen", "matches backbone/stage4_block0/bn1/bias"),
    ("resnet50", "^head/", "train", "but bn='train'"),
    # Only Keras-layout ResNets have convolution biases: the pattern would train them with Keras weights.
    ("resnet50", "^head/|stem_conv/bias", "frozen", "matches backbone/stem_conv/bias"),
    ("resnet18", "^head/|conv/bias", "frozen", None),  # Keras has no ResNet-18: no convolution biases to train
    ("efficientnet_lite0", "^head/|head_conv", "frozen", "matches backbone/head_conv/kernel"),
    ("vgg16", "^head/", "frozen", None),
])
def test_cache_features_on_a_trained_backbone_is_refused_by_validation(model, trainable, bn, refused):
    cfg = _cached(model, trainable, bn)
    if refused is None:
        config_lib.validate(cfg)
        return
    with pytest.raises(data.ConfigError, match=r"config.phases\[0\].cache_features needs the whole backbone frozen"
                                               rf".*{refused}"):
        config_lib.validate(cfg)


def test_cache_features_of_a_later_phase_is_refused_before_the_first_phase_runs(tmp_path):
    cfg = tiny.get_config(str(tmp_path / "no-images-needed"))
    cfg.phases[1].cache_features = True  # phase 2 trains everything
    with pytest.raises(data.ConfigError, match=r"config.phases\[1\].cache_features needs the whole backbone frozen"):
        train.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_weights_of_another_family_are_one_error_line_from_the_cli(tmp_path):
    """A ResNet state dict (torchvision's names) given to an EfficientNet: the CLI names the mismatch, no traceback."""
    rng = np.random.default_rng(0)
    keys = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.running_mean", "fc.weight"]
    path = tmp_path / "resnet18.safetensors"
    safetensors.numpy.save_file({k: rng.normal(size=(4, 4)).astype(np.float32) for k in keys}, str(path))
    result = train_util.cli(tmp_path / "no-images-needed", tmp_path / "run", "--config.model.name=efficientnet_lite0",
                            f"--config.model.weights={path}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("WeightsMismatchError: these weights match no efficientnet naming convention"), last
    assert "they are resnet (torchvision) weights" in last and "layer1.0.conv1.weight" in last
