"""On-disk cache of decoded datasets: plain ``.npz`` arrays (never pickles), written atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from jaxcifar.errors import first_line

CACHE_ENV = "JAXCIFAR_CACHE"


def default_cache_dir() -> Path:
    """``$JAXCIFAR_CACHE`` or ``~/.cache/jaxcifar``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "jaxcifar"))


def fingerprint(path: Path) -> str:
    """A short key that changes whenever the source changes.

    A zip (or any file) is keyed by the SHA-256 of its bytes (~0.1 s for CIFAR-10); a directory by the
    relative path, size and modification time of every file below it.
    """
    if path.is_file():
        return sha256_of(path)[:16]
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), path)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask (read by setting it and setting it
    back, the only way to read it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place, so a
    kill never leaves half a file. The file gets the permissions a plain ``open`` would (``mkstemp`` makes
    it private, 0600, whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write ``arrays`` (numeric or unicode arrays only) as an uncompressed ``.npz``."""
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


class UnreadableCache(Exception):
    """A cache file exists but cannot be read back (truncated, empty, corrupted, not an ``.npz``)."""


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """Read a cache written by :func:`save_arrays`; ``None`` when there is none. A file that cannot be read
    raises :class:`UnreadableCache` naming why, whatever numpy or zipfile raised (``BadZipFile``,
    ``EOFError``, a CRC error, ...): the caller rebuilds it."""
    try:
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 (any failure means the same: rebuild the file)
        raise UnreadableCache(first_line(e)) from e
