"""Metrics over the predictions of K models (seeds) on one set of images, as pure ``jax.numpy`` functions:
ensemble accuracy, pairwise disagreement, per-class accuracy and calibration (ECE, NLL, Brier score, reliability
bins). :func:`seed_metrics` computes all of them in one compiled program. Inputs are softmax probabilities
``probs`` float [K, N, C] (or [N, C] for one model) and integer ``labels`` [N]."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

ECE_BINS = 15
# Probabilities are clipped here before the log of the NLL: a float32 softmax can round a wrong class's
# probability to 0, whose log is -inf. log(1e-12) = -27.6 bounds one example's NLL.
MIN_PROBABILITY = 1e-12


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of images whose most probable class is the label ([N, C] -> scalar)."""
    return (probs.argmax(-1) == labels).mean()


def disagreement_matrix(predictions: jax.Array) -> jax.Array:
    """[K, K]: the fraction of images on which models i and j predict different classes (``predictions`` int
    [K, N]); zero on the diagonal."""
    return (predictions[:, None, :] != predictions[None, :, :]).mean(-1)


def per_class_accuracy(predictions: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """[K, C]: each model's accuracy on the images of each class (NaN for a class with no image)."""
    onehot = jax.nn.one_hot(labels, num_classes)  # [N, C]
    correct = (predictions == labels).astype(jnp.float32)  # [K, N]
    counts = onehot.sum(0)
    return jnp.where(counts > 0, correct @ onehot / jnp.maximum(counts, 1.0), jnp.nan)


def calibration(probs: jax.Array, labels: jax.Array, bins: int = ECE_BINS) -> dict[str, jax.Array]:
    """Calibration of one model ([N, C]): ``ece`` (expected calibration error: confidence, the top
    probability, binned into ``bins`` equal-width bins (lo, hi]; the count-weighted mean of |accuracy -
    mean confidence| over bins), ``nll`` (mean negative log-likelihood of the label), ``brier`` (mean over
    images of the squared distance between the probabilities and the one-hot label, summed over classes:
    0 perfect, 2 worst) and the reliability bins: ``bin_confidence``, ``bin_accuracy`` (NaN when empty) and
    ``bin_count``."""
    n, num_classes = probs.shape
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(jnp.float32)
    index = jnp.clip(jnp.ceil(confidence * bins).astype(jnp.int32) - 1, 0, bins - 1)
    count = jnp.zeros(bins).at[index].add(1.0)
    conf_sum = jnp.zeros(bins).at[index].add(confidence)
    correct_sum = jnp.zeros(bins).at[index].add(correct)
    safe = jnp.maximum(count, 1.0)
    ece = jnp.abs(correct_sum - conf_sum).sum() / n
    label_prob = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    onehot = jax.nn.one_hot(labels, num_classes)
    return {
        "ece": ece,
        "nll": -jnp.log(jnp.maximum(label_prob, MIN_PROBABILITY)).mean(),
        "brier": ((probs - onehot) ** 2).sum(-1).mean(),
        "bin_confidence": jnp.where(count > 0, conf_sum / safe, jnp.nan),
        "bin_accuracy": jnp.where(count > 0, correct_sum / safe, jnp.nan),
        "bin_count": count,
    }


def seed_metrics(probs: jax.Array, labels: jax.Array, bins: int = ECE_BINS) -> dict[str, Any]:
    """Every metric of K models' ``probs`` [K, N, C] on ``labels`` [N]: per model ``accuracy`` [K] and
    calibration (``ece``, ``nll``, ``brier`` [K], reliability bins [K, bins]); ``per_class_accuracy``
    [K, C]; ``disagreement`` [K, K]; and the ``ensemble`` (the mean of the K softmaxes) with its accuracy and
    calibration. Jit it (``jax.jit(seed_metrics, static_argnums=2)``) to run it as one program."""
    predictions = probs.argmax(-1)
    ensemble = probs.mean(0)
    return {
        "accuracy": (predictions == labels).mean(-1),
        **jax.vmap(calibration, in_axes=(0, None, None))(probs, labels, bins),
        "per_class_accuracy": per_class_accuracy(predictions, labels, probs.shape[-1]),
        "disagreement": disagreement_matrix(predictions),
        "ensemble": {"accuracy": accuracy(ensemble, labels), **calibration(ensemble, labels, bins)},
    }
