"""Helpers for the training tests: a small image folder, running the CLI, reading a run's final parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.py")


def image_folder(root: Path, classes: int = 3, per_class: int = 20, size: int = 20, overlap: float = 0.0) -> Path:
    """`root/<class>/<i>.png`, classes told apart by brightness, so a tiny model can learn them.

    overlap: the standard deviation of each image's brightness around its class's (60 apart): with 30 or more, the
    classes overlap and a model makes mistakes to show.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            brightness = 60 + 60 * c + (rng.normal(0, overlap) if overlap else 0)
            pixels = np.clip(rng.normal(brightness, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(pixels))
    return root


def cli(folder: Path, workdir: Path, *overrides: str, env: dict | None = None, wait: bool = True):
    """Runs `python -m tljax.main` on the tiny config; returns the CompletedProcess (or the Popen if not wait)."""
    cmd = [sys.executable, "-m", "tljax.main", f"--config={TINY}:{folder}", f"--workdir={workdir}", *overrides]
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    if not wait:  # output to a file: a pipe nobody reads would block the child once full
        log = open(workdir.parent / f"{workdir.name}.log", "ab")
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    result = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    return result


def final_state(workdir: Path) -> dict:
    """The newest checkpoint's state as a dict of numpy arrays."""
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return state
