"""Publishes in flight, where a worker killed in the middle of one leaves them behind.

A worker killed (SIGKILL, the OOM killer) between publishing a message and the broker's
confirm never answers its client, which sends the message again later. If the broker had
persisted the first publish, the retry under a new queue id is a second copy. The
unconfirmed ledger (services/filter/unconfirmed.py) covers every outcome the worker lives
to see; this covers the one it does not.

Each worker keeps a file of SLOT-sized slots, one per publish in flight: the transaction's
digest and queue id, written into a shared memory mapping before the publish and cleared
after its outcome. A memory write is no system call, so the SMTP path pays nothing for it,
and the kernel keeps the mapped pages when the process dies (not when the machine does).
The worker holds an exclusive lock on its file while it lives. Any worker of the same stack
on the machine (a replacement started by `tiermail up` or a service manager, or one already
running) finds a file whose lock is free, puts each filled slot into the ledger (so that a
retry, reaching any worker, reuses the queue id and the store delivers one copy) and removes
the file: at its start and every ADOPT_INTERVAL seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from common.listen import locked_if_unheld

log = logging.getLogger(__name__)

SLOT = 128  # octets: "<64 hex digest> <queue id>\n", zero-padded
ADOPT_INTERVAL = 10.0  # seconds between looks for the files of killed workers
# A killed worker of another stack (tests use a stack each) leaves a file no worker of ours
# may adopt: it is removed when nothing was in flight, or when its entries would have
# expired from that stack's ledger anyway (unconfirmed.RETRY_WINDOW).
FOREIGN_KEPT = 5 * 86400.0
_PREFIX = "tiermail-inflight-"


def stack_tag(stack: str) -> str:
    """A file-name-safe tag of a stack's identity: a worker adopts only its own stack's
    files (another stack's queue ids mean nothing to this stack's ledger)."""
    return hashlib.sha256(stack.encode()).hexdigest()[:16]


class InFlightTable:
    def __init__(self, stack: str, slots: int, folder: Path | None = None,
                 worker: str = "") -> None:
        self._folder = folder or Path(tempfile.gettempdir())
        self._ours = f"{_PREFIX}{stack_tag(stack)}-"
        # Two workers may share a process (tests): each has a file of its own.
        worker = worker or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.path = self._folder / f"{self._ours}{worker}.slots"
        self._slots = max(1, slots)
        self._file: IO[bytes] | None = None
        self._map: mmap.mmap | None = None
        self._free: list[int] = []

    def open(self) -> list[tuple[str, str]]:
        """Create this worker's file, after adopting whatever killed workers left."""
        adopted = self.adopt()
        handle = open(self.path, "w+b")  # noqa: SIM115 - held open for the worker's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else's
        except OSError:
            handle.close()
            raise
        handle.truncate(self._slots * SLOT)
        self._file = handle
        self._map = mmap.mmap(handle.fileno(), self._slots * SLOT)
        self._free = list(range(self._slots - 1, -1, -1))
        return adopted

    def close(self) -> None:
        """A clean stop: nothing is in flight any more (the server has closed)."""
        if self._file is None:
            return
        assert self._map is not None
        self._map.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._file.close()
        self._file = self._map = None

    @contextlib.contextmanager
    def holding(self, digest: str, queue_id: str) -> Iterator[None]:
        """The publish of transaction `digest` under `queue_id` is in flight meanwhile."""
        slot = self._take(f"{digest} {queue_id}\n".encode())
        try:
            yield
        finally:
            if slot is not None:
                self._give_back(slot)

    def _take(self, entry: bytes) -> int | None:
        if self._map is None or not self._free or len(entry) > SLOT:
            return None  # not open, or more publishes than slots: this one goes uncovered
        slot = self._free.pop()
        start = slot * SLOT
        self._map[start:start + len(entry)] = entry
        return slot

    def _give_back(self, slot: int) -> None:
        if self._map is not None:
            start = slot * SLOT
            self._map[start:start + SLOT] = bytes(SLOT)
            self._free.append(slot)

    def adopt(self) -> list[tuple[str, str]]:
        """The (digest, queue id) of every publish left in flight in the files of this
        stack's workers on this machine that have ended; their files are removed."""
        adopted: list[tuple[str, str]] = []
        for path in self._folder.glob(f"{_PREFIX}*.slots"):
            if path == self.path and self._file is not None:
                continue
            try:
                handle = open(path, "rb")  # noqa: SIM115 - closed below
            except OSError:
                continue  # gone meanwhile, or another user's
            with handle:
                if not locked_if_unheld(handle):
                    continue  # its worker is alive, or another worker adopted it first
                entries = _entries(handle.read())
                if path.name.startswith(self._ours):
                    adopted += entries
                elif entries and time.time() - path.stat().st_mtime < FOREIGN_KEPT:
                    continue  # another stack's, for its own workers to adopt
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return adopted


def _entries(content: bytes) -> list[tuple[str, str]]:
    found = []
    for start in range(0, len(content), SLOT):
        line = content[start:start + SLOT].split(b"\n", 1)[0].decode("ascii", "replace")
        digest, _, queue_id = line.partition(" ")
        if len(digest) == 64 and queue_id:
            found.append((digest, queue_id))
    return found
