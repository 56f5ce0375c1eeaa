"""Data parallelism over all devices, two ways behind one small interface.

* "pmap": the state is replicated with a leading device axis; each device runs the step on its slice of the batch;
  gradients and BatchNorm statistics are averaged with `lax.pmean` over the "batch" axis.
* "jit": one `jax.jit` over a `Mesh` of all devices; the batch is sharded on the "data" axis with `NamedSharding`,
  the state replicated; XLA inserts the reductions.

Both accept this process's part of each global batch (multi-host: every process passes its own examples) and give
the same parameters as one device on the same global batch. `prefetch` puts each batch on the devices one step
ahead, so that its transfer overlaps the step before it.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tljax.models import conv

PyTree = Any
AXIS = "batch"
MODES = ("pmap", "jit")


class Pmap:
    """`jax.pmap` over the local devices (global across processes in a multi-host run)."""

    axis_name = AXIS

    def __init__(self) -> None:
        self.local_devices = jax.local_devices()
        self.stacked = NamedSharding(Mesh(np.asarray(self.local_devices), (AXIS,)), PartitionSpec(AXIS))

    def put_state(self, state: PyTree) -> PyTree:
        """One copy per local device, stacked on a leading axis."""
        n = len(self.local_devices)
        return jax.device_put(jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), state), self.stacked)

    def get_state(self, state: PyTree) -> PyTree:
        return jax.tree.map(lambda x: x[0], state)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's batch split over the local devices on a leading axis, on the devices (transfer started)."""
        n = len(self.local_devices)
        return jax.device_put({k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()},
                              self.stacked)

    def compile(self, fn: Callable, donate: bool) -> Callable:
        """`jax.pmap`, which takes no XLA options: on CPU its convolutions stay in XLA's default library."""
        return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS, donate_argnums=(0,) if donate else ())

    def get_metrics(self, tree: PyTree) -> PyTree:
        """Device values -> host numpy; reduced metrics are equal on every device, so take the first."""
        return jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(tree))

    def gather(self, x: jax.Array) -> np.ndarray:
        """Per-example outputs of every process, flattened in global batch order."""
        local = np.asarray(jax.device_get(x)).reshape(-1, *x.shape[2:])
        return np.asarray(multihost_utils.process_allgather(local, tiled=True))


class Jit:
    """One `jax.jit` over a 1-D `Mesh` of all devices, batch sharded on its "data" axis."""

    axis_name = None

    def __init__(self) -> None:
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec("data"))

    def put_state(self, state: PyTree) -> PyTree:
        return jax.device_put(state, self.replicated)

    def get_state(self, state: PyTree) -> PyTree:
        return state

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()}

    def compile(self, fn: Callable, donate: bool) -> Callable:
        return jax.jit(fn, out_shardings=self.replicated, donate_argnums=(0,) if donate else (),
                       compiler_options=conv.compiler_options())

    def get_metrics(self, tree: PyTree) -> PyTree:
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def gather(self, x: jax.Array) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def prefetch(par: Pmap | Jit, batches: Iterable[dict[str, np.ndarray]], ahead: int = 1) -> Iterator[dict[str, Any]]:
    """`par.put_batch` of each of `batches`, placed `ahead` batches before it is asked for (JAX transfers
    asynchronously): the step running while the next batch is asked for overlaps that batch's transfer."""
    batches = iter(batches)
    queue = collections.deque(par.put_batch(b) for b in itertools.islice(batches, ahead + 1))
    while queue:
        yield queue.popleft()
        queue.extend(par.put_batch(b) for b in itertools.islice(batches, 1))


def micro_batches(per_device_batch: int, examples: int = 8) -> int:
    """Independent slices for an inference-mode backbone pass (`steps.backbone_features`) on this backend.

    On CPU, slices of `examples` examples (at most 8 slices, dividing the batch evenly) let XLA overlap operations
    across the cores; accelerators run one large batch best, so 1 there.
    """
    if jax.default_backend() != "cpu":
        return 1
    return max((k for k in range(1, 9) if per_device_batch % k == 0 and per_device_batch // k >= examples),
               default=1)


def initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one; a no-op for a single process.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID. Managed clusters (SLURM,
    Open MPI, Kubernetes, Cloud TPU) are detected by `jax.distributed.initialize()` itself when
    TLJAX_DISTRIBUTED=auto. On CPU, set JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo for cross-process collectives.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("TLJAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def create(mode: str) -> Pmap | Jit:
    """The strategy for `config.parallelism`."""
    if mode not in MODES:
        raise ValueError(f"unknown parallelism {mode!r}; choose one of {MODES}")
    return Pmap() if mode == "pmap" else Jit()
