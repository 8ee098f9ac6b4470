"""Seeded train/validation splits and class counts (pure ``jnp``, usable under ``jit``/``vmap``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar.errors import ConfigError


def validation_count(num_examples: int, val: int | float) -> int:
    """``val`` as a count: an int is a count, a float in (0, 1) a fraction of ``num_examples``."""
    if isinstance(val, float) and not float(val).is_integer():
        if not 0.0 < val < 1.0:
            raise ConfigError(f"validation fraction {val} must lie in (0, 1): e.g. 0.2, or give a count")
        count = int(round(val * num_examples))
    else:
        count = int(val)
    if not 0 <= count < num_examples:
        problem = f"validation size {count} must be in [0, {num_examples}): lower "
        raise ConfigError(problem + "val_size", cli=problem + "--val-size")
    return count


def _stratified_quota(labels: np.ndarray, count: int, num_classes: int) -> np.ndarray:
    """Per-class validation counts proportional to class frequency, summing exactly to ``count``
    (largest-remainder rounding)."""
    freq = np.bincount(labels, minlength=num_classes)
    exact = freq * count / len(labels)
    quota = np.floor(exact).astype(np.int64)
    short = count - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    return quota


def split_indices(
    key: jax.Array, labels: np.ndarray, val: int | float, *, stratified: bool = False, num_classes: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Random disjoint ``(train_idx, val_idx)`` int32 index arrays covering ``range(len(labels))``.

    ``labels`` must be concrete (sizes are static); ``key`` may be traced, so ``jax.vmap`` over keys gives
    every run its own split. With ``stratified`` each class keeps its share in the validation set.
    """
    labels = np.asarray(labels)
    count = validation_count(len(labels), val)
    if not stratified:
        return _shuffled_split(key, count=count, n=len(labels))
    num_classes = int(num_classes or labels.max() + 1)
    quota = _stratified_quota(labels, count, num_classes)
    return _stratified_split(key, jnp.asarray(labels), jnp.asarray(quota), count=count)


# One compiled program per split size (a dozen eager ops would each compile once per shape: seconds on CPU).
@functools.partial(jax.jit, static_argnames=("count", "n"))
def _shuffled_split(key: jax.Array, *, count: int, n: int) -> tuple[jax.Array, jax.Array]:
    """The first ``count`` of a random permutation of ``range(n)`` as validation, the rest as training."""
    perm = jax.random.permutation(key, n)
    return perm[count:].astype(jnp.int32), perm[:count].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("count",))
def _stratified_split(key: jax.Array, lab: jax.Array, quota: jax.Array, *, count: int) -> tuple[jax.Array, jax.Array]:
    """A random split with ``quota[c]`` validation examples of class ``c``, shuffled within each side."""
    n, num_classes = lab.shape[0], quota.shape[0]
    perm = jax.random.permutation(key, n)
    order = perm[jnp.argsort(lab[perm], stable=True)]  # grouped by class, random within class
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(jnp.bincount(lab, length=num_classes))[:-1]])
    rank = jnp.arange(n) - starts[lab[order]]
    is_val = rank < quota[lab[order]]
    val_idx = order[jnp.nonzero(is_val, size=count)[0]]
    train_idx = order[jnp.nonzero(~is_val, size=n - count)[0]]
    # Shuffle within each side so classes are not grouped.
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    train_idx = jax.random.permutation(k1, train_idx).astype(jnp.int32)
    return train_idx, jax.random.permutation(k2, val_idx).astype(jnp.int32)


def train_val_split(split, val: int | float, seed: int = 0, *, stratified: bool = False):
    """Split a host :class:`~jaxcifar.data.Split` into ``(train, validation)`` splits, seeded."""
    train_idx, val_idx = split_indices(jax.random.key(seed), split.labels, val, stratified=stratified)
    return split.take(np.asarray(train_idx)), split.take(np.asarray(val_idx))


def class_counts(labels: np.ndarray | jax.Array, num_classes: int) -> np.ndarray:
    """Examples per class: int64 [num_classes]."""
    return np.bincount(np.asarray(labels), minlength=num_classes)
