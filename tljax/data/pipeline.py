"""The tf.data input pipeline: order, shard, decode, transform, normalise and batch, deterministically.

Order. Epoch e of the train split is a permutation of its examples drawn from (seed, e); global batch k holds
positions [k*B, (k+1)*B) of it (the remainder is dropped). Process p of P takes its own contiguous slice
[p*L, (p+1)*L) of every global batch (L = B / P) and decodes only those examples, so one process with batch B and
P processes with B / P each see the same global batches. `train(epoch, start_step)` starts at batch start_step
without decoding anything before it: (epoch, step) is the whole iterator state a checkpoint needs. Consecutive
epochs share one tf.data iterator (`_TrainStream`): while epoch e's last batches are taken, epoch e + 1's first ones
are already being decoded, so a loop asking for train(e + 1) right after train(e) does not wait at the boundary. The
epochs' orders reach that iterator through a queue the main thread fills one epoch ahead, so no Python runs in
tf.data's threads for a folder source (a worker waiting for the GIL can hang an iterator's destructor).

Randomness. Augmentations (crop, flip, RandAugment) are stateless, seeded from (seed, epoch, example index): a
resumed run and any process layout reproduce them exactly.

Evaluation. Every example exactly once, in split order; the last global batch is padded (with copies of example 0)
and the "mask" is 0 for padding.

Decoding. JPEGs are decoded only around the random-resized crop's window, with the same pixels as a full decode
(`transforms.decode_window`); the eval transform lets the decoder downscale in the DCT when
`config.data.jpeg_dct_scaling` is on (`transforms.decode_center_crop`).

Threads. TF is kept off GPUs. tf.data decodes elements in parallel, one per thread of its own pool,
`config.data.threads` threads (0: one per core); each op runs single-threaded (`max_intra_op_parallelism = 1`)
so a large resize cannot take every core from the JAX step running beside it; autotuning is off
(`iterators.options`: with it on, releasing an iterator waited up to a minute).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from tljax.data import iterators, normalize, randaugment, sources, transforms
from tljax.data.iterators import Releasable
from tljax.data.options import ConfigError, check_config, check_layout
from tljax.data.sources import Records, SourceError

SPLITS = ("train", "val", "test")
Views = Callable[[tf.Tensor], tf.Tensor]  # a decoded image -> its test-time views [V, S, S, 3] (tljax.runs.tta.views)


class CorruptImageError(SourceError):
    """An image file (or encoded image) that cannot be decoded."""


def _keep_tf_off_accelerators() -> None:
    """Hides the GPUs from TensorFlow, so that tf.data takes no accelerator memory from JAX.

    Nothing to do when TF sees none (a CPU build, or a second pipeline in this process). TF refuses the change once
    its GPUs are initialised (TF used on the GPU before tljax): that error surfaces, with what to do.
    """
    if not tf.config.get_visible_devices("GPU"):
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        raise RuntimeError(f"cannot keep TensorFlow off the GPUs, where it would take memory from JAX ({e}); build "
                           "the input pipeline before TensorFlow first uses a GPU in this process") from e


Reader = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def _reader(records: Records) -> Reader:
    """A graph function from an example's index to (its encoded image, or its pixels for "pixels" records; its
    int32 label). tfds records are read from their shard, label included."""
    data = tf.constant(records.data)
    if records.kind == "tfds":
        return lambda i: records.examples.read(data[i])
    labels = tf.constant(records.labels)
    if records.kind == "file":
        return lambda i: (tf.io.read_file(data[i]), labels[i])
    return lambda i: (data[i], labels[i])


def _readable(records: Records) -> np.ndarray:
    """A bool per record: does it decode? One parallel pass, decode only."""
    read = _reader(records)
    ds = tf.data.Dataset.range(len(records)).map(
        lambda i: (i, tf.shape(transforms.decode(read(i)[0]))[0]), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False).ignore_errors().with_options(iterators.options())
    ok = np.zeros(len(records), bool)
    for i, _ in ds.as_numpy_iterator():
        ok[i] = True
    return ok


def _without_undecodable(source: sources.Source) -> tuple[sources.Source, dict[str, int]]:
    """`source` without the images that do not decode, and how many each split lost (logged)."""
    splits, skipped = {}, {}
    for split, records in source.splits.items():
        ok = np.ones(len(records), bool) if records.kind == "pixels" else _readable(records)
        skipped[split] = int((~ok).sum())
        if skipped[split]:
            logging.warning("skip_corrupt: skipping %d undecodable image(s) of %d in %s, e.g. %s", skipped[split],
                            len(records), split, ", ".join(records.names[~ok][:3]))
        splits[split] = records.take(np.flatnonzero(ok))
    return dataclasses.replace(source, splits=splits), skipped


def _decodes(read: Reader, i: int) -> bool:
    try:
        transforms.decode(read(tf.constant(i, tf.int64))[0])
    except tf.errors.InvalidArgumentError:
        return False
    return True


def padded(n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices 0..n-1 in [steps, batch] rows, the last row padded with index 0, and the mask (0 = padding)."""
    steps = math.ceil(n / batch)
    indices = np.zeros(steps * batch, np.int64)
    indices[:n] = np.arange(n)
    return indices.reshape(steps, batch), (np.arange(steps * batch) < n).astype(np.float32).reshape(steps, batch)


def eval_geometry(cfg: ml_collections.ConfigDict, prep: Any) -> tuple[float, str]:
    """(crop fraction, resize method) of the evaluation transform: config.data's crop_fraction, else the prep's."""
    return cfg.crop_fraction or (prep.crop_fraction if prep else 0.875), prep.interpolation if prep else "bilinear"


@dataclasses.dataclass
class _TrainStream:
    """A train iterator that runs on from epoch to epoch: `orders` feeds it (epoch, this process's example indices),
    `queued` the last epoch fed; `position` is the (epoch, step) of its next batch; `owner` the token of the epoch
    handed out from it that is being read (None: free)."""

    batches: Releasable
    orders: tf.queue.FIFOQueue
    queued: int
    position: tuple[int, int]
    owner: object | None = None


class InputPipeline:
    """A data set's splits as batch iterators for one process; see the module docstring for order and sharding.

    Attributes: class_names, num_classes, sizes ({split: examples}), specs ({split: split string}),
    steps_per_epoch (global train batches per epoch), stats (the training statistics in use, or None),
    skipped ({split: undecodable images skipped}), records ({split: Records}: example i's label and name, e.g.
    its file, for reports).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, prep: Any, source: sources.Source, *, seed: int,
                 process_index: int, process_count: int, skipped: dict[str, int]):
        self.source = source.name
        self.class_names = source.class_names
        self.num_classes = len(source.class_names)
        self.sizes = {split: len(records) for split, records in source.splits.items()}
        self.specs = dict(source.specs)
        self.skipped = skipped
        self.batch_size = cfg.batch_size
        self.eval_batch_size = cfg.eval_batch_size or cfg.batch_size
        self.steps_per_epoch = self.sizes["train"] // self.batch_size
        self.image_size = cfg.image_size
        self.crop_fraction, self.interpolation = eval_geometry(cfg, prep)
        self.stats: normalize.Stats | None = None
        self._cfg, self._seed = cfg, seed
        self._randaugment = randaugment.parse(cfg.randaugment) if cfg.randaugment else None
        self._process, self._processes = process_index, process_count
        self.records = source.splits
        self._readers = {split: _reader(r) for split, r in source.splits.items()}
        self._normalize = lambda x: x
        self._stream: _TrainStream | None = None
        self._options = iterators.options(cfg.threads)

    def use_normalization(self, strategy: str, prep: Any, stats: normalize.Stats | None) -> None:
        """Sets the normalization every later batch gets (stats: scoped training statistics or None)."""
        self.stats = stats
        self._normalize = normalize.normalizer(strategy, prep, stats)

    def train_order(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, batch_size] train example indices of every global batch of `epoch`."""
        perm = np.random.default_rng([self._seed, epoch]).permutation(self.sizes["train"])
        return perm[: self.steps_per_epoch * self.batch_size].reshape(self.steps_per_epoch, self.batch_size)

    def train(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's part of global batches start_step.. of `epoch`: {"image" [L,H,W,3] f32, "label" [L] i32}."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} not in [0, {self.steps_per_epoch}]")
        stream = self._stream
        if stream is None or stream.owner is not None or stream.position != (epoch, start_step):
            stream = self._stream = self._train_stream(epoch, start_step)
        stream.owner = token = object()
        return self._take_epoch(stream, token, epoch, start_step)

    def _train_stream(self, epoch: int, start_step: int) -> _TrainStream:
        """One tf.data iterator over this process's train batches from (epoch, start_step) on, epoch after epoch as
        their orders are queued (`_queue_through`); fed here with the rest of `epoch`."""
        orders = tf.queue.FIFOQueue(-1, [tf.int64, tf.int64])
        orders.enqueue([epoch, self.local(self.train_order(epoch)[start_step:]).reshape(-1)])

        def next_order(_: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            e, indices = orders.dequeue()
            return tf.reshape(e, []), tf.reshape(indices, [-1])

        items = tf.data.Dataset.from_tensors(0).repeat().map(next_order).flat_map(
            lambda e, indices: tf.data.Dataset.from_tensor_slices(
                {"index": indices, "epoch": tf.fill(tf.shape(indices), e)}))

        def stop() -> None:  # may run in the garbage collector while a tf.function is traced: close it eagerly
            with tf.init_scope():
                orders.close(cancel_pending_enqueues=True)

        batches = self._batches("train", items, self.batch_size // self._processes, stop=stop)
        return _TrainStream(batches, orders, epoch, (epoch, start_step))

    def _queue_through(self, stream: _TrainStream, epoch: int) -> None:
        """Queues the orders of the epochs after `stream.queued` up to `epoch` (whole epochs, this process's part)."""
        while stream.queued < epoch:
            stream.queued += 1
            stream.orders.enqueue([stream.queued, self.local(self.train_order(stream.queued)).reshape(-1)])

    def _take_epoch(self, stream: _TrainStream, token: object, epoch: int,
                    start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches start_step.. of `epoch` from `stream` (held with `token`), which stays at the next position for
        the next epoch. The next epoch's order is queued as this one starts, so its first batches are decoded
        while this one's last are taken."""
        try:
            self._queue_through(stream, epoch + 1)
            for step in range(start_step, self.steps_per_epoch):
                batch = self._next("train", stream.batches,
                                   lambda step=step: self.local(self.train_order(epoch))[step])
                last = step + 1 == self.steps_per_epoch
                stream.position = (epoch + 1, 0) if last else (epoch, step + 1)
                if last:  # released with the last batch: the loop never asks past it
                    stream.owner = None
                yield batch
        finally:
            if stream.owner is token:
                stream.owner = None

    def eval_steps(self, split: str) -> int:
        """Global eval batches of `split` (the last one padded)."""
        return math.ceil(self._split_size(split) / self.eval_batch_size)

    def eval(self, split: str, views: Views | None = None) -> Iterator[dict[str, np.ndarray]]:
        """This process's part of every padded eval batch: {"image", "label", "mask" [L] f32 (0 = padding)}.

        views: a function from a decoded image to its V test-time views (float32 [V, S, S, 3] in 0..255, see
        `tljax.runs.tta.views`), which replace the eval transform: "image" is then [L, V, S, S, 3], each view
        normalised.
        """
        indices, mask = padded(self._split_size(split), self.eval_batch_size)
        return self._iterate(split, self.local(indices), self.local(mask), normalized=True, views=views)

    def raw_train_images(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """Every train image once, eval transform, not normalised (the statistics pass; not sharded)."""
        indices, mask = padded(self.sizes["train"], batch_size)
        for batch in self._iterate("train", indices, mask, normalized=False):
            yield batch["image"][batch["mask"] > 0]

    def raw_images(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Examples `indices` of `split` with the eval transform, not normalised: float32 0..255 (for showing)."""
        indices = np.asarray(indices, np.int64)
        if not len(indices):
            return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        return next(self._iterate(split, indices[None], None, normalized=False))["image"]

    def _split_size(self, split: str) -> int:
        if split not in self.sizes:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self.sizes[split]

    def local(self, global_batches: np.ndarray) -> np.ndarray:
        """This process's contiguous columns of [steps, global batch]."""
        width = global_batches.shape[1] // self._processes
        return global_batches[:, self._process * width : (self._process + 1) * width]

    def _image(self, split: str, raw: tf.Tensor, index: tf.Tensor, epoch: tf.Tensor | None,
               views: Views | None) -> tf.Tensor:
        """Decode and transform example `index`, read as `raw` (encoded, or pixels): float32 [S, S, 3] in 0..255
        (with `views`: [V, S, S, 3]).

        epoch: None for the eval transform, else the train epoch whose augmentation to draw."""
        cfg, kind = self._cfg, self.records[split].kind
        size, method = self.image_size, self.interpolation
        decoded = lambda: transforms.to_rgb(raw) if kind == "pixels" else transforms.decode(raw)  # noqa: E731
        if views is not None:
            return views(decoded())
        augment = epoch is not None and cfg.augment
        if not (augment and cfg.random_crop):
            image = (transforms.center_crop(decoded(), size, self.crop_fraction, method) if kind == "pixels" else
                     transforms.decode_center_crop(raw, size, self.crop_fraction, method, cfg.jpeg_dct_scaling))
            if not augment:
                return image
        crop_seed, flip_seed, augment_seed = transforms.example_seeds(self._seed, epoch, index)
        if cfg.random_crop:
            crop = (tuple(cfg.crop_scale), tuple(cfg.crop_ratio), method)
            image = (transforms.random_resized_crop(decoded(), size, crop_seed, *crop) if kind == "pixels" else
                     transforms.decode_random_resized_crop(raw, size, crop_seed, *crop))
        if cfg.flip:
            image = transforms.random_flip(image, flip_seed)
        return randaugment.apply(image, self._randaugment, augment_seed) if self._randaugment else image

    def _example(self, split: str, normalized: bool, views: Views | None, item: dict) -> dict[str, tf.Tensor]:
        raw, label = self._readers[split](item["index"])
        image = self._image(split, raw, item["index"], item.get("epoch"), views)
        out = {"image": self._normalize(image) if normalized else image, "label": label}
        if "mask" in item:
            out["mask"] = item["mask"]
        return out

    def _batches(self, split: str, items: tf.data.Dataset, batch: int, normalized: bool = True,
                 views: Views | None = None, stop: Callable[[], None] | None = None) -> Releasable:
        """Examples `items` ({"index", and "epoch" for the train transform or "mask"}) decoded in parallel, in
        order, batched and prefetched: a numpy iterator (`stop`: see `Releasable`)."""
        ds = items.map(functools.partial(self._example, split, normalized, views),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return Releasable(ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(
            self._options).as_numpy_iterator(), stop)

    def _iterate(self, split: str, local: np.ndarray, mask: np.ndarray | None, *, normalized: bool,
                 views: Views | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Eval-transform batches of `local` ([steps, L] indices); names the file if a decode fails."""
        items = {"index": local.reshape(-1)}
        if mask is not None:
            items["mask"] = mask.reshape(-1)
        batches = self._batches(split, tf.data.Dataset.from_tensor_slices(items), local.shape[1], normalized, views)
        for step in range(local.shape[0]):
            yield self._next(split, batches, lambda step=step: local[step])

    def _next(self, split: str, batches: Iterator[dict[str, np.ndarray]],
              indices: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
        """The next batch of `batches`; if an image in it (examples `indices()`) does not decode, the error names it."""
        try:
            return next(batches)
        except tf.errors.InvalidArgumentError as e:
            corrupt = self._corrupt(split, indices(), e)
            if corrupt is None:
                raise
            raise corrupt from e

    def _corrupt(self, split: str, indices: np.ndarray, error: Exception) -> CorruptImageError | None:
        """The error naming the undecodable images among `indices` (tf's own message names no file), if any."""
        records, read = self.records[split], self._readers[split]
        bad = [records.names[i] for i in np.unique(indices) if not _decodes(read, int(i))]
        if not bad:
            return None
        return CorruptImageError(
            f"cannot decode image {bad[0]}" + (f" (and {len(bad) - 1} more: {', '.join(bad[1:4])})" if bad[1:] else "")
            + f": truncated, corrupt, or not an image ({str(error).splitlines()[0][-120:]}). Remove or replace it, "
            "or set config.data.skip_corrupt=True to skip undecodable images.")


def _statistics(pipe: InputPipeline, cfg: ml_collections.ConfigDict, prep: Any, workdir: str | None,
                process_index: int, trained_with: str | None) -> normalize.Stats | None:
    """The training statistics the strategy needs: loaded from workdir if saved there, else computed (and saved).

    `trained_with`: the normalization file of a trained run, whose statistics are used as they are (evaluating that
    run's model, possibly on other data); nothing is computed or written then.

    Every process computes the same statistics itself from the whole train split (no communication); only
    process 0 writes the file. The file also records the settings they depend on (and the prep, for
    "pretrained"), so a workdir cannot silently mix inputs normalised two ways.
    """
    settings: dict[str, Any] = {"normalization": cfg.normalization}
    if cfg.normalization == "pretrained":
        settings["prep"] = dataclasses.asdict(prep)
    if cfg.normalization in normalize.TRAIN_STRATEGIES:
        settings |= {"stats_scope": cfg.stats_scope, "source": pipe.source, "train_split": pipe.specs["train"],
                     "train_examples": pipe.sizes["train"], "image_size": pipe.image_size,
                     "crop_fraction": pipe.crop_fraction, "interpolation": pipe.interpolation}
        if cfg.jpeg_dct_scaling:  # recorded only when on: files written before the option still load
            settings["jpeg_dct_scaling"] = True
    path = os.path.join(workdir, normalize.FILENAME) if workdir else None
    if trained_with:
        stats = normalize.read(trained_with)[1]
    elif path and os.path.exists(path):
        stats = normalize.load(path, settings)
        logging.info("normalization %s: reusing %s", cfg.normalization, path)
    else:
        stats = None
        if cfg.normalization in normalize.TRAIN_STRATEGIES:
            logging.info("computing training statistics over %d train images at %d px (one pass)",
                         pipe.sizes["train"], pipe.image_size)
            stats = normalize.compute_stats(pipe.raw_train_images())
        if path and process_index == 0:
            os.makedirs(workdir, exist_ok=True)
            normalize.save(path, settings, stats)
    if stats is not None:
        logging.info("training statistics (per channel): mean %s std %s min %s max %s", stats.mean, stats.std,
                     stats.min, stats.max)
        stats = stats.scoped(cfg.stats_scope)
    return stats


def build(cfg: ml_collections.ConfigDict, prep: Any = None, *, seed: int = 0, workdir: str | None = None,
          num_devices: int = 1, process_index: int = 0, process_count: int = 1,
          trained_with: str | None = None) -> InputPipeline:
    """Validates `cfg` (config.data), reads the source, resolves normalization, and returns the pipeline.

    prep: the loaded weights' `Preprocessing` (resize method, crop fraction, "pretrained" normalization); None
    with random weights. workdir: where normalization.json is saved and reused (None: not saved).
    num_devices / process_index / process_count: jax.device_count(), jax.process_index(), jax.process_count().
    trained_with: a trained run's normalization.json whose statistics to use unchanged (see `_statistics`).
    """
    check_config(cfg)
    check_layout(cfg, prep, seed, num_devices, process_index, process_count)
    _keep_tf_off_accelerators()
    specs = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    source = sources.load(cfg.source, data_dir=cfg.data_dir, download=cfg.download, specs=specs,
                          val_percent=cfg.val_percent, test_percent=cfg.test_percent)
    skipped = {split: 0 for split in source.splits}
    if cfg.skip_corrupt:
        source, skipped = _without_undecodable(source)
    for split, records in source.splits.items():
        if len(records) == 0:
            raise SourceError(f"{source.name}: split {source.specs[split]!r} ({split}) holds no examples")
    if len(source.splits["train"]) < cfg.batch_size:
        raise ConfigError(f"the train split ({source.specs['train']}) holds {len(source.splits['train'])} examples, "
                          f"fewer than one global batch of {cfg.batch_size}")
    pipe = InputPipeline(cfg, prep, source, seed=seed, process_index=process_index, process_count=process_count,
                         skipped=skipped)
    stats = _statistics(pipe, cfg, prep, workdir, process_index, trained_with)
    pipe.use_normalization(cfg.normalization, prep, stats)
    return pipe
