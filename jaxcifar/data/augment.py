"""Data augmentation as pure functions ``(key, images) -> images``.

``images`` is a batch, NHWC, of any dtype: uint8 in [0, 255] or float in [0, 1] (after normalization the
geometric ops still work; the photometric ones assume [0, 1] floats or uint8). Every op keeps shape and
dtype, draws an independent random choice per image from ``key``, and composes under ``jax.jit``,
``jax.vmap`` and ``lax.scan``, so the whole pipeline runs on the device inside a compiled epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from jaxcifar.data.mix import MIXES, MixFn
from jaxcifar.errors import ConfigError

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def _to_float(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)


def _from_float(y: jax.Array, like: jax.Array) -> jax.Array:
    if jnp.issubdtype(like.dtype, jnp.integer):
        return jnp.clip(jnp.round(y * 255.0), 0, 255).astype(like.dtype)
    return y.astype(like.dtype)


def random_flip(key: jax.Array, images: jax.Array, p: float = 0.5) -> jax.Array:
    """Mirror each image left-right with probability ``p``."""
    flip = jax.random.bernoulli(key, p, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def random_crop(key: jax.Array, images: jax.Array, padding: int = 4, mode: str = "constant") -> jax.Array:
    """Pad each side by ``padding`` (``mode``: ``'constant'`` zeros or ``'reflect'``), then take a random
    crop of the original size per image."""
    if mode not in ("constant", "reflect"):
        raise ConfigError(f"crop padding mode {mode!r} is unknown: use 'constant' or 'reflect'")
    if padding == 0:
        return images
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_translate(key: jax.Array, images: jax.Array, max_shift: int = 2) -> jax.Array:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with zeros."""
    return random_crop(key, images, padding=max_shift, mode="constant")


def random_rotation(key: jax.Array, images: jax.Array, max_degrees: float = 15.0, order: int = 1) -> jax.Array:
    """Rotate each image about its centre by an angle uniform in [-max_degrees, max_degrees], zero fill;
    ``order`` 1 interpolates bilinearly, 0 takes the nearest pixel (torchvision's ``RandomRotation`` default)."""
    if order not in (0, 1):
        raise ConfigError(f"rotation order {order} must be 0 (nearest) or 1 (bilinear)")
    n, h, w, c = images.shape
    angles = jnp.deg2rad(jax.random.uniform(key, (n,), minval=-max_degrees, maxval=max_degrees))
    x = _to_float(images)
    yy, xx = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij")

    def rotate(img, a):
        cos, sin = jnp.cos(a), jnp.sin(a)
        src_y = cos * yy - sin * xx + (h - 1) / 2
        src_x = sin * yy + cos * xx + (w - 1) / 2
        chans = [map_coordinates(img[..., ch], [src_y, src_x], order=order, mode="constant") for ch in range(c)]
        return jnp.stack(chans, axis=-1)

    return _from_float(jax.vmap(rotate)(x, angles), images)


def resize_crop(key: jax.Array, images: jax.Array, size: int = 40) -> jax.Array:
    """Resize every image to ``size`` x ``size`` (bilinear, antialiased) and cut a random window of the original
    size out of it: torchvision's ``Resize((40, 40))`` then ``RandomCrop(32)`` (reference report B's B5b)."""
    n, h, w, c = images.shape
    if size < max(h, w):
        raise ConfigError(f"resize_crop size {size} must be at least the image size {max(h, w)}")
    big = jax.image.resize(_to_float(images), (n, size, size, c), method="linear")
    ky, kx = jax.random.split(key)
    ys = jax.random.randint(ky, (n,), 0, size - h + 1)
    xs = jax.random.randint(kx, (n,), 0, size - w + 1)

    def crop(img, y, x):
        return jax.lax.dynamic_slice(img, (y, x, 0), (h, w, c))

    return _from_float(jax.vmap(crop)(big, ys, xs), images)


# NumPy, not jnp: a jnp constant built at import would start JAX's backend, after which XLA flags (such as
# --deterministic's) are ignored.
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB_TO_YIQ = _YIQ.astype(np.float32)
_YIQ_TO_RGB = np.linalg.inv(_YIQ).astype(np.float32)


def color_jitter(
    key: jax.Array,
    images: jax.Array,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.05,
) -> jax.Array:
    """Random brightness, contrast and saturation factors in ``[1 - s, 1 + s]`` and a hue rotation of up
    to ``hue`` turns (in YIQ space), per image; results clipped to [0, 1]."""
    n = images.shape[0]
    kb, kc, ks, kh = jax.random.split(key, 4)

    def factor(k, s):
        return jax.random.uniform(k, (n, 1, 1, 1), minval=1.0 - s, maxval=1.0 + s)

    x = _to_float(images)
    x = x * factor(kb, brightness)
    mean = (x @ _GRAY).mean(axis=(1, 2))[:, None, None, None]
    x = (x - mean) * factor(kc, contrast) + mean
    gray = (x @ _GRAY)[..., None]
    x = (x - gray) * factor(ks, saturation) + gray
    theta = 2 * jnp.pi * jax.random.uniform(kh, (n,), minval=-hue, maxval=hue)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    one, zero = jnp.ones_like(cos), jnp.zeros_like(cos)
    rot = jnp.stack([jnp.stack([one, zero, zero], -1), jnp.stack([zero, cos, -sin], -1),
                     jnp.stack([zero, sin, cos], -1)], -2)  # [n, 3, 3] rotation of the I/Q plane
    yiq = jnp.einsum("nhwc,dc->nhwd", x, _RGB_TO_YIQ)
    yiq = jnp.einsum("nhwc,ndc->nhwd", yiq, rot)
    x = jnp.einsum("nhwc,dc->nhwd", yiq, _YIQ_TO_RGB)
    return _from_float(jnp.clip(x, 0.0, 1.0), images)


def cutout(key: jax.Array, images: jax.Array, size: int = 8) -> jax.Array:
    """Zero a ``size`` x ``size`` square (clipped at the border) at a random centre per image."""
    n, h, w, _ = images.shape
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (n, 1, 1), 0, h)
    cx = jax.random.randint(kx, (n, 1, 1), 0, w)
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    inside = (jnp.abs(ys - cy) <= (size - 1) // 2 + (size % 2 == 0) * (ys >= cy)) & (
        jnp.abs(xs - cx) <= (size - 1) // 2 + (size % 2 == 0) * (xs >= cx)
    )
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


AUGMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "flip": random_flip,
    "crop": random_crop,
    "translate": random_translate,
    "rotate": random_rotation,
    "resize_crop": resize_crop,
    "color": color_jitter,
    "cutout": cutout,
}

# One entry of a spec: a name, (name, kwargs), or an image op ``(key, images) -> images`` itself.
AugmentItem = str | tuple[str, dict[str, Any]] | AugmentFn
AugmentSpec = Sequence[AugmentItem]


def register_augmentation(name: str, *, mixes_labels: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` usable by name in ``TrainConfig.augment`` (and so from the command line and in
    checkpoints). An image op is ``fn(key, images, **kwargs) -> images`` (uint8 NHWC, shape and dtype kept);
    with ``mixes_labels`` it is ``fn(key, images, targets, **kwargs) -> (images, targets)`` on the normalized
    float batch and soft targets (like :func:`~jaxcifar.data.mix.mixup`). Registering a name again replaces it.
    """
    def register(fn: Callable) -> Callable:
        AUGMENTATIONS.pop(name, None)
        MIXES.pop(name, None)
        (MIXES if mixes_labels else AUGMENTATIONS)[name] = fn
        return fn

    return register


def augment_names() -> list[str]:
    """Every registered augmentation name, image ops and label-mixing ones."""
    return sorted({*AUGMENTATIONS, *MIXES})


def _parse(item: AugmentItem) -> tuple[str | None, Callable, dict[str, Any]]:
    """``(name or None for a callable, function, kwargs)`` of one spec entry."""
    if callable(item):
        return None, item, {}
    name, kwargs = (item, {}) if isinstance(item, str) else (item[0], dict(item[1]))
    if name in MIXES:
        return name, MIXES[name], kwargs
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}: use one of {augment_names()}, or pass a function "
                          f"(key, images) -> images")
    return name, AUGMENTATIONS[name], kwargs


def augment_functions(spec: AugmentSpec) -> list[Callable]:
    """The function behind every entry of ``spec``, given or registered (a name can be registered again, so
    compiled programs depend on these, not on the names)."""
    return [_parse(item)[1] for item in spec]


def make_pipeline(spec: AugmentSpec) -> tuple[AugmentFn, MixFn | None]:
    """``(image_ops, mix)`` for ``spec``: the image ops composed into one ``(key, images) -> images`` (run on
    the uint8 batch), and the label-mixing ops (``mixup``, ``cutmix``; they must come last) composed into one
    ``(key, images, targets) -> (images, targets)`` run on the normalized batch, or None when there are none.
    """
    image_ops, mix_ops = [], []
    for item in spec:
        name, fn, kwargs = _parse(item)
        if name in MIXES:
            mix_ops.append((fn, kwargs))
        elif mix_ops:
            raise ConfigError(f"augmentation {name or fn!r} comes after a label-mixing one ({sorted(MIXES)}): put "
                              "mixup/cutmix last, they mix the normalized batch")
        else:
            image_ops.append((fn, kwargs))

    def augment(key: jax.Array, images: jax.Array) -> jax.Array:
        for i, (fn, kwargs) in enumerate(image_ops):
            images = fn(jax.random.fold_in(key, i), images, **kwargs)
        return images

    def mix(key: jax.Array, images: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i, (fn, kwargs) in enumerate(mix_ops):
            images, targets = fn(jax.random.fold_in(key, len(image_ops) + i), images, targets, **kwargs)
        return images, targets

    return augment, (mix if mix_ops else None)


def make_augment(spec: AugmentSpec) -> AugmentFn:
    """Compose image ops into one ``(key, images) -> images`` pipeline.

    ``spec`` lists op names (defaults), ``(name, kwargs)`` pairs or functions ``(key, images) -> images``,
    applied in order, e.g. ``["flip", ("crop", {"padding": 4, "mode": "reflect"}), my_op]``.
    Names: ``flip crop translate rotate resize_crop color cutout`` and any registered with
    :func:`register_augmentation`. An empty spec is the identity. Label-mixing ops (``mixup``, ``cutmix``)
    need the labels: see :func:`make_pipeline`.
    """
    augment, mix = make_pipeline(spec)
    if mix is not None:
        raise ConfigError(f"{sorted(MIXES)} mix labels too: use make_pipeline(spec), which returns them apart")
    return augment
