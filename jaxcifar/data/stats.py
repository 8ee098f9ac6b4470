"""Channel statistics and normalization (pure ``jnp``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar.errors import DataError

# The standard statistics of the original CIFAR training sets, for comparison in reports.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@jax.jit
def _chunk_moments(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images.astype(jnp.float32) / 255.0
    # Two-stage reduction (per image, then over images) keeps float32 sums accurate.
    return x.mean(axis=(1, 2)).sum(0), (x * x).mean(axis=(1, 2)).sum(0)


def channel_stats(images: np.ndarray | jax.Array, chunk: int = 10_000) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and std of uint8 NHWC ``images`` scaled to [0, 1]; two float32 [3] arrays.

    Computed in chunks so a 50,000-image split never needs a float copy of itself.
    """
    n = images.shape[0]
    if n == 0:
        raise DataError("cannot compute channel statistics of an empty split")
    s1 = jnp.zeros(3)
    s2 = jnp.zeros(3)
    for i in range(0, n, chunk):
        a, b = _chunk_moments(jnp.asarray(images[i : i + chunk]))
        s1, s2 = s1 + a, s2 + b
    mean = s1 / n
    return mean, jnp.sqrt(jnp.maximum(s2 / n - mean * mean, 0.0))


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 (or [0, 1] float) NHWC images -> ``(x / 255 - mean) / std`` in ``dtype``; shape kept."""
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
    return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def check_normalized(images: np.ndarray, mean, std, atol: float = 0.02) -> dict[str, list[float] | bool]:
    """Normalize ``images`` with ``mean``/``std`` and verify per-channel mean ~0 and std ~1 (within
    ``atol``). Returns the measured statistics and ``ok``."""
    n_mean, n_std = channel_stats_normalized(images, mean, std)
    ok = bool(jnp.all(jnp.abs(n_mean) < atol) & jnp.all(jnp.abs(n_std - 1.0) < atol))
    return {"mean": [float(v) for v in n_mean], "std": [float(v) for v in n_std], "ok": ok}


def channel_stats_normalized(images: np.ndarray, mean, std, chunk: int = 10_000) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and std of ``normalize(images, mean, std)``, computed in chunks."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)
    raw_mean, raw_std = channel_stats(images, chunk)
    # normalize is affine per channel, so the normalized moments follow exactly from the raw ones.
    return (raw_mean - mean) / std, raw_std / std
