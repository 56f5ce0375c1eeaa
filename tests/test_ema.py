"""The EMA of the weights: its definition against numpy, raw and EMA validation, exact resume with label smoothing
and mixup on, the weights that predict, evaluate, export and report use, an EMA turned on and off by recipe changes,
and bad EMA fields."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf

from tests import train_util
from tests.configs import tiny
from tljax import config as config_lib
from tljax import evaluate, export, models, predict, report
from tljax.runs import restore
from tljax.training import checkpoint, optim, preemption, steps, train


def _batch(seed: int, n: int = 8, size: int = 16, classes: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


@pytest.mark.parametrize("decay, warmup", [(0.9, False), (0.3, True)])
def test_ema_is_the_numpy_average_of_the_parameter_trajectory(decay, warmup):
    # Stage 2 and the head train with BatchNorm in training mode: their parameters and statistics move; the stem and
    # stage 1 stay frozen. With warm-up and decay 0.3, steps t = 0..2 use (1 + t) / (10 + t) and t = 3, 4 use 0.3.
    model = models.create("resnet_tiny", 5)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
    phase = config_lib.phase(trainable="stage2|^head/", bn="train", ema_decay=decay, ema_warmup=warmup,
                             optimizer={"name": "sgd", "learning_rate": 0.1})
    labels = optim.param_labels(variables["params"], phase.trainable)
    tx = optim.build(phase, labels, phase_steps=10)
    start = 7  # a phase that starts at global step 7: its own steps count t
    state = steps.create_state(variables, tx, jax.random.PRNGKey(1), step=start, ema=True)
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, labels=labels, bn_train=True,
                                   ema=steps.phase_ema(phase, start)))
    expected = {k: v.astype(np.float64) for k, v in train_util.flat(variables).items()}
    for t in range(5):
        state, _ = fn(state, _batch(t))
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        raw = train_util.flat(jax.device_get(steps.variables_of(state)))
        expected = {k: d * expected[k] + (1 - d) * raw[k] for k in expected}
    ema = train_util.flat(jax.device_get(state.ema))
    assert ema.keys() == expected.keys()
    moved = 0
    for key, value in ema.items():
        np.testing.assert_allclose(value, expected[key], rtol=2e-6, atol=2e-7, err_msg=key)
        if "stem" in key or "stage1" in key:  # frozen: the very values of the raw weights, never averaged
            np.testing.assert_array_equal(value, train_util.flat(variables)[key], err_msg=key)
            np.testing.assert_array_equal(raw[key], train_util.flat(variables)[key], err_msg=key)
        elif np.max(np.abs(raw[key] - value)) > 1e-4:  # the average lags behind the weights that train
            moved += 1
    assert moved > 10, moved  # stage 2 and the head: kernels, biases, scales, and the statistics


def _techniques(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` (the tiny config) with EMA (warm-up in phase 2), label smoothing, mixup and CutMix on."""
    cfg.phases[0].ema_decay = 0.5
    cfg.phases[1].ema_decay = 0.9
    cfg.phases[1].ema_warmup = True
    for p in cfg.phases:
        p.label_smoothing = 0.1
    cfg.data.mixup_alpha, cfg.data.cutmix_alpha = 0.4, 1.0
    return cfg


pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """(workdir, summary) of an uninterrupted tiny run with the techniques on."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.run(_techniques(tiny.get_config(str(folder))), str(workdir))


def test_validation_reports_raw_and_ema_weights(reference):
    workdir, summary = reference
    assert summary["weights"] == "ema"
    for result in summary["phases"]:
        assert {"val_accuracy", "val_loss", "val_ema_accuracy", "val_ema_loss"} <= result.keys()
    epochs = [line for line in train_util.metric_lines(workdir) if "val_loss" in line]
    assert len(epochs) == 4 and all("val_ema_loss" in line and "val_ema_accuracy" in line for line in epochs)
    assert any(line["val_ema_loss"] != line["val_loss"] for line in epochs)
    tags = set()
    for path in workdir.glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            tags |= {value.tag for value in tf.compat.v1.Event.FromString(record.numpy()).summary.value}
    assert {"val_ema_loss", "val_ema_accuracy", "val_loss", "val_accuracy"} <= tags


def test_sigterm_mid_phase_resumes_to_the_same_ema_bit_for_bit(folder, reference, tmp_path, monkeypatch):
    # Step 15 is phase 2's third step (its EMA in warm-up), between two checkpoints: only the signal saves there.
    workdir = tmp_path / "run"
    cfg = _techniques(tiny.get_config(str(folder)))
    monkeypatch.setenv(preemption.TEST_SIGNAL_VARIABLE, "15")
    with pytest.raises(preemption.Preempted):
        train.run(cfg, str(workdir))
    saved = train_util.final_state(workdir)
    assert int(saved["step"]) == 15 and saved["ema"]
    monkeypatch.delenv(preemption.TEST_SIGNAL_VARIABLE)
    summary = train.run(cfg, str(workdir))
    ref_workdir, ref_summary = reference
    assert summary == ref_summary
    ref, resumed = train_util.final_state(ref_workdir), train_util.final_state(workdir)
    train_util.assert_same_params(ref, resumed, atol=0)
    train_util.assert_same_params(ref["ema"], resumed["ema"], atol=0)
    assert train_util.metric_lines(workdir) == train_util.metric_lines(ref_workdir)


def test_predict_evaluate_and_export_use_the_ema_weights(folder, reference, tmp_path):
    workdir, summary = reference
    state = train_util.final_state(workdir)
    run = restore.load(str(workdir))
    assert run.weights == "ema"
    for part in ("params", "batch_stats"):
        ema, got = train_util.flat(state["ema"][part]), train_util.flat(run.variables[part])
        assert ema.keys() == got.keys() and all(np.array_equal(ema[k], got[k]) for k in ema)
    assert not np.array_equal(state["ema"]["params"]["head"]["out"]["kernel"], state["params"]["head"]["out"]["kernel"])
    raw = dataclasses.replace(run, variables={"params": state["params"], "batch_stats": state["batch_stats"]},
                              weights="raw")

    tensors = safetensors.numpy.load_file(export.export(run, str(tmp_path / "model.safetensors")))
    expected = {f"{part}/{k}": v for part in ("params", "batch_stats")
                for k, v in train_util.flat(state["ema"][part]).items()}
    assert tensors.keys() == expected.keys()
    assert all(np.array_equal(tensors[k], expected[k]) for k in expected)

    scores = evaluate.evaluate(run, "test").scores()
    assert scores["accuracy"] == summary["test_accuracy"]
    assert scores["loss"] == pytest.approx(summary["test_loss"], abs=1e-5)  # the summary's test used the EMA too
    assert evaluate.evaluate(raw, "test").scores()["loss"] != pytest.approx(summary["test_loss"], abs=1e-5)

    paths = sorted(str(p) for p in folder.glob("*/*.png"))[::20]  # one image per class
    predicted = {p.path: p.probabilities for p in predict.predict(run, paths, top_k=3)[0]}
    unaveraged = {p.path: p.probabilities for p in predict.predict(raw, paths, top_k=3)[0]}
    images = np.stack([run.transform(predict.read_image(path)[0]).numpy() for path in paths])
    by_hand = np.asarray(jax.nn.softmax(run.model.apply(state["ema"], images, train=False)), np.float64)
    for path, probabilities in zip(paths, by_hand):
        np.testing.assert_allclose(predicted[path], np.sort(probabilities)[::-1], rtol=1e-5)
        assert not np.allclose(unaveraged[path], predicted[path], rtol=1e-5)


def test_the_report_shows_the_ema_validation_and_the_weights_it_scores(reference, tmp_path):
    workdir, summary = reference
    text = (tmp_path / "report.html")
    report.write(str(workdir), str(text))
    text = text.read_text()
    for k, phase in enumerate(summary["phases"]):
        row = re.search(rf'<tr id="val-ema-{k}">(.*?)</tr>', text).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert "EMA" in cells[0] and cells[2:4] == [f"{phase['val_ema_accuracy']:.4f}", f"{phase['val_ema_loss']:.4f}"]
    assert "<td>weights tested and exported</td><td>their moving average (EMA)</td>" in text


def test_ema_eval_off_gives_the_raw_weights_to_the_tools(reference, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(reference[0], workdir)
    fields = json.loads((workdir / "config.json").read_text())
    fields["phases"][-1]["ema_eval"] = False
    (workdir / "config.json").write_text(json.dumps(fields))
    run, state = restore.load(str(workdir)), train_util.final_state(workdir)
    assert run.weights == "raw"
    train_util.assert_same_params(run.variables, state, atol=0)


def test_an_ema_turned_on_by_a_recipe_change_starts_at_the_checkpoint(folder, tmp_path):
    cfg = tiny.get_config(str(folder))
    cfg.phases = cfg.phases[:1]
    cfg.phases[0].steps = 2
    cfg.checkpoint_every_steps, cfg.keep_checkpoints = 1, 100
    train.run(cfg, str(tmp_path))
    cfg.phases[0].steps, cfg.phases[0].ema_decay, cfg.allow_recipe_change = 4, 0.5, True
    summary = train.run(cfg, str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    raw = {step: train_util.flat(ckpt.restore_variables(step)["params"]) for step in (2, 3, 4)}
    ema = train_util.flat(ckpt.restore_variables(4, "ema")["params"])
    ckpt.close()
    for key, value in ema.items():  # from step 2's weights on: two updates of decay 0.5
        np.testing.assert_allclose(value, 0.5 * (0.5 * raw[2][key] + 0.5 * raw[3][key]) + 0.5 * raw[4][key],
                                   rtol=1e-6, atol=1e-7, err_msg=key)
    assert summary["weights"] == "ema" and restore.load(str(tmp_path)).weights == "ema"
    cfg.phases[0].steps, cfg.phases[0].ema_decay = 6, 0.0  # and off again: the checkpoints hold no EMA any more
    assert train.run(cfg, str(tmp_path))["weights"] == "raw"
    assert not train_util.final_state(tmp_path)["ema"]
    assert restore.load(str(tmp_path)).weights == "raw"


@pytest.mark.parametrize("field, value, message", [
    ("ema_decay", 1.0, "ema_decay must be in [0, 1)"), ("ema_decay", -0.1, "ema_decay must be a number >= 0"),
    ("ema_eval", None, "ema_eval must be True or False"), ("ema_warmup", None, "ema_warmup must be True or False")])
def test_bad_ema_fields_are_refused_naming_them(field, value, message):
    cfg = config_lib.defaults()
    cfg.phases[1][field] = value
    with pytest.raises(config_lib.data.ConfigError) as refused:
        config_lib.validate(cfg)
    assert f"config.phases[1].{field}" in str(refused.value) and message in str(refused.value)
