"""Record the software and hardware a result came from."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = ("jaxcifar", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy")


def environment() -> dict[str, object]:
    """Versions of Python and the key packages, the JAX backend and devices, and XLA flags."""
    import os

    import jax

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
