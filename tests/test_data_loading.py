"""Loading CIFAR from tfds (mocked), ImageFolder directories and zips; caching; clear errors."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLASSES, png_bytes, write_image_folder, zip_tree

from jaxcifar.data import channel_stats, class_counts, load_cifar
from jaxcifar.errors import DataError

REAL_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10_jpeg.zip"


def _load(path, cache, name="cifar10", **kw):
    # Generated trees have 3 classes; the autouse fixture below makes "cifar10" expect 3.
    return load_cifar(name, path, cache_dir=cache, progress=False, **kw)


@pytest.fixture(autouse=True)
def three_classes(monkeypatch):
    from jaxcifar.data import sources

    monkeypatch.setitem(sources.NUM_CLASSES, "cifar10", 3)


@pytest.mark.parametrize("as_zip", [False, True])
def test_image_folder_shapes_labels_and_order(folder, tmp_path, as_zip):
    root, written = folder
    path = zip_tree(root, tmp_path / "c.zip") if as_zip else root
    ds = _load(path, tmp_path / "cache")
    chex.assert_shape(ds.train.images, (18, 32, 32, 3))
    chex.assert_shape(ds.test.images, (6, 32, 32, 3))
    chex.assert_type([ds.train.images, ds.train.labels], [np.uint8, np.int32])
    assert ds.class_names == CLASSES
    np.testing.assert_array_equal(class_counts(ds.train.labels, 3), [6, 6, 6])
    # Lossless PNGs come back bit-exact, with the label of their folder.
    np.testing.assert_array_equal(ds.train.images[7], written[("train", "dog", 1)])
    assert ds.train.labels[7] == 1


def test_cache_serves_second_load_and_notices_changes(folder, tmp_path, monkeypatch):
    from jaxcifar.data import sources

    root, _ = folder
    cache = tmp_path / "cache"
    first = _load(root, cache)
    assert len(list(cache.glob("*.npz"))) == 1
    with monkeypatch.context() as m:  # served from the cache: no decoding
        m.setattr(sources, "read_image_folder", lambda *a, **k: pytest.fail("decoded the images again"))
        second = _load(root, cache)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    # A changed source gets a new cache entry and its new content.
    new = np.full((32, 32, 3), 7, np.uint8)
    target = root / "train" / "cat" / "0000.png"
    target.write_bytes(png_bytes(new))
    os.utime(target, ns=(1, 1))
    third = _load(root, cache)
    np.testing.assert_array_equal(third.train.images[0], new)
    assert len(list(cache.glob("*.npz"))) == 2


def test_unknown_dataset_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar11'"):
        load_cifar("cifar11", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_cifar("cifar10", tmp_path / "nope")


def test_class_folders_differ(folder, tmp_path):
    root, _ = folder
    (root / "test" / "frog").rename(root / "test" / "toad")
    with pytest.raises(DataError, match=r"class folders differ.*only in train \['frog'\].*only in test \['toad'\]"):
        _load(root, tmp_path / "cache")


def test_corrupt_image_is_named(folder, tmp_path):
    root, _ = folder
    (root / "train" / "dog" / "0003.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode image train/dog/0003\.png"):
        _load(root, tmp_path / "cache")


def test_wrong_size_image_is_named(folder, tmp_path):
    root, _ = folder
    (root / "test" / "cat" / "0001.png").write_bytes(png_bytes(np.zeros((28, 28, 3), np.uint8)))
    with pytest.raises(DataError, match=r"test/cat/0001\.png .* 28x28"):
        _load(root, tmp_path / "cache")


def test_empty_split(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root, {"train": 2, "test": 0})
    for c in CLASSES:  # folders exist but hold no images
        (root / "test" / c).mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError, match="split 'test' .* is empty"):
        _load(root, tmp_path / "cache")


def test_missing_split_folders(tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ and test/ folders"):
        _load(tmp_path / "data", tmp_path / "cache")


def test_zip_slip_member_is_refused(folder, tmp_path):
    root, _ = folder
    path = zip_tree(root, tmp_path / "c.zip")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("../evil/train/cat/x.png", b"")
    with pytest.raises(DataError, match="unsafe member name"):
        _load(path, tmp_path / "cache")
    assert not (tmp_path / "evil").exists()


def test_wrong_class_count_for_dataset(folder, tmp_path, monkeypatch):
    from jaxcifar.data import sources

    monkeypatch.setitem(sources.NUM_CLASSES, "cifar10", 10)
    with pytest.raises(DataError, match="has 3 classes but cifar10 has 10"):
        _load(folder[0], tmp_path / "cache")


@pytest.mark.tfds
def test_tfds_cifar100_path_with_mock_data(tmp_path, monkeypatch):
    """The tfds code path, offline: tfds.testing.mock_data generates examples from the dataset's specs."""
    import tensorflow_datasets as tfds

    from jaxcifar.data import sources

    monkeypatch.setattr(sources, "_require_host", lambda *args: None)  # mock_data downloads nothing
    with tfds.testing.mock_data(num_examples=12):
        ds = load_cifar("cifar100", cache_dir=tmp_path, use_cache=False, progress=False)
    chex.assert_shape(ds.train.images, (12, 32, 32, 3))
    chex.assert_type(ds.train.images, np.uint8)
    assert ds.num_classes == 100 and len(ds.coarse_class_names) == 20
    chex.assert_shape(ds.train.coarse_labels, (12,))
    assert ds.train.labels.max() < 100 and ds.train.coarse_labels.max() < 20


@pytest.mark.tfds
def test_tfds_offline_failure_is_clear(tmp_path):
    """From Python the fix names the function's argument; the experiments print the flag (``cli``)."""
    with pytest.raises(DataError, match=r"pass load_cifar\(name, path=PATH\)") as e:
        load_cifar("cifar10", data_dir=str(tmp_path / "tfds"), cache_dir=tmp_path, use_cache=False,
                   download=False)
    assert "--data" not in str(e.value) and "pass --data PATH" in e.value.cli


@pytest.mark.tfds
def test_tfds_download_offline_fails_fast_with_the_fix(tmp_path, monkeypatch):
    """Without a network tfds would retry the download for minutes; the loader checks the host first."""
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DataError, match="www.cs.toronto.edu, which this machine cannot reach.*path=PATH") as e:
        load_cifar("cifar10", data_dir=str(tmp_path / "tfds"), cache_dir=tmp_path, use_cache=False)
    assert "--data PATH" in e.value.cli


@pytest.mark.realdata
def test_shared_cifar10_jpeg_copy(tmp_path, monkeypatch):
    """Reads the real shared copy; fails loudly (never skips) when it is missing."""
    from jaxcifar.data import sources

    monkeypatch.setitem(sources.NUM_CLASSES, "cifar10", 10)
    assert REAL_ZIP.exists(), f"shared CIFAR-10 copy missing at {REAL_ZIP}: CI must provide ../shared/data"
    ds = load_cifar("cifar10", REAL_ZIP, cache_dir=tmp_path, progress=False)
    assert (len(ds.train), len(ds.test)) == (50000, 10000)
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    np.testing.assert_array_equal(class_counts(ds.train.labels, 10), [5000] * 10)
    np.testing.assert_array_equal(class_counts(ds.test.labels, 10), [1000] * 10)
    mean, std = channel_stats(ds.train.images)
    # These decoded JPEG bytes' statistics to 4 decimals (computed in float64): float32 error is ~1e-5
    # (test_channel_stats_and_normalization); 1e-3 is the rounding of the figures plus a wide margin, and far
    # below the 0.002-0.009 by which the JPEG copy differs from the original CIFAR-10 (0.4914 / 0.2470 ...).
    np.testing.assert_allclose(mean, [0.4913, 0.4821, 0.4465], atol=1e-3)
    np.testing.assert_allclose(std, [0.2452, 0.2428, 0.2606], atol=1e-3)
    # The second load comes from the decoded-array cache: decoding again would fail here.
    monkeypatch.setattr(sources, "read_image_folder", lambda *a, **k: pytest.fail("decoded the zip again"))
    again = load_cifar("cifar10", REAL_ZIP, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.test.images, ds.test.images)
    assert jnp.asarray(ds.train.images[:1]).dtype == jnp.uint8
