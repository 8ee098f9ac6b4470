"""XLA:CPU flags that jaxcifar sets before JAX starts its backend.

Measured on 2-core x86 machines (jax 0.10.2): turning YNNPACK fusion off
(``--xla_cpu_experimental_ynn_fusion_type=``) speeds up the ConvNet train step 1.4-2.4x. The flag is
only added when the user has not set it, only when ``JAXCIFAR_XLA_DEFAULTS`` is not ``0``, and it only
affects the CPU backend. It must run before the first JAX computation; importing jaxcifar first does that.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def configure_xla_cpu() -> None:
    if os.environ.get("JAXCIFAR_XLA_DEFAULTS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def deterministic_gpu() -> None:
    """Ask XLA for run-to-run identical GPU results (``--xla_gpu_deterministic_ops=true``: no atomics in
    reductions and scatters, deterministic convolution algorithms). It costs speed on a GPU and changes
    nothing on CPU, whose results are already identical run to run. Must run before JAX starts its backend;
    afterwards the flag would be ignored, so that is a ConfigError."""
    from jax._src import xla_bridge

    from jaxcifar.errors import ConfigError

    if xla_bridge.backends_are_initialized():
        raise ConfigError("deterministic_gpu() must run before the first JAX computation: call it (or pass "
                          "--deterministic) at the start of the program")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU_FLAG}".strip()
