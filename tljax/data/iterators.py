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

Every pipeline here runs with tf.data's autotuning off (`options`): destroying an iterator joins autotuning's model
thread, which TensorFlow 2.21 does not wake; the destructor waited out that thread's optimization period, which
grows to 60 s (releases of 4-41 s measured in the test suite, 0.01 s with autotuning off). Parallel maps then run
one element per thread of the pool and prefetch buffers keep their own (legacy) sizing; the train transform was no
slower (410 vs 395 images/s at 224 px on 2 threads).
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Callable, Iterator

import tensorflow as tf

_LIVE: weakref.WeakSet[Releasable] = weakref.WeakSet()
_STOPS: dict[int, Callable[[], None]] = {}


def options(threads: int = 0) -> tf.data.Options:
    """The options of every tljax pipeline: deterministic order, each op single-threaded (a large resize cannot take
    every core from the JAX step running beside it), autotuning off (see above), `threads` threads (0: one per
    core)."""
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.enabled = False
    if threads:
        opts.threading.private_threadpool_size = threads
    return opts


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
