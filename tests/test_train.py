"""The training run end to end: both phases, parallel modes, resume after a kill, multi-host, bad runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import train_util
from tests.configs import tiny
from tljax.training import checkpoint, preemption, train

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """(workdir, summary) of an uninterrupted tiny run (in this process): what interrupted runs must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.run(tiny.get_config(str(folder)), str(workdir))


def test_both_phases_end_to_end(folder, reference):
    workdir, summary = reference
    assert [p["name"] for p in summary["phases"]] == ["head", "all"]
    assert summary["test_accuracy"] > 0.6  # three classes: chance is 0.33
    trainable = summary["num_trainable_params_per_phase"]
    assert trainable[0] < trainable[1] == summary["num_params"]
    assert json.loads((workdir / "summary.json").read_text()) == summary
    for plot in ("learning_curves.png", "confusion_matrix.png"):
        assert (workdir / "plots" / plot).stat().st_size > 1000
    assert list(workdir.glob("events.out.tfevents.*"))
    assert json.loads((workdir / "normalization.json").read_text())
    # What it trained on: 60 images, carved 80/10/10 as the folder has no split folders.
    assert summary["data"] == {
        "source": f"folder:{folder}", "classes": ["class0", "class1", "class2"],
        "splits": {"train": {"split": "train[:80%]", "examples": 48}, "val": {"split": "train[80%:90%]", "examples": 6},
                   "test": {"split": "train[90%:]", "examples": 6}}}


def test_train_metrics_are_logged_every_log_every_steps(reference):
    lines = train_util.metric_lines(reference[0])
    epochs = [line for line in lines if "val_loss" in line]
    windows = [line for line in lines if "train_step_loss" in line]
    assert [line["step"] for line in epochs] == [6, 12, 18, 24]  # one line per epoch: 2 epochs x 2 phases
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= epochs[0].keys()
    assert [line["step"] for line in windows] == list(range(3, 25, 3))  # log_every_steps=3
    # Each window averages its own 3 steps (not the epoch so far): two windows of equal batches make up an epoch.
    for k, epoch in enumerate(epochs):
        assert windows[2 * k]["train_step_loss"] != windows[2 * k + 1]["train_step_loss"]
        for metric in ("loss", "accuracy"):
            pair = [windows[2 * k][f"train_step_{metric}"], windows[2 * k + 1][f"train_step_{metric}"]]
            assert np.mean(pair) == pytest.approx(epoch[f"train_{metric}"], rel=1e-6)
    # Every epoch line carries the epoch's speed: images/s and the loop thread's CPU time per step.
    raw = [json.loads(line) for line in (reference[0] / "metrics.jsonl").read_text().splitlines()]
    speeds = [(line["train_images_per_s"], line["train_host_ms_per_step"]) for line in raw if "val_loss" in line]
    assert len(speeds) == 4 and all(rate > 0 and host_ms > 0 for rate, host_ms in speeds)


# The fine-tuning techniques, all on: EMA (with warm-up in phase 2), label smoothing, mixup and CutMix, layer decay,
# L2-SP.
TECHNIQUES = ("--config.phases[0].ema_decay=0.5", "--config.phases[1].ema_decay=0.9",
              "--config.phases[1].ema_warmup=True", "--config.phases[0].label_smoothing=0.1",
              "--config.phases[1].label_smoothing=0.1", "--config.data.mixup_alpha=0.4",
              "--config.data.cutmix_alpha=1.0", "--config.phases[1].layer_decay=0.75", "--config.phases[1].l2sp=0.01")


def test_pmap_jit_and_one_device_give_the_same_parameters_and_ema(folder, tmp_path):
    # With mixing, pmap pairs examples across devices and every device draws the same mix: the same batches as jit.
    runs = {"one": ({}, "jit"), "pmap": (FOUR_DEVICES, "pmap"), "jit": (FOUR_DEVICES, "jit")}
    states = {}
    for name, (env, mode) in runs.items():
        result = train_util.cli(folder, tmp_path / name, f"--config.parallelism={mode}", *TECHNIQUES, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        states[name] = train_util.final_state(tmp_path / name)
    for name in ("pmap", "jit"):
        train_util.assert_same_params(states["one"], states[name], atol=1e-5)
        train_util.assert_same_params(states["one"]["ema"], states[name]["ema"], atol=1e-5)
    # The EMA compared is not a copy of the weights.
    assert not np.allclose(states["one"]["ema"]["params"]["head"]["out"]["kernel"],
                           states["one"]["params"]["head"]["out"]["kernel"], atol=1e-4)


def test_batch_not_divisible_by_devices_is_refused_before_compiling(folder, tmp_path):
    result = train_util.cli(folder, tmp_path / "run", "--config.data.batch_size=6", env=FOUR_DEVICES)
    assert result.returncode != 0
    assert "divisible" in result.stderr and "4" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the run made anything


def _wait_for_checkpoint(workdir, minimum: int, process: subprocess.Popen) -> None:
    directory = workdir / "checkpoints"
    for _ in range(3000):
        steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()] if directory.exists() else []
        if steps and max(steps) >= minimum:
            return
        assert process.poll() is None, (workdir.parent / f"{workdir.name}.log").read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_resume_after_kill_and_preemption_matches_an_uninterrupted_run(folder, reference, tmp_path):
    # 12 steps per phase. SIGKILL inside phase 1, then SIGTERM (preemption) after step 15 (phase 2, between two
    # checkpoints: only the signal saves there), then run to the end.
    run = tmp_path / "interrupted"
    process = train_util.cli(folder, run, wait=False)
    _wait_for_checkpoint(run, 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped = train_util.cli(folder, run, env={preemption.TEST_SIGNAL_VARIABLE: "15"})
    assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]  # 75: saved, rerun me
    assert "SIGTERM: saved checkpoint at step 15; rerun the same command to resume" in stopped.stderr
    assert f"data: folder:{folder}; train 'train[:80%]': 48 examples; val 'train[80%:90%]'" in stopped.stderr
    ckpt = checkpoint.Checkpointer(str(run / "checkpoints"), read_only=True)
    assert ckpt.manager.latest_step() == 15 and ckpt.meta(15)["phase_step"] == 3
    ckpt.close()
    final = train_util.cli(folder, run)
    assert final.returncode == 0, final.stderr
    workdir, summary = reference
    train_util.assert_same_params(train_util.final_state(workdir), train_util.final_state(run), atol=0)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert train_util.metric_lines(run) == train_util.metric_lines(workdir)  # no duplicated or lost lines


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
    cfg.allow_recipe_change = True  # a longer phase is a change of recipe
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
    assert all(np.all(np.isfinite(x)) for x in train_util.flat(state["params"]).values())


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


def _two_processes(folder, workdir, logs, env: dict[int, dict[str, str]] | None = None,
                   timeout: float = 300) -> list[int]:
    """Runs the tiny config as a two-process run (2 CPU devices each, gloo), the CLI recording each process's reads
    in logs/read<i>.jsonl; returns the exit statuses. A run still going after `timeout` seconds is killed and the
    test fails: a hang must not stall CI."""
    port = _free_port()
    processes = []
    for i in range(2):
        process_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_NUM_CPU_DEVICES": "2",
                       "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                       "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "RECORD": str(logs / f"read{i}.jsonl"),
                       **(env or {}).get(i, {})}
        cmd = [sys.executable, "-c", RECORDING_MAIN, f"--config={train_util.TINY}:{folder}", f"--workdir={workdir}"]
        with open(logs / f"process{i}.log", "ab") as log:
            processes.append(subprocess.Popen(cmd, cwd=train_util.ROOT, env=process_env, stdout=log,
                                              stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two processes did not finish in {timeout} s (a hang?):\n"
                    + "\n".join((logs / f"process{i}.log").read_text()[-2000:] for i in range(2)))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_two_processes_stopped_by_sigterm_to_one_resume_to_match_one_process(folder, reference, tmp_path):
    workdir = tmp_path / "multi"
    # Only process 1 receives SIGTERM (after step 5, inside phase 1's first epoch); process 0 learns it from the
    # sum of the flags. Without that agreement one process enters the collective save while the other trains on,
    # they wait for each other, and the timeout fails the test.
    statuses = _two_processes(folder, workdir, tmp_path, env={1: {preemption.TEST_SIGNAL_VARIABLE: "5"}})
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert statuses == [preemption.EXIT_STATUS] * 2, [log[-3000:] for log in logs]
    saved = [re.findall(r"SIGTERM: saved checkpoint at step (\d+)", log) for log in logs]
    assert saved == [["6"], ["6"]]  # both after the step following the signal's, where they read the flags' sum
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    assert ckpt.manager.latest_step() == 6
    ckpt.close()

    statuses = _two_processes(folder, workdir, tmp_path)
    assert statuses == [0, 0], [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
    train_util.assert_same_params(train_util.final_state(reference[0]), train_util.final_state(workdir), atol=1e-5)
    summary = json.loads((workdir / "summary.json").read_text())
    assert [p["val_accuracy"] for p in summary["phases"]] == [p["val_accuracy"] for p in reference[1]["phases"]]
    assert summary["test_loss"] == pytest.approx(reference[1]["test_loss"], abs=1e-5)
    # Each process selected (and so decoded) only its half of every global batch; side by side, all of it. The
    # stop came at an epoch's end, where the batches put on the devices one step ahead had already started epoch 2's
    # iterator: the stopped run read epochs 1-2, the resumed run epochs 2-4.
    reads = [[json.loads(line) for line in (tmp_path / f"read{i}.jsonl").read_text().splitlines()] for i in (0, 1)]
    assert len(reads[0]) == len(reads[1]) == 5
    assert reads[0][1]["global"] == reads[0][2]["global"]  # epoch 2, started again by the resumed run
    for a, b in zip(*reads):
        assert a["global"] == b["global"]
        np.testing.assert_array_equal(np.concatenate([a["local"], b["local"]], axis=1), a["global"])
    # Only process 0 wrote logs: the reference's metrics lines, one TensorBoard file per run.
    assert [line["step"] for line in train_util.metric_lines(workdir)] == [
        line["step"] for line in train_util.metric_lines(reference[0])]
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 2


def test_cached_features_give_the_same_head_as_running_the_backbone(folder, tmp_path):
    states, summaries = {}, {}
    for cached in (False, True):
        cfg = tiny.get_config(str(folder))
        cfg.phases = cfg.phases[:1]
        cfg.phases[0].cache_features = cached
        cfg.phases[0].ema_decay = 0.8  # on cached features, the EMA covers the head (the backbone is frozen)
        cfg.model.head.dropout = 0.3  # the head's dropout masks must match too
        summaries[cached] = train.run(cfg, str(tmp_path / str(cached)))
        states[cached] = train_util.final_state(tmp_path / str(cached))
    train_util.assert_same_params(states[False], states[True], atol=1e-6)
    train_util.assert_same_params(states[False]["ema"], states[True]["ema"], atol=1e-6)
    for key in ("val_accuracy", "val_loss", "val_ema_accuracy", "val_ema_loss"):
        assert summaries[True]["phases"][0][key] == pytest.approx(summaries[False]["phases"][0][key], abs=1e-6)
