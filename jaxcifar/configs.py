"""Named recipes: small functions returning a :class:`~jaxcifar.train.TrainConfig`, shared by experiments
and by users who want the same starting points. Keyword arguments override any field."""

from __future__ import annotations

from typing import Any

from jaxcifar.train.config import TrainConfig

FLIP_CROP = ("flip", ("crop", {"padding": 4}))


def baseline(**overrides: Any) -> TrainConfig:
    """The classic CIFAR-10 assignment: ConvNet (conv32-conv32-pool-conv64-conv64-pool-dense512), SGD lr 1e-3
    momentum 0.9, batch 32, 20 epochs, 49000/1000 split, training metrics every 200 steps, no augmentation.
    ``dropout_rate`` applies before the classifier (after the 512-unit dense layer)."""
    base = dict(model="convnet", model_kwargs={"dropout_at": ("head",)}, optimizer="sgd", learning_rate=1e-3,
                momentum=0.9, batch_size=32, epochs=20, val_size=1000, log_every=200)
    return TrainConfig(**{**base, **overrides})


def improved(**overrides: Any) -> TrainConfig:
    """The known improvements together: same-padded ConvNet with BatchNorm and GELU, dropout after the conv
    blocks and before the classifier, flip + crop + small rotation + colour jitter, AdamW with decoupled
    weight decay and a cosine schedule with warm-up, label smoothing."""
    base = dict(model="convnet",
                model_kwargs={"channels": ((64, 64), (128, 128), (256, 256)), "padding": "SAME",
                              "batch_norm": True, "activation": "gelu", "dropout_at": ("blocks", "head"),
                              "dense": (512,)},
                dropout_rate=0.2, optimizer="adamw", learning_rate=2e-3, weight_decay=5e-2, batch_size=128,
                schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1, epochs=20, val_size=1000,
                augment=(*FLIP_CROP, ("rotate", {"max_degrees": 10.0}), ("color", {})), log_every=100)
    return TrainConfig(**{**base, **overrides})


def cifar100(**overrides: Any) -> TrainConfig:
    """The CIFAR-100 study default: Adam lr 1e-4, batch 256, 20 epochs (model set per variant)."""
    base = dict(optimizer="adam", learning_rate=1e-4, momentum=0.9, batch_size=256, epochs=20, val_size=1000,
                log_every=50)
    return TrainConfig(**{**base, **overrides})
