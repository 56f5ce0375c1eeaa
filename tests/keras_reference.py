"""The Keras side of the parity tests: Keras Applications models with calibrated BatchNorm (ConvNeXt: with random
LayerNorm, bias and layer-scale parameters), in float64.

`make(directory, names)` runs this module in a subprocess on Keras's TensorFlow backend (it builds and runs the
deep models ~10x faster than the JAX backend does op by op, and needs no global float64 switch in the test
process). For each Keras Applications model it writes, into `directory/<name>/`:
  * `legacy.h5` (Keras Applications' layout, names with `:0`) and `model.weights.h5` (Keras 3), float32 like the
    released files: every weight is float32-representable, so float32 files hold exactly the float64 model's weights;
  * `reference.npz`: `images`, two 0..255 RGB images (float64) whose normalisation is standard normal (the
    distribution the statistics are calibrated on); `inputs`, their normalisation as Keras computes it (what tljax's
    model should receive: `preprocess_input` for ResNet/VGG, the output of EfficientNet's in-model Rescaling and
    Normalization, of ConvNeXt's in-model Normalization); `logits` (float64) and `<layer>` outputs where asked for;
  * `layers.json`: the names of the layers that hold weights, in `model.layers` order (Keras 3 files number layers
    by class in that order), a nested Sequential's as `sequential/layer`.
BatchNorm statistics are calibrated as in tests/torch_reference.py: random gamma U(0.5, 1.5) and beta N(0, 0.1),
the cumulative average over three train-mode passes on random normalised images, then every statistic times
U(0.9, 1.1). ConvNeXt has no BatchNorm: the parameters Keras initialises to constants (LayerNorm gamma and beta,
biases, layer scales of 1e-6, which would make every block nearly the identity) get random values instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # Keras's "caffe" preprocessing (imagenet_utils)
SIZE = 64  # VGG16 with its classifier needs 224 (its flattened 7x7 features feed fc1)
# The EfficientNet input Normalization's mean and variance: not the identity, and not ImageNet's (which Keras treats
# specially, see `IMAGENET_NORMALIZATION`).
NORMALIZATION = ((0.5, 0.45, 0.4), (0.06, 0.05, 0.04))
# Keras's released EfficientNet files store ImageNet's *std* as the Normalization's variance; Keras builds the
# ImageNet model with a second Rescaling(1 / sqrt(std)) that is in no file. The case "EfficientNetB0_imagenet" saves
# such a file, and its reference logits are those of the model Keras builds for it: the same weights with the extra
# rescaling folded into the stem kernel's input channels.
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# ConvNeXt's in-model Normalization: ImageNet's mean and std on 0..255 values.
CONVNEXT_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Extra layer outputs to record, per model.
OUTPUTS = {"VGG16": ("block5_pool", "fc2")}


def make(directory: Path, names: list[str]) -> dict[str, Path]:
    """Writes the references of Keras Applications models `names` (e.g. "ResNet101", "EfficientNetB3",
    "EfficientNetB0_imagenet") into `directory`; returns {name: its folder}."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    # Two processes, each with every other model: building a Keras model and running it eagerly is mostly
    # single-threaded Python. Each model's reference depends on its name only (seeds are reset per model).
    processes = [subprocess.Popen([sys.executable, "-m", "tests.keras_reference", str(directory), *group],
                                  cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for group in (names[0::2], names[1::2]) if group]
    for process in processes:
        _, stderr = process.communicate(timeout=1800)
        assert process.returncode == 0, stderr[-4000:]
    return {name: directory / name for name in names}


def _float32_values(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, np.float32).astype(a.dtype) for a in arrays]


def _calibrate(model, keras, model_input, rng: np.random.Generator) -> None:
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0.0, 0.1, beta.shape), mean, var])
    for k in range(3):  # moving = m * moving + (1 - m) * batch: m = k / (k + 1) makes the cumulative average
        for layer in norms:
            layer.momentum = k / (k + 1)
        model(model_input(rng.normal(size=(8, *model.input_shape[1:]))), training=True)
    for layer in norms:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights(_float32_values([gamma, beta, mean * rng.uniform(0.9, 1.1, mean.shape),
                                           var * rng.uniform(0.9, 1.1, var.shape)]))


def _randomize_constants(model, rng: np.random.Generator) -> None:
    """Random values for every weight Keras initialises to a constant: scales (all ones) U(0.5, 1.5), the rest
    (zero biases and betas, 1e-6 layer scales) N(0, 0.1)."""
    for layer in model.layers:
        weights = layer.get_weights()
        for i, w in enumerate(weights):
            if w.size and np.ptp(w) == 0:
                weights[i] = rng.uniform(0.5, 1.5, w.shape) if np.all(w == 1) else rng.normal(0.0, 0.1, w.shape)
        layer.set_weights(_float32_values(weights))


def _weighted_layers(model, keras) -> list[str]:
    """The names of the layers holding weights in `model.layers` order, a nested Sequential's as `seq/layer`."""
    return [f"{layer.name}/{inner.name}" if isinstance(layer, keras.Sequential) else layer.name
            for layer in model.layers for inner in (layer.layers if isinstance(layer, keras.Sequential) else [layer])
            if inner.weights]


def _he_init(model, rng: np.random.Generator) -> None:
    """He-normal kernels and non-zero biases for VGG (Keras's Glorot default shrinks the signal over 16 layers)."""
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            he = rng.normal(0.0, np.sqrt(2.0 / np.prod(kernel.shape[:-1])), kernel.shape)
            layer.set_weights(_float32_values([he, rng.normal(0.0, 0.05, bias.shape)]))


def _set_normalization(model, mean, variance) -> None:
    layer = model.get_layer("normalization")
    layer.set_weights([np.float32(mean), np.float32(variance), np.int32(0)])
    layer.finalize_state()


def _copy_as_float32(src: Path, dst: Path) -> None:
    """Copies an HDF5 file with every float64 dataset stored as float32 (exact: the values are
    float32-representable)."""
    import h5py

    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        g.attrs.update(f.attrs)

        def copy(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                g[name] = data.astype(np.float32) if data.dtype == np.float64 else data
            else:
                g.require_group(name)
            g[name].attrs.update(obj.attrs)

        f.visititems(copy)


def _write(name: str, folder: Path) -> None:
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.backend.clear_session()  # layer names restart (the first Normalization is "normalization" again)
    keras.config.set_floatx("float64")  # the input layer's dtype (the dtype policy sets the layers')
    keras.config.set_dtype_policy("float64")
    rng = np.random.default_rng(0)
    arch, _, variant = name.partition("_")
    family = ("resnet" if arch.startswith("ResNet") else "vgg16" if arch == "VGG16" else
              "convnext" if arch.startswith("ConvNeXt") else "efficientnet")
    in_model = family in ("efficientnet", "convnext")  # the model normalises its 0..255 input itself
    keras.utils.set_random_seed(0)
    size = 224 if family == "vgg16" else SIZE
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    model.set_weights(_float32_values(model.get_weights()))
    if family == "efficientnet":
        _set_normalization(model, *NORMALIZATION)
    std = np.sqrt(NORMALIZATION[1])

    def images_of(x: np.ndarray) -> np.ndarray:
        """0..255 RGB images whose normalisation (the model's preprocessing) is `x`."""
        if family == "efficientnet":
            mean = NORMALIZATION[0] if variant != "imagenet" else IMAGENET_NORMALIZATION[0]
            return (x * std + np.asarray(mean)) * 255
        if family == "convnext":
            return (x * np.asarray(CONVNEXT_NORMALIZATION[1]) + np.asarray(CONVNEXT_NORMALIZATION[0])) * 255
        return (x + np.asarray(CAFFE_MEAN_BGR))[..., ::-1]  # caffe: BGR, the ImageNet mean subtracted

    def model_input(images: np.ndarray) -> np.ndarray:
        """What the Keras model takes: EfficientNet and ConvNeXt normalise inside the model, ResNet and VGG outside."""
        return images if in_model else getattr(keras.applications, family).preprocess_input(images)

    if family == "vgg16":
        _he_init(model, rng)
    elif family == "convnext":
        _randomize_constants(model, rng)
    else:
        _calibrate(model, keras, lambda x: model_input(images_of(x)), rng)

    folder.mkdir(parents=True, exist_ok=True)
    if variant == "imagenet":
        _set_normalization(model, *IMAGENET_NORMALIZATION)
        std = np.asarray(IMAGENET_NORMALIZATION[1])  # the real std, which the files hold as "variance"
    with h5py.File(folder / "legacy64.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    model.save_weights(folder / "model64.weights.h5")
    for name64, name32 in (("legacy64.h5", "legacy.h5"), ("model64.weights.h5", "model.weights.h5")):
        _copy_as_float32(folder / name64, folder / name32)
        (folder / name64).unlink()

    images = images_of(rng.normal(size=(2, size, size, 3)))
    if in_model:
        # The backbone's input as Keras computes it (EfficientNet's Rescaling constant is float32: ~1e-7 from the
        # exact value).
        normalization = "normalization" if family == "efficientnet" else f"{model.name}_prestem_normalization"
        inputs = np.asarray(keras.Model(model.input, model.get_layer(normalization).output)(images))
        if variant == "imagenet":
            inputs = inputs / np.sqrt(std)  # the Rescaling(1 / sqrt(std)) Keras adds, folded into the stem below
            stem = model.get_layer("stem_conv")
            stem.set_weights([stem.get_weights()[0] / np.sqrt(std)[None, None, :, None]])
    else:
        inputs = model_input(images.copy())
    outputs = {"images": images, "inputs": inputs, "logits": np.asarray(model(model_input(images.copy())))}
    for layer in OUTPUTS.get(arch, ()):
        inner = keras.Model(model.input, model.get_layer(layer).output)
        outputs[layer] = np.asarray(inner(model_input(images.copy())))
    np.savez(folder / "reference.npz", **outputs)
    (folder / "layers.json").write_text(json.dumps(_weighted_layers(model, keras)))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for model_name in sys.argv[2:]:
        _write(model_name, out / model_name)
