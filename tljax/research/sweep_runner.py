"""Running a sweep's variants one after another: shared prefixes trained once under a lock, each variant as an
ordinary run in `workdir/<name>/`, and a record of each (`variant.json`) for the comparison.

A shared prefix (`sweeps.Prefix`) trains in `workdir/_shared/<key>/` with `train.run(..., phases=k)`, which stops
after the checkpoint of phase k's boundary, and then writes `prefix.json` (the marker that it is done, with its
training time). A variant that starts from it gets a copy of that checkpoint and of the run's files (metrics,
TensorBoard events, normalization statistics, description) in its empty workdir and resumes there, as a run
stopped at that boundary would: its own later phases are phases the checkpoint has not started, which a resume
takes from the config (`checkpoint.Checkpointer.resume`), so its parameters equal those of an independent run.

Several jobs (`--variant_shard`) may need one prefix. The first to get there creates `.lock.0` in its directory
with O_CREAT|O_EXCL and trains it, refreshing the file's modification time every `stale_s / 10` seconds; the
others poll until `prefix.json` appears. A job that fails marks its lock released; a lock neither released nor
refreshed for `stale_s` seconds is stale (its holder died). Either way the next job takes over by creating the
next generation, `.lock.1`, ..., with O_EXCL, so exactly one job wins each takeover; it resumes the prefix from
its newest checkpoint.

Variants that differ only in numbers of a cached-features phase k (`heads.group_key`: learning rate, weight decay,
label smoothing, schedule arguments, ...) train phase k together, as the heads of one vmapped step
(`heads.train_group`), when the first of them in this job's share comes up: each starts from its shared prefix
(or its empty workdir, for k = 0), and afterwards resumes alone from its checkpoint at phase k's end. A group that
cannot train together (`heads.NotBatchable`, a diverging head, any error) leaves each variant to train its phase k
alone, from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import traceback
from typing import Any, Sequence

from absl import logging

from tljax import cli, data
from tljax import config as config_lib
from tljax.research import sweeps
from tljax.training import checkpoint, heads, preemption, train
from tljax.training import workdir as workdir_lib

SHARED = "_shared"  # under the sweep's workdir: one directory per shared prefix
RECORD = "variant.json"  # in each variant's workdir: name, overrides, status, error, training seconds, prefixes
DONE = "prefix.json"  # in a prefix's directory once it has trained
_LOCK = ".lock."


def shared_dir(root: str, key: str) -> str:
    return os.path.join(root, SHARED, key)


def prefix_chain(prefix: sweeps.Prefix | None) -> list[sweeps.Prefix]:
    """The prefix and those it starts from, shortest first."""
    chain = []
    while prefix is not None:
        chain.insert(0, prefix)
        prefix = prefix.parent
    return chain


class PrefixLock:
    """The lock of one shared prefix directory (see the module docstring); `acquire` waits for it."""

    def __init__(self, directory: str, stale_s: float, poll_s: float) -> None:
        self.directory, self.stale_s, self.poll_s = directory, stale_s, poll_s
        self.path: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _latest(self) -> int:
        generations = [int(n[len(_LOCK):]) for n in os.listdir(self.directory)
                       if n.startswith(_LOCK) and n[len(_LOCK):].isdigit()]
        return max(generations, default=-1)

    def _holder(self, generation: int) -> dict[str, Any] | None:
        """Who holds generation `generation` ({"host", "pid"}), or None when it is free: released or stale."""
        path = os.path.join(self.directory, f"{_LOCK}{generation}")
        try:
            age = time.time() - os.stat(path).st_mtime
            with open(path) as f:
                holder = json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # just created, not yet written: held
            return {}
        if holder.get("released"):
            return None
        if age > self.stale_s:
            logging.warning("the lock %s was not refreshed for %.0f s: its holder %s is taken to be dead", path, age,
                            holder)
            return None
        return holder

    def acquire(self, done: str) -> bool:
        """Takes the lock (True), or returns False as soon as the file `done` exists."""
        waiting = False
        while not os.path.exists(done):
            generation = self._latest()
            holder = self._holder(generation) if generation >= 0 else None
            if holder is None:
                path = os.path.join(self.directory, f"{_LOCK}{generation + 1}")
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:  # another job took this generation first
                    continue
                with os.fdopen(fd, "w") as f:
                    json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
                self.path = path
                self._heartbeat = threading.Thread(target=self._refresh, daemon=True)
                self._heartbeat.start()
                if os.path.exists(done):  # its holder finished between the check above and its release
                    self.release()
                    return False
                return True
            if not waiting:
                logging.info("waiting for %s: another job trains it (%s)", self.directory, holder)
                waiting = True
            time.sleep(self.poll_s)
        return False

    def _refresh(self) -> None:
        while not self._stop.wait(self.stale_s / 10):
            os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        self._heartbeat.join()
        workdir_lib.write_json(self.path, {"host": socket.gethostname(), "pid": os.getpid(), "released": True})


def seed(workdir: str, source: str) -> None:
    """Starts the run in `workdir` from the newest checkpoint of the run in `source`: copies that checkpoint and
    the run's top-level files (metrics, TensorBoard events, statistics, description). A workdir that holds
    checkpoints already is left as it is (its run resumes); a copy interrupted before its end is redone."""
    target = os.path.join(workdir, "checkpoints")
    if os.path.isdir(target):
        return
    os.makedirs(workdir, exist_ok=True)
    for entry in os.scandir(source):
        if entry.is_file() and not entry.name.startswith(".") and entry.name not in (DONE, RECORD):
            shutil.copy2(entry.path, os.path.join(workdir, entry.name))
    ckpt = checkpoint.Checkpointer(os.path.join(source, "checkpoints"), read_only=True)
    try:
        step = ckpt.manager.latest_step()
    finally:
        ckpt.close()
    staging = target + ".seeding"  # renamed into place once complete
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(os.path.join(source, "checkpoints", str(step)), os.path.join(staging, str(step)))
    os.rename(staging, target)


def finished(workdir: str, variant: sweeps.Variant) -> bool:
    """Whether `workdir` holds a finished run of the variant's config: summary.json, and config.json with the same
    trained fields (`checkpoint.trained_fields`)."""
    try:
        with open(os.path.join(workdir, "summary.json")) as f1, open(os.path.join(workdir, "config.json")) as f2:
            json.load(f1)
            written = json.load(f2)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return checkpoint.trained_fields(written) == checkpoint.trained_fields(variant.config)


def _record(variant: sweeps.Variant, **fields: Any) -> dict[str, Any]:
    """A variant's record (`RECORD`): its name and overrides, status, error, training seconds and shared prefixes."""
    return {"name": variant.name, "overrides": json.loads(json.dumps(variant.overrides, default=str)),
            "status": "running", "error": None, "seconds": 0.0, "shared": [], **fields}


def read_record(workdir: str) -> dict[str, Any] | None:
    """The record of the variant in `workdir`, None before its first run."""
    try:
        with open(os.path.join(workdir, RECORD)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


class Runner:
    """Runs variants in the sweep's workdir `root`, training each shared prefix at most once."""

    def __init__(self, root: str, plan: dict[str, sweeps.Prefix | None], stale_s: float = 600,
                 poll_s: float = 2, groups: dict[str, tuple[int, list[sweeps.Variant]]] | None = None) -> None:
        self.root, self.plan, self.stale_s, self.poll_s = root, plan, stale_s, poll_s
        self.groups = groups or {}  # variant name -> (phase k, the variants training phase k with it as heads)
        self._failed: dict[str, str] = {}  # prefix key -> the error that stopped it in this job
        self._grouped: set[str] = set()  # variants whose group this job has trained (or tried to)

    def run(self, variant: sweeps.Variant) -> dict[str, Any]:
        """Trains `variant` (skipped when finished; resumed when interrupted) and returns its record, also written
        to its workdir. Any error is recorded ("failed" with the error) instead of raised, except SIGTERM's
        `preemption.Preempted`, which stops the sweep after the run saved."""
        workdir = os.path.join(self.root, variant.name)
        previous = read_record(workdir) or {}
        chain = prefix_chain(self.plan.get(variant.name))
        record = _record(variant, seconds=previous.get("seconds", 0.0),
                         shared=[{"key": p.key, "phases": p.phases} for p in chain],
                         **({"heads": previous["heads"]} if "heads" in previous else {}))
        if finished(workdir, variant):
            logging.info("variant %s: finished already", variant.name)
            return self._write(workdir, {**record, "status": "done"})
        self._write(workdir, record)
        start = None
        try:
            self._prepare(variant)
            if variant.name in self.groups and variant.name not in self._grouped:
                self._train_heads(*self.groups[variant.name])
                record.update({k: v for k, v in (read_record(workdir) or {}).items() if k in ("seconds", "heads")})
            logging.info("variant %s: training in %s", variant.name, workdir)
            start = time.perf_counter()
            train.run(variant.config, workdir)
            record["status"] = "done"
        except preemption.Preempted:
            raise
        except Exception as e:  # recorded: the sweep goes on with the next variant
            error = f"{type(e).__name__}: {e}"
            expected = isinstance(e, cli.USER_ERRORS + (train.TrainingDivergedError,))  # no traceback: not a bug
            logging.error("variant %s failed: %s", variant.name, error if expected else traceback.format_exc())
            record.update(status="failed", error=error)
        finally:
            if start is not None:
                record["seconds"] += time.perf_counter() - start
            self._write(workdir, record)
        return record

    def _prepare(self, variant: sweeps.Variant) -> None:
        """Trains the variant's shared prefixes (if not yet done) and starts its workdir from the deepest one."""
        chain = prefix_chain(self.plan.get(variant.name))
        for prefix in chain:
            self._train_prefix(prefix)
        if chain:
            seed(os.path.join(self.root, variant.name), shared_dir(self.root, chain[-1].key))

    def _train_heads(self, k: int, members: list[sweeps.Variant]) -> None:
        """Trains phase k of the group's unfinished members as heads of one step (`heads.train_group`) and adds
        the time, shared out evenly, and {"phase", "heads"} to each trained member's record; on an error other
        than SIGTERM's, logs it and leaves each member to train alone."""
        self._grouped.update(v.name for v in members)
        todo = [v for v in members if not finished(os.path.join(self.root, v.name), v)]
        if len(todo) < 2:
            return
        start = time.perf_counter()
        try:
            for v in todo:
                self._prepare(v)
            logging.info("phase %d of %s: trained together, as heads of one step", k + 1,
                         ", ".join(v.name for v in todo))
            trained = [todo[i] for i in heads.train_group([v.config for v in todo],
                                                          [os.path.join(self.root, v.name) for v in todo], k)]
        except preemption.Preempted:
            raise
        except Exception as e:  # each member trains its phase k alone instead, from its last checkpoint
            logging.warning("phase %d of %s could not train as heads of one step (%s: %s); they train one by one",
                            k + 1, ", ".join(v.name for v in todo), type(e).__name__, e)
            return
        seconds = (time.perf_counter() - start) / max(len(trained), 1)
        for v in trained:
            workdir = os.path.join(self.root, v.name)
            previous = read_record(workdir) or _record(v)
            self._write(workdir, {**previous, "seconds": previous["seconds"] + seconds,
                                  "heads": {"phase": k, "heads": len(trained)}})

    def fail(self, variant: sweeps.Variant, error: str) -> dict[str, Any]:
        """Records `variant` as failed with `error` without training it."""
        logging.error("variant %s failed: %s", variant.name, error)
        return self._write(os.path.join(self.root, variant.name), _record(variant, status="failed", error=error))

    @staticmethod
    def _write(workdir: str, record: dict[str, Any]) -> dict[str, Any]:
        os.makedirs(workdir, exist_ok=True)
        workdir_lib.write_json(os.path.join(workdir, RECORD), record)
        return record

    def _train_prefix(self, prefix: sweeps.Prefix) -> None:
        """Makes sure the prefix has trained: by this job (under the lock) or by another (waiting for it)."""
        directory = shared_dir(self.root, prefix.key)
        done = os.path.join(directory, DONE)
        if os.path.exists(done):
            return
        if prefix.key in self._failed:
            raise RuntimeError(f"the shared phases in {directory} failed earlier: {self._failed[prefix.key]}")
        os.makedirs(directory, exist_ok=True)
        lock = PrefixLock(directory, self.stale_s, self.poll_s)
        if not lock.acquire(done):
            return
        try:
            if prefix.parent is not None:
                seed(directory, shared_dir(self.root, prefix.parent.key))
            logging.info("training phases 1-%d, shared by %s, in %s", prefix.phases, ", ".join(prefix.members),
                         directory)
            start = time.perf_counter()
            train.run(prefix.config, directory, phases=prefix.phases)
            workdir_lib.write_json(done, {"phases": prefix.phases, "members": list(prefix.members),
                                          "seconds": time.perf_counter() - start})
        except preemption.Preempted:
            raise
        except Exception as e:
            self._failed[prefix.key] = f"{type(e).__name__}: {e}"
            raise
        finally:
            lock.release()


def run(root: str, runs: Sequence[sweeps.Variant], shard: tuple[int, int] = (0, 1), stale_s: float = 600,
        poll_s: float = 2) -> list[dict[str, Any]]:
    """Runs this job's share of `runs`, variants i, i + n, ... for shard (i, n), one after another (each on all
    devices) in the sweep's workdir `root`; returns their records.

    Every variant is validated first (`config.validate`): one it refuses is recorded as failed and left out of the
    shared prefixes, which are planned over all the others, the same in every job of a sharded sweep.
    """
    errors = {}
    for v in runs:
        try:
            config_lib.validate(v.config)
        except data.ConfigError as e:
            errors[v.name] = f"ConfigError: {e}"
    index, count = shard
    valid = [v for v in runs if v.name not in errors]
    runner = Runner(root, sweeps.plan(valid), stale_s, poll_s, groups=head_groups(valid[index::count]))
    return [runner.fail(v, errors[v.name]) if v.name in errors else runner.run(v) for v in runs[index::count]]


def head_groups(runs: Sequence[sweeps.Variant]) -> dict[str, tuple[int, list[sweeps.Variant]]]:
    """{variant name: (k, its group)} for the variants that train phase k as heads of one step
    (`heads.group_key`), two or more per group, each in the group of its earliest such phase."""
    groups: dict[str, tuple[int, list[sweeps.Variant]]] = {}
    for v in runs:
        for k in range(len(v.config.phases)):
            key = heads.group_key(v.config, k)
            members = [w for w in runs if key is not None and len(w.config.phases) > k
                       and heads.group_key(w.config, k) == key]
            if len(members) > 1:
                groups[v.name] = (k, members)
                break
    return groups
