"""Label-mixing augmentations: pure functions ``(key, images, targets) -> (images, targets)``.

``images`` are the normalized float batch [B, H, W, C] (mixing commutes with the per-channel affine
normalization, so mixing after it is the same as mixing the raw pixels), ``targets`` are soft labels float
[B, classes] (one-hot to start with). Each op pairs every example with another of the same batch (a random
permutation) and mixes both the images and the targets with one weight per batch, as in the papers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

MixFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _partners(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of the batch: example i is mixed with example ``perm[i]``."""
    return jax.random.permutation(key, n)


def _applied(key: jax.Array, p: float) -> jax.Array:
    """Whether this batch is mixed at all (probability ``p``)."""
    return jax.random.bernoulli(key, p)


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float = 0.2,
          p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """mixup (Zhang et al., 2018): ``lam * x + (1 - lam) * x[perm]`` for images and targets, ``lam`` drawn
    from Beta(``alpha``, ``alpha``) once per batch; with probability ``1 - p`` the batch is left as it is."""
    k_lam, k_perm, k_apply = jax.random.split(key, 3)
    lam = jax.random.beta(k_lam, alpha, alpha)
    lam = jnp.where(_applied(k_apply, p), lam, 1.0)
    perm = _partners(k_perm, images.shape[0])
    mixed = lam * images.astype(jnp.float32) + (1.0 - lam) * images[perm].astype(jnp.float32)
    return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * targets[perm]


def cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float = 1.0,
           p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """CutMix (Yun et al., 2019): paste one rectangle of the partner image into every image; the box has
    area ``1 - lam`` of the image (``lam`` from Beta(``alpha``, ``alpha``)) at a uniform random centre, is
    clipped at the border, and the targets mix by the area actually pasted. With probability ``1 - p`` the
    batch is left as it is."""
    n, h, w, _ = images.shape
    k_lam, k_perm, k_y, k_x, k_apply = jax.random.split(key, 5)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = jnp.sqrt(1.0 - lam)
    cy = jax.random.uniform(k_y) * h
    cx = jax.random.uniform(k_x) * w
    ys = jnp.arange(h)[:, None] + 0.5
    xs = jnp.arange(w)[None, :] + 0.5
    box = (jnp.abs(ys - cy) < cut * h / 2) & (jnp.abs(xs - cx) < cut * w / 2)
    box = box & _applied(k_apply, p)
    perm = _partners(k_perm, n)
    pasted = jnp.where(box[None, :, :, None], images[perm], images)
    kept = 1.0 - box.mean()  # the share of each image that is its own
    return pasted, kept * targets + (1.0 - kept) * targets[perm]


MIXES: dict[str, MixFn] = {"mixup": mixup, "cutmix": cutmix}
