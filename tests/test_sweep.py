"""Sweeps (`tljax.research.sweeps`, `sweep_runner`, `sweep_report`): shared phases trained once and each variant equal
to its independent run, bit for bit, through a preemption, a diverging and an invalid variant and reruns; the
comparison; resuming into phases not started yet; the lock of a shared prefix."""

from __future__ import annotations

import json
import os
import threading
import time

import jax
import numpy as np
import pytest
from ml_collections.config_flags import config_path

from tests import train_util
from tests.configs import tiny
from tljax import report
from tljax.research import sweep_report, sweep_runner, sweeps
from tljax.training import checkpoint, preemption, train

RATES = (1e-3, 1e-2, 3e-2)  # phase 2's learning rate in the variants that finish


pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny config with one epoch (6 steps) per phase, locked as the command line's is."""
    cfg = tiny.get_config(str(train_util.image_folder(tmp_path_factory.mktemp("images"))))
    for phase in cfg.phases:
        phase.epochs = 1
    cfg.lock()
    return cfg


@pytest.fixture(scope="module")
def swept(base, tmp_path_factory):
    """A sweep over phase 2's learning rate (three good rates, one that diverges, one that validation refuses) run
    three times: stopped by SIGTERM at step 9 (phase 2 of the first variant), resumed to the end, and again. Returns
    (workdir, variants, the phases each call started training, the records of the 2nd and 3rd calls)."""
    root = tmp_path_factory.mktemp("sweep")
    runs = sweeps.variants(base, sweeps.product({"phases[1].optimizer.learning_rate": RATES + (1e38, -1.0)}))
    calls: list[list[int]] = []
    original = train._train_phase

    def counting(run, k, *args, **kwargs):
        calls[-1].append(k)
        return original(run, k, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "_train_phase", counting)
        patch.setenv(preemption.TEST_SIGNAL_VARIABLE, "9")
        calls.append([])
        with pytest.raises(preemption.Preempted):
            sweep_runner.run(str(root), runs)
        patch.delenv(preemption.TEST_SIGNAL_VARIABLE)
        calls.append([])
        finished = sweep_runner.run(str(root), runs)
        calls.append([])
        again = sweep_runner.run(str(root), runs)
    return root, runs, calls, finished, again


def test_the_shared_phase_trains_once_and_each_variant_equals_its_independent_run(swept, tmp_path):
    root, runs, calls, finished, again = swept
    assert [v.name for v in runs] == ["lr1e-3", "lr0.01", "lr0.03", "lr1e+38", "lr-1"]
    # Phase 1 once, for everyone; phase 2 of the first variant until SIGTERM, then resumed; the diverging variant
    # is retried by the last call, where everything else is finished.
    assert calls == [[0, 1], [1, 1, 1, 1], [1]]
    statuses = [(r["status"], (r["error"] or "").split(":")[0]) for r in finished]
    assert statuses == [("done", "")] * 3 + [("failed", "TrainingDivergedError"), ("failed", "ConfigError")]
    assert "learning_rate" in finished[4]["error"]
    assert again == finished[:3] + [again[3], finished[4]]  # finished variants are skipped, records unchanged
    (key,) = os.listdir(root / sweep_runner.SHARED)
    assert all(r["shared"] == [{"key": key, "phases": 1}] for r in finished[:4])
    for variant in runs[:3]:
        alone = tmp_path / variant.name
        summary = train.run(variant.config, str(alone))
        ours, theirs = train_util.final_state(root / variant.name), train_util.final_state(alone)
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))
        assert json.loads((root / variant.name / "summary.json").read_text()) == summary
        assert train_util.metric_lines(root / variant.name) == train_util.metric_lines(alone)
        written = json.loads((root / variant.name / "config.json").read_text())
        assert written["phases"][1]["optimizer"]["learning_rate"] == variant.overrides[
            "phases[1].optimizer.learning_rate"]


def test_the_comparison_covers_every_variant_and_report_works_on_a_variant(swept, tmp_path):
    root, runs, _, finished, _ = swept
    table = sweep_report.write(str(root), runs)
    saved = json.loads((root / "sweep.json").read_text())
    assert saved["variants"] == json.loads(json.dumps(table))
    done = [r for r in table if r["status"] == "done"]
    best = max(done, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert saved["best"] == best["name"] and [r["name"] for r in table if r["best"]] == [best["name"]]
    summary = json.loads((root / "lr0.01" / "summary.json").read_text())
    row = table[1]
    assert row["phases"] == [{k: p[k] for k in ("name", "val_accuracy", "val_loss")} for p in summary["phases"]]
    assert (row["test_accuracy"], row["seconds"]) == (summary["test_accuracy"], finished[1]["seconds"])
    assert table[3]["error"].startswith("TrainingDivergedError") and table[3]["test_accuracy"] is None
    csv_lines = (root / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("best,name,status,phases[1].optimizer.learning_rate,phase1_val_accuracy,")
    assert [line.split(",")[1] for line in csv_lines[1:]] == [v.name for v in runs]
    text = sweep_report.text(table)
    assert f"* best: {best['name']}" in text and "test split never picks" in text
    page = (root / "sweep.html").read_text()
    assert "test split never picks the winner" in page and page.count('src="data:image/png;base64,') == 2
    # A variant's workdir is an ordinary run's: the report of it evaluates its final checkpoint.
    output = report.write(str(root / "lr0.01"), str(tmp_path / "report.html"))
    assert f"{summary['test_accuracy']:.4f}" in open(output).read()


def test_the_best_variant_is_picked_by_validation_never_by_test(tmp_path):
    def variant(name: str, val: float, test: float, loss: float = 1.0) -> None:
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / sweep_runner.RECORD).write_text(json.dumps(
            {"name": name, "overrides": {"seed": len(name)}, "status": "done", "error": None, "seconds": 1.0,
             "shared": []}))
        (workdir / "summary.json").write_text(json.dumps(
            {"phases": [{"name": "head", "val_accuracy": val, "val_loss": loss}], "weights": "raw",
             "test_accuracy": test, "test_loss": 1.0}))

    variant("a", val=0.6, test=0.9)
    variant("bb", val=0.8, test=0.5)
    variant("ccc", val=0.7, test=0.95)
    table = sweep_report.rows(str(tmp_path))
    assert [(r["name"], r["best"]) for r in table] == [("a", False), ("bb", True), ("ccc", False)]
    variant("dddd", val=0.8, test=0.5, loss=0.5)  # as accurate as bb, with a lower validation loss
    assert [r["name"] for r in sweep_report.rows(str(tmp_path)) if r["best"]] == ["dddd"]


def test_the_sweep_page_sorts_by_a_clicked_column(swept, tmp_path):
    from tests import browser

    root, runs, _, _, _ = swept
    sweep_report.write(str(root), runs)
    headers = ["best", "name", "status", "phases[1].optimizer.learning_rate"]
    probe = tmp_path / "probe.html"  # the page plus a script that clicks headers and records the row order
    probe.write_text((root / "sweep.html").read_text().replace("</body>", f"""<script>
      const names = () => [...document.querySelectorAll("tbody tr")].map(r => r.id.slice(8)).join(" ");
      const header = i => document.querySelectorAll("th")[i];
      const orders = [names()];
      header({headers.index("phases[1].optimizer.learning_rate")}).click(); orders.push(names());
      header({headers.index("phases[1].optimizer.learning_rate")}).click(); orders.push(names());
      header({headers.index("best")}).click(); header({headers.index("best")}).click(); orders.push(names());
      document.body.setAttribute("data-orders", orders.join("|"));
    </script></body>"""))
    result = browser.dump_dom(probe)
    orders = result.stdout.split('data-orders="')[1].split('"')[0].split("|")
    assert orders[0] == "lr1e-3 lr0.01 lr0.03 lr1e+38 lr-1"  # as swept
    assert orders[1] == "lr-1 lr1e-3 lr0.01 lr0.03 lr1e+38"  # by value, not as text
    assert orders[2] == "lr1e+38 lr0.03 lr0.01 lr1e-3 lr-1"
    best = json.loads((root / "sweep.json").read_text())["best"]
    assert orders[3].split()[0] == best  # descending: the starred row first


def test_phases_not_started_yet_may_change_on_resume_and_started_ones_may_not(swept, base):
    root, runs, _, _, _ = swept
    (key,) = os.listdir(root / sweep_runner.SHARED)
    params = train_util.final_state(root / sweep_runner.SHARED / key)["params"]
    ckpt = checkpoint.Checkpointer(str(root / sweep_runner.SHARED / key / "checkpoints"), read_only=True)
    try:
        later = runs[2].config.copy_and_resolve_references()
        later.phases[1].trainable, later.phases[1].epochs = "^head/", 3
        step, meta, changed = ckpt.resume(later, params)
        assert (step, meta["phase"], changed) == (6, 0, True)
        assert meta["recipe"]["phases[1].epochs"] == 3 and meta["identity"]["phases"][1][1] == "^head/"
        assert meta["recipe_changes"] == []  # nothing trained with the old values
        for field, value in (("phases[0].optimizer.learning_rate", 0.5), ("phases[1].l2sp", 0.1)):
            cfg = runs[2].config.copy_and_resolve_references()
            config_path.set_value(field, cfg, value)  # phase 1 started; L2-SP's anchor concerns every phase
            with pytest.raises(checkpoint.RecipeChangedError, match=field.replace("[", r"\[").replace("]", r"\]")):
                ckpt.resume(cfg, params)
        renamed = runs[2].config.copy_and_resolve_references()
        renamed.phases[0].name = "other"
        with pytest.raises(checkpoint.CheckpointMismatchError, match="phases"):
            ckpt.resume(renamed, params)
    finally:
        ckpt.close()


def test_a_stale_or_released_lock_is_taken_over_and_a_done_prefix_is_not_waited_for(tmp_path):
    done = str(tmp_path / sweep_runner.DONE)
    held = sweep_runner.PrefixLock(str(tmp_path), stale_s=60, poll_s=0.01)
    assert held.acquire(done) and held.path.endswith(".lock.0")
    held.release()  # as after a failure: the next job takes generation 1
    taker = sweep_runner.PrefixLock(str(tmp_path), stale_s=60, poll_s=0.01)
    assert taker.acquire(done) and taker.path.endswith(".lock.1")
    taker._stop.set()  # its job "dies": no refreshes, no release
    taker._heartbeat.join()
    old = time.time() - 120
    os.utime(taker.path, (old, old))
    third = sweep_runner.PrefixLock(str(tmp_path), stale_s=60, poll_s=0.01)
    assert third.acquire(done) and third.path.endswith(".lock.2")
    results = []
    waiter = threading.Thread(target=lambda: results.append(
        sweep_runner.PrefixLock(str(tmp_path), stale_s=60, poll_s=0.01).acquire(done)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # the lock is held and refreshed: it waits
    (tmp_path / sweep_runner.DONE).write_text("{}")  # the holder finished: the waiter returns without the lock
    waiter.join(10)
    assert results == [False]
    third.release()


def test_grids_sweep_files_and_names(base, tmp_path):
    rates = sweeps.grid("phases[1].optimizer.learning_rate=1e-4, 3e-4,1e-3", base)
    assert rates == {"phases[1].optimizer.learning_rate": [1e-4, 3e-4, 1e-3]}  # parsed as --config.<path>= is
    assert sweeps.grid("model.head.hidden=(4, 8),(2,)", base) == {"model.head.hidden": [(4, 8), (2,)]}
    path = tmp_path / "sweep.py"
    path.write_text("from tljax.research import sweeps\n\ndef get_sweep():\n    return sweeps.product("
                    "{'phases[1].schedule.name': ('cosine_decay_schedule', 'constant')})\n")
    runs = sweeps.variants(base, sweeps.combine(sweeps.load(str(path)), sweeps.product(rates)))
    assert [v.name for v in runs][:4] == ["sched-cosine_decay_lr1e-4", "sched-cosine_decay_lr3e-4",
                                          "sched-cosine_decay_lr1e-3", "sched-constant_lr1e-4"]
    assert runs[3].config.phases[1].schedule.name == "constant"
    assert runs[3].config.phases[1].optimizer.learning_rate == 1e-4 and base.phases[1].optimizer.learning_rate == 1e-2
    both = sweeps.variants(base, sweeps.product({"phases[0].optimizer.learning_rate": (0.1,),
                                                 "phases[1].optimizer.learning_rate": (0.2,)}))
    assert both[0].name == "p0lr0.1_p1lr0.2"  # one field name in two phases: the phase tells them apart


@pytest.mark.parametrize("make, message", [
    (lambda b: sweeps.variants(b, [{"phases[1].optimizer.learnig_rate": 1.0}]),
     "phases[1].optimizer.learnig_rate is not a config field (did you mean phases[1].optimizer.learning_rate?)"),
    (lambda b: sweeps.variants(b, [{"phases[1].epochs": 1.5}]),
     "variant ep1.5: phases[1].epochs=1.5: Could not override field 'epochs'"),
    (lambda b: sweeps.grid("phases[1].epochs=two", b), "--grid phases[1].epochs: 'two' is not a value"),
    (lambda b: sweeps.grid("phases[1].epochs=", b), "the grid of phases[1].epochs is empty"),
    (lambda b: sweeps.grid("phases[1].epochs", b), "write 'field.path=value1,value2,...'"),
    (lambda b: sweeps.product({"phases[1].epochs": []}), "needs a non-empty list"),
    (lambda b: sweeps.variants(b, [{"data.normalization": "none"}, {"data.normalization": "none"}]),
     "two variants are both named 'normalization-none'"),
    (lambda b: sweeps.variants(b, [{"phases[1].schedule": {"name": "constant"}}], fixed=["phases[1].schedule.name"]),
     "phases[1].schedule is swept and also set by --config.phases[1].schedule.name"),
    (lambda b: sweeps.combine([{"seed": 1}], [{"seed": 2}]), "seed is swept twice"),
    (lambda b: sweeps.shard("1/1"), "--variant_shard='1/1'"),
    (lambda b: sweeps.shard("0-2"), "--variant_shard='0-2'"),
])
def test_bad_sweeps_are_refused_naming_the_override(base, make, message):
    with pytest.raises(sweeps.SweepError) as refused:
        make(base)
    assert message in str(refused.value)


def test_prefixes_nest_where_groups_part_and_nothing_is_shared_across_data(base):
    three = base.copy_and_resolve_references()
    three.phases = list(three.phases) + [three.phases[1].copy_and_resolve_references()]
    runs = sweeps.variants(three, sweeps.product({"phases[1].optimizer.learning_rate": (0.1, 0.2),
                                                  "phases[2].optimizer.learning_rate": (0.3, 0.4)}))
    plan = sweeps.plan(runs)
    assert [(plan[v.name].phases, plan[v.name].members) for v in runs[:2]] == [
        (2, ("p1lr0.1_p2lr0.3", "p1lr0.1_p2lr0.4"))] * 2
    assert plan[runs[2].name].phases == 2 and plan[runs[2].name].key != plan[runs[0].name].key
    assert plan[runs[0].name].parent is plan[runs[2].name].parent  # phase 1, shared by all four
    assert plan[runs[0].name].parent.members == tuple(v.name for v in runs)
    apart = sweeps.variants(base, sweeps.product({"data.image_size": (16, 32)}))
    assert sweeps.plan(apart) == {"px16": None, "px32": None}
