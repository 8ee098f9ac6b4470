"""Several training runs in one compiled program: the run axis, its strategy, and how many runs fit.

A sweep's state carries a leading run axis. :func:`over_runs` turns a single-run function into one over
that axis, either with ``jax.vmap`` (one batched program; best on GPU/TPU) or by tracing the runs one
after another into the same program (``"loop"``; best on XLA:CPU, where vmapped convolution weights
become grouped convolutions that run at about half speed). Both give the same numbers up to float
summation order; ``"loop"`` gives exactly the single-run program's operations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

MEMORY_FRACTION = 0.6  # of device (or, on CPU, host) memory a group of runs may use


def over_runs(f: Callable, in_axes: Sequence[int | None], strategy: str) -> Callable:
    """``f`` mapped over the leading run axis of the arguments whose ``in_axes`` entry is 0."""
    if strategy == "vmap":
        return jax.vmap(f, in_axes=tuple(in_axes))

    def looped(*args):
        n = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes, strict=True) if ax == 0)
        outs = [f(*(jax.tree.map(lambda x: x[i], a) if ax == 0 else a  # noqa: B023
                    for a, ax in zip(args, in_axes, strict=True))) for i in range(n)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return looped


def memory_budget(fraction: float = MEMORY_FRACTION) -> int:
    """Bytes a group of runs may use: ``fraction`` of the first device's memory limit, or of host RAM on
    backends that report none (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * fraction)


def program_bytes(compiled: Any) -> int:
    """Peak bytes of a compiled program: arguments + outputs + temporaries (XLA's own analysis)."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def concat_runs(trees: Sequence[Any]) -> Any:
    """Concatenate stacked states (or metrics) of consecutive run groups along the run axis."""
    return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)
