"""`python -m tljax.export` and exported files read back with `pretrained`: the same logits, a new head on the
exported backbone, the input the run was trained on, a training run started from the file, and refusals."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf
from flax import traverse_util

from tests import train_util
from tests.tool_util import snapshot, tool
from tljax import export, pretrained
from tljax.data import normalize, pipeline, transforms
from tljax.pretrained import exported
from tljax.runs import restore


@pytest.fixture(scope="module")
def run(trained_run) -> restore.TrainedRun:
    return restore.load(str(trained_run[1]))


@pytest.fixture(scope="module")
def model_file(run, tmp_path_factory) -> Path:
    return Path(export.export(run, str(tmp_path_factory.mktemp("export") / "model.safetensors")))


@pytest.fixture(scope="module")
def images(trained_run, run) -> np.ndarray:
    """Real images of the fixture's folder, as the run's evaluation feeds them to the model."""
    files = sorted(trained_run[0].glob("*/*.png"))[::8]
    return np.stack([run.transform(transforms.decode(tf.io.read_file(str(f)))).numpy() for f in files])


def test_exported_model_gives_the_runs_logits(run, model_file, images):
    # The file's head and dtype win over the caller's when its classifier is kept: the exported model exactly.
    model, variables, prep = pretrained.load(run.description["name"], model_file, head_hidden=(7,), dtype="bfloat16")
    variables = jax.device_get(variables)
    jax.tree.map(np.testing.assert_array_equal, variables, run.variables)
    expected = run.logits_fn(len(images))(images)
    assert expected.shape == (len(images), len(run.class_names))
    # The same compiled function with the loaded model and variables: bit for bit.
    loaded = dataclasses.replace(run, model=model, variables=variables).logits_fn(len(images))(images)
    np.testing.assert_array_equal(loaded, expected)
    np.testing.assert_allclose(model.apply(variables, images, train=False), expected, atol=1e-6, rtol=0)
    assert prep.image_size == run.image_size


def test_metadata_describes_the_run(run, model_file):
    info = exported.read(model_file)
    assert (info.model, info.class_names, info.step) == (run.description["name"], run.class_names, run.step)
    assert info.normalization == run.normalization
    assert dict(info.model_kwargs) == {k: tuple(v) if isinstance(v, list) else v
                                       for k, v in run.description["kwargs"].items()}
    tensors = safetensors.numpy.load_file(model_file)
    assert tensors.keys() == traverse_util.flatten_dict(run.variables, sep="/").keys()
    assert all(v.dtype == np.float32 for v in tensors.values())


def test_prep_of_an_export_is_the_runs_input(trained_run, run, model_file):
    """standardize_train (the fixture's strategy) as a Preprocessing, at the run's evaluation geometry, equals what
    the run's evaluation fed the model."""
    assert run.normalization["normalization"] == "standardize_train"
    prep = pretrained.read(run.description["name"], model_file).prep
    crop_fraction, interpolation = pipeline.eval_geometry(run.config.data, run.prep)
    assert (prep.image_size, prep.crop_fraction, prep.interpolation) == (run.image_size, crop_fraction, interpolation)
    for file in sorted(trained_run[0].glob("*/*.png"))[::10]:
        image = transforms.decode(tf.io.read_file(str(file)))
        ours = prep.normalize(transforms.center_crop(image, prep.image_size, prep.crop_fraction, prep.interpolation))
        np.testing.assert_array_equal(ours.numpy(), run.transform(image).numpy())


@pytest.mark.parametrize("strategy, scope", [("standardize_train", "channel"), ("standardize_train", "global"),
                                             ("minmax_train", "channel"), ("minmax_train", "global"),
                                             ("none", "channel"), ("pretrained", "channel")])
def test_input_prep_matches_the_normalizer(run, strategy, scope):
    settings = {**run.normalization, "normalization": strategy, "stats_scope": scope}
    info = exported.Export("resnet_tiny", {}, ("a", "b"), run.prep, settings, 1)
    stats = normalize.Stats.from_dict(settings["stats"]).scoped(scope)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)), tf.float32)
    expected = normalize.normalizer(strategy, run.prep, stats)(x).numpy()
    np.testing.assert_array_equal(exported.input_prep(info, "model.safetensors").normalize(x).numpy(), expected)


@pytest.mark.parametrize("strategy", ["standardize_sample", "minmax_sample"])
def test_per_image_strategies_keep_the_geometry_and_warn(run, strategy, caplog):
    info = exported.Export("resnet_tiny", {}, ("a", "b"), run.prep, {"normalization": strategy}, 1)
    with caplog.at_level(logging.WARNING):
        prep = exported.input_prep(info, "model.safetensors")
    assert f"config.data.normalization={strategy}" in caplog.text
    assert prep == dataclasses.replace(run.prep, mean=(0.0,) * 3, std=(1.0,) * 3, scale=1.0)


def test_new_head_on_the_exported_backbone(run, model_file):
    model, variables, _ = pretrained.load(run.description["name"], model_file, num_classes=5, head_hidden=(7,))
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    tensors = safetensors.numpy.load_file(model_file)
    backbone = {k for k in tensors if k.split("/")[1] == "backbone"}
    assert backbone and backbone == {k for k in flat if k.split("/")[1] == "backbone"}
    for key in backbone:
        np.testing.assert_array_equal(flat[key], tensors[key], err_msg=key)
    assert flat["params/head/hidden0/kernel"].shape == (tensors["params/head/out/kernel"].shape[0], 7)
    assert flat["params/head/out/kernel"].shape == (7, 5)
    images = np.zeros((2, run.image_size, run.image_size, 3), np.float32)
    assert model.apply(variables, images, train=False).shape == (2, 5)


def test_wrong_model_name_or_convention(model_file):
    with pytest.raises(pretrained.WeightsMismatchError, match=r"exported resnet_tiny, not a resnet18"):
        pretrained.load("resnet18", model_file)
    with pytest.raises(pretrained.WeightsMismatchError, match="convention"):
        pretrained.load("resnet_tiny", model_file, convention="torchvision")


def test_truncated_export_is_a_file_error(model_file, tmp_path):
    data = model_file.read_bytes()
    for size in (len(data) // 2, 100):
        cut = tmp_path / f"cut{size}.safetensors"
        cut.write_bytes(data[:size])
        with pytest.raises(pretrained.WeightsFileError, match=str(cut)):
            pretrained.read("resnet_tiny", cut)


def test_output_must_be_safetensors(run, tmp_path):
    with pytest.raises(export.ExportError, match=r"\.safetensors"):
        export.export(run, str(tmp_path / "model.pth"))
    assert not list(tmp_path.iterdir())


def test_cli_refuses_to_overwrite_without_the_flag(trained_run, tmp_path):
    output = tmp_path / "model.safetensors"
    output.write_bytes(b"an earlier file")
    refused = tool("export", f"--workdir={trained_run[1]}", f"--output={output}")
    assert refused.returncode != 0
    assert "FileExistsError" in refused.stderr and str(output) in refused.stderr and "--overwrite" in refused.stderr
    assert output.read_bytes() == b"an earlier file"

    done = tool("export", f"--workdir={trained_run[1]}", f"--output={output}", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(output)
    assert "read only" not in done.stderr  # orbax's warning about the read-only checkpoint is kept out
    assert exported.read(output).model == "resnet_tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_export_leaves_the_workdir_unchanged(trained_run, tmp_path):
    workdir = trained_run[1]
    before = snapshot(workdir)
    export.export(restore.load(str(workdir)), str(tmp_path / "model.safetensors"))
    assert snapshot(workdir) == before


def test_training_starts_from_an_exported_file(trained_run, model_file, tmp_path):
    """config.model.weights=<export> with the same model: a new head on the exported backbone. The backbone stays
    frozen in both phases here, so the run's final backbone must be the file's."""
    workdir = tmp_path / "transfer"
    result = train_util.cli(trained_run[0], workdir, f"--config.model.weights={model_file}",
                            "--config.phases[0].epochs=1", "--config.phases[1].epochs=1",
                            "--config.phases[1].trainable=^head/", "--config.phases[1].bn=frozen")
    assert result.returncode == 0, result.stderr[-3000:]
    state = train_util.final_state(workdir)
    tensors = safetensors.numpy.load_file(model_file)
    final = traverse_util.flatten_dict({"params": state["params"], "batch_stats": state["batch_stats"]}, sep="/")
    backbone = [k for k in tensors if k.split("/")[1] == "backbone"]
    assert backbone
    for key in backbone:
        np.testing.assert_array_equal(final[key], tensors[key], err_msg=key)
    assert (workdir / "summary.json").is_file()
