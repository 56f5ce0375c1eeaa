"""PyTorch `.pth`/`.pt` state dicts -> numpy arrays, without torch and without running code from the file.

`torch.save` pickles the object (for weights: a dict of names -> tensors) and writes every tensor's storage as raw
bytes beside the pickle. Two layouts exist:

* zip (torch >= 1.6): a zip archive with one top folder `<archive>/` holding `data.pkl` (the pickle),
  `data/<key>` (one storage's raw bytes per key) and optionally `byteorder` ("little" or "big").
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): back to back in one file, a pickled magic number,
  a pickled protocol version (1001), a pickled dict of system info (endianness), the main pickle, a pickled list of
  storage keys; then, for each key in that order, an int64 element count followed by the storage's raw bytes.

In both, the main pickle names each storage by a *persistent id*, a tuple `("storage", storage_type, key, location,
numel[, view])`, and builds each tensor with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
`_Unpickler` resolves exactly those globals (and `collections.OrderedDict`) to the stand-ins below: a storage type
becomes its numpy dtype, a tensor a `_TensorRef`, which numpy cuts out of the storage's bytes once they are all read.
Every other global (`os.system`, `builtins.eval`, a model class, ...) is refused before anything is called.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# Keys under which training checkpoints commonly keep the model's state dict, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")

_DTYPES = {
    name: np.dtype(t)
    for name, t in {
        "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64,
        "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
        "bool": np.bool_, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    }.items()
}
_STORAGES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


class TorchFileError(ValueError):
    """A .pth/.pt file that cannot be read safely: corrupt, truncated, or naming code this reader will not run."""


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A run of `nbytes` bytes at byte `start` of the storage saved under `key`, holding elements of `dtype`."""

    key: str
    dtype: np.dtype
    start: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle describes it: a strided view (in elements of `dtype`) of a storage."""

    storage: _Storage
    dtype: np.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _tensor(storage: Any, dtype: Any, offset: Any, size: Any, stride: Any) -> _TensorRef:
    if not (isinstance(storage, _Storage) and isinstance(dtype, np.dtype) and isinstance(offset, int)):
        raise TorchFileError("a tensor in the pickle is not built from a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise TorchFileError(f"a tensor with malformed size {size!r} / stride {stride!r}")
    return _TensorRef(storage, dtype, offset, size, stride)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_flags_hooks_metadata: Any) -> _TensorRef:
    """Stand-in for `torch._utils._rebuild_tensor` and `_rebuild_tensor_v2` (extra arguments are autograd state)."""
    return _tensor(storage, getattr(storage, "dtype", None), offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                       dtype: Any, *_metadata: Any) -> _TensorRef:
    """Stand-in for `torch._utils._rebuild_tensor_v3`: an untyped (byte) storage plus the tensor's dtype."""
    return _tensor(storage, dtype, offset, size, stride)


def _rebuild_parameter(data: Any, *_flags_hooks_state: Any) -> _TensorRef:
    """Stand-in for `torch._utils._rebuild_parameter(_with_state)`: a Parameter is its tensor."""
    if not isinstance(data, _TensorRef):
        raise TorchFileError("a Parameter in the pickle does not hold a tensor")
    return data


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "UntypedStorage"): _DTYPES["uint8"],
    ("torch.storage", "UntypedStorage"): _DTYPES["uint8"],
    **{(module, name): _DTYPES[dtype] for name, dtype in _STORAGES.items() for module in ("torch", "torch.cuda")},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},  # dtype arguments of `_rebuild_tensor_v3`
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals in `_GLOBALS`; records each storage the pickle names in `self.storages`."""

    def __init__(self, file: BinaryIO):
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, tuple[np.dtype, int]] = {}  # key -> (element dtype, element count)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise TorchFileError(
            f"refusing to load {module}.{name}: the pickle names code, and this reader accepts only tensors, "
            "storages and OrderedDict (it never runs code from a weights file). Save the weights alone, e.g. "
            "torch.save(model.state_dict(), path), or convert them to .safetensors"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise TorchFileError(f"unsupported persistent id {str(pid)[:80]} (only storages are read)")
        _, dtype, key, _location, numel, *view = pid
        if not (isinstance(dtype, np.dtype) and isinstance(numel, int) and numel >= 0):
            raise TorchFileError(f"malformed storage reference {str(pid)[:80]}")
        key = str(key)
        self.storages[key] = (dtype, numel)
        if view and view[0] is not None:  # legacy files: a view into a root storage
            _view_key, offset, size = view[0]
            if not 0 <= offset <= offset + size <= numel:
                raise TorchFileError(f"a storage view outside its storage {str(pid)[:80]}")
            return _Storage(key, dtype, offset * dtype.itemsize, size * dtype.itemsize)
        return _Storage(key, dtype, 0, numel * dtype.itemsize)


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """Entry `name`, which may hold at most `limit` bytes: one that declares more is refused unread, and no more than
    `limit` bytes are ever inflated (zipfile stops at the declared size and refuses an entry whose header understates
    it by its CRC), so a small file cannot make the reader allocate a huge buffer."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise TorchFileError(f"{name} holds {info.file_size} bytes, more than the {limit} its tensors declare")
    with archive.open(info) as entry:
        return entry.read(limit)


def _read_zip(f: BinaryIO) -> tuple[Any, dict[str, bytes]]:
    with zipfile.ZipFile(f) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError("a zip archive, but not one written by torch.save (no <archive>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and _read_entry(archive, prefix + "byteorder", len(b"little")) != b"little":
            raise TorchFileError("a big-endian file: re-save it on a little-endian machine")
        with archive.open(pickles[0]) as f:
            unpickler = _Unpickler(f)
            obj = unpickler.load()
        buffers = {}  # a storage absent from the archive is reported by the first tensor that needs it
        for key, (dtype, numel) in unpickler.storages.items():
            if f"{prefix}data/{key}" in names:
                buffers[key] = _read_entry(archive, f"{prefix}data/{key}", numel * dtype.itemsize)
    return obj, buffers


def _read_legacy(f: BinaryIO) -> tuple[Any, dict[str, bytes]]:
    if _Unpickler(f).load() != _LEGACY_MAGIC:
        raise TorchFileError("not a PyTorch file (neither a zip archive nor the legacy magic number)")
    if _Unpickler(f).load() != _LEGACY_PROTOCOL:
        raise TorchFileError("an unknown legacy PyTorch protocol version")
    info = _Unpickler(f).load()
    if not (isinstance(info, dict) and info.get("little_endian", True)):
        raise TorchFileError("a big-endian file: re-save it on a little-endian machine")
    unpickler = _Unpickler(f)
    obj = unpickler.load()
    keys = _Unpickler(f).load()
    if not isinstance(keys, list):
        raise TorchFileError("the list of storage keys is missing")
    buffers = {}
    for key in keys:
        if key not in unpickler.storages:
            raise TorchFileError(f"storage {key} is listed but no tensor uses it")
        dtype, numel = unpickler.storages[key]
        count = int.from_bytes(f.read(8), "little", signed=True)
        if count != numel or numel * dtype.itemsize > os.fstat(f.fileno()).st_size - f.tell():
            raise TorchFileError(f"truncated: storage {key} should hold {numel} elements")
        buffers[key] = f.read(numel * dtype.itemsize)
    return obj, buffers


def _to_array(ref: _TensorRef, buffers: dict[str, bytes]) -> np.ndarray:
    """Copies a tensor out of its storage: a C-contiguous array that owns its memory."""
    if ref.storage.key not in buffers:
        raise TorchFileError(f"storage {ref.storage.key} is missing from the file")
    raw = buffers[ref.storage.key][ref.storage.start : ref.storage.start + ref.storage.nbytes]
    flat = np.frombuffer(raw, ref.dtype, count=len(raw) // ref.dtype.itemsize)
    if ref.offset < 0 or any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride):
        raise TorchFileError(f"a tensor with negative offset, size or stride {ref.size} / {ref.stride}")
    if 0 in ref.size:
        return np.zeros(ref.size, ref.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= flat.size:  # as_strided does no bounds checks: never let a file point past its storage
        raise TorchFileError(f"a tensor of size {ref.size} reaches past the end of its storage (truncated?)")
    strides = tuple(s * ref.dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset :], shape=ref.size, strides=strides, writeable=False)
    return np.array(view, order="C")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, _TensorRef) for v in obj.values())


def _state_dict(obj: Any) -> dict:
    """The flat name -> tensor dict in `obj`: `obj` itself, or one level down in a checkpoint dict."""
    if _is_state_dict(obj):
        return obj
    if not isinstance(obj, dict):
        raise TorchFileError(f"the file holds a {type(obj).__name__}, not a state dict (a dict of name -> tensor)")
    inner = [k for k, v in obj.items() if _is_state_dict(v)]
    preferred = [k for k in _WRAPPER_KEYS if k in inner]
    if len(inner) == 1 or preferred:
        return obj[(preferred or inner)[0]]
    keys = ", ".join(map(repr, list(obj)[:12]))
    what = "several state dicts" if inner else "no state dict (a dict of name -> tensor)"
    raise TorchFileError(f"the file holds a dict with keys {keys}: {what}; save the model's state_dict() alone")


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d state dict (zip or legacy format) as {name: np.ndarray}, running no code from it.

    A checkpoint dict that wraps the state dict (e.g. {"state_dict": ..., "epoch": 3}) is unwrapped one level.
    Raises TorchFileError for corrupt or truncated files, anything but tensors, and any global besides the
    tensor-rebuild functions, storage types and OrderedDict.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            zipped = f.read(4) == b"PK\x03\x04"
            f.seek(0)
            obj, buffers = _read_zip(f) if zipped else _read_legacy(f)
            return {str(k): _to_array(v, buffers) for k, v in _state_dict(obj).items()}
        except TorchFileError as e:
            raise TorchFileError(f"{path.name}: {e}") from None
        except Exception as e:  # a malformed file can make the pickle/zip machinery fail in many ways
            raise TorchFileError(f"{path.name}: corrupt or truncated PyTorch file ({type(e).__name__}: {e})") from e
