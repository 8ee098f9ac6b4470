"""On-disk cache of decoded datasets: plain ``.npz`` arrays (never pickles), written atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

CACHE_ENV = "JAXCIFAR_CACHE"


def default_cache_dir() -> Path:
    """``$JAXCIFAR_CACHE`` or ``~/.cache/jaxcifar``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "jaxcifar"))


def fingerprint(path: Path) -> str:
    """A short key that changes whenever the source changes.

    A zip (or any file) is keyed by the SHA-256 of its bytes (~0.1 s for CIFAR-10); a directory by the
    relative path, size and modification time of every file below it.
    """
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    else:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), path)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place, so a
    kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """Read a cache written by :func:`save_arrays`; ``None`` when absent or unreadable (it is rebuilt)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError):
        return None
