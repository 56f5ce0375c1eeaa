"""Data sources: image folders (both layouts, bad input), animal_mnist offline, tfds names (prepared, unprepared)."""

import gzip
import logging
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tljax import data
from tljax.data import sources
from tljax.data.sources import SourceError


def write_image(path, pixels: np.ndarray) -> None:
    """Writes uint8 pixels [H, W, C] as PNG, or JPEG when the name ends in .jpg."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    encode = tf.io.encode_jpeg if str(path).endswith(".jpg") else tf.io.encode_png
    tf.io.write_file(str(path), encode(pixels))


def write_folder(root, layout: dict[str, int], size: int = 16, seed: int = 0, ext: str = "png") -> dict:
    """Writes random images: layout maps "split/class" (or "class") to a count. Returns {path: pixels}."""
    rng = np.random.default_rng(seed)
    images = {}
    for folder, count in layout.items():
        for i in range(count):
            path = os.path.join(root, folder, f"img{i}.{ext}")
            images[path] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            write_image(path, images[path])
    return images


def test_split_layout_reads_classes_labels_and_ignores_non_images(tmp_path, caplog):
    write_folder(tmp_path, {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 1, "test/dog": 2})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        source = sources.load(f"folder:{tmp_path}")
    assert "notes.txt" in caplog.text and "not images" in caplog.text
    assert source.class_names == ("cat", "dog")
    assert {s: len(r) for s, r in source.splits.items()} == {"train": 5, "val": 2, "test": 2}
    train = source.splits["train"]
    for name, label in zip(train.names, train.labels):
        assert os.path.basename(os.path.dirname(name)) == source.class_names[label]
    assert list(source.splits["test"].labels) == [1, 1]


def test_validation_folder_name_and_missing_test_are_carved(tmp_path):
    write_folder(tmp_path, {"train/a": 10, "train/b": 10, "validation/a": 2, "validation/b": 2})
    source = sources.load(f"folder:{tmp_path}")
    # No test folder: the validation folder becomes test and validation is carved from train (10%).
    assert source.specs == {"train": "train[:90%]", "val": "train[90%:]", "test": "val"}
    assert {s: len(r) for s, r in source.splits.items()} == {"train": 18, "val": 2, "test": 4}


def test_flat_layout_carves_deterministic_disjoint_stratified_splits(tmp_path):
    write_folder(tmp_path, {"a": 20, "b": 10})
    first = sources.load(f"folder:{tmp_path}")
    second = sources.load(f"folder:{tmp_path}")
    sizes = {s: np.bincount(r.labels, minlength=2).tolist() for s, r in first.splits.items()}
    assert sizes == {"train": [16, 8], "val": [2, 1], "test": [2, 1]}
    names = [set(r.names) for r in first.splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert len(set().union(*names)) == 30
    for split in first.splits:
        assert list(first.splits[split].names) == list(second.splits[split].names)
    custom = sources.load(f"folder:{tmp_path}", specs={"train": "train[:50%]", "val": "train[50%:]",
                                                          "test": "train[90%:]"})
    assert np.bincount(custom.splits["train"].labels).tolist() == [10, 5]


@pytest.mark.parametrize("layout, specs, message", [
    ({"train/a": 2, "train/b": 0}, {}, "holds no images"),
    ({"train/a": 2, "val/a": 1, "val/zebra": 1}, {}, "not in the train folder"),
    ({"a": 2}, {"test": "test"}, "does not exist"),
    ({"a": 2}, {"train": "train[:50"}, "expected 'name' or"),
    ({"a": 2}, {"train": "train[10:20]"}, "in whole percents"),
    ({"train/a": 2, "cats": 1}, {}, "use either"),
    ({"val/a": 2}, {}, "no 'train' folder"),
])
def test_bad_folders_give_clear_errors(tmp_path, layout, specs, message):
    write_folder(tmp_path, {k: v for k, v in layout.items() if v})
    for folder in (k for k, v in layout.items() if not v):
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(SourceError, match=message):
        sources.load(f"folder:{tmp_path}", specs=specs)


def test_folder_without_class_folders_or_missing_root(tmp_path):
    write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SourceError, match="no class folders"):
        sources.load(f"folder:{tmp_path}")
    with pytest.raises(SourceError, match="does not exist"):
        sources.load(f"folder:{tmp_path / 'nope'}")


def test_parse_split():
    assert sources.parse_split("train") == ("train", 0, 100)
    assert sources.parse_split("train[ 10%:]") == ("train", 10, 100)
    assert sources.parse_split("val[:35%]") == ("val", 0, 35)
    with pytest.raises(SourceError, match="0 <= a <= b <= 100"):
        sources.parse_split("train[50%:10%]")


def test_auto_splits():
    assert sources.auto_splits({"train", "validation", "test"}, 10, 10) == {
        "train": "train", "val": "validation", "test": "test"}
    assert sources.auto_splits({"train", "test"}, 10, 10) == {
        "train": "train[:90%]", "val": "train[90%:]", "test": "test"}
    assert sources.auto_splits({"train"}, 10, 20) == {
        "train": "train[:70%]", "val": "train[70%:80%]", "test": "train[80%:]"}


def test_animal_mnist_loads_offline_with_fixed_splits():
    source = sources.load("animal_mnist")
    assert source.class_names[0] == "bear" and source.class_names[-1] == "zebra" and len(source.class_names) == 10
    expected = {"train": 800, "val": 100, "test": 100}
    for split, records in source.splits.items():
        assert records.kind == "pixels" and records.data.shape[1:] == (28, 28, 1)
        assert np.bincount(records.labels).tolist() == [expected[split]] * 10
    names = [set(r.names) for r in source.splits.values()]
    assert sum(map(len, names)) == len(set().union(*names)) == 10000
    again = sources.load("animal_mnist")
    assert np.array_equal(again.splits["test"].data, source.splits["test"].data)


def test_restricted_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(OrderedDict(a=1), f)
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        sources._read_numpy_pickle(path)
    with gzip.open(path, "wb") as f:
        pickle.dump(np.arange(5), f)
    assert sources._read_numpy_pickle(path).tolist() == [0, 1, 2, 3, 4]


def test_unprepared_tfds_name_fails_fast_without_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(SourceError) as error:
        sources.load("tf_flowers", data_dir=str(tmp_path))
    assert f"data_dir='{tmp_path}'" in str(error.value) and "folder:" in str(error.value)


def test_unknown_source_name():
    with pytest.raises(SourceError, match="unknown data source 'no_such_data_set'"):
        sources.load("no_such_data_set")


def test_prepared_tfds_data_set_is_read_from_data_dir_with_carved_validation(tmp_path):
    tfds.testing.DummyMnist(data_dir=str(tmp_path)).download_and_prepare()  # generated locally, 20 + 20 examples
    source = sources.load("dummy_mnist", data_dir=str(tmp_path))
    assert source.specs == {"train": "train[:90%]", "val": "train[90%:]", "test": "test"}
    assert {s: len(r) for s, r in source.splits.items()} == {"train": 18, "val": 2, "test": 20}
    assert not set(source.splits["train"].names) & set(source.splits["val"].names)
    cfg = data.default_config()
    cfg.update(dict(source="dummy_mnist", data_dir=str(tmp_path), image_size=16, batch_size=6, normalization="none",
                    crop_fraction=1.0))
    ds = data.build(cfg, None)
    batch = next(ds.eval("test"))
    assert batch["image"].shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # grayscale -> RGB
    with pytest.raises(SourceError, match="split 'validation' .* cannot be read"):
        sources.load("dummy_mnist", data_dir=str(tmp_path), specs={"val": "validation"})


def test_download_without_a_network_fails_fast(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    monkeypatch.setattr(sources.socket, "create_connection", offline)
    with pytest.raises(SourceError) as error:
        sources.load("tf_flowers", data_dir=str(tmp_path), download=True)
    assert "no connection" in str(error.value) and "folder:" in str(error.value)
