"""Command line: `python -m tljax.main --config=configs/quickstart.py --workdir=runs/quickstart`.

Any config field can be overridden, e.g. `--config.phases[1].optimizer.learning_rate=1e-5`. Re-running the same
command with the same workdir resumes from the newest checkpoint. Exit status: 0 when the run finished, 75
(`preemption.EXIT_STATUS`, EX_TEMPFAIL) when SIGTERM stopped it after saving (rerun to resume), 1 for an error.
"""

from __future__ import annotations

from tljax import allocator

if __name__ == "__main__":  # first, before NumPy, TensorFlow and JAX load: LD_PRELOAD counts only at start
    allocator.relaunch()

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tljax import cli
from tljax.training import parallel, preemption, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, summary and plots.")
flags.mark_flags_as_required(["config", "workdir"])

SPLITS = ("train_split", "val_split", "test_split")


def stale_splits(config_flag: flags.Flag) -> list[str]:
    """Warnings for the split strings a command-line data.source leaves as the config file wrote them for its own.

    A config written for one data set (configs/quickstart.py: animal_mnist with train_split "train[:25%]") run with
    `--config.data.source=folder:/my/digits` would otherwise train on a quarter of the folder without a word. One
    warning per non-empty split string not given on the command line, when the file's source is another.
    """
    overrides = config_flags.get_override_values(config_flag)
    filename = config_flags.get_config_filename(config_flag)
    written = config_flag.parser.parse(filename).data  # the config file's own values, before the overrides
    final = config_flag.value.data
    if "data.source" not in overrides or written.source == final.source:
        return []
    return [f"config.data.{name}={final[name]!r} comes from {filename}, written for source {written.source!r}, "
            f"but the source is now {final.source!r}; set --config.data.{name}='' for the new source's own split, "
            f"or give the split string you mean" for name in SPLITS
            if f"data.{name}" not in overrides and final[name]]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize_distributed()
    for warning in stale_splits(flags.FLAGS["config"]):
        logging.warning(warning)
    try:
        summary = train.run(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted:
        sys.exit(preemption.EXIT_STATUS)  # the run logged where it saved
    logging.info("summary: %s", json.dumps(summary))
    print(json.dumps({k: summary[k] for k in ("test_accuracy", "test_loss")}))


if __name__ == "__main__":
    app.run(cli.command(main, train.TrainingDivergedError))
