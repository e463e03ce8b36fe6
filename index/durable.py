"""Crash-safe files: replacement by temp file, fsync, rename, fsync the directory
(a reader sees either the old file or the new one, never a torn write, and a
rename that returned survives power loss); private files and directories; and
the file lock that processes sharing a data directory hold.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[str], None], mode: int = 0o644) -> None:
    """Create ``path`` by calling ``write(temp_path)`` then atomically renaming."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes_atomically(path: Path, data: bytes | memoryview, mode: int = 0o644) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    replace_atomically(path, write, mode)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), whatever the umask;
    an existing one is tightened."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner can read or write (0600), created empty
    where missing (so it never exists with looser rights); an existing one is
    tightened."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    return path


class FileLock:
    """A lock across the threads of this process and every process sharing the
    file: a re-entrant thread lock, then an ``flock`` on ``path``.  The writer
    lock of a SQLite registry (see :class:`index.registry.WriterLock`) and the
    gallery's snapshot lock.
    """

    def __init__(self, path: Path) -> None:
        self._thread_lock = threading.RLock()
        self._file = open(private_file(path), "a+b")  # noqa: SIM115 - held for the registry's life
        self._depth = 0
        self.on_acquire: Callable[[], None] = lambda: None

    def __enter__(self) -> FileLock:
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
                self.on_acquire()
            except BaseException:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        self._file.close()
