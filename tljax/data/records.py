"""Random access to a prepared tfds split on disk: example i's serialized record, read when it is needed.

A tfds split is a list of shards (ArrayRecord or TFRecord files). Reading example i alone, rather than holding the
split in memory, is what lets a data set larger than memory (ImageNet) be shuffled, sharded across processes and
resumed at any (epoch, step): the pipeline asks only for the examples of this process's batches.

ArrayRecord shards are addressable by record number as written (`tfds build --file_format=array_record`, or
`config.data.download=True`, which prepares in that format). TFRecord shards (tfds's default) are not: their records
are length-prefixed (8-byte length, 4-byte length checksum, data, 4-byte data checksum), so the first read from a
shard indexes it once by hopping from header to header (12 bytes read per record, never the images) and caches the
offsets beside the shard (`<shard>.offsets.npy`) when that folder is writable.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from tljax.data import iterators

ARRAY_RECORD, TFRECORD = "array_record", "tfrecord"
FORMATS = (ARRAY_RECORD, TFRECORD)
_HEADER = 12  # TFRecord: uint64 length + uint32 masked CRC of the length; the data is followed by a uint32 CRC
OFFSETS_SUFFIX = ".offsets.npy"


def tfrecord_offsets(path: str) -> np.ndarray:
    """[records + 1] byte offsets of the records of a TFRecord file (the last one: the file's size)."""
    offsets = [0]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while offsets[-1] < size:
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                raise OSError(f"{path}: truncated TFRecord header at byte {offsets[-1]}")
            offsets.append(offsets[-1] + _HEADER + struct.unpack("<Q", header[:8])[0] + 4)
            f.seek(offsets[-1])
    if offsets[-1] != size:
        raise OSError(f"{path}: TFRecord framing ends at byte {offsets[-1]}, past the file's {size} bytes")
    return np.asarray(offsets, np.int64)


class _TFRecordShard:
    """One TFRecord file, read record by record at the offsets of its (cached) index."""

    def __init__(self, path: str):
        self.path = path
        cache = path + OFFSETS_SUFFIX
        try:
            self.offsets = np.load(cache)
        except (OSError, ValueError):
            self.offsets = tfrecord_offsets(path)
            try:
                tmp = f"{cache}.tmp.{os.getpid()}.npy"
                np.save(tmp, self.offsets)
                os.replace(tmp, cache)
            except OSError as e:
                logging.warning("cannot cache the record index of %s (%s); it is rebuilt by each run", path, e)
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, i: int) -> bytes:
        start = int(self.offsets[i]) + _HEADER
        return os.pread(self._fd, int(self.offsets[i + 1]) - 4 - start, start)


class _ArrayRecordShard:
    """One ArrayRecord file (tfds writes one record per chunk, so one record is read per access)."""

    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordReader

        self.path = path
        self._reader = ArrayRecordReader(path, "readahead_buffer_size:0")
        self._lock = threading.Lock()

    def read(self, i: int) -> bytes:
        with self._lock:
            return self._reader.read([i])[0]


class ShardedReader:
    """The serialized examples of one split string: tfds's file instructions (shard, skip, take), concatenated.

    Shards are opened (and TFRecord shards indexed) on their first read, so building a pipeline reads nothing.
    """

    def __init__(self, instructions: Sequence, file_format: str):
        if file_format not in FORMATS:
            raise ValueError(f"tfds file format {file_format!r} has no random access here; prepare the data set "
                             f"as {' or '.join(FORMATS)}")
        self.file_format = file_format
        self.paths = [os.fspath(i.filename) for i in instructions]
        self.skips = np.asarray([i.skip for i in instructions], np.int64)
        self.starts = np.concatenate([[0], np.cumsum([i.take for i in instructions])]).astype(np.int64)
        self._shards: dict[int, _TFRecordShard | _ArrayRecordShard] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, position: int) -> tuple[int, int]:
        """(shard number, record number in that shard) of example `position`."""
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return shard, int(self.skips[shard] + position - self.starts[shard])

    def _shard(self, shard: int) -> _TFRecordShard | _ArrayRecordShard:
        with self._lock:  # one thread opens (and indexes) a shard; the others wait for it
            if shard not in self._shards:
                kind = _ArrayRecordShard if self.file_format == ARRAY_RECORD else _TFRecordShard
                self._shards[shard] = kind(self.paths[shard])
            return self._shards[shard]

    def read(self, position: int) -> bytes:
        """The serialized example at `position` (0-based in the split string's order)."""
        if not 0 <= position < len(self):
            raise IndexError(f"example {position} not in [0, {len(self)})")
        shard, record = self._locate(position)
        return self._shard(shard).read(record)

    def name(self, position: int) -> str:
        """tfds's id of example `position`: `<shard file name>__<record number>`."""
        shard, record = self._locate(position)
        return f"{os.path.basename(self.paths[shard])}__{record}"


class TfdsExamples:
    """Random access to a tfds split's (encoded image, label) pairs, as graph ops for tf.data.

    image_key / label_key: the feature names (tfds's supervised keys); images stay encoded, labels are int64 in the
    serialized tf.Example.
    """

    def __init__(self, reader: ShardedReader, image_key: str, label_key: str):
        self.reader = reader
        self._features = {image_key: tf.io.FixedLenFeature([], tf.string),
                          label_key: tf.io.FixedLenFeature([], tf.int64)}
        self._keys = image_key, label_key

    def read(self, position: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(encoded image, int32 label) of example `position` (an int64 scalar tensor), read from its shard."""
        serialized = tf.numpy_function(lambda p: self.reader.read(int(p)), [position], tf.string, stateful=False)
        example = tf.io.parse_single_example(tf.reshape(serialized, []), self._features)
        return example[self._keys[0]], tf.cast(example[self._keys[1]], tf.int32)

    def labels(self, positions: np.ndarray) -> np.ndarray:
        """int32 labels of examples `positions`: reads each of them (a pass over those records, in parallel)."""
        ds = tf.data.Dataset.from_tensor_slices(np.asarray(positions, np.int64)).map(
            lambda p: self.read(p)[1], num_parallel_calls=tf.data.AUTOTUNE).with_options(iterators.options())
        return np.fromiter(ds.as_numpy_iterator(), np.int32, count=len(positions))

    def names(self, positions: np.ndarray) -> np.ndarray:
        """tfds ids of examples `positions` (for messages and reports), computed without reading."""
        return np.asarray([self.reader.name(int(p)) for p in positions], dtype=object)
