"""Small generated CIFAR-shaped datasets for tests, demos and benchmarks (no download needed)."""

from __future__ import annotations

import numpy as np

from jaxcifar.data.sources import Dataset, Split


def synthetic_split(n: int, num_classes: int, seed: int, noise: float = 40.0) -> Split:
    """uint8 [n, 32, 32, 3] images whose class is learnable: each class has its own colour and
    stripe orientation/frequency, plus Gaussian noise of std ``noise`` (in 0..255 units)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    proto_rng = np.random.default_rng(1234)  # prototypes are shared by every split
    colours = proto_rng.uniform(40, 215, (num_classes, 3))
    angles = proto_rng.uniform(0, np.pi, num_classes)
    freqs = proto_rng.uniform(0.2, 0.8, num_classes)
    waves = np.sin(freqs[:, None, None] * (np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy))
    protos = colours[:, None, None, :] + 40.0 * waves[..., None]
    images = protos[labels] + rng.normal(0, noise, (n, 32, 32, 3))
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels)


def synthetic_cifar(num_train: int = 512, num_test: int = 256, num_classes: int = 10, seed: int = 0,
                    noise: float = 40.0) -> Dataset:
    """A :class:`Dataset` named ``cifar10``/``cifar100`` (by ``num_classes``) of generated images."""
    name = "cifar100" if num_classes == 100 else "cifar10"
    return Dataset(name, synthetic_split(num_train, num_classes, seed, noise),
                   synthetic_split(num_test, num_classes, seed + 1, noise),
                   tuple(f"class{i:02d}" for i in range(num_classes)), source="synthetic")
