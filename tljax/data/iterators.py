"""Numpy iterators over tf.data pipelines that are released before the interpreter shuts down.

The train stream reads its epochs' orders from a Python generator, and tfds sources read records through
`tf.numpy_function`: both run Python in tf.data's own threads. An iterator still alive when the interpreter
finalizes is destroyed then, and its destructor waits for those threads, which can no longer take the GIL: the
process hangs after its last line (seen at the end of a test session). Every iterator the pipeline hands out is
wrapped here, and an `atexit` hook, which runs while Python still works, drops them all first.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Iterator

_LIVE: weakref.WeakSet[Releasable] = weakref.WeakSet()


class Releasable:
    """An iterator over `iterator` until `release` drops it (then it is exhausted)."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator: Iterator[Any] | None = iterator
        _LIVE.add(self)

    def __iter__(self) -> Releasable:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def release(self) -> None:
        self._iterator = None


@atexit.register
def _release_all() -> None:
    for iterator in list(_LIVE):
        iterator.release()
