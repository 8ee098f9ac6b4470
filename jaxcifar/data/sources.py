"""Load CIFAR-10/100 as host arrays: through tfds (with TensorFlow) or the authors' binary archive
(:mod:`~jaxcifar.data.archives`, without), or from a local copy: an ImageFolder directory or zip
(:mod:`~jaxcifar.data.folders`) or the binary archive."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxcifar.data.archives import ARCHIVES, download_archive, is_archive, read_archive
from jaxcifar.data.cache import CACHE_ENV, UnreadableCache, default_cache_dir, fingerprint, load_arrays, save_arrays
from jaxcifar.data.folders import IMAGE_SHAPE, SPLITS, read_image_folder
from jaxcifar.errors import DataError, first_line, warn

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class Split:
    """One split on the host. ``images``: uint8 [N, 32, 32, 3] (NHWC, RGB); ``labels``: int32 [N];
    ``coarse_labels``: int32 [N] for CIFAR-100 from tfds, else ``None``."""

    images: np.ndarray
    labels: np.ndarray
    coarse_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> Split:
        """The examples at ``index`` (int array), in that order."""
        coarse = None if self.coarse_labels is None else self.coarse_labels[index]
        return Split(self.images[index], self.labels[index], coarse)


@dataclass(frozen=True)
class Dataset:
    """A CIFAR dataset: the train and test splits plus class names in canonical label order."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    coarse_class_names: tuple[str, ...] | None = None
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0,
               stratified: bool = True) -> Dataset:
        """A seeded random subset in random order: ``n_train`` training and ``n_test`` test examples (None:
        all of them, shuffled), each class keeping its share when ``stratified``. Take subsets this way, not
        by slicing: a local copy loads in class order (``ds.train.images[:2000]`` would be all airplanes)."""
        import jax

        from jaxcifar.data.split import split_indices

        def pick(split: Split, n: int | None, stream: int) -> Split:
            count = len(split) if n is None else n
            if not 1 <= count <= len(split):
                raise DataError(f"subset of {count} examples from a split of {len(split)}: pick 1..{len(split)}")
            key = jax.random.fold_in(jax.random.key(seed), stream)
            if count == len(split):  # all of it: every class keeps its share, only the order changes
                return split.take(np.asarray(jax.random.permutation(key, count)))
            _, chosen = split_indices(key, split.labels, count, stratified=stratified,
                                      num_classes=self.num_classes)
            return split.take(np.asarray(chosen))

        return Dataset(self.name, pick(self.train, n_train, 0), pick(self.test, n_test, 1), self.class_names,
                       self.coarse_class_names, f"{self.source} (subset: seed {seed})")

    @classmethod
    def from_arrays(cls, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                    test_labels: np.ndarray, class_names: Sequence[str] | None = None, name: str = "arrays",
                    source: str = "arrays") -> Dataset:
        """A dataset from your own arrays: images uint8 [N, 32, 32, 3] or floats in [0, 1] (rounded to uint8,
        what the data pipeline keeps on the device), integer labels. ``class_names`` default to "0", "1", ...
        up to the largest label. Bad shapes, ranges or dtypes raise ``DataError`` saying the fix."""
        from jaxcifar.data.checks import as_uint8, checked_labels

        if class_names is None:
            top = max(int(np.max(train_labels, initial=0)), int(np.max(test_labels, initial=0)))
            class_names = [str(i) for i in range(top + 1)]
        splits = []
        for what, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
            x = as_uint8(images, f"{what} images")
            splits.append(Split(x, checked_labels(labels, len(x), len(class_names), f"{what} labels")))
        return cls(name, splits[0], splits[1], tuple(class_names), None, source)


def load_cifar(
    name: str = "cifar10",
    path: str | os.PathLike | None = None,
    *,
    data_dir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    download: bool = True,
) -> Dataset:
    """Load ``cifar10`` or ``cifar100``.

    With ``path`` (an ImageFolder directory or ``.zip``, or the authors' binary archive
    ``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``) the local copy is read. Otherwise, with
    TensorFlow installed (``pip install -e '.[tfds]'``), tfds loads the dataset (downloading into ``data_dir``
    when online and ``download``); without it the binary archive is downloaded into ``cache_dir/downloads``,
    checked against its published MD5 and read with NumPy (:mod:`jaxcifar.data.archives`). Decoded arrays
    are cached under ``cache_dir`` (default ``$JAXCIFAR_CACHE`` or ``~/.cache/jaxcifar``), keyed by the
    source's content, so the second load takes well under a second. A local copy comes in class order (every
    image of the first class, then the second, ...): take subsets with :meth:`Dataset.subset`, never by
    slicing.
    """
    if name not in NUM_CLASSES:
        raise DataError(f"unknown dataset {name!r}: use one of {sorted(NUM_CLASSES)}")
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if path is not None:
        source = Path(path).expanduser()
        if not source.exists():
            raise DataError(f"data path {str(source)!r} does not exist: pass an ImageFolder directory or zip, or "
                            "the binary archive")
        key = f"{name}-folder-{fingerprint(source)}"
        loader = lambda: (read_archive(source, name) if is_archive(source)  # noqa: E731
                          else read_image_folder(source, name, progress))
        label = str(source)
    elif not has_tensorflow():  # the authors' binary archive, downloaded into the cache: no TensorFlow needed
        archive = cache_root / "downloads" / ARCHIVES[name].filename
        key = f"{name}-archive-{ARCHIVES[name].md5[:16]}"
        loader = lambda: read_archive(_archive(name, archive, download, progress), name)  # noqa: E731
        label = f"{ARCHIVES[name].url} (binary version)"
    else:
        key = f"{name}-tfds-{_tfds_key(data_dir)}"
        loader = lambda: _read_tfds(name, data_dir, download)  # noqa: E731
        label = f"tfds:{name}"
    cache_file = cache_root / f"{key}.npz"
    cached = _from_cache(cache_file, name, label) if use_cache else None
    if cached is not None:
        return cached
    arrays = loader()
    dataset = _dataset_from_arrays(name, arrays, label)  # validated before it is cached
    if use_cache:
        _store(cache_file, arrays)
    return dataset


def has_tensorflow() -> bool:
    """Whether TensorFlow is installed (the ``tfds`` extra): tfds then downloads and prepares CIFAR; without it
    the authors' binary archive is read instead (:mod:`jaxcifar.data.archives`)."""
    return importlib.util.find_spec("tensorflow") is not None


def _archive(name: str, path: Path, download: bool, progress: bool) -> Path:
    """The binary archive of ``name`` at ``path``, downloaded there first when allowed."""
    if not download and not path.is_file():
        problem = f"no {path.name} in {path.parent} and download=False: "
        raise DataError(problem + "allow the download, or " + OFFLINE_FIX, cli=problem + OFFLINE_FLAG)
    return download_archive(name, path.parent, OFFLINE_FIX, OFFLINE_FLAG, progress)


def _from_cache(cache_file: Path, name: str, label: str) -> Dataset | None:
    """The dataset in ``cache_file``, or None when there is none or it is unusable: a file that cannot be read,
    lacks an array or holds arrays that fail validation is reported in one warning line and rebuilt from the
    source (which then overwrites it)."""
    try:
        arrays = load_arrays(cache_file)
        return None if arrays is None else _dataset_from_arrays(name, arrays, label)
    except (UnreadableCache, KeyError, ValueError, DataError) as e:
        reason = str(e) if isinstance(e, UnreadableCache | DataError) else first_line(e)
        warn(f"the cache file {cache_file} is unusable ({reason}): rebuilding it from {label}")
        return None


def _store(cache_file: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache; when the cache directory is unusable (a file, read-only, full) say so in one warning
    line and go on without it: the decoded data is kept either way."""
    try:
        save_arrays(cache_file, arrays)
    except OSError as e:
        warn(f"cannot write the cache {cache_file} ({first_line(e)}): going on without a cache; pass a "
             f"writable --cache-dir (or set ${CACHE_ENV}) to load faster next time")


def _dataset_from_arrays(name: str, a: dict[str, np.ndarray], source: str) -> Dataset:
    def split(s: str) -> Split:
        coarse = a.get(f"{s}_coarse_labels")
        return Split(a[f"{s}_images"], a[f"{s}_labels"].astype(np.int32), coarse)

    coarse_names = tuple(str(c) for c in a["coarse_class_names"]) if "coarse_class_names" in a else None
    ds = Dataset(name, split("train"), split("test"), tuple(str(c) for c in a["class_names"]),
                 coarse_names, source)
    _validate(ds)
    return ds


def _validate(ds: Dataset) -> None:
    expected = NUM_CLASSES[ds.name]
    if ds.num_classes != expected:
        raise DataError(
            f"{ds.source} has {ds.num_classes} classes but {ds.name} has {expected}: "
            f"check the dataset name or the class folders",
            cli=f"{ds.source} has {ds.num_classes} classes but {ds.name} has {expected}: check --dataset or the "
                "class folders")
    for s in SPLITS:
        split = getattr(ds, s)
        if len(split) == 0:
            raise DataError(f"split {s!r} of {ds.source} is empty: add images under {s}/<class>/")
        if split.images.shape[1:] != IMAGE_SHAPE or split.images.dtype != np.uint8:
            raise DataError(f"split {s!r} of {ds.source} holds {split.images.shape[1:]} "
                            f"{split.images.dtype} images, expected uint8 {IMAGE_SHAPE}")


# ----------------------------------------------------------------------------------------------- tfds


def _import_tfds():
    """Import tfds lazily (TensorFlow takes seconds) and hide every GPU from TensorFlow, so that it
    never grabs memory that JAX needs. Without TensorFlow (an install without the ``tfds`` extra), a one-line
    ``DataError`` saying how to get it."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise DataError(f"tfds needs TensorFlow, which is not installed ({first_line(e)}): pip install -e "
                        "'.[tfds]' (or use the generated corruptions / the binary archive)") from e

    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    return tfds


def _tfds_key(data_dir: str | None) -> str:
    import hashlib

    return hashlib.sha256(str(Path(data_dir).expanduser().resolve() if data_dir else "").encode()).hexdigest()[:12]


def _read_tfds(name: str, data_dir: str | None, download: bool) -> dict[str, np.ndarray]:
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download and not builder.is_prepared():
            _require_host(CIFAR_HOST, name, OFFLINE_FIX, OFFLINE_FLAG)
            builder.download_and_prepare()
        raw = {s: _tfds_split_arrays(tfds, builder, s) for s in SPLITS}
    except DataError:
        raise
    except Exception as e:
        problem = f"tfds could not load {name} ({first_line(e)}); offline? "
        raise DataError(problem + OFFLINE_FIX, cli=problem + OFFLINE_FLAG) from e
    features = builder.info.features
    arrays = {"class_names": np.array(features["label"].names)}
    if "coarse_label" in features:
        arrays["coarse_class_names"] = np.array(features["coarse_label"].names)
    for s in SPLITS:
        arrays[f"{s}_images"] = np.asarray(raw[s]["image"], np.uint8)
        arrays[f"{s}_labels"] = np.asarray(raw[s]["label"], np.int32)
        if "coarse_label" in raw[s]:
            arrays[f"{s}_coarse_labels"] = np.asarray(raw[s]["coarse_label"], np.int32)
    return arrays


def _tfds_split_arrays(tfds, builder, split: str) -> dict[str, np.ndarray]:
    """One split as numpy arrays, read in batches (``batch_size=-1`` crashes TF on generator-backed
    datasets such as ``tfds.testing.mock_data``)."""
    keys = ("image", "label", "coarse_label")
    parts = [{k: b[k] for k in keys if k in b}
             for b in tfds.as_numpy(builder.as_dataset(split=split).batch(10_000))]
    if not parts:
        return {"image": np.zeros((0, *IMAGE_SHAPE), np.uint8), "label": np.zeros((0,), np.int32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


CIFAR_HOST = "www.cs.toronto.edu"  # where tfds downloads CIFAR-10 and CIFAR-100 from
CIFAR10C_HOST = "zenodo.org"  # where tfds downloads CIFAR-10-C from


# the fix for no internet, worded for the library and for the command line
OFFLINE_FIX = "pass load_cifar(name, path=PATH) with an ImageFolder directory or zip"
OFFLINE_FLAG = "pass --data PATH to an ImageFolder directory or zip"
GENERATED_FIX = "use the generated corruptions (evaluate_robustness without corrupted=)"
GENERATED_FLAG = "use the generated corruptions (--corruptions all)"


def _require_host(host: str, what: str, fix: str, cli_fix: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, naming ``fix`` (``cli_fix`` on the command line), when ``host`` cannot be reached: tfds would
    retry the download of ``what`` for minutes."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        problem = f"tfds downloads {what} from {host}, which this machine cannot reach ({first_line(e)}): "
        raise DataError(problem + fix, cli=cli_fix and problem + cli_fix) from e


def load_tfds_corrupted(corruption: str, severity: int, data_dir: str | None = None,
                        download: bool = True) -> Split:
    """The published CIFAR-10-C test images of one corruption at one severity (1-5), from tfds
    ``cifar10_corrupted/<corruption>_<severity>`` (downloaded on first use: about 2.9 GB for all configs,
    so it needs the internet or a ``data_dir`` where it was prepared). Raises ``DataError`` naming the fix."""
    tfds = _import_tfds()
    name = f"cifar10_corrupted/{corruption}_{severity}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:
        problem = f"tfds does not know {name} ({first_line(e)}): "
        raise DataError(problem + GENERATED_FIX, cli=problem + GENERATED_FLAG) from e
    if not prepared:
        if not download:
            raise DataError(f"tfds has no prepared {name} in {builder.data_dir}: allow the download or pass the "
                            "data_dir where it was prepared")
        _require_host(CIFAR10C_HOST, "CIFAR-10-C", f"{GENERATED_FIX}, or a tfds data_dir where cifar10_corrupted "
                      "is prepared", f"{GENERATED_FLAG}, or a tfds data_dir where cifar10_corrupted is prepared")
    try:
        builder.download_and_prepare()
        raw = _tfds_split_arrays(tfds, builder, "test")
    except Exception as e:
        problem = f"tfds could not load {name} ({first_line(e)}): it needs the internet or a prepared tfds data_dir; "
        raise DataError(problem + GENERATED_FIX, cli=problem + GENERATED_FLAG) from e
    return Split(np.asarray(raw["image"], np.uint8), np.asarray(raw["label"], np.int32))
