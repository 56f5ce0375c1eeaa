"""The training run end to end: both phases, parallel modes, resume after a kill, multi-host, bad runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import train_util
from tests.configs import tiny
from tljax import checkpoint, train

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_util.image_folder(tmp_path_factory.mktemp("images"))


def _assert_same_params(a: dict, b: dict, atol: float) -> None:
    for part in ("params", "batch_stats"):
        flat_a, flat_b = _flat(a[part]), _flat(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            np.testing.assert_allclose(flat_a[key], flat_b[key], atol=atol, rtol=0, err_msg=key)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


def test_both_phases_end_to_end(folder, tmp_path):
    summary = train.run(tiny.get_config(str(folder)), str(tmp_path))
    assert [p["name"] for p in summary["phases"]] == ["head", "all"]
    assert summary["test_accuracy"] > 0.6  # three classes: chance is 0.33
    trainable = summary["num_trainable_params_per_phase"]
    assert trainable[0] < trainable[1] == summary["num_params"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for plot in ("learning_curves.png", "confusion_matrix.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 1000
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4  # one line per epoch: 2 epochs x 2 phases
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= lines[0].keys()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "normalization.json").read_text())


def test_pmap_jit_and_one_device_give_the_same_parameters(folder, tmp_path):
    runs = {"one": ({}, "jit"), "pmap": (FOUR_DEVICES, "pmap"), "jit": (FOUR_DEVICES, "jit")}
    states = {}
    for name, (env, mode) in runs.items():
        result = train_util.cli(folder, tmp_path / name, f"--config.parallelism={mode}", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        states[name] = train_util.final_state(tmp_path / name)
    _assert_same_params(states["one"], states["pmap"], atol=1e-5)
    _assert_same_params(states["one"], states["jit"], atol=1e-5)


def test_batch_not_divisible_by_devices_is_refused_before_compiling(folder, tmp_path):
    result = train_util.cli(folder, tmp_path / "run", "--config.data.batch_size=6", env=FOUR_DEVICES)
    assert result.returncode != 0
    assert "divisible" in result.stderr and "4" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def _wait_for_checkpoint(workdir, minimum: int, process: subprocess.Popen) -> None:
    directory = workdir / "checkpoints"
    for _ in range(3000):
        steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()] if directory.exists() else []
        if steps and max(steps) >= minimum:
            return
        assert process.poll() is None, (workdir.parent / f"{workdir.name}.log").read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_resume_after_kill_and_preemption_matches_an_uninterrupted_run(folder, tmp_path):
    reference = train_util.cli(folder, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    # 12 steps per phase. SIGKILL inside phase 1, then SIGTERM (preemption) inside phase 2, then run to the end.
    run = tmp_path / "interrupted"
    process = train_util.cli(folder, run, wait=False)
    _wait_for_checkpoint(run, 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process = train_util.cli(folder, run, wait=False)
    _wait_for_checkpoint(run, 16, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 0  # a clean exit after saving
    final = train_util.cli(folder, run)
    assert final.returncode == 0, final.stderr
    _assert_same_params(train_util.final_state(tmp_path / "reference"), train_util.final_state(run), atol=0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "reference" / "summary.json").read_text())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [6, 12, 18, 24]  # no duplicated or lost epochs


def test_a_save_killed_midway_leaves_the_previous_checkpoint(folder, tmp_path):
    cfg = tiny.get_config(str(folder))
    cfg.phases[1].epochs = 1
    train.run(cfg, str(tmp_path))
    latest = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    # What a SIGKILL during an orbax save leaves: a half-written temporary directory for a later step.
    partial = tmp_path / "checkpoints" / f"{latest + 2}.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "state").mkdir()
    cfg.phases[1].epochs = 2
    summary = train.run(cfg, str(tmp_path))
    assert len(summary["phases"]) == 2


def test_checkpoint_of_another_model_is_refused(folder, tmp_path):
    cfg = tiny.get_config(str(folder))
    cfg.phases = cfg.phases[:1]
    cfg.phases[0].steps = 2
    train.run(cfg, str(tmp_path))
    cfg.model.head.hidden = (4,)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="parameter_shapes"):
        train.run(cfg, str(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    cfg = tiny.get_config(str(folder))
    cfg.phases = cfg.phases[:1]
    cfg.checkpoint_every_steps = 1
    cfg.phases[0].optimizer = {"name": "sgd", "learning_rate": 1e38}
    with pytest.raises(train.TrainingDivergedError, match="checkpoint"):
        train.run(cfg, str(tmp_path))
    state = train_util.final_state(tmp_path)
    assert all(np.all(np.isfinite(x)) for x in _flat(state["params"]).values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs the CLI, recording which train examples this process's pipeline selects (before any decoding happens).
RECORDING_MAIN = """
import json, os, sys
from absl import app
from tljax import main
from tljax.data import pipeline
original = pipeline.InputPipeline.train
def recording(self, epoch, start_step=0):
    order = self.train_order(epoch)[start_step:]
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps({"global": order.tolist(), "local": self.local(order).tolist()}) + "\\n")
    return original(self, epoch, start_step)
pipeline.InputPipeline.train = recording
sys.argv = ["tljax.main"] + sys.argv[1:]
app.run(main.main)
"""


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(folder, tmp_path):
    single = train_util.cli(folder, tmp_path / "single", env={"JAX_NUM_CPU_DEVICES": "4"})
    assert single.returncode == 0, single.stderr
    port = _free_port()
    workdir = tmp_path / "multi"
    processes = []
    for i in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_NUM_CPU_DEVICES": "2",
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "RECORD": str(tmp_path / f"read{i}.jsonl")}
        cmd = [sys.executable, "-c", RECORDING_MAIN, f"--config={train_util.TINY}:{folder}", f"--workdir={workdir}"]
        log = open(tmp_path / f"process{i}.log", "wb")
        processes.append(subprocess.Popen(cmd, cwd=train_util.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    for i, p in enumerate(processes):
        assert p.wait(timeout=600) == 0, (tmp_path / f"process{i}.log").read_text()[-3000:]
    _assert_same_params(train_util.final_state(tmp_path / "single"), train_util.final_state(workdir), atol=1e-5)
    # Each process selected (and so decoded) only its half of every global batch; side by side, all of it.
    reads = [[json.loads(line) for line in (tmp_path / f"read{i}.jsonl").read_text().splitlines()] for i in (0, 1)]
    assert len(reads[0]) == len(reads[1]) == 4  # one iterator per epoch
    for a, b in zip(*reads):
        assert a["global"] == b["global"]
        np.testing.assert_array_equal(np.concatenate([a["local"], b["local"]], axis=1), a["global"])
    # Only process 0 wrote logs: one metrics line per epoch, one TensorBoard file.
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 4
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1


def test_cached_features_give_the_same_head_as_running_the_backbone(folder, tmp_path):
    states = {}
    for cached in (False, True):
        cfg = tiny.get_config(str(folder))
        cfg.phases = cfg.phases[:1]
        cfg.phases[0].cache_features = cached
        cfg.model.head.dropout = 0.3  # the head's dropout masks must match too
        summary = train.run(cfg, str(tmp_path / str(cached)))
        states[cached] = train_util.final_state(tmp_path / str(cached))
        assert summary["phases"][0]["val_accuracy"] >= 0
    _assert_same_params(states[False], states[True], atol=1e-6)
    assert not (tmp_path / "True" / "features").exists()


def test_cached_features_refuse_a_trainable_backbone(folder, tmp_path):
    cfg = tiny.get_config(str(folder))
    cfg.phases[1].cache_features = True
    with pytest.raises(ValueError, match="cache_features needs the whole backbone frozen"):
        train.run(cfg, str(tmp_path))
