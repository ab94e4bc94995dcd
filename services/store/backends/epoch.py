"""The store's epoch: how many times the store started after a stop that may have lost
writes the disk had not confirmed (docs/architecture.md, "MODSEQ after a power loss").

Flag changes commit without waiting for the disk, so a power loss or a kernel crash may take
the last ones back, and with them MODSEQs clients have already seen. A process that dies
(SIGKILL, OOM) loses nothing: what it wrote is in the page cache, which the kernel still writes
out. So a starting store counts an unclean stop only when the marker of the run before is
still there *and* was written under another boot of the kernel (or the boot is unknown). Then
the epoch goes up by one, and each index finds, when it is next opened, that it was last
reconciled in another epoch (`MailDB._recover_modseqs`).

    <root>/running   present while a store runs: the kernel's boot id at its start (fsynced)
    <root>/epoch     the epoch, a decimal number (replaced atomically, fsynced)
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from services.store.backends.durable import fsync_dir, fsync_path

log = logging.getLogger(__name__)

RUNNING = "running"
EPOCH = "epoch"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: new at every boot


def current_boot() -> str:
    """This boot's id, or "" where the kernel does not say (any leftover marker then counts
    as a reboot)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def resumes_a_killed_run(root: Path) -> bool:
    """Whether the store at `root` was killed in this boot: its run marker, and the -wal and
    -shm files of the databases it had open, are still there, so its start creates nothing."""
    boot = current_boot()
    return bool(boot) and _previous_boot(root) == boot


def begin_run(root: Path) -> int:
    """Mark the store at `root` as running (durably) and return this run's epoch."""
    epoch = _read_epoch(root / EPOCH)
    boot = current_boot()
    previous = _previous_boot(root)
    if boot and previous == boot:
        # Only the process died (SIGKILL, OOM): the marker already says what it must. Kept,
        # not written again, so a store that died because the disk filled starts again (and
        # serves its mail) without a byte to write; synced, as that process may have died
        # before it had synced the marker.
        fsync_path(root / RUNNING)
        fsync_dir(root)
        return epoch
    if previous is not None:
        epoch += 1
        _write_durably(root / EPOCH, f"{epoch}\n")
        log.warning("the store did not stop cleanly before a reboot: epoch %d, MODSEQs are "
                    "re-established as each index is opened", epoch,
                    extra={"event": "unclean-stop"})
    _write_durably(root / RUNNING, boot + "\n")
    return epoch


def _previous_boot(root: Path) -> str | None:
    """The boot id in the run marker, None when there is no marker (a clean stop)."""
    try:
        return (root / RUNNING).read_text().strip()
    except FileNotFoundError:
        return None


def end_run(root: Path) -> None:
    """A clean stop, once nothing writes any more: every write, including the commits that
    did not wait for the disk, is made durable (one syncfs(2) of the store's file system: the
    writer may have closed the indexes it flagged long ago), then the marker goes."""
    _sync_filesystem(root)
    (root / RUNNING).unlink(missing_ok=True)
    fsync_dir(root)


def _sync_filesystem(root: Path) -> None:
    """syncfs(2) of the file system holding `root`, not sync(2) of every file system the
    host has mounted (a network mount could hold the store's stop for minutes); sync(2)
    where the C library has no syncfs."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _read_epoch(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

