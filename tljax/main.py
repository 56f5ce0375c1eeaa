"""Command line: `python -m tljax.main --config=configs/quickstart.py --workdir=runs/quickstart`.

Any config field can be overridden, e.g. `--config.phases[1].optimizer.learning_rate=1e-5`. Re-running the same
command with the same workdir resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging as logging_std

from absl import app, flags, logging
from ml_collections import config_flags

from tljax import checkpoint, data, parallel, pretrained, train

# Errors about the user's input (config, data, weights, workdir) or a diverged run; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (data.ConfigError, data.SourceError, pretrained.WeightsFileError, pretrained.WeightsMismatchError,
               pretrained.WeightsUnavailableError, checkpoint.CheckpointMismatchError, train.TrainingDivergedError)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, summary and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record: logging_std.LogRecord) -> bool:
    """Drops the INFO chatter of orbax (every save) and of JAX's backend probing; warnings and errors still show."""
    return record.levelno >= logging_std.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/jax/_src/"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    parallel.initialize_distributed()
    try:
        summary = train.run(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as e:  # bad input: the message says what to do; a traceback would only bury it
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    if summary is not None:
        logging.info("summary: %s", json.dumps(summary))
        print(json.dumps({k: summary[k] for k in ("test_accuracy", "test_loss")}))


if __name__ == "__main__":
    app.run(main)
