"""Room the store keeps for itself on its file system, so that a store stopped while the disk
was full can start again.

A clean stop removes SQLite's -wal and -shm files and the run marker (epoch.py), and a start
has to create them again, which needs free blocks. The store runs as an unprivileged user
(compose/Dockerfile), so ext4's blocks reserved for root do not help it, and xfs and btrfs
keep none. So the store holds TIERMAIL_STORE_SPACE_RESERVE octets (16 MiB) in a file of its
own, `<store dir>/space-reserve` (allocated, not written). A start after a clean stop that
finds less than ROOM_TO_START free deletes it first and says so (a store killed in this boot
has its files and needs no room); the running store allocates it again once four times its
size is free, so the reserve never takes the last room deliveries need.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from common.logs import OncePerOutage
from common.tasks import pause
from services.store.backends.durable import allocate, free_octets, fsync_dir, probe_file
from services.store.backends.epoch import resumes_a_killed_run

log = logging.getLogger(__name__)

RESERVE_NAME = "space-reserve"
MAKING_NAME = RESERVE_NAME + ".new"  # a reserve being allocated; renamed once it is
# Free octets below which a start gives the reserve up. The start itself creates the run
# marker and each database's -wal and -shm (32 KiB); every mailbox opened afterwards needs its
# own -shm, so this is enough to start, not to serve many users for long.
ROOM_TO_START = 1 << 20
ROOM_TO_REMAKE = 4  # times the reserve's size
CHECK_INTERVAL = 10.0  # seconds between looks at a missing reserve
FULL = (errno.ENOSPC, errno.EDQUOT)


def reserve_path(store_dir: Path) -> Path:
    return store_dir / RESERVE_NAME


def has_room(directory: Path, octets: int) -> bool:
    """Whether the file system (its allocator: quotas count) would give `octets` now. The
    allocation holds the room while it runs: ask for little, or look at `free_octets` first."""
    try:
        with probe_file(directory) as fd:
            allocate(fd, 0, octets)
    except OSError as exc:
        if exc.errno in FULL:
            return False
        raise
    return True


def at_start(store_dir: Path, mail_root: Path, octets: int) -> None:
    """Before the store opens anything: no reserve wanted (`octets` 0), one made before is
    removed; else one is given up when the disk is full, unless the store was killed in this
    boot (its files are all there: it starts without room, and the reserve stays for the
    clean restart that would need it)."""
    if not octets:
        remove(store_dir)
    elif not resumes_a_killed_run(mail_root):
        release_if_full(store_dir)


def release_if_full(store_dir: Path) -> int:
    """At a start after a clean stop: delete the reserve when the file system has not even
    ROOM_TO_START free. Returns the octets freed (0: room enough, no reserve, or it could not
    be deleted: then opening the store says what is wrong, as without a reserve)."""
    try:
        if not _made(store_dir) or has_room(store_dir, ROOM_TO_START):
            return 0
        freed = _delete(store_dir)
    except OSError as exc:
        log.warning("space reserve not given up: %s", exc, extra={"event": "space-reserve"})
        return 0
    log.warning("the store's file system is full: released the space reserve (%s, %s) so "
                "the store can start; it is made again once there is room",
                reserve_path(store_dir), _octets(freed), extra={"event": "space-reserve"})
    return freed


def make(store_dir: Path, octets: int) -> bool:
    """Allocate a reserve of `octets` unless it is there (a reserve of another size, the
    setting changed, or one whose blocks are not allocated, as a sparse copy, is replaced) or
    ROOM_TO_REMAKE times that is not free. Whether it is there now."""
    path = reserve_path(store_dir)
    if _allocated(path) == octets:
        return True
    # statvfs first: the allocator's look, when it fails, takes every free block for a
    # moment, which a write elsewhere meeting it would take for a full disk.
    wanted = ROOM_TO_REMAKE * octets
    if free_octets(store_dir) < wanted or not has_room(store_dir, wanted):
        return False
    making = store_dir / MAKING_NAME
    fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            allocate(fd, 0, octets)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(making, path)
    except OSError as exc:
        making.unlink(missing_ok=True)
        if exc.errno in FULL:  # the room went between the look and the allocation
            return False
        raise
    fsync_dir(store_dir)
    log.info("space reserve made: %s at %s", _octets(octets), path,
             extra={"event": "space-reserve"})
    return True


def remove(store_dir: Path) -> None:
    """No reserve wanted (TIERMAIL_STORE_SPACE_RESERVE=0): give up one made before."""
    try:
        if _delete(store_dir):
            log.info("space reserve removed (TIERMAIL_STORE_SPACE_RESERVE is 0): %s",
                     reserve_path(store_dir), extra={"event": "space-reserve"})
    except OSError as exc:
        log.warning("space reserve not removed: %s", exc, extra={"event": "space-reserve"})


@dataclass
class ReserveState:
    """For the store's heartbeat (`tiermail status`): since when the reserve has been missing
    (given up by a start on a full disk, or never made for want of room); None: it is there."""
    missing_since: float | None = None


async def keep(store_dir: Path, octets: int, state: ReserveState) -> None:
    """Make the reserve now and whenever it is missing (released by a start on a full disk,
    or deleted), as soon as the room is there. Runs until cancelled."""
    failing, short = OncePerOutage(), OncePerOutage()
    while True:
        try:
            made = await asyncio.to_thread(make, store_dir, octets)
            failing.over()
            no_room = not made
        except OSError as exc:
            made = no_room = False
            log.log(failing.level(), "space reserve not made: %s", exc,
                    extra={"event": "space-reserve"})
        kept = None if made else _allocated(reserve_path(store_dir))
        if made:
            short.over()
        elif no_room:
            # Said, not only counted: a reserve that is never made left no line at all.
            log.log(short.level(), "space reserve of %s not made: it needs %s free on %s, "
                    "looking again every %g s%s", _octets(octets),
                    _octets(ROOM_TO_REMAKE * octets), store_dir, CHECK_INTERVAL,
                    f"; the one of {_octets(kept)} made before is kept" if kept else "",
                    extra={"event": "space-reserve"})
        if made or kept:
            state.missing_since = None
        elif state.missing_since is None:
            state.missing_since = time.time()
        await pause(CHECK_INTERVAL)


def _made(store_dir: Path) -> bool:
    return any((store_dir / name).exists() for name in (RESERVE_NAME, MAKING_NAME))


def _delete(store_dir: Path) -> int:
    """Delete the reserve, and one a killed store was still allocating. The octets freed."""
    freed = 0
    for name in (RESERVE_NAME, MAKING_NAME):
        path = store_dir / name
        if path.exists():
            freed += path.stat().st_blocks * 512
            path.unlink()
    if freed:
        fsync_dir(store_dir)
    return freed


def _allocated(path: Path) -> int | None:
    """The reserve's size when every octet of it is allocated, else None (missing, sparse)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size if stat.st_blocks * 512 >= stat.st_size else None


def _octets(octets: int) -> str:
    return f"{octets / (1 << 20):g} MiB" if octets >= 1 << 20 else f"{octets} octets"
