"""Gradual unfreezing: `config.unfreeze_schedule`'s phases open exactly the head and the top k stages of each
family, bad stage counts are refused, and the shipped config built with it validates."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from tests.test_efficientnet import SMALL
from tests.test_layer_decay import call_order
from tljax import config as config_lib
from tljax import models
from tljax.training import optim

ADAM = {"name": "adam", "learning_rate": 1e-4}
# name: (create kwargs for a small variant with the family's module names, number of stages, the stage a
# top-level backbone module belongs to, written out from its name).
FAMILIES = {
    "resnet18": ({}, 4, lambda m: 1 if m.startswith("stem_") else int(re.match(r"stage(\d+)_", m)[1])),
    "efficientnet_b0": (SMALL, 7, lambda m: {"stem": 1, "head": 7}.get(m.split("_")[0])
                        or int(re.match(r"stage(\d+)_", m)[1])),
    "vgg16": ({"fc": True, "hidden": 8}, 5, lambda m: 5 if m in ("fc1", "fc2") else int(re.match(r"block(\d)_", m)[1])),
}


def _paths(name: str) -> list[str]:
    kwargs = FAMILIES[name][0]
    model = models.create(name, 3, **kwargs)
    image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)["params"]
    return [optim.path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_phase_k_trains_the_head_and_the_top_k_stages(name):
    _, count, stage_of = FAMILIES[name]
    paths = _paths(name)
    phases = config_lib.unfreeze_schedule(name, count, epochs=2, optimizer=ADAM, layer_decay=0.8)
    assert [p.name for p in phases] == ["head"] + [f"top{k}" for k in range(1, count + 1)]
    assert all(p.epochs == 2 and p.optimizer.to_dict() == ADAM and p.layer_decay == 0.8 for p in phases)
    for k, phase in enumerate(phases):
        trained = {path for path in paths if re.search(phase.trainable, path)}
        expected = {path for path in paths if path.startswith("head/")
                    or stage_of(path.split("/")[1]) > count - k}
        assert trained == expected, (k, sorted(trained ^ expected)[:5])
    assert {path for path in paths if re.search(phases[-1].trainable, path)} == set(paths)  # all open at the end


def test_fewer_stages_stop_below_the_top():
    phases = config_lib.unfreeze_schedule("resnet18", 2, epochs=1, optimizer=ADAM)
    trained = {path for path in _paths("resnet18") if re.search(phases[-1].trainable, path)}
    assert {path.split("/")[1] for path in trained if path.startswith("backbone/")} == {
        "stage3_block0", "stage3_block1", "stage4_block0", "stage4_block1"}


@pytest.mark.parametrize("stages", [0, 5, True, 2.0])
def test_a_stage_count_the_family_does_not_have_is_refused(stages):
    with pytest.raises(ValueError, match=r"stages must be an integer from 1 to 4 \(the stages of resnet18\)"):
        config_lib.unfreeze_schedule("resnet18", stages, epochs=1, optimizer=ADAM)


def test_the_shipped_gradual_config_uses_the_schedule_and_validates():
    path = Path(__file__).resolve().parents[1] / "configs" / "gradual.py"
    spec = importlib.util.spec_from_file_location("gradual", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    config_lib.validate(cfg)
    schedule = config_lib.unfreeze_schedule(cfg.model.name, 3, epochs=1, optimizer=ADAM)
    assert [(p.name, p.trainable) for p in cfg.phases] == [(p.name, p.trainable) for p in schedule]
    assert cfg.phases[0].cache_features and not any(p.cache_features for p in cfg.phases[1:])


@pytest.mark.parametrize("family", list(models.FAMILIES))
def test_every_family_s_stages_split_its_backbone_in_forward_order(family):
    """Each backbone module belongs to exactly one stage, and the stages follow the forward pass (each registered
    family, its first preset)."""
    name = next(iter(models.FAMILIES[family].PRESETS))
    called, _ = call_order(name)
    stages = models.unfreeze_stages(name)
    stage_of = {}
    for module in called:
        matches = [s for s, pattern in enumerate(stages) if re.search(f"^backbone/(?:{pattern})/", module + "/")]
        assert len(matches) == 1, (module, matches)
        stage_of[module] = matches[0]
    assert [stage_of[m] for m in called] == sorted(stage_of.values())
    assert set(stage_of.values()) == set(range(len(stages)))  # no stage is empty
