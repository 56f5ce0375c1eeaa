"""What a run reports: scalars to TensorBoard and JSON lines, a progress line, summary.json and plots.

Only process 0 writes files; every writer here is a no-op elsewhere. Metric sums from the steps (loss, correct,
correct5, count) become averages with `averages`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
from clu import metric_writers


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
    """TensorBoard event files (via clu) and `metrics.jsonl` in the workdir; silent unless `active`."""

    def __init__(self, workdir: str, active: bool) -> None:
        self.active = active
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = metric_writers.create_default_writer(workdir, just_logging=not active, asynchronous=False)

    def write(self, step: int, scalars: dict[str, float], top5: bool = True) -> None:
        scalars = {k: v for k, v in scalars.items() if top5 or "top5" not in k}
        self.tensorboard.write_scalars(step, scalars)
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step` (left by a run that died after its last checkpoint): a resume adds no duplicates."""
        if not self.active or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def close(self) -> None:
        self.tensorboard.flush()
        self.tensorboard.close()


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


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def plot_learning_curves(path: str, history: Sequence[dict[str, Any]], phase_names: Sequence[str]) -> None:
    """Train and validation loss/accuracy per epoch in one figure, a vertical line where each phase begins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [h.get(f"{split}_{metric}", np.nan) for h in history]
            ax.plot(epochs, values, style, markersize=3, label=split)
        starts = [i for i, h in enumerate(history) if i == 0 or h["phase"] != history[i - 1]["phase"]]
        for i in starts:
            ax.axvline(i + 0.5, color="gray", linestyle="--", linewidth=0.8)
            ax.text(i + 0.6, ax.get_ylim()[1], phase_names[history[i]["phase"]], va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(path: str, labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> None:
    """Test-set confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    size = max(4.0, 0.5 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=90 if k > 10 else 45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
