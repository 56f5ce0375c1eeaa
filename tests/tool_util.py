"""Helpers for the tests of the commands that use a trained run (predict, evaluate, export, report)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `directory`: equal snapshots = nothing modified."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            stat = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), directory)] = (stat.st_size, stat.st_mtime_ns)
    return out


def tool(module: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `python -m tljax.<module> ARGS` from the project root."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", f"tljax.{module}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
