"""Many heads in one step (`tljax.training.heads`): K heads with different learning rates, weight decays, label
smoothing and schedule arguments, trained together on cached features, each equal to its own run; and a sweep that uses
them."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest

from tests import train_util
from tests.configs import tiny
from tljax.research import sweep_runner, sweeps
from tljax.training import heads, train

SWEEP = [  # phase 1's numbers: learning rate, weight decay (never 0 here), label smoothing, cosine decay's alpha
    {"phases[0].optimizer.learning_rate": 1e-2, "phases[0].weight_decay": 1e-4, "phases[0].label_smoothing": 0.0,
     "phases[0].schedule.alpha": 0.0},
    {"phases[0].optimizer.learning_rate": 3e-2, "phases[0].weight_decay": 1e-3, "phases[0].label_smoothing": 0.1,
     "phases[0].schedule.alpha": 0.1},
    {"phases[0].optimizer.learning_rate": 5e-3, "phases[0].weight_decay": 3e-3, "phases[0].label_smoothing": 0.2,
     "phases[0].schedule.alpha": 0.5},
]


pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """The tiny config with a cached-features first phase (2 epochs, cosine decay, an EMA) and a one-epoch second
    phase, swept over phase 1's numbers. (Vmapped dot products may round differently: the heads equal their
    sequential runs to about 1e-7, and the second phase must not amplify that past 1e-6.)"""
    cfg = tiny.get_config(str(train_util.image_folder(tmp_path_factory.mktemp("images"))))
    head, rest = cfg.phases[0], cfg.phases[1]
    head.cache_features, head.ema_decay = True, 0.9
    head.schedule = {"name": "cosine_decay_schedule", "init_value": "learning_rate", "decay_steps": "phase_steps",
                     "alpha": 0.0}
    rest.epochs = 1
    rest.optimizer.learning_rate = 1e-3  # a gentler full fine-tuning: float rounding of the heads grows less
    cfg.lock()
    return sweeps.variants(cfg, SWEEP)


@pytest.fixture(scope="module")
def alone(variants, tmp_path_factory):
    """Each variant's independent run: {name: (workdir, summary)}."""
    root = tmp_path_factory.mktemp("alone")
    return {v.name: (root / v.name, train.run(v.config, str(root / v.name))) for v in variants}


def assert_same_run(ours, theirs, summary) -> None:
    """Final state, summary and metrics.jsonl of workdir `ours` equal those of `theirs` to 1e-6."""
    a, b = train_util.final_state(ours), train_util.final_state(theirs)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    written = json.loads((ours / "summary.json").read_text())
    assert written.keys() == summary.keys()
    assert [sorted(p) for p in written["phases"]] == [sorted(p) for p in summary["phases"]]
    for phase, other in zip(written["phases"], summary["phases"]):
        np.testing.assert_allclose([phase[key] for key in sorted(phase) if key != "name"],
                                   [other[key] for key in sorted(phase) if key != "name"], atol=1e-6)
    assert (written["test_accuracy"], written["weights"]) == (summary["test_accuracy"], summary["weights"])
    np.testing.assert_allclose(written["test_loss"], summary["test_loss"], atol=1e-6)
    lines, expected = train_util.metric_lines(ours), train_util.metric_lines(theirs)
    assert [sorted(line) for line in lines] == [sorted(line) for line in expected]
    for line, other in zip(lines, expected):
        for key, value in line.items():
            np.testing.assert_allclose(value, other[key], atol=1e-6, err_msg=key)


def test_the_numbers_may_differ_but_structure_may_not(variants):
    keys = {heads.group_key(v.config, 0) for v in variants}
    assert len(keys) == 1 and heads.group_key(variants[0].config, 1) is None  # phase 2 caches nothing
    assert heads.numbers(variants[1].config.phases[0]) == {
        "weight_decay": 1e-3, "label_smoothing": 0.1, "clip_grad_norm": 0.0, "optimizer.learning_rate": 3e-2,
        "schedule.alpha": 0.1}
    no_decay = copy.deepcopy(variants[0].config)  # (copy_and_resolve_references shares the phases' dicts)
    no_decay.phases[0].weight_decay = 0.0  # the chain loses add_decayed_weights: another optimizer state
    assert heads.group_key(no_decay, 0) not in keys


def test_three_heads_in_one_step_equal_their_sequential_runs(variants, alone, tmp_path):
    workdirs = [str(tmp_path / v.name) for v in variants]
    assert heads.train_group([v.config for v in variants], workdirs, 0) == [0, 1, 2]
    for v, workdir in zip(variants, workdirs):
        summary = train.run(v.config, workdir)  # resumes after phase 1: phase 2, test, summary
        assert_same_run(tmp_path / v.name, *alone[v.name])
        assert summary.keys() == alone[v.name][1].keys()


def test_a_sweep_over_cached_phase_numbers_trains_them_as_heads(variants, alone, tmp_path):
    calls = []
    original = heads.train_group

    def counting(configs, workdirs, k):
        calls.append((len(configs), k))
        return original(configs, workdirs, k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(heads, "train_group", counting)
        records = sweep_runner.run(str(tmp_path), variants)
    assert calls == [(3, 0)]
    assert [r["status"] for r in records] == ["done"] * 3
    assert all(r["heads"] == {"phase": 0, "heads": 3} and r["seconds"] > 0 for r in records)
    for v in variants:
        assert_same_run(tmp_path / v.name, *alone[v.name])
