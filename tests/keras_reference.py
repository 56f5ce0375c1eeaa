"""Keras Applications models with random, non-trivial weights, saved in the layouts Keras distributes.

Used by the parity tests: tljax must compute the same logits from the saved file as Keras does in memory.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
from keras.src.legacy.saving import legacy_h5_format


def randomize_batchnorm(model: keras.Model, seed: int = 0) -> None:
    """Gives every BatchNormalization layer random gamma/beta and running statistics (not 1/0/0/1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([
                rng.uniform(0.5, 1.5, shape).astype("float32"),
                rng.normal(0.0, 0.1, shape).astype("float32"),
                rng.normal(0.0, 0.1, shape).astype("float32"),
                rng.uniform(0.5, 1.5, shape).astype("float32"),
            ])


def save(model: keras.Model, path: Path, layout: str) -> Path:
    """Saves weights as Keras Applications' legacy HDF5 ("legacy") or as a Keras 3 `.weights.h5` ("keras3")."""
    if layout == "legacy":
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
        return path
    path = path.with_name(path.stem + ".weights.h5")
    model.save_weights(path)
    return path


def logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(images, training=False))
