"""`python -m tljax.predict --workdir=DIR IMAGE_OR_FOLDER...`: the top-k classes of each image, from a trained run.

Loads the newest (or `--step`) checkpoint and the normalization the run saved, and feeds each image through the
run's own evaluation transform: the same decode, resize, centre crop and normalization, so an image gets the label
the model's eval step gives it during training. Prints one line per image and, with `--output=preds.csv`, writes
the classes and probabilities as CSV. Works offline and on CPU; only reads the workdir.

Images are decoded as training decodes them: grayscale is replicated to RGB and an alpha channel is dropped; a note
says so for each such image. An image that cannot be decoded is named and skipped, the others are still predicted,
and the command then exits with status 1.

`--tta=flip` (or "crops5", "flip,crops5"; see `tljax.runs.tta`) reports the softmax averaged over each image's test-time
views instead of the evaluation view's alone, as `tljax.evaluate --tta` scores them. An unknown name stops the
command before anything is loaded.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import csv
import dataclasses
import os
import sys
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import app, flags

from tljax import cli
from tljax.data import transforms
from tljax.data.sources import IMAGE_EXTENSIONS
from tljax.runs import restore, tta

FLAGS = flags.FLAGS


_CHANNEL_NOTES = {
    1: "grayscale: replicated to RGB, as in training",
    2: "grayscale with alpha: alpha dropped and gray replicated to RGB, as in training",
    4: "alpha channel dropped (transparent pixels keep their stored colour), as in training",
}


class ImageInputError(ValueError):
    """An input path that is neither an image file nor a folder holding images."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's top classes, most probable first, and a note on how it was read (or "")."""

    path: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    note: str = ""


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Files as given, and every image file under each folder (recursively, sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            if not found:
                raise ImageInputError(f"folder {item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise ImageInputError(f"{item}: no such file or folder")
    if not paths:
        raise ImageInputError("no images given: pass image files or folders")
    return paths


def read_image(path: str) -> tuple[tf.Tensor, str]:
    """(uint8 RGB [H, W, 3] exactly as the training pipeline decodes it, a note on its channels or "").

    Raises tf.errors.InvalidArgumentError when the file is not a decodable image.
    """
    raw = tf.io.read_file(path)
    channels = int(tf.io.decode_image(raw, expand_animations=False).shape[-1])
    return transforms.decode(raw), _CHANNEL_NOTES.get(channels, "")


def predict(run: restore.TrainedRun, paths: Sequence[str], top_k: int = 5, batch_size: int = 0, tta_spec: str = ""
            ) -> tuple[list[Prediction], list[str]]:
    """Top-k predictions for every readable image in `paths`, and a message for each image that cannot be read.

    batch_size: images per forward pass (0: the run's eval batch size); tta_spec: test-time augmentation ("flip",
    "crops5", "flip,crops5"; "" = the evaluation view alone): the probabilities are averaged over the views.
    """
    names = tta.parse(tta_spec)
    batch_size = batch_size or run.eval_batch_size
    transform = tf.function(lambda image: run.views(image, names),
                            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    probabilities_fn = run.probabilities_fn(batch_size, tta.count(names))
    k = min(top_k, len(run.class_names))
    results, errors = [], []
    read: list[tuple[str, str, np.ndarray]] = []

    def flush() -> None:
        images = np.stack([image for _, _, image in read])
        padded = np.concatenate([images, np.repeat(images[:1], batch_size - len(images), 0)])
        probs = probabilities_fn(padded)[: len(images)]
        for (path, note, _), p in zip(read, probs):
            best = np.argsort(-p, kind="stable")[:k]
            results.append(Prediction(path, tuple(run.class_names[i] for i in best),
                                      tuple(float(p[i]) for i in best), note))
        read.clear()

    for path in paths:
        try:
            image, note = read_image(path)
        except tf.errors.InvalidArgumentError as e:
            reason = e.message.split("}}")[-1].split("[Op:")[0].strip()  # TF's own words, without op details
            errors.append(f"cannot decode image {path}: truncated, corrupt, or not an image ({reason})")
            continue
        read.append((path, note, transform(image).numpy()))
        if len(read) == batch_size:
            flush()
    if read:
        flush()
    return results, errors


def write_csv(path: str, predictions: Sequence[Prediction], top_k: int) -> None:
    """path, then class_i and probability_i for i = 1..top_k, then the note; one row per image."""
    header = ["path"] + [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("class", "probability")] + ["note"]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for p in predictions:
            pairs = [v for c, prob in zip(p.classes, p.probabilities) for v in (c, f"{prob:.6f}")]
            out.writerow([p.path, *pairs, *[""] * (2 * top_k - len(pairs)), p.note])


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a program (other modules import its functions)."""
    flags.DEFINE_string("workdir", None, "The run's workdir (written by tljax.main).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("top_k", 5, "Classes to report per image.")
    flags.DEFINE_string("output", "", "Write the predictions to this CSV file.")
    flags.DEFINE_integer("batch_size", 0, "Images per forward pass (0 = the run's eval batch size).")
    flags.DEFINE_string("tta", "", f"Test-time augmentation: a comma-separated list of {', '.join(tta.NAMES)} "
                        "('' = none); the softmax is averaged over the views.")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("give one or more image files or folders: python -m tljax.predict --workdir=DIR IMAGE...")
    if FLAGS.top_k < 1:
        raise app.UsageError(f"--top_k must be at least 1, not {FLAGS.top_k}")
    tta.parse(FLAGS.tta)  # an unknown name stops here, before anything is loaded or compiled
    paths = image_paths(argv[1:])
    run = restore.load(FLAGS.workdir, FLAGS.step)
    predictions, errors = predict(run, paths, FLAGS.top_k, FLAGS.batch_size, FLAGS.tta)
    for p in predictions:
        print(f"{p.path}: " + ", ".join(f"{c} {prob:.4f}" for c, prob in zip(p.classes, p.probabilities))
              + (f"  [{p.note}]" if p.note else ""))
    if FLAGS.output:
        write_csv(FLAGS.output, predictions, min(FLAGS.top_k, len(run.class_names)))
    for message in errors:
        print(message, file=sys.stderr)
    if errors:
        raise SystemExit(f"{len(errors)} of {len(paths)} images could not be read (named above); the others were "
                         "predicted")


if __name__ == "__main__":
    _define_flags()
    app.run(cli.command(main, ImageInputError, tta.TTAError))
