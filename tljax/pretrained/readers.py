"""Weight files -> `{key: np.ndarray}`, with the key form the mapping tables expect.

* PyTorch state dicts (`.safetensors`, `.pth`/`.pt`/`.bin`): keys `module.path.tensor`; format "torch".
* Models exported by `python -m tljax.export` (`.safetensors` whose metadata says format "tljax"): keys are the Flax
  variables' paths (`params/backbone/stem_conv/kernel`); format "tljax" (see `exported`).
* Keras HDF5 weights in the legacy layout Keras Applications distributes (`layer_names` / `weight_names`, also
  inside a whole-model file's `model_weights` group): keys `layer_name/index`; format "keras".
* Keras 3 `.weights.h5` (`layers/<class>_<n>/vars/<i>`): keys `<class>_<n>/index`; format "keras3" (the loader
  renames the layers by class ordinal, see `convert.keras3_names`).

Nothing here executes code from the file: `.pth` goes through `torchfile`'s restricted unpickler.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import safetensors
import safetensors.numpy

from tljax.pretrained import torchfile

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
KERAS_SUFFIXES = (".h5", ".hdf5")


class WeightsFileError(ValueError):
    """A weights file that cannot be read: missing, truncated, or not in a supported format."""


def _read_keras(path: Path) -> tuple[dict[str, np.ndarray], str]:
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            arrays = {}
            for layer in root.attrs["layer_names"]:
                layer = layer.decode() if isinstance(layer, bytes) else str(layer)
                names = root[layer].attrs.get("weight_names", [])
                for i, name in enumerate(names):
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    arrays[f"{layer}/{i}"] = np.asarray(root[layer][name])
            return arrays, "keras"
        if "layers" in root:
            arrays = {}
            for layer, group in root["layers"].items():
                variables = group.get("vars", {})
                for i in range(len(variables)):
                    arrays[f"{layer}/{i}"] = np.asarray(variables[str(i)])
            return arrays, "keras3"
    raise WeightsFileError(f"{path}: an HDF5 file, but neither Keras's legacy weights layout nor a Keras 3 .weights.h5")


def _safetensors_format(path: Path) -> str:
    """"tljax" for a model `tljax.export` wrote (its metadata says so), else "torch" (a PyTorch state dict)."""
    with safetensors.safe_open(path, "np") as f:
        return "tljax" if (f.metadata() or {}).get("format") == "tljax" else "torch"


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Reads a weights file; returns (arrays, format) with format "torch", "tljax", "keras" or "keras3"."""
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
    except torchfile.TorchFileError as e:
        raise WeightsFileError(f"cannot read weights file {path}: {e}") from e
    except (OSError, EOFError, KeyError, safetensors.SafetensorError) as e:
        raise WeightsFileError(f"cannot read weights file {path} (truncated or corrupt?): {e}") from e
    raise WeightsFileError(
        f"{path}: unknown weights format; expected .safetensors, {'/'.join(TORCH_SUFFIXES)} (PyTorch state dict) "
        f"or {'/'.join(KERAS_SUFFIXES)} (Keras)"
    )
