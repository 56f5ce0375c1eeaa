"""Test-time augmentation (`tljax.runs.tta`, `--tta` of evaluate and predict): the views' geometry, the mean of the
views' probabilities computed by hand on a trained model, and names refused before anything loads."""

from __future__ import annotations

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests.tool_util import snapshot, tool
from tljax import data, evaluate, predict
from tljax.data import normalize, transforms
from tljax.runs import restore, tta


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("spec, names", [("", ()), ("flip", ("flip",)), ("crops5", ("crops5",)),
                                         ("crops5,flip", ("flip", "crops5")), (" flip , crops5 ", ("flip", "crops5"))])
def test_names_parse_to_views(spec, names):
    assert tta.parse(spec) == names
    assert tta.count(names) == {(): 1, ("flip",): 2, ("crops5",): 5, ("flip", "crops5"): 10}[names]


@pytest.mark.parametrize("spec", ["flop", "flip,", "crops10", "flip;crops5"])
def test_unknown_names_are_refused_naming_the_accepted_values(spec):
    with pytest.raises(tta.TTAError, match=r"--tta=.*unknown test-time augmentation .*accepted: .*flip, crops5"):
        tta.parse(spec)


def test_five_crops_are_the_corners_and_centre_of_the_eval_resize_and_flip_mirrors_them():
    """A 10 x 14 image, size 8, crop fraction 0.8: the eval resize keeps it (shorter side round(8 / 0.8) = 10), so the
    views are plain slices of it."""
    image = np.arange(10 * 14 * 3, dtype=np.float32).reshape(10, 14, 3) % 251
    views = tta.views(tf.constant(image), ("flip", "crops5"), 8, 0.8, "bilinear").numpy()
    assert views.shape == (10, 8, 8, 3)
    regions = [image[:8, :8], image[:8, 6:], image[2:, :8], image[2:, 6:], image[1:9, 3:11]]  # FiveCrop order
    for view, region in zip(views[:5], regions):
        np.testing.assert_array_equal(view, region)
    np.testing.assert_array_equal(views[5:], views[:5, :, ::-1])
    # The centre crop is the evaluation transform's view; no TTA gives it alone.
    eval_view = transforms.center_crop(tf.constant(image), 8, 0.8, "bilinear").numpy()
    np.testing.assert_array_equal(views[4], eval_view)
    np.testing.assert_array_equal(tta.views(tf.constant(image), (), 8, 0.8, "bilinear").numpy(), eval_view[None])
    # A real resize: a 20 x 30 image at size 8 and fraction 0.5 becomes 16 x 24; the corners are its corners.
    big = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    resized = transforms.resize_for_crop(tf.constant(big), 8, 0.5, "bilinear").numpy()
    assert resized.shape == (16, 24, 3)
    crops = tta.views(tf.constant(big), ("crops5",), 8, 0.5, "bilinear").numpy()
    np.testing.assert_array_equal(crops[3], resized[8:, 16:])
    np.testing.assert_array_equal(crops[4], resized[4:12, 8:16])


def test_mean_probabilities_averages_each_examples_consecutive_views():
    logits = np.random.default_rng(0).normal(size=(6, 4))  # 3 examples x 2 views
    want = (softmax(logits[0::2]) + softmax(logits[1::2])) / 2
    np.testing.assert_allclose(tta.mean_probabilities(logits, 2), want, rtol=1e-12)
    np.testing.assert_allclose(tta.mean_probabilities(logits, 1), softmax(logits), rtol=1e-12)


def _val_inputs(run: restore.TrainedRun) -> tuple[np.ndarray, list[str]]:
    """The val split as the run's evaluation feeds it (normalised eval views) and the files, in order."""
    cfg = ml_collections.ConfigDict(run.config.data.to_dict())
    pipe = data.build(cfg, run.prep, seed=0, trained_with=os.path.join(run.workdir, normalize.FILENAME))
    batches = list(pipe.eval("val"))
    images = np.concatenate([b["image"] for b in batches])[np.concatenate([b["mask"] for b in batches]) > 0]
    return images, list(pipe.records["val"].names)


def test_flip_tta_is_the_mean_of_the_two_views_probabilities(trained_run):
    run = restore.load(str(trained_run[1]))
    images, files = _val_inputs(run)
    logits_fn = run.logits_fn(len(images))
    plain, mirrored = softmax(logits_fn(images).astype(np.float64)), softmax(
        logits_fn(images[:, :, ::-1]).astype(np.float64))  # standardize_train is per channel: flip commutes with it
    assert np.abs(plain - mirrored).max() > 1e-3  # the model is not flip-symmetric: the two views disagree
    ev = evaluate.evaluate(run, "val", tta_spec="flip")
    assert ev.tta == ("flip",) and ev.scores()["tta"] == ["flip"]
    np.testing.assert_allclose(ev.probabilities, (plain + mirrored) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(evaluate.evaluate(run, "val").probabilities, plain, rtol=1e-5, atol=1e-7)
    predictions, errors = predict.predict(run, files, top_k=3, batch_size=4, tta_spec="flip")
    assert not errors
    for p, want in zip(predictions, (plain + mirrored) / 2):
        got = np.zeros(3)
        got[[run.class_names.index(c) for c in p.classes]] = p.probabilities
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_ten_views_in_evaluate_and_predict_equal_the_views_by_hand(trained_run):
    run = restore.load(str(trained_run[1]))
    _, files = _val_inputs(run)
    names = ("flip", "crops5")
    views = np.stack([run.views(transforms.decode(tf.io.read_file(f)), names).numpy() for f in files])
    assert views.shape[1] == 10 and not np.allclose(views[:, 0], views[:, 3])  # the corners differ (20 px -> 18)
    logits = run.logits_fn(views.shape[0] * 10)(views.reshape(-1, *views.shape[2:])).astype(np.float64)
    want = softmax(logits).reshape(len(files), 10, -1).mean(1)
    ev = evaluate.evaluate(run, "val", tta_spec="flip,crops5")
    np.testing.assert_allclose(ev.probabilities, want, rtol=1e-5, atol=1e-7)
    predictions, _ = predict.predict(run, files, top_k=1, tta_spec="crops5,flip")
    assert [run.class_names.index(p.classes[0]) for p in predictions] == list(want.argmax(-1))
    np.testing.assert_allclose([p.probabilities[0] for p in predictions], want.max(-1), rtol=1e-5)


def test_cli_tta_writes_its_own_folder_and_refuses_unknown_names_before_loading(trained_run, tmp_path):
    folder, workdir = trained_run
    before = snapshot(workdir)
    result = tool("evaluate", f"--workdir={workdir}", "--tta=bogus")
    assert result.returncode != 0
    assert "TTAError: --tta='bogus': unknown test-time augmentation 'bogus'; accepted:" in result.stderr
    assert "flip, crops5" in result.stderr
    assert snapshot(workdir) == before
    with pytest.raises(tta.TTAError, match="unknown test-time augmentation 'mirror'"):
        predict.predict(restore.load(str(workdir)), [str(folder / "class0" / "0.png")], tta_spec="flip,mirror")
    result = tool("evaluate", f"--workdir={workdir}", "--tta=flip", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TTA flip" in result.stdout
    scores = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert scores["tta"] == ["flip"] and scores["examples"] == 12
    assert evaluate.default_output_dir(str(workdir), "test", "", ("flip", "crops5")) == os.path.join(
        str(workdir), "eval", "test_tta-flip-crops5")
    shutil.rmtree(tmp_path / "out")
