"""Room the store keeps for itself on its file system, so that a store stopped while the disk
was full can start again.

A clean stop removes SQLite's -wal and -shm files and the run marker (epoch.py), and a start
has to create them again, which needs free blocks. The store runs as an unprivileged user
(compose/Dockerfile), so ext4's blocks reserved for root do not help it, and xfs and btrfs
keep none. So the store holds TIERMAIL_STORE_SPACE_RESERVE octets (16 MiB) in a file of its
own, `<store dir>/space-reserve` (allocated, not written). A start that finds less than
ROOM_TO_START free deletes it first and says so; the running store allocates it again once
four times its size is free, so the reserve never takes the last room deliveries need.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.logs import OncePerOutage
from common.tasks import pause
from services.store.backends.durable import allocate, fsync_dir, probe_file

log = logging.getLogger(__name__)

RESERVE_NAME = "space-reserve"
# A start creates a few small files (the run marker, each database's -wal and -shm: 32 KiB).
ROOM_TO_START = 1 << 20
ROOM_TO_REMAKE = 4  # times the reserve's size
CHECK_INTERVAL = 10.0  # seconds between looks at a missing reserve
FULL = (errno.ENOSPC, errno.EDQUOT)


def reserve_path(store_dir: Path) -> Path:
    return store_dir / RESERVE_NAME


def has_room(directory: Path, octets: int) -> bool:
    """Whether the file system (its allocator: quotas count) would give `octets` now."""
    try:
        with probe_file(directory) as fd:
            allocate(fd, 0, octets)
    except OSError as exc:
        if exc.errno in FULL:
            return False
        raise
    return True


def release_if_full(store_dir: Path) -> int:
    """At start: delete the reserve when the file system has not even ROOM_TO_START free.
    Returns the octets freed (0: room enough, or no reserve to free)."""
    path = reserve_path(store_dir)
    try:
        if not path.exists() or has_room(store_dir, ROOM_TO_START):
            return 0
    except OSError as exc:  # not a full disk (read-only, broken): opening the store says it
        log.debug("space reserve kept: %s", exc, extra={"event": "space-reserve"})
        return 0
    freed = path.stat().st_blocks * 512
    path.unlink()
    fsync_dir(store_dir)
    log.warning("the store's file system is full: released the space reserve (%s, %s) so "
                "the store can start; it is made again once there is room",
                path, _octets(freed), extra={"event": "space-reserve"})
    return freed


def make(store_dir: Path, octets: int) -> bool:
    """Allocate a reserve of `octets` unless it is there (a reserve of another size, the
    setting changed, is replaced) or ROOM_TO_REMAKE times that is not free. Whether it is
    there now."""
    path = reserve_path(store_dir)
    if _size(path) == octets:
        return True
    if not has_room(store_dir, ROOM_TO_REMAKE * octets):
        return False
    making = path.with_name(RESERVE_NAME + ".new")
    fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        allocate(fd, 0, octets)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        making.unlink()
        if exc.errno in FULL:  # the room went between the look and the allocation
            return False
        raise
    os.close(fd)
    os.rename(making, path)
    fsync_dir(store_dir)
    log.info("space reserve made: %s at %s", _octets(octets), path,
             extra={"event": "space-reserve"})
    return True


def remove(store_dir: Path) -> None:
    """No reserve wanted (TIERMAIL_STORE_SPACE_RESERVE=0): give up one made before."""
    path = reserve_path(store_dir)
    if path.exists():
        path.unlink()
        log.info("space reserve removed (TIERMAIL_STORE_SPACE_RESERVE is 0): %s", path,
                 extra={"event": "space-reserve"})


@dataclass
class ReserveState:
    """For the store's heartbeat (`tiermail status`): when a start gave the reserve up, until
    it is made again."""
    released_at: float | None = None


async def keep(store_dir: Path, octets: int, state: ReserveState) -> None:
    """Make the reserve now and whenever it is missing (released by a start on a full disk,
    or deleted), as soon as the room is there. Runs until cancelled."""
    failing = OncePerOutage()
    while True:
        try:
            if await asyncio.to_thread(make, store_dir, octets):
                state.released_at = None
            failing.over()
        except OSError as exc:
            log.log(failing.level(), "space reserve not made: %s", exc,
                    extra={"event": "space-reserve"})
        await pause(CHECK_INTERVAL)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _octets(octets: int) -> str:
    return f"{octets / (1 << 20):g} MiB" if octets >= 1 << 20 else f"{octets} octets"
