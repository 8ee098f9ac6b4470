"""CIFAR data: loading (tfds, the binary archive or a local ImageFolder/zip), statistics, splits, augmentation,
batching."""

from jaxcifar.data.augment import (
    AUGMENTATIONS,
    augment_functions,
    augment_names,
    color_jitter,
    cutout,
    make_augment,
    make_pipeline,
    random_crop,
    random_flip,
    random_rotation,
    random_translate,
    register_augmentation,
)
from jaxcifar.data.batching import epoch_batches, eval_batches, steps_per_epoch
from jaxcifar.data.folders import CIFAR10_CLASSES
from jaxcifar.data.mix import MIXES, cutmix, mixup
from jaxcifar.data.sources import Dataset, Split, load_cifar
from jaxcifar.data.split import class_counts, split_indices, train_val_split, validation_count
from jaxcifar.data.stats import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    channel_stats,
    check_normalized,
    normalize,
)

__all__ = [
    "AUGMENTATIONS", "MIXES", "augment_functions", "augment_names", "cutmix", "make_pipeline", "mixup",
    "register_augmentation",
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "Dataset", "Split", "channel_stats", "check_normalized", "class_counts", "color_jitter", "cutout",
    "epoch_batches", "eval_batches", "load_cifar", "make_augment", "normalize", "random_crop", "random_flip",
    "random_rotation", "random_translate", "split_indices", "steps_per_epoch", "train_val_split",
    "validation_count",
]
