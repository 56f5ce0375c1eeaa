"""Weight files -> `{key: np.ndarray}`, with the key form the mapping tables expect.

* PyTorch state dicts (`.safetensors`, `.pth`/`.pt`/`.bin`): keys `module.path.tensor`; format "torch".
* Models exported by `python -m tljax.export` (`.safetensors` whose metadata says format "tljax"): keys are the Flax
  variables' paths (`params/backbone/stem_conv/kernel`); format "tljax" (see `exported`).
* Keras HDF5 weights in the legacy layout Keras Applications distributes (`layer_names` / `weight_names`, also
  inside a whole-model file's `model_weights` group): keys `layer_name/index`; format "keras". A nested Sequential
  (ConvNeXt's stem) holds the weights of several layers, named in its weight names: `sequential/layer_name/index`.
* Keras 3 `.weights.h5` (`layers/<class>_<n>/vars/<i>`, nested Sequentials as `layers/<class>_<n>/layers/...`): keys
  `<class>_<n>/index` (`sequential_<n>/<class>_<m>/index`); format "keras3" (the loader renames the layers by class
  ordinal, see `convert.keras3_names`).
* NumPy `.npz` archives of a Flax model's parameters (Google's JAX ViT checkpoints: `Transformer/encoder_norm/scale`,
  ...): keys as stored; format "flax".

Nothing here executes code from the file: `.pth` goes through `torchfile`'s restricted unpickler, and `.npz` files
are read with `allow_pickle=False` (one holding pickled objects is refused).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import safetensors
import safetensors.numpy

from tljax.pretrained import torchfile

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
KERAS_SUFFIXES = (".h5", ".hdf5")
NPZ_SUFFIXES = (".npz",)


class WeightsFileError(ValueError):
    """A weights file that cannot be read: missing, truncated, or not in a supported format."""


def _read_keras(path: Path) -> tuple[dict[str, np.ndarray], str]:
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            arrays = {}
            for layer in root.attrs["layer_names"]:
                layer = layer.decode() if isinstance(layer, bytes) else str(layer)
                names = [n.decode() if isinstance(n, bytes) else str(n)
                         for n in root[layer].attrs.get("weight_names", [])]
                arrays.update({key: np.asarray(root[layer][name]) for key, name in _legacy_keys(layer, names)})
            return arrays, "keras"
        if "layers" in root:
            return _keras3_arrays(root["layers"]), "keras3"
    raise WeightsFileError(f"{path}: an HDF5 file, but neither Keras's legacy weights layout nor a Keras 3 .weights.h5")


def _legacy_keys(layer: str, weight_names: list[str]) -> list[tuple[str, str]]:
    """(key, weight name) for a legacy layer's weights: `layer/index`, or for a nested Sequential, whose weights
    belong to several layers (`stem/stem_conv/kernel:0`, `stem/stem_layernorm/gamma:0`, ...),
    `layer/inner_layer/index` with the index counted per inner layer."""
    inner = [name.split("/")[-2] if "/" in name else layer for name in weight_names]
    if len(set(inner)) < 2:
        return [(f"{layer}/{i}", name) for i, name in enumerate(weight_names)]
    counts: dict[str, int] = {}
    keys = []
    for sub, name in zip(inner, weight_names):
        keys.append((f"{layer}/{sub}/{counts.get(sub, 0)}", name))
        counts[sub] = counts.get(sub, 0) + 1
    return keys


def _keras3_arrays(layers: h5py.Group, prefix: str = "") -> dict[str, np.ndarray]:
    """A Keras 3 `layers` group's variables as `layer/index`, nested Sequentials' as `sequential/layer/index`."""
    arrays = {}
    for layer, group in layers.items():
        variables = group.get("vars", {})
        for i in range(len(variables)):
            arrays[f"{prefix}{layer}/{i}"] = np.asarray(variables[str(i)])
        if "layers" in group:
            arrays.update(_keras3_arrays(group["layers"], f"{prefix}{layer}/"))
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz` archive, without unpickling anything: object arrays are refused."""
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as e:  # neither a zip archive nor an .npy array: numpy would need to unpickle it
        raise WeightsFileError(f"{path}: not a NumPy .npz archive ({e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise WeightsFileError(f"{path}: one unnamed NumPy array, not an .npz archive of named weights")
    with archive:
        try:
            return {key: archive[key] for key in archive.files}
        except ValueError as e:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            raise WeightsFileError(f"{path}: holds object arrays (pickled Python objects), which tljax does not "
                                   f"load; save the weights as plain numeric arrays ({e})") from None


def _safetensors_format(path: Path) -> str:
    """"tljax" for a model `tljax.export` wrote (its metadata says so), else "torch" (a PyTorch state dict)."""
    with safetensors.safe_open(path, "np") as f:
        return "tljax" if (f.metadata() or {}).get("format") == "tljax" else "torch"


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Reads a weights file; returns (arrays, format) with format "torch", "tljax", "keras", "keras3" or "flax"."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist")
    name = path.name.lower()
    try:
        if name.endswith(".safetensors"):
            return safetensors.numpy.load_file(path), _safetensors_format(path)
        if name.endswith(TORCH_SUFFIXES):
            return torchfile.load(path), "torch"
        if name.endswith(KERAS_SUFFIXES):
            return _read_keras(path)
        if name.endswith(NPZ_SUFFIXES):
            return _read_npz(path), "flax"
    except torchfile.TorchFileError as e:
        raise WeightsFileError(f"cannot read weights file {path}: {e}") from e
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, safetensors.SafetensorError) as e:
        raise WeightsFileError(f"cannot read weights file {path} (truncated or corrupt?): {e}") from e
    raise WeightsFileError(
        f"{path}: unknown weights format; expected .safetensors, {'/'.join(TORCH_SUFFIXES)} (PyTorch state dict), "
        f"{'/'.join(KERAS_SUFFIXES)} (Keras) or .npz (Google's JAX checkpoints)"
    )
