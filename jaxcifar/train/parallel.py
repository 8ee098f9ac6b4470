"""Several devices with ``jax.sharding``: a 1-D device mesh with a ``"data"`` axis. Data parallelism splits
every batch along it, with the state and the dataset replicated; XLA's SPMD partitioner inserts the gradient
all-reduce, so the train step is the same pure function on one device or many. A vmapped sweep can instead
shard its run axis along it (:func:`shard_runs`): each device trains its own runs, with no communication.
Several hosts: call :func:`initialize_distributed` first (``jax.distributed.initialize``); the mesh then
spans every host's devices and each host feeds the same replicated data (see docs/scaling.md)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcifar.errors import ConfigError

DATA_AXIS = "data"


def initialize_distributed(**kwargs: Any) -> None:
    """``jax.distributed.initialize(**kwargs)`` (coordinator address, process count and id come from the
    arguments or the cluster environment: SLURM, Open MPI, Cloud TPU, or ``JAX_COORDINATOR_ADDRESS`` etc.)."""
    jax.distributed.initialize(**kwargs)


def data_mesh(devices: int | None = None) -> Mesh:
    """A mesh over the first ``devices`` devices (all when None) with one axis, ``"data"``."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise ConfigError(f"devices={n} but {len(available)} are available: use 1..{len(available)} or None (all)")
    return Mesh(np.asarray(available[:n]), (DATA_AXIS,))


def check_batch(batch_size: int, mesh: Mesh, what: str = "global batch") -> None:
    if batch_size % mesh.size:
        raise ConfigError(f"{what} {batch_size} does not divide over {mesh.size} devices: use a multiple of "
                          f"{mesh.size} (or fewer devices)")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _place(tree: Any, sharding: NamedSharding) -> Any:
    """Every leaf as a global array laid out by ``sharding``, each device taking its part of the host value
    (works across hosts when each host holds the same values)."""
    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf as a global array with a full copy on each device of ``mesh``."""
    return _place(tree, NamedSharding(mesh, PartitionSpec()))


def shard_runs(tree: Any, mesh: Mesh) -> Any:
    """Every leaf's leading (run) axis split over the devices of ``mesh``."""
    return _place(tree, batch_sharding(mesh))


def parallel_mode(mode: str, mesh: Mesh, strategy: str, group_sizes: list[int]) -> str:
    """``"data"`` or ``"runs"`` for config ``parallel=mode`` (see :class:`~jaxcifar.train.TrainConfig`), given the
    run strategy (``"single"`` for one run) and the run count of each compiled group."""
    divides = all(g % mesh.size == 0 for g in group_sizes)
    if mode == "auto":
        return "runs" if mesh.size > 1 and strategy == "vmap" and divides else "data"
    if mode == "runs":
        if strategy != "vmap":
            raise ConfigError("parallel='runs' shards a vmapped sweep: pass runs=[...] with run_strategy='vmap'")
        if not divides:
            raise ConfigError(f"run groups of {sorted(set(group_sizes))} do not divide over {mesh.size} devices: "
                              f"use a multiple of {mesh.size} runs (and runs_per_chunk), or parallel='data'")
    return mode
