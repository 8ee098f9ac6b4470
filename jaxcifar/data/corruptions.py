"""Common corruptions of the CIFAR-10-C benchmark (Hendrycks & Dietterich, ICLR 2019) as pure functions.

Each corruption takes float images [N, H, W, C] in [0, 1], a PRNG key and its severity's parameter, and runs
on the device under ``jax.jit``; :func:`corrupt` applies one at a severity 1-5 (0 = unchanged) to uint8 images
and returns uint8, so the result can be fed to any model like a test set. The parameters per severity are the
published CIFAR-10-C ones. What differs from the published generator (NumPy, scikit-image, OpenCV, PIL) is
stated where it applies: random numbers come from JAX, so corrupted images are not the published ones pixel for
pixel, but their distributions are. JPEG is the exception: it is PIL's encoder itself (on the host), as in the
generator.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)


def gaussian_noise(key: jax.Array, x: jax.Array, scale: float) -> jax.Array:
    """Add normal noise of standard deviation ``scale``."""
    return jnp.clip(x + scale * jax.random.normal(key, x.shape), 0.0, 1.0)


def shot_noise(key: jax.Array, x: jax.Array, photons: float) -> jax.Array:
    """Poisson (photon) noise: each value becomes Poisson(x * photons) / photons."""
    return jnp.clip(jax.random.poisson(key, x * photons).astype(jnp.float32) / photons, 0.0, 1.0)


def impulse_noise(key: jax.Array, x: jax.Array, amount: float) -> jax.Array:
    """Salt-and-pepper noise: each value is replaced, with probability ``amount``, by 0 or 1 (even odds),
    as scikit-image's ``random_noise(mode='s&p')``."""
    k_hit, k_salt = jax.random.split(key)
    hit = jax.random.uniform(k_hit, x.shape) < amount
    salt = jax.random.uniform(k_salt, x.shape) < 0.5
    return jnp.where(hit, salt.astype(x.dtype), x)


def _separable(x: jax.Array, taps: np.ndarray, mode: str) -> jax.Array:
    """Filter every channel of ``x`` [N, H, W, C] with the 1-D ``taps`` along H, then along W, padding with
    ``mode`` (``'edge'`` or ``'reflect'``)."""
    r = len(taps) // 2
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode=mode)
    h, w = x.shape[1:3]
    rows = sum(float(t) * padded[:, i:i + h] for i, t in enumerate(taps))
    return sum(float(t) * rows[:, :, i:i + w] for i, t in enumerate(taps))


def _gaussian_taps(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-t * t / (2 * sigma * sigma))
    return taps / taps.sum()


def gaussian_blur(key: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
    """Gaussian blur of standard deviation ``sigma``, truncated at 4 sigma, edges repeated (scikit-image's
    ``gaussian`` defaults)."""
    del key
    return jnp.clip(_separable(x, _gaussian_taps(sigma, int(4 * sigma + 0.5)), "edge"), 0.0, 1.0)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel [17, 17]: a disk of ``radius`` pixels (normalized) smoothed by a 3x3 Gaussian of
    standard deviation ``alias_blur`` (mirrored edges), as the published generator builds it with OpenCV."""
    grid = np.arange(-8, 9)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (xx * xx + yy * yy <= radius * radius).astype(np.float64)
    disk /= disk.sum()
    taps = _gaussian_taps(alias_blur, 1)
    padded = np.pad(disk, 1, mode="reflect")
    rows = sum(t * padded[i:i + 17] for i, t in enumerate(taps))
    return sum(t * rows[:, i:i + 17] for i, t in enumerate(taps))


def defocus_blur(key: jax.Array, x: jax.Array, params: tuple[float, float]) -> jax.Array:
    """Convolve every channel with :func:`disk_kernel` ``(radius, alias_blur)``, mirrored edges."""
    del key
    kernel = disk_kernel(*params)
    keep = np.nonzero(kernel.sum(0) > 1e-12)[0]  # the kernel's support: the rest of the 17x17 is zero
    r = int(max(8 - keep.min(), keep.max() - 8))
    kernel = kernel[8 - r:9 + r, 8 - r:9 + r]
    c = x.shape[-1]
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    hwio = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, c)), jnp.float32)
    out = jax.lax.conv_general_dilated(padded, hwio, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=c, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(out, 0.0, 1.0)


def contrast(key: jax.Array, x: jax.Array, factor: float) -> jax.Array:
    """Pull every image towards its per-channel mean: ``(x - mean) * factor + mean``."""
    del key
    mean = x.mean(axis=(1, 2), keepdims=True)
    return jnp.clip((x - mean) * factor + mean, 0.0, 1.0)


def brightness(key: jax.Array, x: jax.Array, shift: float) -> jax.Array:
    """Add ``shift`` to the HSV value (the largest channel), keeping hue and saturation: every channel scales
    by the same factor; black becomes grey."""
    del key
    value = x.max(axis=-1, keepdims=True)
    new = jnp.clip(value + shift, 0.0, 1.0)
    return jnp.where(value > 0, x * new / jnp.where(value > 0, value, 1.0), new)


def saturate(key: jax.Array, x: jax.Array, params: tuple[float, float]) -> jax.Array:
    """Set the HSV saturation to ``clip(s * a + b, 0, 1)``, keeping hue and value. A channel is
    ``v * (1 - s * g(hue))``, so it becomes ``v - (s' / s) * (v - channel)``; a grey pixel (s = 0) has hue 0
    (red) as in scikit-image, so it becomes ``(v, v (1 - s'), v (1 - s'))``."""
    del key
    a, b = params
    value = x.max(axis=-1, keepdims=True)
    low = x.min(axis=-1, keepdims=True)
    sat = jnp.where(value > 0, (value - low) / jnp.where(value > 0, value, 1.0), 0.0)
    new = jnp.clip(sat * a + b, 0.0, 1.0)
    coloured = value - new / jnp.where(sat > 0, sat, 1.0) * (value - x)
    grey = value * (1.0 - new * jnp.asarray([0.0, 1.0, 1.0], x.dtype))
    return jnp.clip(jnp.where(sat > 0, coloured, grey), 0.0, 1.0)


def box_resample_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of PIL's BOX resampling along one axis: output pixel i averages the input
    pixels whose centres fall in its footprint (the nearest one when enlarging)."""
    scale = size_in / size_out
    support = 0.5 * max(scale, 1.0)
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), size_in)
        for j in range(lo, hi):
            offset = (j - centre + 0.5) / max(scale, 1.0)
            weights[i, j] = 1.0 if -0.5 <= offset < 0.5 else 0.0
        weights[i] /= weights[i].sum()
    return weights


def pixelate(key: jax.Array, x: jax.Array, factor: float) -> jax.Array:
    """Shrink to ``int(size * factor)`` pixels and enlarge back, both with BOX resampling (as the generator
    does with PIL, without PIL's rounding to uint8 between the passes)."""
    del key
    h, w = x.shape[1:3]
    small_h, small_w = int(h * factor), int(w * factor)
    down_h, down_w = box_resample_matrix(h, small_h), box_resample_matrix(w, small_w)
    up_h, up_w = box_resample_matrix(small_h, h), box_resample_matrix(small_w, w)
    rows = jnp.asarray(up_h @ down_h, jnp.float32)
    cols = jnp.asarray(up_w @ down_w, jnp.float32)
    return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def jpeg_compression(images: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode every uint8 image with PIL's JPEG at ``quality`` (on the host, as the generator)."""
    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


@dataclass(frozen=True)
class Corruption:
    """A corruption: the function, its parameter at severities 1-5, whether it draws random numbers, whether
    the parameter sets shapes (``static``: compiled in), whether the generator made it with PIL (results
    rounded to the nearest integer, not truncated), and whether it runs on the host on uint8 images (JPEG)
    instead of on the device on floats."""

    fn: Callable[..., Any]
    params: tuple
    random: bool = False
    static: bool = False
    pil: bool = False
    host: bool = False


# The published CIFAR-10-C parameters per severity 1-5.
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": Corruption(gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), random=True),
    "shot_noise": Corruption(shot_noise, (500, 250, 100, 75, 50), random=True),
    "impulse_noise": Corruption(impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), random=True),
    "gaussian_blur": Corruption(gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), static=True),
    "defocus_blur": Corruption(defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), static=True),
    "contrast": Corruption(contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": Corruption(brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "saturate": Corruption(saturate, ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))),
    "pixelate": Corruption(pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), static=True, pil=True),
    "jpeg_compression": Corruption(jpeg_compression, (80, 65, 58, 50, 40), host=True),
}


def corruption_names() -> list[str]:
    return list(CORRUPTIONS)


def _check(name: str, severity: int) -> Corruption:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}: use some of {corruption_names()}")
    if severity not in (0, *SEVERITIES):
        raise ConfigError(f"corruption severity {severity} must be 0 (none) or 1..5")
    return CORRUPTIONS[name]


def _apply(fn: Callable[..., Any], nearest: bool, key: jax.Array, images: jax.Array, param: Any) -> jax.Array:
    """``fn`` applied to uint8 ``images`` as floats in [0, 1], back to uint8 as the generator does: rounded to
    the nearest (``nearest``: PIL's resampling) or truncated (``np.uint8`` of its float results; the 1e-3 keeps
    float32 rounding from turning a kept k into k - 1)."""
    x = jnp.clip(fn(key, images.astype(jnp.float32) / 255.0, param), 0.0, 1.0) * 255.0
    return (jnp.round(x) if nearest else jnp.floor(x + 1e-3)).astype(jnp.uint8)


# Parameters that set shapes (blur and resampling kernels) are compiled in; the others are traced, so the five
# severities of a noise share one compiled program.
_with_static_param = jax.jit(_apply, static_argnums=(0, 1, 4))
_with_traced_param = jax.jit(_apply, static_argnums=(0, 1))


def corrupt(images: np.ndarray | jax.Array, name: str, severity: int, key: jax.Array) -> np.ndarray:
    """``images`` (uint8 [N, H, W, 3]) with corruption ``name`` at ``severity`` (0 returns them unchanged),
    uint8 of the same shape; the same key gives the same images."""
    spec = _check(name, severity)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ConfigError(f"corrupt takes uint8 images [N, H, W, C], not {images.dtype} {images.shape}")
    if severity == 0:
        return images.copy()
    param = spec.params[severity - 1]
    if spec.host:
        return spec.fn(images, param)
    program = _with_static_param if spec.static else _with_traced_param
    return np.asarray(program(spec.fn, spec.pil, key, jnp.asarray(images), param))


def corruption_key(key: jax.Array, name: str, severity: int) -> jax.Array:
    """The key of one (corruption, severity): ``key`` folded with both, so every cell has its own stream."""
    _check(name, severity)
    return jax.random.fold_in(jax.random.fold_in(key, corruption_names().index(name)), severity)
