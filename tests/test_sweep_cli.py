"""`python -m tljax.sweep`: two shard jobs at once share one prefix and finish every variant; bad input is refused
before anything trains, naming the override."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import train_util
from tljax.research import sweep_report, sweep_runner

GRID = "--grid=phases[1].optimizer.learning_rate=1e-3,1e-2,3e-2"
ONE_EPOCH = ("--config.phases[0].epochs=1", "--config.phases[1].epochs=1")


def _sweep(folder, workdir, *args: str, log=None) -> subprocess.Popen:
    """Starts `python -m tljax.sweep` on the tiny config, its output to `log` (a file) or a pipe."""
    cmd = [sys.executable, "-m", "tljax.sweep", f"--config={train_util.TINY}:{folder}", f"--workdir={workdir}", *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = log or subprocess.PIPE
    return subprocess.Popen(cmd, cwd=train_util.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_shard_jobs_train_the_shared_phase_once_and_finish_every_variant(folder, tmp_path):
    root = tmp_path / "sweep"
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    jobs = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:
            jobs.append(_sweep(folder, root, GRID, *ONE_EPOCH, f"--variant_shard={i}/2", log=f))
    try:
        statuses = [job.wait(timeout=900) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    texts = [log.read_text() for log in logs]
    assert statuses == [0, 0], [text[-3000:] for text in texts]
    (key,) = os.listdir(root / sweep_runner.SHARED)
    shared = root / sweep_runner.SHARED / key
    # One job trained phase 1 (one lock generation, one epoch of metrics); the other waited for it or found it done.
    assert sum(text.count("training phases 1-1, shared by lr1e-3, lr0.01, lr0.03") for text in texts) == 1
    assert sorted(n for n in os.listdir(shared) if n.startswith(".lock")) == [".lock.0"]
    assert [line["step"] for line in train_util.metric_lines(shared) if "val_loss" in line] == [6]
    names = ["lr1e-3", "lr0.01", "lr0.03"]
    for name in names:  # the --config overrides applied to every variant: 6 steps per phase
        summary = json.loads((root / name / "summary.json").read_text())
        assert [p["steps"] for p in summary["phases"]] == [6, 6]
    assert [r["status"] for r in sweep_report.rows(str(root))] == ["done"] * 3
    assert sorted(r["name"] for r in json.loads((root / "sweep.json").read_text())["variants"]) == sorted(names)
    assert "test split never picks the winner" in "".join(texts)


def test_bad_input_is_refused_before_anything_trains(folder, tmp_path):
    root = tmp_path / "sweep"
    for args, message in (
            (["--grid=phases[1].optimizer.learnig_rate=1e-3,1e-2"],
             "phases[1].optimizer.learnig_rate is not a config field (did you mean "
             "phases[1].optimizer.learning_rate?)"),
            ([GRID, "--variant_shard=2/2"], "--variant_shard='2/2': write i/n with 0 <= i < n")):
        job = _sweep(folder, root, *args)
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 1, output[-3000:]
        assert message in output
        assert not root.exists()
