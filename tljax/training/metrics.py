"""What a run reports: scalars to TensorBoard and JSON lines, a progress line, summary.json, classification scores.

Only process 0 writes files; every writer here is a no-op elsewhere. Metric sums from the steps (loss, correct,
correct5, count) become averages with `averages`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import tensorflow as tf
from clu import metric_writers
from tensorboard.compat.proto import event_pb2

from tljax.training import workdir as workdir_lib


def averages(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Metric sums -> {loss, accuracy, top5_accuracy} averaged over the examples counted."""
    n = max(float(sums["count"]), 1.0)
    return {
        f"{prefix}loss": float(sums["loss"]) / n,
        f"{prefix}accuracy": float(sums["correct"]) / n,
        f"{prefix}top5_accuracy": float(sums["correct5"]) / n,
    }


def add(total: dict[str, Any] | None, sums: dict[str, Any]) -> dict[str, Any]:
    """Running sum of metric dicts."""
    return dict(sums) if total is None else {k: total[k] + sums[k] for k in total}


class Writer:
    """TensorBoard event files (via clu) and `metrics.jsonl` in the workdir; silent unless `active`.

    resume_step: the checkpoint a resumed run starts from. Points past it (written by a run that died after its last
    checkpoint) are dropped from metrics.jsonl and from the event files before anything new is written, so the
    resumed run's points replace them instead of doubling them.
    """

    def __init__(self, workdir: str, active: bool, resume_step: int | None = None) -> None:
        self.active = active
        self.path = os.path.join(workdir, "metrics.jsonl")
        if active and resume_step is not None:
            self._truncate(workdir, resume_step)
        self.tensorboard = metric_writers.create_default_writer(workdir, just_logging=not active, asynchronous=False)

    def write(self, step: int, scalars: dict[str, float], top5: bool = True) -> None:
        scalars = {k: v for k, v in scalars.items() if top5 or "top5" not in k}
        self.tensorboard.write_scalars(step, scalars)
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def _truncate(self, workdir: str, step: int) -> None:
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            workdir_lib.write_text(self.path, "".join(lines))
        for name in sorted(os.listdir(workdir)):
            if name.startswith(EVENTS_PREFIX):
                _truncate_events(os.path.join(workdir, name), step)

    def close(self) -> None:
        self.tensorboard.flush()
        self.tensorboard.close()


EVENTS_PREFIX = "events.out.tfevents."


def _truncate_events(path: str, step: int) -> None:
    """Rewrites a TensorBoard event file without its events past `step` (atomically; untouched if it has none)."""
    records = [bytes(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
    if len(kept) == len(records):
        return
    temporary = workdir_lib.temporary_path(path)
    with tf.io.TFRecordWriter(temporary) as f:
        for record in kept:
            f.write(record)
    os.replace(temporary, path)


class Progress:
    """A one-line progress bar per phase on stderr (a log line every ~10% when stderr is not a terminal)."""

    def __init__(self, title: str, total: int, start: int, active: bool, width: int = 28) -> None:
        self.title, self.total, self.done, self.active, self.width = title, total, start, active, width
        self.start_done, self.start_time = start, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_logged = -1

    def update(self, done: int, text: str = "") -> None:
        self.done = done
        if not self.active:
            return
        frac = done / max(self.total, 1)
        elapsed = time.perf_counter() - self.start_time
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * self.width)
        line = f"{self.title} [{bar:<{self.width}}] {done}/{self.total} {text} eta {eta:4.0f}s"
        if self.tty:
            sys.stderr.write("\r" + line)
            if done >= self.total:
                sys.stderr.write("\n")
        elif int(frac * 10) != self.last_logged or done >= self.total:
            self.last_logged = int(frac * 10)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]; sums to the number of examples."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of every class from a confusion matrix (0 where undefined: a class never
    predicted has precision 0, a class absent from the labels recall 0, as scikit-learn's zero_division=0)."""
    hits = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(0), matrix.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    workdir_lib.write_json(os.path.join(workdir, "summary.json"), summary)
