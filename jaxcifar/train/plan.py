"""The run plan: every decision ``fit`` takes from the config, the run count and the machine, made once.

:func:`make_plan` is pure (it compiles nothing and touches no data), so each rule below has a unit test that
needs no training. Everything downstream (the program, the epoch loop, checkpoints) reads the plan instead
of interpreting the config again.

* **strategy**: how several runs share one program: ``"single"`` (no run axis), ``"vmap"`` (one batched
  program; best on GPU/TPU) or ``"loop"`` (the runs traced one after another; best on XLA:CPU, where
  vmapped convolutions become slow grouped convolutions).
* **loop**: ``"scan"`` (the whole epoch as one ``lax.scan``; accelerators) or ``"unrolled"`` (straight-line
  chunks of steps; XLA:CPU runs convolution gradients inside a loop ~30x slower).
* **chunk**: steps per compiled call. Unrolled chunks cost compile time in proportion to their length, and
  on CPU their speed gain over a one-step call is a few per cent, so a short training run gets a short chunk
  (see :func:`unrolled_chunk`): the chunk length never changes the numbers, only how they are dispatched.
* **group size**: runs compiled and trained together (``None``: as many as fit in memory, found by
  compiling once, see :mod:`jaxcifar.train.program`).
* **parallel**: ``"data"`` (every batch split over the devices) or ``"runs"`` (the run axis sharded).
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
from jax.sharding import Mesh

from jaxcifar.data.batching import steps_per_epoch
from jaxcifar.errors import ConfigError
from jaxcifar.train.config import TrainConfig
from jaxcifar.train.parallel import check_batch, data_mesh, parallel_mode

# An unrolled chunk of k steps compiles in about k times the time of one step, and saves a few per cent of
# step time over one-step calls (docs/guide.md, "Start-up"). A run of fewer than this many steps per chunk
# step of compile gets a shorter chunk: the compile would cost more than the chunk saves.
STEPS_PER_UNROLLED_STEP = 64


@dataclass(frozen=True)
class RunPlan:
    """How ``fit`` trains ``n_runs`` runs of one config on this machine (see the module docstring)."""

    n_runs: int
    run_axis: bool  # the state carries a leading run axis (fit(runs=...)), even for one run
    strategy: str  # "single" | "vmap" | "loop"
    loop: str  # "scan" | "unrolled"
    max_chunk: int  # steps per compiled call for one run (the "loop" strategy divides it by the group size)
    steps_per_epoch: int
    group_size: int | None  # runs per compiled group; None = as many as fit in memory
    parallel: str  # "data" | "runs"
    mesh: Mesh
    backend: str

    def chunk(self, group_runs: int) -> int:
        """Steps per compiled call for a group of ``group_runs`` runs: the whole epoch for ``scan``; for the
        ``loop`` strategy the runs are traced one after another, so the chunk shrinks to keep the program's
        size."""
        if self.loop == "scan":
            return self.steps_per_epoch
        per_run = self.max_chunk // group_runs if self.strategy == "loop" else self.max_chunk
        return max(1, min(per_run, self.steps_per_epoch))

    def bounds(self, group_runs: int) -> tuple[tuple[int, int], ...]:
        """``(first, end)`` steps of each compiled call in an epoch (the last may be shorter)."""
        chunk = self.chunk(group_runs)
        return tuple((lo, min(lo + chunk, self.steps_per_epoch)) for lo in range(0, self.steps_per_epoch, chunk))

    def groups(self, group_size: int) -> list[range]:
        """The run indices of each compiled group, ``group_size`` at a time."""
        return [range(lo, min(lo + group_size, self.n_runs)) for lo in range(0, self.n_runs, group_size)]

    @property
    def data_mesh(self) -> Mesh | None:
        """The mesh every batch is split over, or None (one device, or the runs are sharded instead)."""
        return self.mesh if self.parallel == "data" and self.mesh.size > 1 else None

    @property
    def run_mesh(self) -> Mesh | None:
        """The mesh the run axis is sharded over, or None."""
        return self.mesh if self.parallel == "runs" and self.mesh.size > 1 else None


def run_strategy(config: TrainConfig, run_axis: bool, backend: str) -> str:
    """``"single"`` without a run axis; otherwise the configured strategy, ``"auto"`` = ``"loop"`` on CPU
    (grouped convolutions are slow there) and ``"vmap"`` elsewhere."""
    if not run_axis:
        return "single"
    if config.run_strategy == "auto":
        return "loop" if backend == "cpu" else "vmap"
    return config.run_strategy


def loop_kind(config: TrainConfig, backend: str) -> str:
    """``config.loop``, ``"auto"`` = unrolled chunks on CPU, the rolled whole-epoch scan elsewhere."""
    if config.loop == "auto":
        return "unrolled" if backend == "cpu" else "scan"
    return config.loop


def unrolled_chunk(config: TrainConfig, spe: int) -> int:
    """Steps per unrolled chunk: ``config.unroll``, shortened for a short run so that its compile time
    (about one step's worth of compile per unrolled step) stays below :data:`STEPS_PER_UNROLLED_STEP` steps
    of training per unrolled step. Never more than an epoch."""
    total_steps = config.epochs * spe
    affordable = max(1, total_steps // STEPS_PER_UNROLLED_STEP)
    return max(1, min(config.unroll, affordable, spe))


def group_size(config: TrainConfig, n_runs: int, run_axis: bool, strategy: str, mesh: Mesh) -> int | None:
    """Runs per compiled group: all of them without a run axis; ``config.runs_per_chunk`` when set; all of
    them when a vmapped sweep's run axis can be sharded over several devices; else None (memory decides)."""
    if not run_axis:
        return n_runs
    if config.runs_per_chunk is not None:
        return config.runs_per_chunk
    shardable = mesh.size > 1 and config.parallel != "data" and strategy == "vmap" and n_runs % mesh.size == 0
    return n_runs if shardable else None


def make_plan(config: TrainConfig, n_runs: int, run_axis: bool, train_size: int, mesh: Mesh | None = None,
              backend: str | None = None) -> RunPlan:
    """The plan for ``n_runs`` runs of ``config`` on ``train_size`` training examples per run, over ``mesh``
    (default: ``config.devices`` devices) on ``backend`` (default: JAX's). Raises ``ConfigError`` for a
    parallel mode the devices or runs cannot serve."""
    backend = backend or jax.default_backend()
    mesh = mesh if mesh is not None else data_mesh(config.devices)
    strategy = run_strategy(config, run_axis, backend)
    loop = loop_kind(config, backend)
    spe = steps_per_epoch(train_size, config.batch_size)
    size = group_size(config, n_runs, run_axis, strategy, mesh)
    sizes = [min(size, n_runs - lo) for lo in range(0, n_runs, size)] if size else [n_runs]
    parallel = parallel_mode(config.parallel, mesh, strategy, sizes)
    if parallel == "data":
        check_batch(config.batch_size, mesh)
    return RunPlan(n_runs=n_runs, run_axis=run_axis, strategy=strategy, loop=loop,
                   max_chunk=unrolled_chunk(config, spe) if loop == "unrolled" else spe, steps_per_epoch=spe,
                   group_size=size, parallel=parallel, mesh=mesh, backend=backend)


def halving_group_size(n_runs: int, fits: Callable[[int], bool]) -> int:
    """The largest group size, halving from ``n_runs``, for which ``fits(size)`` is true (at least 1)."""
    size = n_runs
    while size > 1 and not fits(size):
        size = math.ceil(size / 2)
    return size


def compute_dtype(requested: str, backend: str | None = None, allow_cpu_bfloat16: bool = False) -> str:
    """``requested`` compute dtype; ``"auto"`` = bfloat16 on an accelerator, float32 on CPU (XLA:CPU has no
    fast bf16 path: bf16 was slower there). An explicit ``"bfloat16"`` on the CPU is the GPU setting used
    where JAX fell back to the CPU: a ``ConfigError`` unless ``allow_cpu_bfloat16`` (to study its numerics)."""
    on_cpu = (backend or jax.default_backend()) == "cpu"
    if requested == "bfloat16" and on_cpu and not allow_cpu_bfloat16:
        raise ConfigError("--dtype bfloat16 is the GPU setting but JAX runs on the CPU, where bfloat16 is slower "
                          "than float32: use --dtype auto (float32 here), install the CUDA build for your GPU "
                          "(README), or add --cpu-bfloat16 to study bfloat16 numerics on the CPU")
    if requested != "auto":
        return requested
    return "float32" if on_cpu else "bfloat16"


CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")  # what the cuda13 / cuda12 extras install


def cuda_fallback(backend: str | None = None) -> str | None:
    """The CUDA plugin of JAX that is installed while JAX runs on the CPU anyway (a CUDA build that fell back,
    e.g. on a driver too old for it), else None; also None when the platforms were chosen
    (``JAX_PLATFORMS``, ``jax_platforms``): then the CPU is what was asked for, and a CUDA that fails is
    JAX's own error. Reads package metadata; asks JAX for its backend only when a plugin is installed."""
    installed = [name for name in CUDA_PLUGINS if _installed(name)]
    if not installed or jax.config.jax_platforms or (backend or jax.default_backend()) != "cpu":
        return None
    return installed[0]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def require_accelerator(backend: str | None = None) -> None:
    """Raise ``ConfigError`` when JAX runs on the CPU although a GPU/TPU was asked for (e.g. a CUDA jaxlib
    that fell back to the CPU on a driver too old for it)."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        raise ConfigError("a GPU was required (--require-gpu) but JAX runs on the CPU: install the CUDA build "
                          "matching your driver (pip install -e \".[cuda13]\" for driver >= 580, \".[cuda12]\" "
                          "for older ones), check `nvidia-smi`, and run with JAX_PLATFORMS=cuda to see why")
