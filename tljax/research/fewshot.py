"""Closed-form linear probes on frozen features: few-shot and full-data ridge regression, L2 chosen on validation.

The method is big_vision's few-shot evaluator (`big_vision/evaluators/fewshot_lsr.py`): standardise each feature
with the training sample's mean and standard deviation, regress onto targets `2 * onehot - 1` (+1 for the class,
-1 for the others) by L2-regularised least squares, and predict the class with the largest output. Two differences:

* the intercept is exactly unregularised. big_vision appends a constant feature of 100 so that its weight is almost
  free; here the features are centred on the training sample, so the unpenalised intercept is the targets' mean
  and the weights are the ridge solution of the centred problem (no constant to choose);
* the L2 strength is not fixed: every value of a small grid is fitted, the one with the best accuracy on the
  validation split is kept (ties: the strongest), and only that one is scored on the test split.

One thin SVD of the standardised sample serves the whole grid: with Z = U S V^T, the weights for strength l are
V diag(s / (s^2 + l)) U^T Y. Directions whose singular value is below lstsq's cut-off (largest * eps * max(n, d))
are dropped, so l = 0 gives exactly `numpy.linalg.lstsq`'s minimum-norm solution, also with fewer examples than
features (the few-shot case). Everything runs in float64 numpy on the host: the problems are small (at most the
training split's size by the feature width, once per draw), float64 makes the solution exact to ~1e-12 whatever the
conditioning, and a probe never competes with the backbone for the accelerator.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Ridge strengths tried on the validation split: the standardised features' Gram matrix grows with the number of
# examples (10 for 1-shot on 10 classes, thousands for the full-data probe), so the grid spans seven decades. Far
# above the Gram matrix's eigenvalues the weights tend to Z^T (Y - b) / l, whose argmax no longer depends on l (with
# balanced classes: the class whose mean standardised feature vector has the largest dot product with the example's);
# for few shots the grid's top end is close to that limit.
L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
# Added to each feature's standard deviation: a feature constant over the sample becomes 0 instead of 0 / 0.
STD_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class RidgePath:
    """Ridge regressions of one training sample, one per L2 strength: scores(x) = ((x - mean) / scale) @ W_l + b."""

    l2: np.ndarray  # [L]
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    weights: np.ndarray  # [L, D, C]
    bias: np.ndarray  # [C]: the unregularised intercept, the same for every strength

    def scores(self, x: np.ndarray) -> np.ndarray:
        """[L, N, C] regression outputs of features x [N, D] under each strength."""
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        return z[None] @ self.weights + self.bias

    def accuracies(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[L] accuracy of the largest output's class against `labels`, under each strength."""
        return np.mean(self.scores(x).argmax(-1) == np.asarray(labels)[None], axis=-1)


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[N, C] regression targets: +1 for the example's class, -1 for the others (2 * onehot - 1)."""
    return 2.0 * (np.asarray(labels)[:, None] == np.arange(num_classes)[None]) - 1.0


def fit_ridge(x: np.ndarray, labels: np.ndarray, num_classes: int, l2_grid: Sequence[float]) -> RidgePath:
    """Minimises ||Z W + 1 b^T - Y||^2 + l ||W||^2 for every l in `l2_grid` (b unpenalised), where Z is `x`
    standardised with its own mean and standard deviation (+ STD_EPS) and Y = targets(labels)."""
    x = np.asarray(x, np.float64)
    l2 = np.asarray(l2_grid, np.float64)
    mean = x.mean(0)
    scale = x.std(0) + STD_EPS
    z = (x - mean) / scale
    y = targets(labels, num_classes)
    bias = y.mean(0)  # the columns of z sum to zero, so the intercept decouples from the weights
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    keep = s > (s[0] if s.size else 0.0) * np.finfo(np.float64).eps * max(z.shape)
    u, s, vt = u[:, keep], s[keep], vt[keep]
    factors = s[None] / (s[None] ** 2 + l2[:, None])  # [L, r]
    weights = vt.T[None] @ (factors[:, :, None] * (u.T @ (y - bias))[None])  # [L, D, C]
    return RidgePath(l2, mean, scale, weights, bias)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One probe: the L2 strength chosen on validation, every strength's validation accuracy, the test accuracy."""

    l2: float
    val_accuracies: tuple[float, ...]  # in the order of the grid
    test_accuracy: float

    @property
    def val_accuracy(self) -> float:
        return max(self.val_accuracies)


def choose_l2(path: RidgePath, val_x: np.ndarray, val_labels: np.ndarray) -> tuple[int, np.ndarray]:
    """(index into the grid, [L] validation accuracies): the best strength on validation; ties go to the strongest
    (the simpler model). Sees nothing but the fit and the validation data."""
    accuracies = path.accuracies(val_x, val_labels)
    best = np.flatnonzero(accuracies == accuracies.max())
    return int(best[np.argmax(path.l2[best])]), accuracies


def probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
          test: tuple[np.ndarray, np.ndarray], num_classes: int, l2_grid: Sequence[float] = L2_GRID) -> ProbeResult:
    """Fits the ridge path on `train` (features, labels), chooses L2 on `val`, and scores that one fit on `test`."""
    path = fit_ridge(*train, num_classes, l2_grid)
    chosen, val_accuracies = choose_l2(path, *val)
    test_accuracy = float(np.mean(path.scores(test[0])[chosen].argmax(-1) == test[1]))
    return ProbeResult(float(path.l2[chosen]), tuple(map(float, val_accuracies)), test_accuracy)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[C] examples per class."""
    return np.bincount(np.asarray(labels), minlength=num_classes)


def few_shot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """`shots` examples of each class, drawn by `seed`: each class's examples in an order fixed by the seed, the first
    `shots` of it. The draws are nested (the 5-shot sample of a seed holds its 1-shot sample) and depend on the
    labels alone, so every backbone is probed on the same examples."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    short = [c for c, idx in enumerate(per_class) if len(idx) < shots]
    if short:
        raise ValueError(f"{shots} shots: class {short[0]} has only {len(per_class[short[0]])} training examples")
    return np.concatenate([idx[:shots] for idx in per_class])


@dataclasses.dataclass(frozen=True)
class Features:
    """A backbone's features [N, D] and labels [N] of the train, val and test splits."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int


def probe_shots(features: Features, shots: int | None, seeds: Sequence[int],
                l2_grid: Sequence[float] = L2_GRID) -> list[ProbeResult]:
    """One probe per seed on a `shots`-per-class draw of the train split; `shots=None`: the full-data probe (every
    training example, one fit, whatever the seeds)."""
    x, labels = features.train
    if shots is None:
        return [probe(features.train, features.val, features.test, features.num_classes, l2_grid)]
    results = []
    for seed in seeds:
        idx = few_shot_indices(labels, features.num_classes, shots, seed)
        results.append(probe((x[idx], labels[idx]), features.val, features.test, features.num_classes, l2_grid))
    return results


def summarize(backbone: str, shots: int | None, train_examples: int, results: Sequence[ProbeResult]) -> dict:
    """One output row: test accuracy mean, spread (sample std over seeds, 0 for one; min, max), the chosen L2s."""
    acc = np.asarray([r.test_accuracy for r in results])
    return {
        "backbone": backbone, "shots": "all" if shots is None else shots, "train_examples": train_examples,
        "seeds": len(results), "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()),
        "val_accuracy_mean": float(np.mean([r.val_accuracy for r in results])),
        "l2": [r.l2 for r in results], "accuracies": acc.tolist(),
    }
