"""Resuming a run: after SIGTERM on any step boundary, after a kill (TensorBoard), with a changed recipe, and the
warning for split strings a source override leaves behind."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import tensorflow as tf
from absl import flags
from ml_collections import config_flags

from tests import train_util
from tests.configs import tiny
from tljax import main, report
from tljax.training import checkpoint, preemption, train


pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """(workdir, summary) of an uninterrupted tiny run (12 steps per phase, checkpoints every 2 steps)."""
    workdir = tmp_path_factory.mktemp("reference")
    cfg = tiny.get_config(str(folder))
    cfg.keep_checkpoints = 100
    return workdir, train.run(cfg, str(workdir))


def _checkpoint_meta(workdir, step: int) -> dict:
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        return ckpt.meta(step)
    finally:
        ckpt.close()


def test_sigterm_on_phase_and_run_boundaries_resumes_to_the_same_results(folder, reference, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    cfg = tiny.get_config(str(folder))
    cfg.keep_checkpoints = 100
    # Phase 1's last step, phase 2's first, the run's last: each run stops after SIGTERM there, the next resumes.
    for step, phases_done in ((12, 1), (13, 1), (24, 2)):
        monkeypatch.setenv(preemption.TEST_SIGNAL_VARIABLE, str(step))
        with pytest.raises(preemption.Preempted) as stopped:
            train.run(cfg, str(workdir))
        assert stopped.value.step == step
        meta = _checkpoint_meta(workdir, step)
        assert [p["name"] for p in meta["phase_results"]] == ["head", "all"][:phases_done]
    monkeypatch.delenv(preemption.TEST_SIGNAL_VARIABLE)
    summary = train.run(cfg, str(workdir))
    ref_workdir, ref_summary = reference
    assert summary == ref_summary
    assert json.loads((workdir / "summary.json").read_text()) == ref_summary
    train_util.assert_same_params(train_util.final_state(ref_workdir), train_util.final_state(workdir), atol=0)
    assert train_util.metric_lines(workdir) == train_util.metric_lines(ref_workdir)


def _tensorboard_points(workdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the workdir's event files."""
    points = []
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                points.append((value.tag, event.step, float(tf.make_ndarray(value.tensor))))
    return points


def test_resume_after_a_kill_keeps_each_tensorboard_point_once(folder, reference, tmp_path):
    # What a run killed after step 24 but whose checkpoints after step 16 never completed leaves: logs up to step
    # 24, checkpoints up to 16. The resume redoes steps 17-24 and writes their points again.
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    for path in (workdir / "checkpoints").iterdir():
        if int(path.name) > 16:
            shutil.rmtree(path)
    cfg = tiny.get_config(str(folder))
    cfg.keep_checkpoints = 100
    train.run(cfg, str(workdir))
    points = _tensorboard_points(workdir)
    keys = [(tag, step) for tag, step, _ in points]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    expected = {(tag, step): value for tag, step, value in _tensorboard_points(reference[0])}
    assert {(tag, step): value for tag, step, value in points if tag not in train_util.TIMING} == {
        key: value for key, value in expected.items() if key[0] not in train_util.TIMING}
    assert train_util.metric_lines(workdir) == train_util.metric_lines(reference[0])


def test_a_changed_recipe_is_refused_unless_allowed_and_then_recorded(folder, tmp_path):
    workdir = tmp_path / "run"
    cfg = tiny.get_config(str(folder))
    cfg.phases = cfg.phases[:1]
    cfg.phases[0].steps = 2
    train.run(cfg, str(workdir))
    description = {name: (workdir / name).read_bytes() for name in ("config.json", "model.json", "prep.json")}

    cfg.keep_checkpoints = 5  # not part of the recipe: the resume goes ahead and leaves the description alone
    train.run(cfg, str(workdir))
    assert {name: (workdir / name).read_bytes() for name in description} == description

    cfg.phases[0].optimizer = {"name": "sgd", "learning_rate": 1e-3}
    cfg.phases[0].steps = 4
    with pytest.raises(checkpoint.RecipeChangedError) as refused:
        train.run(cfg, str(workdir))
    message = str(refused.value)
    for line in ("phases[0].optimizer.learning_rate: 0.01 -> 0.001", "phases[0].optimizer.name: 'adam' -> 'sgd'",
                 "phases[0].steps: 2 -> 4", "allow_recipe_change=True"):
        assert line in message
    assert {name: (workdir / name).read_bytes() for name in description} == description

    cfg.allow_recipe_change = True
    summary = train.run(cfg, str(workdir))
    assert summary["phases"][0]["steps"] == 4
    assert int(train_util.final_state(workdir)["step"]) == 4  # continued from step 2, with a fresh sgd state
    changes = _checkpoint_meta(workdir, 4)["recipe_changes"]
    assert changes == [{"step": 2, "changes": [
        {"field": "phases[0].optimizer.learning_rate", "old": 0.01, "new": 0.001},
        {"field": "phases[0].optimizer.name", "old": "adam", "new": "sgd"},
        {"field": "phases[0].steps", "old": 2, "new": 4}]}]
    assert json.loads((workdir / "config.json").read_text())["phases"][0]["optimizer"] == {
        "name": "sgd", "learning_rate": 1e-3}
    page = (tmp_path / "report.html")
    report.write(str(workdir), str(page))
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row)
            for row in re.findall(r'<tr id="recipe-\d+">(.*?)</tr>', page.read_text())]
    assert rows == [["2", "phases[0].optimizer.learning_rate", "0.01", "0.001"],
                    ["2", "phases[0].optimizer.name", "&quot;adam&quot;", "&quot;sgd&quot;"],
                    ["2", "phases[0].steps", "2", "4"]]


def _config_flag(tmp_path, *overrides: str) -> flags.Flag:
    """The --config flag as tljax.main parses it, for a config file written for animal_mnist's splits."""
    path = tmp_path / "written_for_animal_mnist.py"
    path.write_text("from tljax import config\n\ndef get_config():\n    cfg = config.defaults()\n"
                    "    cfg.data.source = 'animal_mnist'\n    cfg.data.train_split = 'train[:25%]'\n"
                    "    return cfg\n")
    argv = ["tljax.main", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values["config"]


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading config files
def test_split_strings_written_for_another_source_are_warned_about(tmp_path):
    warnings = main.stale_splits(_config_flag(tmp_path, "--config.data.source=folder:/my/digits"))
    assert len(warnings) == 1
    assert "config.data.train_split='train[:25%]'" in warnings[0] and "'animal_mnist'" in warnings[0]
    assert "'folder:/my/digits'" in warnings[0]
    # The split given too, the file's own source, or no source override: nothing to warn about.
    assert not main.stale_splits(_config_flag(tmp_path, "--config.data.source=folder:/my/digits",
                                              "--config.data.train_split="))
    assert not main.stale_splits(_config_flag(tmp_path, "--config.data.source=animal_mnist"))
    assert not main.stale_splits(_config_flag(tmp_path, "--config.seed=3"))


def test_a_field_an_older_checkpoint_lacks_is_no_change_while_it_keeps_its_default():
    """A checkpoint written before a field existed (ema_decay, layer_decay, mixup_alpha, ...) resumes under the
    default value of that field, and is refused as a changed recipe under any other."""
    cfg = tiny.get_config("unused")
    current = checkpoint.recipe(cfg)
    defaults = checkpoint.default_recipe(len(cfg.phases))
    older = {k: v for k, v in current.items() if k not in ("phases[1].ema_decay", "data.mixup_alpha")}
    assert checkpoint.recipe_changes(older, current, defaults) == []
    cfg.phases[1].ema_decay, cfg.data.mixup_alpha = 0.99, 0.2
    changed = checkpoint.recipe_changes(older, checkpoint.recipe(cfg), defaults)
    assert changed == [{"field": "data.mixup_alpha", "old": None, "new": 0.2},
                       {"field": "phases[1].ema_decay", "old": None, "new": 0.99}]
    assert checkpoint.recipe_changes({**older, "phases[1].ema_decay": 0.0}, checkpoint.recipe(cfg), defaults)[1] == {
        "field": "phases[1].ema_decay", "old": 0.0, "new": 0.99}
