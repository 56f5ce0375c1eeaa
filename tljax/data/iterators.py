"""Numpy iterators over tf.data pipelines that are released safely, at the latest before the interpreter shuts down.

tfds sources read records through `tf.numpy_function`, which runs Python in tf.data's own threads. An iterator
still alive when the interpreter finalizes is destroyed then, and its destructor waits for those threads, which can
no longer take the GIL: the process hangs after its last line (seen at the end of a test session). Every iterator
the pipeline hands out is wrapped here, and an `atexit` hook, which runs while Python still works, drops them all
first.

An iterator may also wait on something outside tf.data (the train stream's queue of epoch orders): destroying it
while an op waits there crashes TensorFlow, so `release` first calls its `stop`, which ends that wait. Stops are
held here, not by their iterators: an iterator collected in a reference cycle is finalized (released) in any order
with the rest of the cycle, and what its stop needs (the queue) must not be finalized before it.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Callable, Iterator

_LIVE: weakref.WeakSet[Releasable] = weakref.WeakSet()
_STOPS: dict[int, Callable[[], None]] = {}


class Releasable:
    """An iterator over `iterator` until `release` drops it (then it is exhausted), also when it is collected.

    stop: called once before the iterator is dropped, to end any wait of its threads (e.g. close a queue).
    """

    def __init__(self, iterator: Iterator[Any], stop: Callable[[], None] | None = None) -> None:
        self._iterator: Iterator[Any] | None = iterator
        if stop is not None:
            _STOPS[id(self)] = stop
        _LIVE.add(self)

    def __iter__(self) -> Releasable:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def release(self) -> None:
        stop = _STOPS.pop(id(self), None)
        if stop is not None:
            stop()
        self._iterator = None

    def __del__(self) -> None:
        if self._iterator is not None:  # not yet released (the exit hook releases before modules are torn down)
            self.release()


@atexit.register
def _release_all() -> None:
    for iterator in list(_LIVE):
        iterator.release()
