"""Where images come from: tfds names, image folders and the offline `animal_mnist` set, as cheap records.

Every source becomes a `Source`: class names plus, for each of the splits "train", "val" and "test", a `Records`
table that says how to read example i (a file path, a position in a prepared tfds split's shards, or raw pixels
held in memory) and its label. Nothing is decoded here, and tfds splits are not read (see `tljax.data.records`):
the pipeline shuffles, shards and skips these records before any image is read or decoded.

Split strings: tfds names take any tfds split string (`train[:90%]`, `train+validation`). Folder and animal_mnist
sources take `name` or `name[a%:b%]`, sliced per class (stratified) from a fixed per-class order, so carved splits
are deterministic, disjoint and balanced. An empty split string means "auto" (see `auto_splits`).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.metadata
import os
import pickle
import re
import socket
import zlib
from pathlib import Path

import numpy as np
from absl import logging

from tljax.data.records import FORMATS, ShardedReader, TfdsExamples

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
FOLDER_PREFIX = "folder:"

# animal-mnist 0.4 (MIT): labels 0..9 in the order of the package description (alphabetical).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_MNIST_FILES = ("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                      "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz")
# Fixed split of each class's 1,000 images: 800 train / 100 val / 100 test -> 8,000 / 1,000 / 1,000.
ANIMAL_MNIST_PER_CLASS = {"train": 800, "val": 100, "test": 100}


class SourceError(ValueError):
    """A data source that cannot be read as configured: unknown, not prepared, empty, or missing a split."""


@dataclasses.dataclass(frozen=True)
class Records:
    """One split as cheap records.

    kind: "file" (data: paths), "pixels" (data: uint8 [N, H, W, C] in memory) or "tfds" (data: int64 positions
    in `examples`, a prepared tfds split read from disk one example at a time).
    labels: int32 [N]. names: a name per example for error messages (file paths, tfds ids). For "tfds" records
    both are derived from `examples` when first asked for (labels read every record once; the pipeline itself
    takes each label from the record it reads, so training never needs them up front).
    """

    kind: str
    data: np.ndarray
    given_labels: np.ndarray | None = None
    given_names: np.ndarray | None = None
    examples: TfdsExamples | None = None

    def __len__(self) -> int:
        return len(self.data)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return self.given_labels if self.given_labels is not None else self.examples.labels(self.data)

    @functools.cached_property
    def names(self) -> np.ndarray:
        return self.given_names if self.given_names is not None else self.examples.names(self.data)

    def take(self, indices: np.ndarray) -> Records:
        """The records at `indices`, in that order."""
        pick = lambda a: None if a is None else a[indices]  # noqa: E731
        return Records(self.kind, self.data[indices], pick(self.given_labels), pick(self.given_names), self.examples)


@dataclasses.dataclass(frozen=True)
class Source:
    """A data set with its three splits resolved. `specs` holds the split strings each split was read with."""

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, Records]
    specs: dict[str, str]


def parse_split(spec: str) -> tuple[str, int, int]:
    """`name` or `name[a%:b%]` (either bound optional) -> (name, a, b): local sources' split syntax."""
    m = re.fullmatch(r"(\w+)(?:\[(?:(\d+)%)?:(?:(\d+)%)?\])?", spec.replace(" ", ""))
    if not m:
        raise SourceError(f"split {spec!r}: expected 'name' or 'name[a%:b%]' in whole percents (e.g. 'train[:90%]')")
    lo, hi = int(m.group(2) or 0), int(m.group(3) or 100)
    if not lo <= hi <= 100:
        raise SourceError(f"split {spec!r}: percents must satisfy 0 <= a <= b <= 100")
    return m.group(1), lo, hi


def auto_splits(available: set[str], val_percent: int, test_percent: int) -> dict[str, str]:
    """Default split strings for the splits a data set has.

    train+validation+test: used as they are. Train+test: validation carved from the end of train. Train+validation
    (no test, e.g. imagenette): the data set's validation split becomes the held-out test split and validation is
    carved from train. Train only: train, validation and test carved from train.
    """
    val = next((s for s in ("validation", "val") if s in available), None)
    has_test = "test" in available
    if val and has_test:
        return {"train": "train", "val": val, "test": "test"}
    if val or has_test:
        cut = 100 - val_percent
        return {"train": f"train[:{cut}%]", "val": f"train[{cut}%:]", "test": "test" if has_test else val}
    cut_val, cut_test = 100 - val_percent - test_percent, 100 - test_percent
    return {"train": f"train[:{cut_val}%]", "val": f"train[{cut_val}%:{cut_test}%]", "test": f"train[{cut_test}%:]"}


def _with_auto(given: dict[str, str], available: set[str], val_percent: int, test_percent: int) -> dict[str, str]:
    """The given split strings, with empty or absent ones replaced by `auto_splits`."""
    auto = auto_splits(available, val_percent, test_percent)
    return {split: given.get(split) or auto[split] for split in auto}


def _stratified(records: Records, lo: int, hi: int) -> Records:
    """Percent slice [lo, hi) of every class, in class order; each class keeps its fixed order."""
    parts = []
    for c in np.unique(records.labels):
        idx = np.flatnonzero(records.labels == c)
        parts.append(idx[len(idx) * lo // 100 : len(idx) * hi // 100])
    return records.take(np.concatenate(parts) if parts else np.zeros(0, np.int64))


def _resolve_local(name: str, base: dict[str, Records], specs: dict[str, str]) -> dict[str, Records]:
    """Applies split strings to a local source's base splits."""
    out = {}
    for split, spec in specs.items():
        base_name, lo, hi = parse_split(spec)
        base_name = SPLIT_DIRS.get(base_name, base_name)
        if base_name not in base:
            raise SourceError(f"{name}: split {spec!r} ({split}) does not exist; it has {sorted(base)}")
        out[split] = _stratified(base[base_name], lo, hi)
    return out


def _fixed_order(items: list, key: str) -> list:
    """`items` in a fixed pseudo-random order that depends only on `key` (a class name) and the items themselves."""
    order = np.random.default_rng(zlib.crc32(key.encode())).permutation(len(items))
    return [items[i] for i in order]


def _scan_class_dirs(split_dir: Path, ignored: list[str]) -> dict[str, list[str]]:
    """{class name: sorted image paths} under `split_dir/<class>/` (recursively); non-images go to `ignored`."""
    classes = {}
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir():
            if not entry.name.startswith("."):
                ignored.append(str(entry))
            continue
        images = []
        for dirpath, dirnames, filenames in os.walk(entry):
            dirnames.sort()
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                path = os.path.join(dirpath, f)
                (images if f.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(path)
        if not images:
            raise SourceError(f"class folder {entry} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        classes[entry.name] = images
    if not classes:
        raise SourceError(f"{split_dir} holds no class folders: expected {split_dir}/<class>/<image files>")
    return classes


def folder(root: str, specs: dict[str, str], val_percent: int, test_percent: int) -> Source:
    """Images in `root/<split>/<class>/*` (splits train, val|validation, test) or `root/<class>/*`.

    Class names and label order come from the train folder (sorted). Files of other types are ignored with a
    warning; an empty class folder, a folder without class folders, or a class absent from train is an error.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SourceError(f"image folder {root!r} does not exist or is not a folder")
    subdirs = [d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    split_dirs = {SPLIT_DIRS[d.lower()]: d for d in subdirs if d.lower() in SPLIT_DIRS}
    ignored: list[str] = []
    if split_dirs:
        others = sorted(set(subdirs) - set(split_dirs.values()))
        if others:
            raise SourceError(f"{root}: holds split folders {sorted(split_dirs.values())} and other folders "
                              f"{others}; use either <split>/<class>/ or <class>/ throughout")
        if "train" not in split_dirs:
            raise SourceError(f"{root}: split folders {sorted(split_dirs.values())} but no 'train' folder")
        scanned = {split: _scan_class_dirs(path / d, ignored) for split, d in split_dirs.items()}
    else:
        scanned = {"train": _scan_class_dirs(path, ignored)}
    if ignored:
        logging.warning("%s: ignoring %d file(s) that are not images (%s), e.g. %s", root, len(ignored),
                        "/".join(IMAGE_EXTENSIONS), ", ".join(ignored[:3]))
    class_names = tuple(sorted(scanned["train"]))
    base = {}
    for split, classes in scanned.items():
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise SourceError(f"{root}: classes {unknown} in {split_dirs[split]}/ are not in the train folder")
        paths, labels = [], []
        for label, name in enumerate(class_names):
            files = _fixed_order(classes.get(name, []), name)
            paths += files
            labels += [label] * len(files)
        paths_array = np.asarray(paths, dtype=object)
        base[split] = Records("file", paths_array, np.asarray(labels, np.int32), paths_array)
    specs = _with_auto(specs, set(base), val_percent, test_percent)
    return Source(f"{FOLDER_PREFIX}{root}", class_names, _resolve_local(root, base, specs), specs)


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: the only globals allowed are numpy's array-reconstruction ones."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def _read_numpy_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        array = _NumpyArrayUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise SourceError(f"{path}: expected a numpy array, found {type(array).__name__}")
    return array


def animal_mnist(specs: dict[str, str]) -> Source:
    """The animal-mnist package's 10,000 28x28 grayscale silhouettes (10 classes), read without importing it.

    Splits: a fixed stratified draw per class (seeded by the class name) of 800 train / 100 val / 100 test images.
    """
    try:
        dist = importlib.metadata.distribution("animal-mnist")
    except importlib.metadata.PackageNotFoundError as e:
        raise SourceError("source 'animal_mnist' needs the animal-mnist package: pip install animal-mnist==0.4 "
                          "(or tljax[quickstart])") from e
    images, labels = (_read_numpy_pickle(Path(str(dist.locate_file(f)))) for f in ANIMAL_MNIST_FILES)
    if images.shape != (10000, 28, 28) or images.dtype != np.uint8 or labels.shape != (10000,):
        raise SourceError(f"animal-mnist {dist.version}: unexpected arrays {images.shape} {images.dtype} / "
                          f"{labels.shape}; tljax reads animal-mnist==0.4")
    base = {split: [] for split in ANIMAL_MNIST_PER_CLASS}
    for label, name in enumerate(ANIMAL_MNIST_CLASSES):
        idx = _fixed_order(list(np.flatnonzero(labels == label)), name)
        start = 0
        for split, count in ANIMAL_MNIST_PER_CLASS.items():
            base[split] += idx[start : start + count]
            start += count
    pixels = images[..., None]
    records = {
        split: Records("pixels", pixels[idx], labels[idx].astype(np.int32),
                       np.asarray([f"animal_mnist #{i}" for i in idx], dtype=object))
        for split, idx in ((s, np.asarray(v)) for s, v in base.items())
    }
    specs = _with_auto(specs, set(records), 0, 0)
    return Source("animal_mnist", ANIMAL_MNIST_CLASSES, _resolve_local("animal_mnist", records, specs), specs)


def _not_prepared(name: str, data_dir: str) -> SourceError:
    return SourceError(
        f"tfds data set {name!r} is not prepared in data_dir={data_dir!r}, and tljax does not download unless "
        f"asked. Either prepare it there (on a machine with internet: `tfds build {name} --data_dir={data_dir}`, "
        f"or set config.data.download=True), point config.data.data_dir at a folder where it is prepared, or use "
        f"your own images with config.data.source='folder:/path/to/root' (root/<class>/*.jpg), or the offline "
        f"source 'animal_mnist'."
    )


def _require_network(name: str, data_dir: str, host: str = "storage.googleapis.com") -> None:
    """Fails within seconds when the machine is offline (tfds would retry its downloads for minutes)."""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise SourceError(f"cannot download {name!r}: no connection to {host} ({e}). "
                          + str(_not_prepared(name, data_dir))) from e


def tfds_source(name: str, data_dir: str, download: bool, specs: dict[str, str], val_percent: int,
                test_percent: int) -> Source:
    """A prepared tensorflow-datasets image-classification data set, read from `data_dir` one example at a time.

    Nothing is read here: each split becomes positions into its shards (`records.ShardedReader`), so the data set
    may be larger than memory. A download prepares the data set as ArrayRecord; TFRecord shards (tfds's default)
    are indexed on first read. Fails fast (before any download attempt) when the data set is not prepared and
    `download` is False.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise SourceError(f"unknown data source {name!r}: not a tfds name, 'animal_mnist', or "
                          f"'{FOLDER_PREFIX}/path/to/root'") from e
    if download and not builder.is_prepared():
        _require_network(name, str(builder.data_dir_root))
        builder.download_and_prepare(file_format="array_record")
    if not builder.is_prepared():
        raise _not_prepared(name, str(builder.data_dir_root))
    file_format = builder.info.file_format.value
    if file_format not in FORMATS:
        raise SourceError(f"{name} is prepared as {file_format} in {builder.data_dir}; tljax reads "
                          f"{' or '.join(FORMATS)} (prepare it with `tfds build {name} --file_format=array_record`)")
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    specs = _with_auto(specs, set(builder.info.splits), val_percent, test_percent)
    splits = {}
    for split, spec in specs.items():
        try:
            instructions = builder.info.splits[spec].file_instructions
        except (KeyError, ValueError) as e:
            raise SourceError(f"{name}: split {spec!r} ({split}) cannot be read: {e}") from e
        reader = ShardedReader(instructions, file_format)
        if not len(reader):
            raise SourceError(f"{name}: split {spec!r} ({split}) is empty")
        splits[split] = Records("tfds", np.arange(len(reader), dtype=np.int64),
                                examples=TfdsExamples(reader, image_key, label_key))
    return Source(name, tuple(builder.info.features[label_key].names), splits, specs)


def load(source: str, *, data_dir: str = "", download: bool = False, specs: dict[str, str] | None = None,
         val_percent: int = 10, test_percent: int = 10) -> Source:
    """Reads `source` ("animal_mnist", "folder:/path", or a tfds name) with split strings `specs` ('' = auto)."""
    specs = specs or {}
    if source == "animal_mnist":
        return animal_mnist(specs)
    if source.startswith(FOLDER_PREFIX):
        return folder(source[len(FOLDER_PREFIX):], specs, val_percent, test_percent)
    if not re.fullmatch(r"[\w.:/-]+", source):
        raise SourceError(f"unknown data source {source!r}: expected a tfds name, 'animal_mnist', or "
                          f"'{FOLDER_PREFIX}/path/to/root'")
    return tfds_source(source, data_dir, download, specs, val_percent, test_percent)
