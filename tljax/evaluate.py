"""`python -m tljax.evaluate --workdir=DIR [--split=test] [--data=SOURCE] [--tta=flip,crops5]`: a trained run's
scores on a split.

Writes under DIR/eval/<split> (or `--output_dir`): metrics.json (accuracy, top-5, loss and per-class precision,
recall and F1), per_class.csv, confusion_matrix.csv and .png, most_wrong.png (the misclassified examples the model
was surest about, with their true and predicted labels) and predictions.csv (every example). Nothing else in the
workdir is touched: the run's checkpoint, config and normalization are only read.

The inputs are made exactly as the run's own evaluation made them (same transform, same training statistics), so on
the run's test split the accuracy equals the test accuracy in its summary.json. `--data` evaluates the model on
other data with the same classes: a tfds name or `folder:/path`, with `--split` one of its split strings (a folder
of class folders without split folders has one split, `train`, holding every image).

`--tta` (test-time augmentation, `tljax.runs.tta`): "flip", "crops5" or "flip,crops5" score each example by the softmax
averaged over its views (2, 5 or 10 per image: one forward pass of eval_batch_size x views images per batch); the
files then go to DIR/eval/<split>_tta-<names> and metrics.json records the views. An unknown name stops the command
before anything is loaded.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import csv
import dataclasses
import functools
import json
import os
import re

import ml_collections
import numpy as np
from absl import app, flags

from tljax import cli, data
from tljax.data import normalize
from tljax.data.pipeline import SPLITS
from tljax.reporting import plots
from tljax.runs import restore, tta
from tljax.training import metrics

FLAGS = flags.FLAGS

MOST_WRONG = 16


class EvaluationError(ValueError):
    """Data that the run's model cannot be scored on (e.g. classes it does not know)."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Every example's label and class probabilities, and the examples the model got most wrong.

    labels index `class_names` (the run's classes); `wrong` indexes the examples, surest mistake first, and
    `wrong_images` holds them as the model saw them before normalization (0..255, the evaluation view); `tta` names
    the test-time views the probabilities average over (() = the evaluation view alone).
    """

    split: str
    source: str
    step: int
    class_names: tuple[str, ...]
    names: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    wrong: np.ndarray
    wrong_images: np.ndarray
    tta: tuple[str, ...] = ()

    @property
    def predictions(self) -> np.ndarray:
        return np.argmax(self.probabilities, -1)

    @property
    def confusion(self) -> np.ndarray:
        return metrics.confusion_matrix(self.labels, self.predictions, len(self.class_names))

    def scores(self) -> dict:
        """Accuracy, top-5 accuracy (None under 5 classes), mean cross-entropy, and per-class scores."""
        n = len(self.labels)
        top5 = None
        if len(self.class_names) >= 5:
            best5 = np.argsort(-self.probabilities, -1)[:, :5]
            top5 = float(np.mean(np.any(best5 == self.labels[:, None], -1)))
        true_prob = self.probabilities[np.arange(n), self.labels]
        per_class = metrics.per_class_scores(self.confusion)
        return {
            "split": self.split, "source": self.source, "step": self.step, "tta": list(self.tta), "examples": n,
            "accuracy": float(np.mean(self.predictions == self.labels)), "top5_accuracy": top5,
            "loss": float(-np.mean(np.log(np.maximum(true_prob, 1e-300)))),
            "per_class": {name: {k: float(v[i]) for k, v in per_class.items()}
                          for i, name in enumerate(self.class_names)},
        }

    def wrong_titles(self) -> list[str]:
        pred = self.predictions
        return [f"{os.path.basename(str(self.names[i]))[-28:]}\ntrue: {self.class_names[self.labels[i]]}\n"
                f"predicted: {self.class_names[pred[i]]} ({self.probabilities[i, pred[i]]:.2f})" for i in self.wrong]


def _data_config(run: restore.TrainedRun, split: str, source: str) -> tuple[ml_collections.ConfigDict, str]:
    """The run's config.data set up to read `split` (of `source`, if given); returns it and the role to read. A field
    newer than the run takes its default (off)."""
    cfg = data.default_config()
    cfg.update(run.config.data.to_dict())
    cfg.batch_size, cfg.eval_batch_size = 1, run.eval_batch_size  # one device; no training batches are read,
    cfg.mixup_alpha = cfg.cutmix_alpha = 0.0  # so none are mixed
    if not source:
        if split not in SPLITS:
            raise data.ConfigError(f"--split {split!r}: choose one of {SPLITS} (or give --data)")
        return cfg, split
    cfg.source = source
    cfg.train_split = cfg.val_split = cfg.test_split = split
    return cfg, "test"


def _labels_in_run_classes(labels: np.ndarray, names: tuple[str, ...], run: restore.TrainedRun) -> np.ndarray:
    index = {name: i for i, name in enumerate(run.class_names)}
    unknown = sorted(set(names[i] for i in np.unique(labels)) - set(index))
    if unknown:
        raise EvaluationError(f"the data holds classes the model was not trained on: {', '.join(unknown)}; it "
                              f"knows {', '.join(run.class_names)}")
    return np.asarray([index[name] for name in names])[labels]


def evaluate(run: restore.TrainedRun, split: str = "test", source: str = "", most_wrong: int = MOST_WRONG,
             tta_spec: str = "") -> Evaluation:
    """Runs the model over every example of `split` once (of `source` if given, else of the run's data); with
    `tta_spec` ("flip", "crops5", "flip,crops5"), on each example's test-time views (see `tljax.runs.tta`)."""
    names = tta.parse(tta_spec)
    cfg, role = _data_config(run, split, source)
    pipe = data.build(cfg, run.prep, seed=int(run.config.seed),
                      trained_with=os.path.join(run.workdir, normalize.FILENAME))
    probabilities_fn = run.probabilities_fn(pipe.eval_batch_size, tta.count(names))
    views = functools.partial(tta.views, names=names, size=pipe.image_size, crop_fraction=pipe.crop_fraction,
                              method=pipe.interpolation)
    probabilities, masks = [], []
    for batch in pipe.eval(role, views):
        probabilities.append(probabilities_fn(batch["image"]))
        masks.append(batch["mask"])
    probabilities = np.concatenate(probabilities)[np.concatenate(masks) > 0]
    records = pipe.records[role]
    labels = _labels_in_run_classes(records.labels, pipe.class_names, run)
    predictions = probabilities.argmax(-1)
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predictions[wrong]], kind="stable")][:most_wrong]
    return Evaluation(pipe.specs[role], pipe.source, run.step, run.class_names, records.names, labels,
                      probabilities, wrong, pipe.raw_images(role, wrong), names)


def default_output_dir(workdir: str, split: str, source: str, tta_names: tuple[str, ...] = ()) -> str:
    """WORKDIR/eval/<split>, or WORKDIR/eval/<source>_<split> for other data (as a safe folder name), with
    _tta-<names> appended under test-time augmentation."""
    name = (f"{source}_{split}" if source else split) + (f"_tta-{'-'.join(tta_names)}" if tta_names else "")
    return os.path.join(workdir, "eval", re.sub(r"[^\w.-]+", "_", name).strip("_"))


def write(ev: Evaluation, directory: str) -> list[str]:
    """Writes the evaluation's files into `directory` (created); returns their paths."""
    os.makedirs(directory, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(directory, name)

    scores = ev.scores()
    with open(path("metrics.json"), "w") as f:
        json.dump(scores, f, indent=1)
    with open(path("per_class.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["class", "precision", "recall", "f1", "support"])
        for name, row in scores["per_class"].items():
            out.writerow([name, *(f"{row[k]:.6f}" for k in ("precision", "recall", "f1")), int(row["support"])])
    matrix = ev.confusion
    with open(path("confusion_matrix.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["true \\ predicted", *ev.class_names])
        out.writerows([name, *map(int, row)] for name, row in zip(ev.class_names, matrix))
    with open(path("predictions.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["example", "label", "prediction", "probability"])
        pred = ev.predictions
        out.writerows([ev.names[i], ev.class_names[ev.labels[i]], ev.class_names[pred[i]],
                       f"{ev.probabilities[i, pred[i]]:.6f}"] for i in range(len(pred)))
    plots.confusion_matrix(path("confusion_matrix.png"), matrix, ev.class_names)
    plots.image_grid(path("most_wrong.png"), ev.wrong_images, ev.wrong_titles())
    names = ("metrics.json", "per_class.csv", "confusion_matrix.csv", "predictions.csv", "confusion_matrix.png",
             "most_wrong.png")
    return [path(n) for n in names]


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a program (other modules import its functions)."""
    flags.DEFINE_string("workdir", None, "The run's workdir (written by tljax.main).")
    flags.DEFINE_string("split", "test", "train, val or test of the run's data; with --data, a split string "
                        "of that source.")
    flags.DEFINE_string("data", "", "Evaluate on another source with the same classes: a tfds name or "
                        "folder:/path ('' = the run's data).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("output_dir", "", "Where to write ('' = WORKDIR/eval/<split or data>[_tta-<names>]).")
    flags.DEFINE_string("tta", "", f"Test-time augmentation: a comma-separated list of {', '.join(tta.NAMES)} "
                        "('' = none); the softmax is averaged over the views.")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    names = tta.parse(FLAGS.tta)  # before anything is loaded or compiled
    run = restore.load(FLAGS.workdir, FLAGS.step)
    ev = evaluate(run, FLAGS.split, FLAGS.data, tta_spec=FLAGS.tta)
    directory = FLAGS.output_dir or default_output_dir(FLAGS.workdir, FLAGS.split, FLAGS.data, names)
    write(ev, directory)
    scores = ev.scores()
    top5 = f", top-5 {scores['top5_accuracy']:.4f}" if scores["top5_accuracy"] is not None else ""
    views = f", TTA {'+'.join(names)}" if names else ""
    print(f"{ev.source} {ev.split} ({scores['examples']} examples, checkpoint {ev.step}{views}): accuracy "
          f"{scores['accuracy']:.4f}{top5}, loss {scores['loss']:.4f}; written to {directory}")


if __name__ == "__main__":
    _define_flags()
    app.run(cli.command(main, EvaluationError, tta.TTAError))
