"""`tljax.predict`: a trained run's labels for image files, equal to its own eval step's; odd and bad images."""

from __future__ import annotations

import csv
import functools
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests.tool_util import snapshot, tool
from tljax import data, predict
from tljax.data import normalize
from tljax.runs import restore
from tljax.training import steps


def _eval_step_labels(run: restore.TrainedRun, split: str) -> dict[str, int]:
    """{file: label} from the training code's eval step over `split` of the run's data (its pipeline, its batches)."""
    cfg = ml_collections.ConfigDict(run.config.data.to_dict())
    pipe = data.build(cfg, run.prep, seed=0, trained_with=os.path.join(run.workdir, normalize.FILENAME))
    fn = jax.jit(functools.partial(steps.eval_step, model=run.model))
    labels = []
    for batch in pipe.eval(split):
        _, pred = fn(run.variables, batch)
        labels += list(np.asarray(pred)[batch["mask"] > 0])
    return dict(zip(pipe.records[split].names, labels))


def test_predict_gives_the_labels_of_the_eval_step_on_training_images(trained_run):
    _, workdir = trained_run
    run = restore.load(str(workdir))
    expected = _eval_step_labels(run, "train")
    predictions, errors = predict.predict(run, sorted(expected), top_k=2, batch_size=5)  # 5: a padded last batch
    assert not errors
    got = {p.path: run.class_names.index(p.classes[0]) for p in predictions}
    assert got == expected
    assert len(set(got.values())) > 1  # not a model that answers one class for everything
    assert all(len(p.classes) == 2 and p.probabilities[0] >= p.probabilities[1] for p in predictions)


def _write(path, pixels):
    tf.io.write_file(str(path), tf.io.encode_png(pixels))
    return str(path)


def test_grayscale_and_alpha_images_are_read_as_training_reads_them(trained_run, tmp_path):
    _, workdir = trained_run
    run = restore.load(str(workdir))
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (24, 30, 1), dtype=np.uint8)
    rgba = rng.integers(0, 256, (24, 30, 4), dtype=np.uint8)
    paths = [_write(tmp_path / "gray.png", gray), _write(tmp_path / "gray_as_rgb.png", np.repeat(gray, 3, -1)),
             _write(tmp_path / "rgba.png", rgba), _write(tmp_path / "rgba_as_rgb.png", rgba[..., :3])]
    predictions, errors = predict.predict(run, paths, top_k=3)
    assert not errors
    by_name = {os.path.basename(p.path): p for p in predictions}
    assert "grayscale" in by_name["gray.png"].note and "alpha" in by_name["rgba.png"].note
    assert by_name["gray_as_rgb.png"].note == by_name["rgba_as_rgb.png"].note == ""
    for odd in ("gray", "rgba"):
        a, b = by_name[f"{odd}.png"], by_name[f"{odd}_as_rgb.png"]
        assert a.classes == b.classes
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-6)


def test_cli_writes_csv_names_a_corrupt_image_and_leaves_the_workdir_alone(trained_run, tmp_path):
    folder, workdir = trained_run
    before = snapshot(workdir)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    output = tmp_path / "preds.csv"
    result = tool("predict", f"--workdir={workdir}", f"--output={output}", "--top_k=2", str(bad),
                  str(folder / "class1"))
    assert result.returncode == 1
    assert f"cannot decode image {bad}" in result.stderr and "1 of 41 images could not be read" in result.stderr
    rows = list(csv.DictReader(open(output)))
    assert len(rows) == 40 and {r["class_1"] for r in rows} <= {"class0", "class1", "class2"}
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in rows)
    assert str(folder / "class1" / "0.png") in result.stdout
    assert snapshot(workdir) == before


def test_a_workdir_without_checkpoint_and_a_missing_image_get_clear_messages(tmp_path):
    result = tool("predict", f"--workdir={tmp_path}", str(tmp_path))
    assert result.returncode != 0
    assert "folder" in result.stderr and "holds no images" in result.stderr
    image = _write(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
    result = tool("predict", f"--workdir={tmp_path}", image)
    assert result.returncode != 0
    assert "RunNotFoundError" in result.stderr and "holds no checkpoints" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(predict.ImageInputError, match="no such file"):
        predict.image_paths([str(tmp_path / "missing.png")])
