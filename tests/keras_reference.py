"""Keras Applications models with random, non-trivial weights, saved in the layouts Keras distributes.

Used by the parity tests: tljax must compute the same logits from the saved file as Keras does in memory.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
from keras.src.legacy.saving import legacy_h5_format


def calibrate_batchnorm(model: keras.Model, seed: int = 0) -> None:
    """Random BatchNorm gamma/beta, then running statistics measured on one batch of noise.

    Random running statistics that do not fit the activations make a deep network's output independent of its
    input; one batch's statistics keep it input-dependent while still being non-trivial (not 0/1).
    """
    rng = np.random.default_rng(seed)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                           rng.uniform(-0.2, 0.2, beta.shape).astype("float32"), mean, var])
        layer.momentum = 0.0
    size = model.input_shape[1:3]
    model(rng.uniform(0, 255, (8, *size, 3)).astype("float32"), training=True)
    for layer in norms:
        layer.momentum = 0.99


def set_normalization(model: keras.Model, mean, variance) -> None:
    """Sets the input Normalization layer of Keras's EfficientNet (it caches mean/variance: finalize_state)."""
    layer = model.get_layer("normalization")
    layer.set_weights([np.float32(mean), np.float32(variance), np.int32(0)])
    layer.finalize_state()


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
