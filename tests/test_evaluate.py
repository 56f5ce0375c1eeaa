"""`tljax.evaluate`: the run's test accuracy reproduced from its checkpoint, per-class scores, other data."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests.tool_util import snapshot, tool
from tljax import evaluate, predict
from tljax.runs import restore
from tljax.training import metrics


def test_accuracy_equals_the_summary_and_the_confusion_matrix_counts_every_test_example(trained_run):
    _, workdir = trained_run
    before = snapshot(workdir)
    result = tool("evaluate", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((workdir / "summary.json").read_text())
    out = workdir / "eval" / "test"
    try:
        scores = json.loads((out / "metrics.json").read_text())
        assert scores["accuracy"] == summary["test_accuracy"]
        assert scores["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
        assert 0 < scores["accuracy"] < 1  # the fixture's model makes mistakes: the figures below have content
        rows = list(csv.reader(open(out / "confusion_matrix.csv")))
        matrix = np.asarray([[int(v) for v in row[1:]] for row in rows[1:]])
        assert matrix.sum() == scores["examples"] == 12  # 10% of the fixture's 120 images
        assert np.trace(matrix) / matrix.sum() == scores["accuracy"]
        per_class = list(csv.DictReader(open(out / "per_class.csv")))
        assert [int(r["support"]) for r in per_class] == list(matrix.sum(1))
        assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 12
        for png in ("confusion_matrix.png", "most_wrong.png"):
            assert tf.io.decode_png(tf.io.read_file(str(out / png))).shape[0] > 100
    finally:
        shutil.rmtree(workdir / "eval")  # the fixture's workdir is shared: leave it as it was
    assert snapshot(workdir) == before


def test_per_class_scores_of_a_known_confusion_matrix():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 0, 2, 2, 0, 1])
    matrix = metrics.confusion_matrix(labels, preds, 4)
    assert matrix.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]
    s = metrics.per_class_scores(matrix)
    np.testing.assert_allclose(s["precision"], [2 / 4, 1 / 3, 2 / 2, 0])
    np.testing.assert_allclose(s["recall"], [2 / 3, 1 / 2, 2 / 4, 0])
    np.testing.assert_allclose(s["f1"], [2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3), 0.4, 2 / 3, 0])
    assert s["support"].tolist() == [3, 2, 4, 0]


def test_other_data_with_some_of_the_classes_is_scored_in_the_runs_class_indices(trained_run, tmp_path):
    folder, workdir = trained_run
    (tmp_path / "class2").mkdir()
    for i in range(6):
        shutil.copy(folder / "class2" / f"{i}.png", tmp_path / "class2" / f"{i}.png")
    run = restore.load(str(workdir))
    ev = evaluate.evaluate(run, "train", f"folder:{tmp_path}")
    assert ev.labels.tolist() == [2] * 6
    predictions, _ = predict.predict(run, [str(p) for p in ev.names])
    assert [run.class_names.index(p.classes[0]) for p in predictions] == ev.predictions.tolist()
    assert ev.scores()["accuracy"] == np.mean(ev.predictions == 2)
    assert ev.confusion.sum() == 6

    (tmp_path / "unicorn").mkdir()
    shutil.copy(folder / "class0" / "0.png", tmp_path / "unicorn" / "0.png")
    with pytest.raises(evaluate.EvaluationError, match="unicorn"):
        evaluate.evaluate(run, "train", f"folder:{tmp_path}")


def test_most_wrong_examples_are_mistakes_surest_first(trained_run):
    _, workdir = trained_run
    ev = evaluate.evaluate(restore.load(str(workdir)), "val")
    pred = ev.predictions
    assert len(ev.wrong) == np.sum(pred != ev.labels) > 0
    assert all(pred[i] != ev.labels[i] for i in ev.wrong)
    confidence = ev.probabilities[ev.wrong, pred[ev.wrong]]
    assert np.all(np.diff(confidence) <= 0)
    assert ev.wrong_images.shape == (len(ev.wrong), 16, 16, 3) and ev.wrong_images.max() > 1  # 0..255, not normalised
