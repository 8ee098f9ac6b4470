"""CIFAR-10/100 from the dataset authors' binary archives (``cifar-10-binary.tar.gz``,
``cifar-100-binary.tar.gz``): the way to load them that needs no TensorFlow.

The archive is downloaded into the cache, checked against the MD5 published on the dataset's page, and read
with NumPy straight from the tar: nothing is extracted and nothing is unpickled (the "python version" of the
archives is pickles, which can run code). Each record is its label byte(s) then 3072 bytes of image, the red,
green and blue 32x32 planes in that order.
"""

from __future__ import annotations

import hashlib
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jaxcifar.data.cache import atomic_write_bytes
from jaxcifar.errors import DataError, first_line

PIXELS = 32 * 32 * 3


@dataclass(frozen=True)
class Archive:
    """One published binary archive: where it is, its MD5 and size, and its members."""

    url: str
    md5: str
    size: int
    folder: str
    train: tuple[str, ...]
    test: str
    label_bytes: int  # CIFAR-100 records hold the coarse label, then the fine one
    names: str  # the class names, one per line
    coarse_names: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


# As published on https://www.cs.toronto.edu/~kriz/cifar.html
ARCHIVES = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                       170_052_171, "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                       "test_batch.bin", 1, "batches.meta.txt"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8",
                        168_513_733, "cifar-100-binary", ("train.bin",), "test.bin", 2, "fine_label_names.txt",
                        "coarse_label_names.txt"),
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_archive(path: Path) -> bool:
    """Whether ``path`` names a tar archive (the binary version), rather than an ImageFolder tree or zip."""
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def read_archive(path: Path, name: str) -> dict[str, np.ndarray]:
    """The arrays of ``name`` (``cifar10`` / ``cifar100``) read from its binary archive at ``path``: images
    uint8 [N, 32, 32, 3], labels, class names (and CIFAR-100's coarse labels and names)."""
    spec = ARCHIVES[name]
    try:
        with tarfile.open(path, "r:*") as tar:
            def member(filename: str) -> bytes:
                try:
                    f = tar.extractfile(f"{spec.folder}/{filename}")
                except KeyError:
                    f = None
                if f is None:
                    raise DataError(f"{path} has no file {spec.folder}/{filename}: is it the binary version of "
                                    f"{name} ({spec.filename})?")
                return f.read()

            arrays = {"class_names": _names(member(spec.names))}
            if spec.coarse_names:
                arrays["coarse_class_names"] = _names(member(spec.coarse_names))
            for split, files in (("train", spec.train), ("test", (spec.test,))):
                arrays.update(_records(b"".join(member(f) for f in files), spec.label_bytes, split, path))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the archive {path} ({first_line(e)}): download it again") from e
    return arrays


def _names(text: bytes) -> np.ndarray:
    return np.array([line.strip() for line in text.decode().splitlines() if line.strip()])


def _records(raw: bytes, label_bytes: int, split: str, path: Path) -> dict[str, np.ndarray]:
    """A split's fixed-length records as arrays (fine labels under ``labels``, coarse ones apart)."""
    size = label_bytes + PIXELS
    if len(raw) % size:
        raise DataError(f"the {split} records in {path} are {len(raw)} bytes, not a multiple of {size}: the "
                        "archive is damaged or another dataset's; download it again")
    records = np.frombuffer(raw, np.uint8).reshape(-1, size)
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    out = {f"{split}_images": np.ascontiguousarray(images),
           f"{split}_labels": records[:, label_bytes - 1].astype(np.int32)}
    if label_bytes == 2:
        out[f"{split}_coarse_labels"] = records[:, 0].astype(np.int32)
    return out


def download_archive(name: str, directory: Path, fix: str, cli_fix: str, progress: bool = True) -> Path:
    """``directory/<archive>``, downloaded first when it is not there, and checked against the published MD5
    either way (a damaged or partial file is deleted, with an error saying to retry). Offline, a one-line
    ``DataError`` naming ``fix`` (``cli_fix`` for the command line)."""
    spec = ARCHIVES[name]
    path = Path(directory) / spec.filename
    if not path.is_file():
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response:
                atomic_write_bytes(path, lambda f: _copy(response, f, spec, progress))
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            problem = f"cannot download {spec.url} ({first_line(e)}): "
            raise DataError(problem + fix, cli=problem + cli_fix) from e
    digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != spec.md5:
        path.unlink()
        raise DataError(f"{path} has MD5 {digest}, not the published {spec.md5} (damaged or partial download): it "
                        "was deleted; load again to download it again")
    return path


def _copy(response, f, spec: Archive, progress: bool) -> None:
    """Stream ``response`` into ``f`` with a progress bar."""
    with tqdm(total=spec.size, unit="B", unit_scale=True, desc=spec.filename, disable=not progress) as bar:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
