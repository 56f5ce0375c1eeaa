"""Every shipped config is valid and documents the command that runs it."""

import importlib.util
from pathlib import Path

import pytest

from tljax import config as config_lib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_and_documented(path):
    module = _load(path)
    config_lib.validate(module.get_config())
    assert f"python -m tljax.main --config=configs/{path.name}" in module.__doc__
    assert "Expected" in module.__doc__


def test_augmentation_with_cached_features_is_refused():
    cfg = _load(CONFIGS[[p.stem for p in CONFIGS].index("quickstart")]).get_config()
    cfg.data.augment = True
    with pytest.raises(ValueError, match="cache_features needs config.data.augment=False"):
        config_lib.validate(cfg)
