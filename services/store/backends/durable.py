"""fsync of a file or directory by path: the store's durability steps (maildb.py, epoch.py)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync the file at `path` through a descriptor of its own (closing it releases no
    lock SQLite holds: those are on the database and -shm files)."""
    _fsync(path, os.O_RDONLY)


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the names created or renamed in it durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
