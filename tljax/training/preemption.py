"""Stopping a run cleanly on SIGTERM (a scheduler's preemption notice): every process saves the same step and stops.

A run that receives SIGTERM finishes its current step, saves a checkpoint and raises `Preempted`; the command
exits with `EXIT_STATUS`, and rerunning it resumes. In a multi-process run the signal may reach one process only,
or the processes at different steps, yet the checkpoint save is collective: if one process entered it while another
took the next step, each would wait for the other forever. So the processes agree on the step: after every step each
one contributes its own flag (SIGTERM received or not) to a sum over all devices, a tiny computation dispatched
behind the step and read after the next step (reading it then waits for nothing the step just dispatched does not
wait for already); every process reads the same sum at the same step, so all stop after the same step, one step
after the first flag. A single process reads its own flag and stops after the step during which SIGTERM arrived.

(JAX's `multihost_utils.reached_preemption_sync_point` solves the same problem, but its notice reaches the other
processes only through a thread that polls once a second, and it misses a notice that arrives before a resumed run
has reported its first step; the sum here costs one scalar reduction per step and stops at a step known in advance.
The handler installed here replaces the one JAX's preemption service installs in `jax.distributed.initialize`.)

For tests, TLJAX_TEST_SIGTERM_AT_STEP=N makes the process send itself SIGTERM right after global step N, so that a
test stops a run at an exact step (a phase's last, the next phase's first, the run's last) instead of racing a timer.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax.training import parallel

EXIT_STATUS = os.EX_TEMPFAIL  # 75, "temporary failure, retry": the run saved and asks to be rerun
TEST_SIGNAL_VARIABLE = "TLJAX_TEST_SIGTERM_AT_STEP"


class Preempted(Exception):
    """SIGTERM: the run saved a checkpoint at global step `step` and stopped; rerunning it resumes from there."""

    def __init__(self, step: int) -> None:
        super().__init__(f"SIGTERM: saved checkpoint at step {step}; rerun the same command to resume")
        self.step = step


def _count(flags: dict[str, jax.Array], axis_name: str | None = None) -> jax.Array:
    """The number of devices whose process has received SIGTERM (each device holds its process's flag)."""
    total = jnp.sum(flags["sigterm"])
    return total if axis_name is None else jax.lax.psum(total, axis_name)


class Preemption:
    """SIGTERM caught for the duration of a run (`with Preemption(par):`), and the processes' agreement on it:
    `poll(global_step)` after each step says whether to stop there, the same answer on every process."""

    def __init__(self, par: parallel.Pmap | parallel.Jit) -> None:
        self.received = False
        self._par = par
        self._count = par.compile(_count, donate=False) if jax.process_count() > 1 else None
        self._last_count: Any = None  # the sum dispatched after the previous step (several processes)
        self._signal_at = int(os.environ.get(TEST_SIGNAL_VARIABLE, "-1"))
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._notice)
        return self

    def __exit__(self, *exc: object) -> None:
        # None: the previous handler was not installed from Python; the default is the closest to it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def _notice(self, *_: object) -> None:
        self.received = True

    def poll(self, step: int) -> bool:
        """Whether to save and stop after global step `step` (dispatched, not necessarily finished).

        One process: SIGTERM has arrived. Several: some process had received it when it polled after the previous
        step. Call it after every step of the run, on every process.
        """
        if step == self._signal_at:
            signal.raise_signal(signal.SIGTERM)  # handled before this returns: the flag is set for this very step
        if self._count is None:
            return self.received
        n = len(jax.local_devices())
        last, self._last_count = self._last_count, self._count(
            self._par.put_batch({"sigterm": np.full(n, self.received, np.int32)}))
        return last is not None and int(self._par.get_metrics(last)) > 0
