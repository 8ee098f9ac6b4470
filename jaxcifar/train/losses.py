"""Losses ``loss_fn(logits, labels) -> per-example loss float32 [B]``.

``labels`` are integer class indices int32 [B], or soft targets float [B, classes] when a label-mixing
augmentation (mixup, cutmix) is on; evaluation always passes integer labels. A user's ``loss_fn`` given to
:func:`~jaxcifar.train.fit` follows the same protocol.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def targets_of(labels: jax.Array, num_classes: int) -> jax.Array:
    """Soft targets float32 [B, classes]: one-hot of integer labels, or the labels themselves if already soft."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return jax.nn.one_hot(labels, num_classes)
    return labels.astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy per example against integer or soft ``labels``, the targets smoothed towards the
    uniform distribution by ``label_smoothing`` (PyTorch's ``CrossEntropyLoss(label_smoothing=...)``)."""
    targets = targets_of(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)

