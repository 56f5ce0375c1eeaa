"""Helpers for the training tests: a small image folder, running the CLI, reading a run's final parameters, and a
compilation cache that lets repeated runs of one config skip compiling."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental.compilation_cache import compilation_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.py")
_CACHE_ENV: dict[str, str] = {}  # what `cli` adds to a run's environment inside `compile_cache`


@contextlib.contextmanager
def compile_cache(directory: Path) -> Iterator[None]:
    """JAX's persistent compilation cache in `directory` for the runs inside, in this process and the ones `cli`
    starts: a test that trains the same config several times (resumes) compiles it once. Afterwards the cache is
    switched off again, so other tests compile (and inspect compiled code) as before."""
    settings = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    _CACHE_ENV.update({name.upper(): str(value) for name, value in settings.items()})
    try:
        yield
    finally:
        _CACHE_ENV.clear()
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


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
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **_CACHE_ENV, **(env or {})}
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


def assert_same_params(a: dict, b: dict, atol: float) -> None:
    """Equal params and batch_stats (to `atol`), leaf by leaf."""
    for part in ("params", "batch_stats"):
        flat_a, flat_b = flat(a[part]), flat(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            np.testing.assert_allclose(flat_a[key], flat_b[key], atol=atol, rtol=0, err_msg=key)


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict of arrays as {"a/b/c": array}."""
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


TIMING = ("train_images_per_s", "train_host_ms_per_step")


def metric_lines(workdir: Path) -> list[dict]:
    """metrics.jsonl without the timing figures (train_images_per_s, train_host_ms_per_step), which no two runs
    share."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]
