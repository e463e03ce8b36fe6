"""Crash-safe file replacement: temp file, fsync, rename, fsync the directory.

A reader sees either the old file or the new one, never a torn write, and a
rename that returned survives power loss.
"""

from __future__ import annotations

import os
import tempfile
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


def write_bytes_atomically(path: Path, data: bytes | memoryview) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    replace_atomically(path, write)
