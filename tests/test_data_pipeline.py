"""The input pipeline end to end on tiny image folders: normalization, saved statistics, padded eval, corrupt files,
determinism, resume and per-process sharding."""

import logging
import os
import struct
import weakref

import numpy as np
import pytest
import tensorflow as tf

from tests.test_data_sources import write_folder, write_image
from tljax import data
from tljax.data import iterators, normalize
from tljax.pretrained.prep import TORCHVISION

SIZE = 8
LAYOUT = {"train/a": 4, "train/b": 4, "train/c": 4, "val/a": 2, "val/b": 2, "val/c": 1,
          "test/a": 1, "test/b": 1, "test/c": 1}


def config(root, **overrides):
    cfg = data.default_config()
    cfg.update(dict(source=f"folder:{root}", image_size=SIZE, batch_size=4, crop_fraction=1.0, augment=False))
    cfg.update(overrides)
    return cfg


def collect(batches):
    """Concatenates batches, keeping only unpadded rows."""
    batches = list(batches)
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    if "mask" in out:
        keep = out["mask"] > 0
        out = {k: v[keep] for k, v in out.items()}
    return out


def expected(strategy, x, train):
    """numpy (float64) computation of each formula in the issue, on images x [N, H, W, 3] in 0..255."""
    x, t = x.astype(np.float64), train.reshape(-1, 3).astype(np.float64)
    per_image = dict(axis=(1, 2, 3), keepdims=True)
    return {
        "pretrained": (x / 255 - np.asarray(TORCHVISION.mean)) / np.asarray(TORCHVISION.std),
        "minmax_train": (x - t.min(0)) / (t.max(0) - t.min(0)),
        "standardize_train": (x - t.mean(0)) / t.std(0),
        "minmax_sample": (x - x.min(**per_image)) / (x.max(**per_image) - x.min(**per_image)),
        "standardize_sample": (x - x.mean(**per_image)) / x.std(**per_image),
        "none": x,
    }[strategy]


@pytest.fixture
def folder(tmp_path):
    images = write_folder(tmp_path / "images", LAYOUT, size=SIZE)
    return tmp_path / "images", images


@pytest.mark.parametrize("strategy", normalize.STRATEGIES)
def test_every_strategy_equals_numpy_formula_with_train_statistics(folder, strategy):
    root, images = folder
    ds = data.build(config(root, normalization=strategy), TORCHVISION)
    train = np.stack([images[n] for n in ds.records["train"].names])
    for split in ("train", "val", "test"):
        got = collect(ds.eval(split))
        x = np.stack([images[n] for n in ds.records[split].names])
        np.testing.assert_allclose(got["image"], expected(strategy, x, train), rtol=1e-5, atol=2e-5)
        assert list(got["label"]) == list(ds.records[split].labels)
    batch = next(ds.train(0))  # augment off: the eval transform, in the epoch's order
    x = np.stack([images[ds.records["train"].names[i]] for i in ds.train_order(0)[0]])
    np.testing.assert_allclose(batch["image"], expected(strategy, x, train), rtol=1e-5, atol=2e-5)
    if strategy.endswith("_train"):
        # val/test images do not move the statistics.
        for path in images:
            if "/train/" not in path:
                write_image(path, np.full((SIZE, SIZE, 3), 255, np.uint8))
        assert data.build(config(root, normalization=strategy), None).stats == ds.stats
        np.testing.assert_allclose(ds.stats.mean, train.reshape(-1, 3).mean(0), rtol=1e-12)


def test_global_scope_uses_one_statistic_for_all_channels(folder):
    root, images = folder
    ds = data.build(config(root, normalization="standardize_train", stats_scope="global"), None)
    train = np.stack([images[n] for n in ds.records["train"].names]).astype(np.float64)
    got = collect(ds.eval("train"))["image"]
    np.testing.assert_allclose(got, (train - train.mean()) / train.std(), rtol=1e-5, atol=2e-5)


def test_saved_statistics_are_reloaded_not_recomputed(folder, tmp_path, monkeypatch):
    root, images = folder
    workdir = str(tmp_path / "run")
    first = data.build(config(root, normalization="minmax_train"), None, workdir=workdir)
    assert os.path.exists(os.path.join(workdir, normalize.FILENAME))

    def must_not_run(*args, **kwargs):
        raise AssertionError("statistics recomputed")

    monkeypatch.setattr(normalize, "compute_stats", must_not_run)
    for path in images:  # new train pixels: saved statistics still rule
        write_image(path, np.full((SIZE, SIZE, 3), 3, np.uint8))
    second = data.build(config(root, normalization="minmax_train"), None, workdir=workdir)
    assert second.stats == first.stats
    with pytest.raises(ValueError, match="image_size: saved 8, now 4"):
        data.build(config(root, normalization="minmax_train", image_size=4), None, workdir=workdir)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_once_with_padding(folder, process_count):
    root, _ = folder
    parts = [data.build(config(root, normalization="none", eval_batch_size=4), None, num_devices=process_count,
                        process_index=p, process_count=process_count) for p in range(process_count)]
    ds = parts[0]
    assert ds.sizes["val"] == 5 and ds.eval_steps("val") == 2
    batches = [list(part.eval("val")) for part in parts]
    assert all(len(b) == 2 for b in batches)
    masks, labels = [], []
    for step in range(2):
        masks.append(np.concatenate([b[step]["mask"] for b in batches]))
        labels.append(np.concatenate([b[step]["label"] for b in batches]))
    masks, labels = np.concatenate(masks), np.concatenate(labels)
    assert masks.sum() == 5 and masks.tolist() == [1] * 5 + [0] * 3
    assert labels[masks > 0].tolist() == ds.records["val"].labels.tolist()


def test_truncated_jpeg_error_names_the_file_and_skip_corrupt_skips_it(tmp_path, caplog):
    root = tmp_path / "images"
    write_folder(root, {"train/a": 5, "train/b": 5, "val/a": 1, "test/a": 1}, size=SIZE, ext="jpg")
    bad = root / "train" / "b" / "img3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(data.CorruptImageError, match="img3.jpg"):  # during the statistics pass
        data.build(config(root, normalization="standardize_train"), None)
    ds = data.build(config(root, normalization="none", batch_size=2), None)
    with pytest.raises(data.CorruptImageError, match=str(bad)):
        for _ in ds.train(0):
            pass
    with caplog.at_level(logging.WARNING):
        ds = data.build(config(root, normalization="standardize_train", skip_corrupt=True, batch_size=2), None)
    assert "skipping 1 undecodable" in caplog.text and str(bad) in caplog.text
    assert ds.skipped == {"train": 1, "val": 0, "test": 0} and ds.sizes["train"] == 9
    assert sum(len(b["label"]) for b in ds.train(0)) == 8


def test_resume_and_processes_reproduce_the_same_augmented_batches(tmp_path):
    root = tmp_path / "images"
    write_folder(root, {"a": 10, "b": 10}, size=12)
    cfg = config(root, normalization="standardize_sample", augment=True, batch_size=4, crop_scale=(0.3, 1.0))
    ds = data.build(cfg, None, seed=3)
    full = list(ds.train(1))
    assert len(full) == ds.steps_per_epoch == 16 // 4
    resumed = list(ds.train(1, start_step=3))
    assert len(resumed) == 1
    np.testing.assert_array_equal(resumed[0]["image"], full[3]["image"])
    np.testing.assert_array_equal(resumed[0]["label"], full[3]["label"])
    again = list(data.build(cfg, None, seed=3).train(1))
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    halves = [list(data.build(cfg, None, seed=3, num_devices=2, process_index=p, process_count=2).train(1))
              for p in range(2)]
    for step, batch in enumerate(full):
        assert all(len(h[step]["label"]) == 2 for h in halves)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), batch[key])
    assert not np.array_equal(ds.train_order(0), ds.train_order(1))
    # Augmentation is on: train images differ from the eval transform of the same examples.
    index = ds.train_order(1)[0, 0]
    plain = collect(ds.eval("train"))["image"][index]
    assert not np.allclose(full[0]["image"][0], plain)


def test_grayscale_bmp_and_centre_crop(tmp_path):
    root = tmp_path / "images"
    gray = np.arange(8 * 16, dtype=np.uint8).reshape(8, 16, 1)
    write_image(root / "a" / "gray.png", gray)
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    row = (8 * 3 + 3) & ~3
    pixels = rgb[::-1, :, ::-1].reshape(8, 24)  # BMP: bottom-up rows, BGR
    header = b"BM" + struct.pack("<IHHI", 54 + row * 8, 0, 0, 54)
    header += struct.pack("<IiiHHIIiiII", 40, 8, 8, 1, 24, 0, row * 8, 2835, 2835, 0, 0)
    (root / "b").mkdir()
    (root / "b" / "c.bmp").write_bytes(header + pixels.tobytes())
    cfg = config(root, normalization="none", batch_size=1,
                 train_split="train", val_split="train", test_split="train")
    got = collect(data.build(cfg, None).eval("train"))["image"]
    np.testing.assert_array_equal(got[0], np.repeat(gray[:, 4:12], 3, axis=-1))  # shorter side kept, centre crop
    np.testing.assert_array_equal(got[1], rgb)


def test_animal_mnist_batches():
    cfg = data.default_config()
    cfg.update(dict(source="animal_mnist", image_size=32, batch_size=16, normalization="pretrained"))
    ds = data.build(cfg, TORCHVISION)
    batch = next(ds.train(0))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert ds.num_classes == 10 and ds.steps_per_epoch == 500 and ds.eval_steps("test") == 63


@pytest.mark.parametrize("overrides, kwargs, message", [
    (dict(normalization="zscore"), {}, "unknown normalization 'zscore'"),
    (dict(normalisation="none"), {}, r"unknown config.data field\(s\) \['normalisation'\]"),
    (dict(batch_size=6), dict(num_devices=4), "batch_size 6 .* not divisible by the 4 devices"),
    (dict(batch_size=6, eval_batch_size=8), dict(process_count=4), "not divisible by the 4 processes"),
    (dict(normalization="pretrained"), dict(prep=None), "needs the weights' Preprocessing"),
    (dict(stats_scope="pixel"), {}, "stats_scope 'pixel'"),
])
def test_config_errors_come_before_reading_data(tmp_path, overrides, kwargs, message):
    cfg = config(tmp_path / "does-not-exist", normalization="none")
    cfg.update(overrides)
    prep = kwargs.pop("prep", TORCHVISION)
    with pytest.raises(data.ConfigError, match=message):
        data.build(cfg, prep, **kwargs)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("batch_size", -8), ("eval_batch_size", -4),
                                          ("image_size", 0), ("threads", -1), ("crop_fraction", float("nan"))])
def test_impossible_numbers_are_refused_naming_the_field(tmp_path, field, value):
    cfg = config(tmp_path / "does-not-exist", normalization="none")
    cfg[field] = value
    with pytest.raises(data.ConfigError, match=rf"config\.data\.{field} must be an? (integer|number) >= \d+, not"):
        data.build(cfg, TORCHVISION)


def test_a_tensorflow_error_hiding_the_gpus_surfaces(folder, monkeypatch):
    """TF refuses to hide GPUs it already initialised: the pipeline must say so, not carry on with TF on them."""
    def refuse(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind: [f"/physical_device:{kind}:0"])
    monkeypatch.setattr(tf.config, "set_visible_devices", refuse)
    with pytest.raises(RuntimeError, match="cannot keep TensorFlow off the GPUs.*cannot be modified after"):
        data.build(config(folder[0], normalization="none"), TORCHVISION)


def test_iterators_left_open_are_released_before_the_interpreter_exits(folder):
    """The exit hook drops the tf.data iterators a run left half-read (the train stream runs on into the next
    epoch): destroyed during finalization they would wait forever for threads that run Python."""
    root, _ = folder
    ds = data.build(config(root, normalization="none"), None)
    train, val = ds.train(0), ds.eval("val")
    next(train), next(val)
    tf_iterators = [it for it in iterators._LIVE if it._iterator is not None]
    assert len(tf_iterators) >= 2
    iterators._release_all()
    assert all(it._iterator is None for it in tf_iterators)
    with pytest.raises(StopIteration):
        next(ds._stream.batches)


@pytest.fixture
def iterated_options(monkeypatch):
    """The tf.data options of every dataset iterated from now on, in order."""
    seen = []
    iterate = tf.data.Dataset.as_numpy_iterator

    def recording(self):
        seen.append(self.options())
        return iterate(self)

    monkeypatch.setattr(tf.data.Dataset, "as_numpy_iterator", recording)
    return seen


def assert_without_autotuning(seen):
    assert seen
    for opts in seen:
        assert not opts.autotune.enabled
        assert opts.deterministic and opts.threading.max_intra_op_parallelism == 1


def test_every_pass_over_a_folder_runs_without_tf_data_autotuning(folder, iterated_options):
    """Destroying an iterator joins tf.data autotuning's model thread, which TensorFlow does not wake: releasing an
    iterator took up to a minute. skip_corrupt's pass, the statistics pass, train and eval all run without it."""
    ds = data.build(config(folder[0], normalization="standardize_train", skip_corrupt=True, threads=1), None)
    next(ds.train(0)), next(ds.eval("val"))
    assert len(iterated_options) == len(ds.sizes) + 3  # a decode check per split, statistics, train, eval
    assert_without_autotuning(iterated_options)
    assert iterated_options[-1].threading.private_threadpool_size == 1


def test_the_train_stream_runs_no_python_in_tf_data_threads(folder):
    """A tf.data thread that runs Python can hang its iterator's destructor, which waits for it while holding the
    GIL: a folder source's train stream is TF ops only, its epochs' orders reaching it through a queue."""
    root, _ = folder
    ds = data.build(config(root, normalization="none", augment=True), None)
    next(ds.train(0))
    graph = tf.compat.v1.GraphDef.FromString(
        ds._stream.batches._iterator._dataset._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}
    assert {"FlatMapDataset", "QueueDequeueV2", "DecodeAndCropJpeg"} <= ops  # the functions' ops are seen too
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc", "GeneratorDataset"}


def test_a_train_stream_finalized_while_a_function_is_traced_closes_its_queue_first(folder):
    """Destroying the stream's iterator while it waits for the next epoch's order crashes TensorFlow, so its queue is
    closed first, eagerly even when the iterator is finalized inside a tf.function's tracing (where the garbage
    collector may run it). Its last reference is dropped there, so the finalizer runs at that point: a gc.collect()
    there returns at once, collecting nothing, while another thread is collecting (seen in CI)."""
    root, _ = folder
    ds = data.build(config(root, normalization="none"), None)
    list(ds.train(0))  # the stream reads on into epoch 1, then waits for epoch 2's order
    streams, ds._stream = [ds._stream], None
    batches, orders = weakref.ref(streams[0].batches), streams[0].orders

    @tf.function
    def traced():
        streams.clear()
        assert batches() is None  # finalized here, inside the tracing
        return tf.constant(0)

    traced.get_concrete_function()  # traced, not run
    assert orders.is_closed()
