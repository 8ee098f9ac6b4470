"""Checks on images and labels that come from research code: the layouts the library takes, and a
``DataError`` naming the fix for the rest (never a silent wrong prediction or an XLA shape error)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxcifar.data.folders import IMAGE_SHAPE
from jaxcifar.errors import DataError


def checked_images(images: np.ndarray | Sequence, what: str = "images") -> np.ndarray:
    """``images`` as a batch the models take: uint8 [N, 32, 32, 3], or float32 [N, 32, 32, 3] in [0, 1].
    A single HWC image gets a batch axis. Floats above 1.5 (the [0, 255] range), negative floats (already
    normalized), NCHW and other sizes raise ``DataError`` saying the fix."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise DataError(f"{what} have shape {x.shape}: pass NHWC [N, 32, 32, 3] (or one HWC [32, 32, 3] image)")
    if x.shape[1:] != IMAGE_SHAPE and x.shape[1] == 3 and x.shape[2:] == IMAGE_SHAPE[:2]:
        raise DataError(f"{what} are NCHW {x.shape}: pass NHWC, e.g. images.transpose(0, 2, 3, 1)")
    if x.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{what} are {x.shape[1]}x{x.shape[2]}x{x.shape[3]} (height x width x channels): "
                        f"the models take 32x32 RGB, resize them first")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what} have dtype {x.dtype}: pass uint8 [0, 255] or float [0, 1]")
    if x.size and float(np.nanmax(x)) > 1.5:
        raise DataError(f"{what} are floats up to {float(np.nanmax(x)):.4g}: pass uint8, or floats scaled to "
                        f"[0, 1] (images / 255)")
    if x.size and float(np.nanmin(x)) < -0.01:
        raise DataError(f"{what} have negative values ({float(np.nanmin(x)):.4g}), as if already normalized: "
                        f"pass raw images (uint8 or [0, 1] floats); the model normalizes them itself")
    return x.astype(np.float32)


def as_uint8(images: np.ndarray, what: str = "images") -> np.ndarray:
    """:func:`checked_images`, then [0, 1] floats rounded to uint8 (what datasets hold)."""
    x = checked_images(images, what)
    return x if x.dtype == np.uint8 else np.round(x * 255.0).astype(np.uint8)


def checked_labels(labels: np.ndarray | Sequence, count: int, num_classes: int, what: str = "labels") -> np.ndarray:
    """``labels`` as int32 [count] in ``[0, num_classes)``, else ``DataError``."""
    y = np.asarray(labels)
    if y.shape != (count,):
        raise DataError(f"{what} have shape {y.shape} for {count} images: pass one integer label per image")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} have dtype {y.dtype}: pass integer class indices (e.g. labels.argmax(-1) for "
                        f"one-hot labels)")
    if count and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{what} range over [{y.min()}, {y.max()}] but there are {num_classes} classes: pass "
                        f"labels in [0, {num_classes - 1}] (or the right class_names)")
    return y.astype(np.int32)
