"""Cached backbone features: a phase whose backbone is frozen runs it once per example, then trains the head alone.

With the backbone frozen and in inference mode (and no augmentation), its features of an example never change
during the phase, so the head sees exactly the inputs it would see through the backbone: the same batches in the
same order (`InputPipeline.train_order`), hence the same head parameters. Train and validation features are kept
in memory, or in memory-mapped files in the workdir when they would not fit comfortably
(`config.features_in_memory_mb`); the cache removes what it wrote, and only that, when it closes.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import jax
import numpy as np

from tljax.data import pipeline
from tljax.training import parallel, steps


class FeatureCache:
    """Features and labels of every train and val example, in example order, on every process.

    A split's features larger than `in_memory_bytes` go to a memory-mapped file in `directory` (created if need be).
    """

    def __init__(self, data: pipeline.InputPipeline, par: Any, state: Any, model: Any, directory: str,
                 in_memory_bytes: float) -> None:
        self.data, self.directory, self.in_memory_bytes = data, directory, in_memory_bytes
        self.created_directory = False
        self.files: list[str] = []  # the memory-mapped files written
        per_device = data.eval_batch_size // jax.device_count()
        extract = par.compile(functools.partial(steps.feature_step, model=model,
                                                micro_batches=parallel.micro_batches(per_device)), donate=False)
        self.features: dict[str, np.ndarray] = {}
        self.labels: dict[str, np.ndarray] = {}
        for split in ("train", "val"):
            stored, labels, filled = None, [], 0
            for batch in data.eval(split):
                on_device = par.put_batch(batch)
                features, mask = par.gather(extract(state, on_device)), par.gather(on_device["mask"])
                features = features[mask > 0]
                if stored is None:
                    stored = self._array(split, (data.sizes[split], features.shape[-1]))
                stored[filled : filled + len(features)] = features
                filled += len(features)
                labels.append(par.gather(on_device["label"])[mask > 0])
            self.features[split], self.labels[split] = stored, np.concatenate(labels)

    def _array(self, split: str, shape: tuple[int, int]) -> np.ndarray:
        if shape[0] * shape[1] * 4 <= self.in_memory_bytes:
            return np.empty(shape, np.float32)
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory)
            self.created_directory = True
        path = os.path.join(self.directory, f"{split}-{jax.process_index()}.npy")
        self.files.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    def train(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's part of global batches start_step.. of `epoch`: {"features", "label"}."""
        for indices in self.data.local(self.data.train_order(epoch)[start_step:]):
            yield {"features": self.features["train"][indices], "label": self.labels["train"][indices]}

    def eval(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """Padded batches over `split` ("train" or "val"), as `InputPipeline.eval` batches them."""
        indices, mask = pipeline.padded(len(self.labels[split]), self.data.eval_batch_size)
        for idx, m in zip(self.data.local(indices), self.data.local(mask)):
            yield {"features": self.features[split][idx], "label": self.labels[split][idx], "mask": m}

    def close(self) -> None:
        """Frees memory and removes the memory-mapped files, and their directory if the cache made it and nothing
        else is in it; anything the user keeps there stays."""
        self.features.clear()
        for path in self.files:
            os.remove(path)
        self.files.clear()
        if self.created_directory and not os.listdir(self.directory):
            os.rmdir(self.directory)
