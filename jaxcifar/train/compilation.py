"""Compilation bookkeeping: how many XLA programs a piece of code compiled and how long that took, and the
opt-in persistent compilation cache."""

from __future__ import annotations

import time
from pathlib import Path

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

# JAX reports each phase of a compilation as a duration event; these three make up one jit compilation.
_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/core/compile/backend_compile_duration")
_BACKEND = "/jax/core/compile/backend_compile_duration"


class CompileClock:
    """Counts compilations while entered: ``compiles`` (XLA backend compilations, including those the
    persistent cache served), ``seconds`` (tracing + lowering + compiling or loading) and ``wall`` (the
    block's wall seconds)::

        with CompileClock() as clock:
            ...
        clock.compiles, clock.seconds
    """

    def __init__(self) -> None:
        self.compiles = 0
        self.seconds = 0.0
        self.wall = 0.0  # wall seconds spent inside the block

    def _listen(self, event: str, duration: float, **_: object) -> None:
        if event in _EVENTS:
            self.seconds += duration
        if event == _BACKEND:
            self.compiles += 1

    def __enter__(self) -> CompileClock:
        monitoring.register_event_duration_secs_listener(self._listen)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._start
        monitoring.unregister_event_duration_listener(self._listen)


def enable_compile_cache(directory: str | Path) -> Path:
    """Keep compiled programs in ``directory`` across processes (JAX's persistent compilation cache; the
    same as setting ``JAX_COMPILATION_CACHE_DIR``). Every program is kept, however fast it compiled, since
    on CPU many small ones add up. The key covers the program, the XLA flags and the jax version."""
    path = Path(directory).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX opens its cache at the first compilation and ignores a later change of directory: reopen it.
    compilation_cache.reset_cache()
    return path
