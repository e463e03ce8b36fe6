"""Crash-safe files: replacement by temp file, fsync, rename, fsync the directory
(a reader sees either the old file or the new one, never a torn write, and a
rename that returned survives power loss); private files and directories; the
file lock that processes sharing a data directory hold; and control files that
fail closed.

Control files fail closed, as OpenSSH's StrictModes does: a file that decides
who may do what (the access policy) or holds a secret (the data, audit and
signing keys, the TLS private key) is refused when someone other than its owner
could change it, or for a secret read it: writable by group or others, owned by
a user other than the server's or root, or in a directory others may write
without the sticky bit.  Checked at start and on every reload; a refused reload
keeps what was loaded before.
"""

from __future__ import annotations

import abc
import fcntl
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from index.errors import ConfigurationError


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


class ProcessesLock(abc.ABC):
    """A re-entrant thread lock, then a lock across processes (:meth:`_take`,
    :meth:`_drop`) taken by the outermost holder, which then runs ``on_acquire``
    (see :class:`index.registry.WriterLock`)."""

    def __init__(self) -> None:
        self._thread_lock = threading.RLock()
        self._depth = 0
        self.on_acquire: Callable[[], None] = lambda: None

    @abc.abstractmethod
    def _take(self, blocking: bool) -> bool:
        """Take the lock across processes; without ``blocking``, False if it is held."""

    @abc.abstractmethod
    def _drop(self) -> None:
        """Let go of the lock across processes."""

    @property
    def held(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> ProcessesLock:
        self.acquire()
        return self

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; without ``blocking``, only if no other thread or process
        holds it (False if one does)."""
        if not self._thread_lock.acquire(blocking):
            return False
        if self._depth == 0:
            try:
                taken = self._take(blocking)
            except BaseException:
                self._thread_lock.release()
                raise
            if not taken:
                self._thread_lock.release()
                return False
            try:
                self.on_acquire()
            except BaseException:
                self._drop()
                self._thread_lock.release()
                raise
        self._depth += 1
        return True

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._drop()
        self._thread_lock.release()


class FileLock(ProcessesLock):
    """A lock across the threads of this process and every process sharing the
    file: a re-entrant thread lock, then an ``flock`` on ``path``.  The writer
    lock of a SQLite registry (see :class:`index.registry.WriterLock`) and the
    gallery's snapshot lock.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(private_file(path), "a+b")  # noqa: SIM115 - held for the registry's life

    def _take(self, blocking: bool) -> bool:
        try:
            fcntl.flock(self._file.fileno(),
                        fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _drop(self) -> None:
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    def close(self) -> None:
        self._file.close()


def check_control(path: Path, what: str, secret: bool = False) -> None:
    """Raises ConfigurationError, naming the fix, unless only its owner (the
    server's user or root) can change ``path``, and, when ``secret``, read it."""
    try:
        st = path.stat()
        parent = path.resolve().parent.stat()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigurationError(f"{what} {path} is owned by uid {st.st_uid}, not by the "
                                 f"server's user (uid {os.geteuid()}) or root: refused")
    loose = st.st_mode & (0o077 if secret else 0o022)
    if loose:
        fix = "chmod 600" if secret else "chmod go-w"
        raise ConfigurationError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
            f"{'others can read or change it' if secret else 'others can change it'}; "
            f"refused (`{fix} {path}`)")
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        raise ConfigurationError(f"{what} {path} is in a directory anyone can write: "
                                 "refused (anyone could replace it)")


def check_private(path: Path, what: str) -> None:
    """:func:`check_control` for a secret."""
    check_control(path, what, secret=True)
