"""Data parallelism with ``jax.sharding``: a 1-D device mesh with a ``"data"`` axis, every batch split along
it, the state and the dataset replicated. XLA's SPMD partitioner inserts the gradient all-reduce, so the
train step is the same pure function on one device or many. Several hosts: call
:func:`initialize_distributed` first (``jax.distributed.initialize``); the mesh then spans every host's
devices and each host feeds the same replicated data (see docs/scaling.md)."""

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


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf as a global array with a full copy on each device of ``mesh`` (works across hosts when
    each host holds the same values)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)
