"""`python -m tljax.export --workdir=runs/x --output=model.safetensors`: a trained run as one self-contained file.

The file holds the checkpoint's variables and, as metadata, the model's name and arguments, its class names and the
input it was trained on (see `pretrained.exported`), so it is used without the workdir, the data or the original
weights: `pretrained.load(name, "model.safetensors")` gives the trained classifier back, and with num_classes=N (or
`--config.model.weights=model.safetensors`) its backbone under a new head, to transfer from an earlier run.
Nothing in the workdir is written; an existing output is replaced only with --overwrite, and atomically.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import dataclasses
import os

import numpy as np
import safetensors.numpy
from absl import app, flags
from flax import traverse_util

from tljax import cli
from tljax.data import pipeline
from tljax.pretrained import exported
from tljax.runs import restore

FLAGS = flags.FLAGS

SUFFIX = ".safetensors"

class ExportError(ValueError):
    """An output path the export cannot write: not a .safetensors file name, or a directory."""


def check_output(output: str, overwrite: bool = False) -> None:
    """Raises ExportError for an output that is no .safetensors file name, FileExistsError for an existing file
    without `overwrite`."""
    if not output.lower().endswith(SUFFIX):  # as readers tells the format
        raise ExportError(f"the output {output} must end in {SUFFIX} (the file pretrained.load reads)")
    if os.path.isdir(output):
        raise ExportError(f"the output {output} is a directory; name a {SUFFIX} file")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite (overwrite=True) to replace it")


def export(run: restore.TrainedRun, output: str, overwrite: bool = False) -> str:
    """Writes `run` to `output` (a .safetensors file; its directory is created) atomically; returns its absolute path.

    Tensors: "params/<path>" and "batch_stats/<path>" as the checkpoint stores them. The prep in the metadata is
    the run's at the run's evaluation geometry (config image size, crop fraction and resize method).
    """
    check_output(output, overwrite)
    crop_fraction, interpolation = pipeline.eval_geometry(run.config.data, run.prep)
    prep = dataclasses.replace(run.prep, image_size=run.image_size, crop_fraction=crop_fraction,
                               interpolation=interpolation)
    metadata = exported.Export(run.description["name"], run.description["kwargs"], run.class_names, prep,
                               run.normalization, run.step).to_metadata()
    tensors = {k: np.ascontiguousarray(v) for k, v in traverse_util.flatten_dict(run.variables, sep="/").items()}
    path = os.path.abspath(output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # open() gives the file the user's usual permissions (umask)
            f.write(safetensors.numpy.save(tensors, metadata))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a program (other modules import its functions)."""
    flags.DEFINE_string("workdir", None, "The workdir of a trained run (python -m tljax.main).")
    flags.DEFINE_string("output", None, f"The file to write, ending in {SUFFIX}.")
    flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the newest).")
    flags.DEFINE_bool("overwrite", False, "Replace the output file if it exists.")
    flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_output(FLAGS.output, FLAGS.overwrite)  # before the (possibly long) restore
    print(export(restore.load(FLAGS.workdir, FLAGS.step), FLAGS.output, FLAGS.overwrite))


if __name__ == "__main__":
    _define_flags()
    app.run(cli.command(main, ExportError))
