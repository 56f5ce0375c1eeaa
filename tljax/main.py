"""Command line: `python -m tljax.main --config=configs/quickstart.py --workdir=runs/quickstart`.

Any config field can be overridden, e.g. `--config.phases[1].optimizer.learning_rate=1e-5`. Re-running the same
command with the same workdir resumes from the newest checkpoint.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from tljax import cli, parallel, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, summary and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize_distributed()
    summary = train.run(_CONFIG.value, _WORKDIR.value)
    if summary is not None:
        logging.info("summary: %s", json.dumps(summary))
        print(json.dumps({k: summary[k] for k in ("test_accuracy", "test_loss")}))


if __name__ == "__main__":
    app.run(cli.command(main, train.TrainingDivergedError))
