"""CIFAR without TensorFlow: the authors' binary archives, generated here in their published format (fixed-length
records: label byte(s), then the red, green and blue planes), read from a path, downloaded and checked, offline;
and an install whose core needs no TensorFlow."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import sys
import tarfile
import tomllib
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from jaxcifar.data import archives, load_cifar, sources
from jaxcifar.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def write_archive(path: Path, name: str, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict:
    """A ``name`` binary archive at ``path`` with random images and labels (several train files for CIFAR-10,
    as published); returns the arrays written, images in NHWC."""
    spec = archives.ARCHIVES[name]
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    written, members = {}, {}
    for split, n, files in (("train", n_train, spec.train), ("test", n_test, (spec.test,))):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, n).astype(np.uint8)
        planes = images.transpose(0, 3, 1, 2).reshape(n, -1)  # R, G, B planes, each 32x32 row by row
        heads = [labels[:, None]] if name == "cifar10" else [(labels // 5)[:, None], labels[:, None]]
        records = np.concatenate([*heads, planes], axis=1)
        for i, chunk in enumerate(np.array_split(records, len(files))):
            members[files[i]] = chunk.tobytes()
        written[split] = (images, labels.astype(np.int32), (labels // 5).astype(np.int32))
    members[spec.names] = "\n".join(f"class{i}" for i in range(classes)).encode() + b"\n"
    if spec.coarse_names:
        members[spec.coarse_names] = "\n".join(f"super{i}" for i in range(20)).encode()
    with tarfile.open(path, "w:gz") as tar:
        for filename, data in members.items():
            info = tarfile.TarInfo(f"{spec.folder}/{filename}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_binary_archive_loads_from_a_path(tmp_path, name):
    path = tmp_path / archives.ARCHIVES[name].filename
    written = write_archive(path, name)
    ds = load_cifar(name, path, cache_dir=tmp_path / "cache", progress=False)
    for split in ("train", "test"):
        images, labels, coarse = written[split]
        np.testing.assert_array_equal(getattr(ds, split).images, images)
        np.testing.assert_array_equal(getattr(ds, split).labels, labels)
        if name == "cifar100":
            np.testing.assert_array_equal(getattr(ds, split).coarse_labels, coarse)
    assert ds.class_names[:2] == ("class0", "class1") and ds.num_classes == (10 if name == "cifar10" else 100)


def test_an_archive_missing_a_member_names_it(tmp_path):
    spec = archives.ARCHIVES["cifar10"]
    path = tmp_path / spec.filename
    with tarfile.open(path, "w:gz") as tar:
        for filename, data in ((spec.names, b"a\n"), (spec.train[0], b"\x00" * 3000)):
            info = tarfile.TarInfo(f"{spec.folder}/{filename}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="has no file cifar-10-batches-bin/data_batch_2.bin"):
        load_cifar("cifar10", path, use_cache=False)


@pytest.fixture
def no_tensorflow(monkeypatch):
    """As on an install without the tfds extra."""
    monkeypatch.setattr(sources, "has_tensorflow", lambda: False)


def serve(monkeypatch, path: Path, name: str = "cifar10", md5: str | None = None) -> list[str]:
    """Serve ``path`` for the archive's URL (and publish its MD5, or ``md5``); returns the URLs opened."""
    data = path.read_bytes()
    spec = archives.ARCHIVES[name]
    published = md5 or hashlib.md5(data).hexdigest()
    monkeypatch.setitem(archives.ARCHIVES, name, dataclasses.replace(spec, md5=published, size=len(data)))
    opened = []

    def urlopen(url, timeout=None):
        opened.append(url)
        return io.BytesIO(data)

    monkeypatch.setattr(archives.urllib.request, "urlopen", urlopen)
    return opened


def test_without_tensorflow_the_archive_is_downloaded_checked_and_read(tmp_path, monkeypatch, no_tensorflow):
    source = tmp_path / "served.tar.gz"
    written = write_archive(source, "cifar10")
    opened = serve(monkeypatch, source)
    ds = load_cifar("cifar10", cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(ds.train.images, written["train"][0])
    assert opened == [archives.ARCHIVES["cifar10"].url] and "binary version" in ds.source
    assert (tmp_path / "cache" / "downloads" / "cifar-10-binary.tar.gz").is_file()
    load_cifar("cifar10", cache_dir=tmp_path / "cache", use_cache=False, progress=False)
    assert len(opened) == 1  # the downloaded archive is kept and checked again, not fetched again


def test_a_download_that_does_not_match_the_published_md5_is_deleted(tmp_path, monkeypatch, no_tensorflow):
    source = tmp_path / "served.tar.gz"
    write_archive(source, "cifar10")
    serve(monkeypatch, source, md5="0" * 32)
    with pytest.raises(DataError, match="not the published 0{32} .*deleted; load again") as e:
        load_cifar("cifar10", cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "cache" / "downloads" / "cifar-10-binary.tar.gz").exists()


def test_without_tensorflow_offline_says_the_fix_in_one_line(tmp_path, monkeypatch, no_tensorflow):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route")

    monkeypatch.setattr(archives.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"cannot download .*: pass load_cifar\(name, path=PATH\)") as e:
        load_cifar("cifar100", cache_dir=tmp_path, progress=False)
    assert "\n" not in str(e.value) and "--data PATH" in e.value.cli
    with pytest.raises(DataError, match="download=False: allow the download, or pass load_cifar"):
        load_cifar("cifar100", cache_dir=tmp_path, progress=False, download=False)


def test_the_core_install_needs_no_tensorflow(tmp_path):
    """TensorFlow is an extra (``.[tfds]``): the core dependencies leave it out, and loading, training and the
    published-corruptions path's error work with its import blocked."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("tensorflow") and "datasets" not in d]
    assert any(d.startswith("tensorflow") for d in project["optional-dependencies"]["tfds"])
    write_archive(tmp_path / "cifar-10-binary.tar.gz", "cifar10", n_train=64, n_test=16)
    code = f"""
import sys
sys.modules["tensorflow"] = None  # `import tensorflow` fails, as without the extra
from jaxcifar.data import load_cifar
from jaxcifar.data.sources import load_tfds_corrupted
from jaxcifar.errors import DataError
from jaxcifar.train import TrainConfig, fit
ds = load_cifar("cifar10", {str(tmp_path / "cifar-10-binary.tar.gz")!r}, cache_dir={str(tmp_path)!r}, progress=False)
fit(TrainConfig(model="mlp", epochs=1, batch_size=16, val_size=0, eval_batch_size=16), ds, progress=False)
try:
    load_tfds_corrupted("contrast", 1)
except DataError as e:
    print(e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tfds needs TensorFlow, which is not installed" in run.stdout and "'.[tfds]'" in run.stdout
