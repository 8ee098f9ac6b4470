"""Batch index plans built on the device, so a whole epoch can run inside ``lax.scan``.

Training: each epoch is a fresh permutation from a key; batches have a fixed size and the ``N % B``
examples left over after the last full batch are dropped *for that epoch only* (a different random subset
each epoch, so every example is seen). Evaluation: every example exactly once; the last batch is padded
with index 0 and a zero weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar.errors import ConfigError


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full training batches per epoch (the remainder is dropped)."""
    if batch_size <= 0 or batch_size > num_examples:
        raise ConfigError(
            f"batch size {batch_size} must be in [1, {num_examples}] (the training split size): lower it"
        )
    return num_examples // batch_size


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """int32 [steps, batch_size] example indices for one shuffled epoch (pure; jit/vmap over ``key``)."""
    steps = steps_per_epoch(num_examples, batch_size)
    perm = jax.random.permutation(key, num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def eval_batches(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``: int32 [steps, batch] and float32 [steps, batch]; every example appears once
    with weight 1, padding slots have index 0 and weight 0."""
    if num_examples <= 0:
        raise ConfigError("cannot evaluate an empty split")
    batch_size = max(1, min(batch_size, num_examples))
    steps = -(-num_examples // batch_size)
    index = np.zeros(steps * batch_size, np.int32)
    index[:num_examples] = np.arange(num_examples)
    weight = np.zeros(steps * batch_size, np.float32)
    weight[:num_examples] = 1.0
    return index.reshape(steps, batch_size), weight.reshape(steps, batch_size)
