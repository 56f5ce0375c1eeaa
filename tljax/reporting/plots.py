"""The figures a run and its evaluation show: learning curves, learning-rate schedule, confusion matrix and the
examples the model got most wrong.

Every function draws one PNG to `out`, a path or a binary file object (the report embeds figures from memory).
matplotlib runs on its Agg backend: no display needed.
"""

from __future__ import annotations

from typing import IO, Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Output = str | IO[bytes]


def _save(fig: Any, out: Output) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def _phase_starts(history: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the history entries (epochs) where a new phase begins."""
    return [i for i, h in enumerate(history) if i == 0 or h["phase"] != history[i - 1]["phase"]]


def learning_curves(out: Output, history: Sequence[dict[str, Any]], phase_names: Sequence[str]) -> None:
    """Train and validation loss/accuracy per epoch (and the validation of the EMA of the weights, "val (EMA)", in the
    phases that keep one), a dashed line and the phase's name where each phase begins."""
    epochs = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = [("train", "train", "-o"), ("val", "val", "-s")]
    if any("val_ema_loss" in h for h in history):
        series.append(("val_ema", "val (EMA)", "-^"))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, name, style in series:
            values = [h.get(f"{key}_{metric}", np.nan) for h in history]
            ax.plot(epochs, values, style, markersize=3, label=name)
        for i in _phase_starts(history):
            ax.axvline(i + 0.5, color="gray", linestyle="--", linewidth=0.8)
            ax.text(i + 0.6, ax.get_ylim()[1], phase_names[history[i]["phase"]], va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    _save(fig, out)


def learning_rates(out: Output, schedules: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Learning rate per global step, one (phase name, head rates, backbone rates) per phase, drawn end to end."""
    fig, ax = plt.subplots(figsize=(11, 3.5))
    start, labelled = 0, set()

    def label(name: str) -> str | None:  # each line's name once in the legend
        first = name not in labelled
        labelled.add(name)
        return name if first else None

    for name, head, backbone in schedules:
        steps = np.arange(start, start + len(head))
        ax.plot(steps, head, color="C0", label=label("head"))
        if backbone is not None:
            ax.plot(steps, backbone, color="C1", linestyle="--", label=label("backbone"))
        ax.axvline(start, color="gray", linestyle="--", linewidth=0.8)
        ax.text(start, 1.0, f" {name}", va="top", fontsize=8, transform=ax.get_xaxis_transform())
        start += len(head)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    rates = np.concatenate([r for _, h, b in schedules for r in (h, b) if r is not None])
    if rates.size and rates.min() > 0 and rates.max() / rates.min() > 50:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, out)


def confusion_matrix(out: Output, matrix: np.ndarray, class_names: Sequence[str]) -> None:
    """A confusion matrix (rows: true class, columns: predicted), counts written in the cells up to 30 classes."""
    k = len(class_names)
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
    _save(fig, out)


def image_grid(out: Output, images: np.ndarray, titles: Sequence[str], columns: int = 4) -> None:
    """Images (0..255, [N, H, W, 3]) in a grid, each with its title (e.g. "true: cat / predicted: dog 0.93")."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.4 * rows), squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(np.clip(images[i], 0, 255).astype(np.uint8))
            ax.set_title(titles[i], fontsize=8)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified examples", ha="center", va="center")
    _save(fig, out)


def few_shot_accuracy(out: Output, curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      full: dict[str, float]) -> None:
    """Test accuracy against shots per class (log x), one line per backbone: {name: (shots, mean, std)} drawn with
    std error bars, and `full` ({name: accuracy}, the full-data probe) as a dotted line of the same colour."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, (shots, mean, std)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.errorbar(shots, mean, yerr=std, fmt="-o", markersize=4, capsize=3, color=color, label=name)
        if name in full:
            ax.axhline(full[name], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    shots = sorted({int(s) for points, _, _ in curves.values() for s in points})
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.minorticks_off()
    ax.set_xlabel("training examples per class (shots)")
    ax.set_ylabel("test accuracy")
    ax.set_title("linear probe on frozen features (dotted: all training examples)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out)


def sweep_scores(out: Output, swept: dict[str, Sequence[Any]], scores: Sequence[float],
                 ylabel: str = "validation accuracy") -> None:
    """A sweep's score against each swept field's values, one panel per field; each line joins the variants that
    agree on the other fields (legend: their values). Numbers sit on a log axis when all are positive and span more
    than 10x; any other values (already strings) are categories in order of appearance."""
    fields = list(swept)
    fig, axes = plt.subplots(1, len(fields), figsize=(5.5 * len(fields), 4), squeeze=False)
    for ax, field in zip(axes[0], fields):
        values = swept[field]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = list(dict.fromkeys(values))
        position = (lambda v: v) if numeric else categories.index
        others = [f for f in fields if f != field]
        groups: dict[tuple, list[int]] = {}
        for i in range(len(scores)):
            groups.setdefault(tuple(swept[f][i] for f in others), []).append(i)
        for rest, members in groups.items():
            members.sort(key=lambda i: position(values[i]))
            name = ", ".join(f"{f}={v}" for f, v in zip(others, rest)) or None
            ax.plot([position(values[i]) for i in members], [scores[i] for i in members], "-o", label=name)
        if numeric and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
        ax.set_xlabel(field)
        ax.set_ylabel(ylabel)
        if others:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, out)


def sweep_curves(out: Output, histories: dict[str, Sequence[dict[str, Any]]]) -> None:
    """Validation loss and accuracy after every epoch of every variant of a sweep, one line per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for name, history in histories.items():
            ax.plot(np.arange(1, len(history) + 1), [h.get(f"val_{metric}", np.nan) for h in history], "-o",
                    markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel(f"validation {metric}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, out)
