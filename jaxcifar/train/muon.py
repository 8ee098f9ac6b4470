"""Muon for convolution and dense kernels, from optax's implementation.

Muon (Keller Jordan, 2024) replaces a weight matrix's momentum update by its nearest semi-orthogonal matrix,
computed with a few Newton-Schulz iterations: every direction the update spans moves by about the same amount.
``optax.contrib.scale_by_muon`` does the momentum and the iteration; this module adds what a CIFAR recipe needs
around it:

- the kernel layout: a Flax kernel's last axis is its output (HWIO for a conv, IO for a dense layer), every
  other axis is reduced over, so a conv kernel is orthogonalized as the [kh*kw*in, out] matrix that
  PyTorch's Muon builds from its [out, in, kh, kw] weight (the two iterations are transposes of each other);
- :func:`normalize_weights`: airbench94_muon rescales every Muon kernel to Frobenius norm sqrt(fan_out) before
  each step, so the learning rate stays a fixed fraction of the weight scale (batch norm after the conv
  makes the loss blind to that scale).

Difference from PyTorch's reference Muon (airbench94_muon): optax keeps an exponential moving average of the
gradients with Adam-style bias correction; the reference sums them (``buf = m * buf + g``). Newton-Schulz
normalizes its input, so the two agree once the correction has faded (after about ``log(1e-3) / log(m)``
steps: 14 at m = 0.6); in the first steps optax weights the newest gradient more.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon


def kernel_dimensions(tree: Any) -> Any:
    """For each array of ``tree``: Muon's dimension numbers for a Flax kernel (reduce over every axis but the
    last, output along the last)."""
    def numbers(x: jax.Array) -> MuonDimensionNumbers:
        return MuonDimensionNumbers(reduction_axis=tuple(range(x.ndim - 1)), output_axis=x.ndim - 1)

    return jax.tree.map(numbers, tree)


def normalize_weights() -> optax.GradientTransformation:
    """Add to each update the move that first rescales its parameter to Frobenius norm sqrt(fan_out), fan_out
    being the last axis (PyTorch's ``p.mul_(len(p) ** 0.5 / p.norm())`` before the step). Comes after the
    learning rate, since the rescaling is not scaled by it; needs ``params``."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("normalize_weights needs params: call update(updates, state, params)")

        def rescale(u: jax.Array, p: jax.Array) -> jax.Array:
            factor = jnp.sqrt(float(p.shape[-1])) / jnp.linalg.norm(p)
            return u + p * (factor - 1.0)

        return jax.tree.map(rescale, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def muon(learning_rate: optax.ScalarOrSchedule, momentum: float, ns_steps: int,
         normalize: bool = False) -> optax.GradientTransformation:
    """Muon with Nesterov momentum ``momentum`` and ``ns_steps`` Newton-Schulz iterations (optax's quintic
    coefficients) for Flax kernels of any rank >= 2, then the learning rate; with ``normalize``, the
    weight rescaling of :func:`normalize_weights`. No weight decay: the reference recipe uses none here."""
    parts = [scale_by_muon(ns_steps=ns_steps, beta=momentum, nesterov=True, weight_dimension_numbers=kernel_dimensions),
             optax.scale_by_learning_rate(learning_rate)]
    if normalize:
        parts.append(normalize_weights())
    return optax.chain(*parts)
