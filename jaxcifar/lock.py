"""An advisory lock on a directory, so two processes never train into the same checkpoints or results."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from jaxcifar.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the directory is used unlocked
    fcntl = None

LOCK_NAME = ".lock"


class DirectoryLock:
    """An exclusive ``flock`` on ``directory/.lock``, which holds the owner's PID. A second process (or a second
    lock in this one) gets a one-line ``OutputError`` naming that PID. The kernel releases the lock when the
    owner exits, however it exits (even ``kill -9``), so a stale ``.lock`` file never blocks a rerun."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock (creating the directory); ``OutputError`` when another process holds it."""
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{self.path.parent} is in use by PID {owner} (another run writes into it): wait for "
                              "it to finish, or pass another output directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
