"""Known weight names -> download URL and checksum; downloads once into a local cache.

(Placeholder interface: `resolve` accepts local files only until the registry lands.)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tljax.pretrained.prep import Preprocessing


@dataclasses.dataclass(frozen=True)
class KnownWeights:
    model: str
    url: str
    sha256: str | None = None
    convention: str | None = None
    prep: Preprocessing | None = None


KNOWN: dict[str, KnownWeights] = {}


def resolve(source: str | os.PathLike, model: str) -> tuple[Path, KnownWeights | None]:
    return Path(source), None
