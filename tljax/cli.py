"""What every command (`tljax.main`, `predict`, `evaluate`, `export`, `report`) shares: which errors are the
user's, reported as one clear line instead of a traceback, and quiet library logging."""

from __future__ import annotations

import functools
import logging as logging_std
from typing import Callable

from absl import logging

from tljax import data, pretrained
from tljax.runs import restore
from tljax.training import checkpoint

# Errors about the user's input (config, data, weights, workdir, files); anything else is a bug and keeps its
# traceback. Commands add their own (e.g. a diverged training run).
USER_ERRORS: tuple[type[BaseException], ...] = (
    data.ConfigError, data.SourceError, pretrained.WeightsFileError, pretrained.WeightsMismatchError,
    pretrained.WeightsUnavailableError, checkpoint.CheckpointMismatchError, restore.RunNotFoundError,
    FileExistsError,
)


def _quiet_libraries(record: logging_std.LogRecord) -> bool:
    """Drops the INFO chatter of orbax (every save, read-only opens) and of JAX's backend probing; warnings from
    JAX and errors from both still show."""
    if "/orbax/" in record.pathname:
        return record.levelno >= logging_std.ERROR
    return record.levelno >= logging_std.WARNING or "/jax/_src/" not in record.pathname


def command(main: Callable[[list[str]], None], *extra_errors: type[BaseException]) -> Callable[[list[str]], None]:
    """`main` for absl's app.run, with quiet libraries and user errors turned into `SystemExit("Type: message")`."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        logging.get_absl_handler().addFilter(_quiet_libraries)
        try:
            main(argv)
        except USER_ERRORS + extra_errors as e:  # the message says what to do; a traceback would only bury it
            raise SystemExit(f"{type(e).__name__}: {e}") from None

    return wrapped
