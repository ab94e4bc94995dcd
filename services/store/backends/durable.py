"""fsync of a file or directory by path: the store's durability steps (maildb.py, epoch.py);
room on the file system asked of its allocator (the storage probe, the space reserve)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def probe_file(directory: Path) -> Iterator[int]:
    """A new empty file on `directory`'s file system, open for writing, with no name: gone
    when closed, so not even a store killed meanwhile leaves it behind with the room it
    reserved. O_TMPFILE; where the file system has none (NFS), a named file unlinked at
    once."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError as exc:
        # EISDIR: a kernel that does not know O_TMPFILE sees O_DIRECTORY alone
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
        fd, name = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.unlink(name)
    try:
        yield fd
    finally:
        os.close(fd)


def free_octets(directory: Path) -> int:
    """What statvfs says this process may still write on `directory`'s file system (root
    may use the blocks reserved for it). Quotas are not in it: ask `allocate` for those."""
    stat = os.statvfs(directory)
    return (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize


def allocate(fd: int, offset: int, length: int) -> None:
    """Have the file system allocate `length` octets at `offset` of `fd`'s file, or raise
    ENOSPC/EDQUOT. Its allocator, unlike statvfs, counts disk quotas (user, group, project,
    btrfs qgroups); ext4, xfs, btrfs and tmpfs write no data for it."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        raise OSError(exc.errno, f"No room for {length} octets: {exc.strerror}") from exc
