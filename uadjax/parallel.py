"""Device mesh, shardings and host-to-global batches (data parallelism with jit, no pmap).

Parameters are replicated (`P()`), batches are split along their leading axis over the
'data' mesh axis (`P('data')`). XLA inserts the gradient all-reduce. On several hosts call
`initialize_distributed()` first; every host then feeds its own slice of the global batch.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Starts jax.distributed when launched as one of several processes.

    Activated by the standard variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`) or a cluster JAX detects itself (SLURM, TPU pods, Kubernetes).
    A plain single-process run does nothing.
    """
    if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("UADJAX_DISTRIBUTED")):
        return
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # Cross-process collectives on CPU hosts (the test suite's two local processes).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over all (or the first `num_devices`) devices.

    The axis is `Auto`: inputs carry explicit NamedShardings and XLA propagates them through
    the network, so model code (reshapes in pooling, attention) needs no sharding
    annotations. With `Explicit` axes every such reshape would need an `out_sharding`.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def local_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over this process's devices (or the first `num_devices`):
    for work each process does on its own share, e.g. scoring its volumes."""
    devices = jax.local_devices()
    n = len(devices) if num_devices is None else num_devices
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def share(items: list) -> list:
    """This process's share of `items`: every process_count-th one, from its index (a
    disjoint round-robin split; with one process, all of them)."""
    return list(items)[jax.process_index()::jax.process_count()]


@contextlib.contextmanager
def together(name: str):
    """A block every process runs, then a barrier that also tells whether all succeeded.

    If the block raises on any process, every process raises (the one that failed with its
    own error, the others with a RuntimeError naming the barrier), instead of the others
    waiting forever at the next barrier. With one process, just the block.
    """
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except BaseException:
        _all_succeeded(False)
        raise
    if not _all_succeeded(True):
        raise RuntimeError(f"{name}: another process failed (its log says why); this one "
                           "stops too. Rerun the same command: finished work is kept")


def _all_succeeded(ok: bool) -> bool:
    """Every process's `ok`, gathered (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([ok], np.int32))
    return bool(np.all(np.asarray(flags)))


def gather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective: every process
    calls it); with one process, [obj]."""
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, sizes.ravel(),
                                                                        strict=True)]


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh) -> None:
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n}")


def local_batch_size(global_batch_size: int) -> int:
    """The share of the global batch that this process loads."""
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def to_global(batch: dict, mesh) -> dict:
    """Numpy host batch (this process's rows) -> global jax arrays sharded over 'data'.

    Non-numeric entries (strings) are dropped: they never enter jitted code.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "biuf":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def replicate(tree, mesh):
    """Places a pytree of arrays replicated on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
