"""tfds data sets read from disk one example at a time: flat memory as the data set grows, no pass over the data
before the first batch, the same batches as in memory, exact resume, per-process reads, in both tfds formats."""

import glob
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.test_data_pipeline import assert_without_autotuning, iterated_options  # noqa: F401 (fixture)
from tljax import data
from tljax.data import pipeline, records, sources

SIZE = 24  # pixels per side; random-noise PNGs of about 1.8 kB
BATCH = 32
SMALL, LARGE = 5000, 20000


class TljaxLargeTestImages(tfds.core.GeneratorBasedBuilder):
    """`examples` random-noise PNGs in 10 classes, train split only (tljax carves val and test from it)."""

    VERSION = tfds.core.Version("1.0.0")
    examples = 0  # set before preparing

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self.examples)}

    def _generate_examples(self, count):
        rng = np.random.default_rng(0)
        for i in range(count):
            yield i, {"image": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "label": i % 10}


def prepare(data_dir, examples: int, file_format: str) -> str:
    TljaxLargeTestImages.examples = examples
    TljaxLargeTestImages(data_dir=str(data_dir), file_format=file_format).download_and_prepare(
        download_dir=str(data_dir / "downloads"))
    return str(data_dir)


def config(data_dir, **overrides):
    cfg = data.default_config()
    cfg.update(dict(source="tljax_large_test_images", data_dir=data_dir, image_size=16, batch_size=BATCH,
                    normalization="none"))
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module", params=records.FORMATS)
def small(request, tmp_path_factory):
    return prepare(tmp_path_factory.mktemp(request.param), SMALL, request.param)


@pytest.fixture
def reads(monkeypatch):
    """reads(split records) -> the positions read from them so far, in order (other pipelines' reads excluded)."""
    seen = []
    read = records.ShardedReader.read

    def counting(self, position):
        seen.append((self, position))
        return read(self, position)

    monkeypatch.setattr(records.ShardedReader, "read", counting)
    return lambda split: [p for reader, p in seen if reader is split.examples.reader]


def in_memory(ds: pipeline.InputPipeline, cfg) -> pipeline.InputPipeline:
    """The same splits decoded into memory ("pixels" records) by tfds's own readers, in file order: the reference."""
    builder = tfds.builder("tljax_large_test_images", data_dir=cfg.data_dir)
    splits = {}
    for split, spec in ds.specs.items():
        if builder.info.file_format.value == records.ARRAY_RECORD:
            examples = list(builder.as_data_source(split=spec))
        else:
            examples = list(tfds.as_numpy(builder.as_dataset(split=spec, shuffle_files=False)))
        splits[split] = sources.Records("pixels", np.stack([e["image"] for e in examples]),
                                        np.asarray([e["label"] for e in examples], np.int32),
                                        np.asarray([str(i) for i in range(len(examples))], dtype=object))
    source = sources.Source("in memory", ds.class_names, splits, ds.specs)
    reference = pipeline.InputPipeline(cfg, None, source, seed=3, process_index=0, process_count=1,
                                       skipped={s: 0 for s in splits})
    reference.use_normalization("none", None, None)
    return reference


def test_first_batch_reads_only_its_share_and_equals_in_memory_batches(small, reads):
    cfg = config(small, randaugment="rand-m9-n1")
    ds = data.build(cfg, None, seed=3)
    assert ds.sizes == {"train": 4000, "val": 500, "test": 500}
    assert not any(reads(r) for r in ds.records.values())  # building reads nothing
    first = next(ds.train(1))
    assert len(reads(ds.records["train"])) < SMALL // 10, "the first batch came after a pass over the data"
    assert set(ds.train_order(1)[0]) <= set(reads(ds.records["train"]))
    reference = in_memory(ds, cfg)
    batches = itertools.chain([first], ds.train(1, start_step=1))
    for got, expected in zip(batches, itertools.islice(reference.train(1), 3)):
        np.testing.assert_array_equal(got["label"], expected["label"])
        np.testing.assert_array_equal(got["image"], expected["image"])  # augmentation included, bit for bit
    for got, expected in zip(ds.eval("val"), reference.eval("val")):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert ds.records["test"].labels.tolist() == reference.records["test"].labels.tolist()


def test_the_label_pass_runs_without_tf_data_autotuning(small, iterated_options):
    """(See tests/test_data_pipeline.py: releasing an autotuned iterator can take a minute.)"""
    ds = data.build(config(small), None)
    assert len(ds.records["test"].labels) == ds.sizes["test"]
    assert len(iterated_options) == 1  # the labels of the test split: train's are not read for a batch
    assert_without_autotuning(iterated_options)


def test_resume_from_epoch_and_step_reads_nothing_before_it(small, reads):
    cfg = config(small)
    straight = [b["image"] for _, b in zip(range(6), data.build(cfg, None, seed=5).train(2))]
    ds = data.build(cfg, None, seed=5)
    resumed = ds.train(2, start_step=4)
    for expected in straight[4:]:
        np.testing.assert_array_equal(next(resumed)["image"], expected)
    order = ds.train_order(2)
    assert not set(reads(ds.records["train"])) & set(order[:4].reshape(-1)) - set(order[4:].reshape(-1))


def test_each_process_reads_only_its_part_of_each_batch(small, reads):
    for process in range(2):
        ds = data.build(config(small, eval_batch_size=16), None, num_devices=2, process_index=process,
                        process_count=2)
        for _ in ds.eval("test"):
            pass
        local = ds.local(pipeline.padded(ds.sizes["test"], 16)[0])
        assert sorted(reads(ds.records["test"])) == sorted(local.reshape(-1).tolist())


def test_tfrecord_index_is_cached_beside_each_shard(tmp_path):
    """(ArrayRecord shards are addressable as written: only TFRecord shards get an index.)"""
    prepared = prepare(tmp_path, 500, records.TFRECORD)
    next(data.build(config(prepared), None).eval("val"))
    shards = [p for p in glob.glob(f"{prepared}/**/*.tfrecord-*", recursive=True)
              if not p.endswith(records.OFFSETS_SUFFIX)]
    assert shards
    for shard in shards:
        np.testing.assert_array_equal(np.load(shard + records.OFFSETS_SUFFIX), records.tfrecord_offsets(shard))


def peak_rss(data_dir: str) -> dict:
    """Run in a subprocess: builds the pipeline, takes 20 train batches and the whole val split; peak and final RSS
    in bytes (Linux)."""
    ds = data.build(config(data_dir), None)
    for _, _ in zip(range(20), ds.train(0)):
        pass
    for _ in ds.eval("val"):
        pass
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    # VmHWM: this process image's peak (ru_maxrss would carry the forking pytest process's peak across exec).
    return {"peak_rss": int(status["VmHWM"].split()[0]) * 1024, "final_rss": int(status["VmRSS"].split()[0]) * 1024}


@pytest.mark.slow
def test_memory_stays_flat_as_the_data_set_grows(tmp_path):
    """Peak RSS at 5,000 and 20,000 examples (ArrayRecord): it grows far less than the encoded data does."""
    measured = {}
    for examples in (SMALL, LARGE):
        data_dir = prepare(tmp_path / str(examples), examples, records.ARRAY_RECORD)
        encoded = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(data_dir) for f in fs
                      if ".array_record-" in f)
        script = f"import json, tests.test_data_large as t; print(json.dumps(t.peak_rss({data_dir!r})))"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd())
        assert result.returncode == 0, result.stderr[-3000:]
        measured[examples] = {"encoded": encoded, **json.loads(result.stdout.strip().splitlines()[-1])}
    print("measured:", measured)
    encoded_growth = measured[LARGE]["encoded"] - measured[SMALL]["encoded"]
    rss_growth = measured[LARGE]["peak_rss"] - measured[SMALL]["peak_rss"]
    assert encoded_growth > 20e6
    assert rss_growth < 0.25 * encoded_growth, measured  # held in memory: at least encoded_growth
