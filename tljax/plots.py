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
    """Train and validation loss/accuracy per epoch, a dashed line and the phase's name where each phase begins."""
    epochs = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [h.get(f"{split}_{metric}", np.nan) for h in history]
            ax.plot(epochs, values, style, markersize=3, label=split)
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
