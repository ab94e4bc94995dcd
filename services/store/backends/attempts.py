"""The store's own count of its unfinished attempts at storing a redelivered message.

RabbitMQ 3.10's quorum queues count every return of an unacknowledged message toward
`x-delivery-limit`: a nack, but also a store connection that broke while the message was in
flight (before the store saw it, while it was stored, or with only its ack lost). The store
tells them apart with this log (services/store/redelivery.py), as long as it reads the
message at one of the last three deliveries the limit allows (of the last two at a limit
of 3): before it stores a message
the broker has given it before, it adds one here, and once that message is stored (or found
already stored) it takes the entry away. An entry therefore counts the attempts that failed
or never finished: storage errors, and a store killed mid-way, which no memory survives.

A first delivery is not written down (nearly every message is one, and then no return can
have happened yet). The file is tiny and written only for redeliveries; commits do not wait
for the disk (WAL, synchronous=NORMAL): they survive a killed process, which is the crash
that matters here, and a power failure that loses the last one costs one renewal too many.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from services.store.backends.sqlite import transaction

FILE_NAME = "attempts.sqlite"
# An entry outlives its message only when the message left some other way (dead-lettered,
# deleted with its queue); it is dropped after this long.
KEPT_FOR = 7 * 24 * 3600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempt (
    message TEXT PRIMARY KEY,
    unfinished INTEGER NOT NULL,
    updated REAL NOT NULL
)"""


class AttemptLog:
    """Thread-safe; every method does file I/O, so call it off the event loop."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # for every commit (see above)
        self._db.execute(_SCHEMA)
        self.forget_older_than(KEPT_FOR)
        self._write_probe()

    def _write_probe(self) -> None:
        """Fail now, not at the first attempt, if the log can be read but not written (a
        full disk, a read-only file): a record that misses attempts is worse than none."""
        with self._lock, transaction(self._db):
            self._db.execute("INSERT INTO attempt (message, unfinished, updated) "
                             "VALUES ('', 0, 0) ON CONFLICT (message) DO NOTHING")
            self._db.execute("DELETE FROM attempt WHERE message = ''")

    @classmethod
    def for_store(cls, store_dir: Path) -> AttemptLog:
        return cls(store_dir / FILE_NAME)

    def unfinished(self, messages: Iterable[str]) -> dict[str, int]:
        """The unfinished attempts at each of `messages` (0 when none are recorded)."""
        keys = list(dict.fromkeys(messages))
        counts = dict.fromkeys(keys, 0)
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
                part = keys[start:start + 500]
                marks = ",".join("?" * len(part))
                for message, count in self._db.execute(
                        f"SELECT message, unfinished FROM attempt WHERE message IN ({marks})",
                        part):
                    counts[message] = int(count)
        return counts

    def begin(self, messages: Iterable[str]) -> None:
        """One more attempt at each of `messages`, recorded before it is made."""
        now = time.time()
        rows = [(message, now) for message in dict.fromkeys(messages)]
        if not rows:
            return
        with self._lock, transaction(self._db):
            self._db.executemany(
                "INSERT INTO attempt (message, unfinished, updated) VALUES (?, 1, ?) "
                "ON CONFLICT (message) DO UPDATE SET unfinished = unfinished + 1, "
                "updated = excluded.updated", rows)

    def finished(self, messages: Iterable[str]) -> None:
        """`messages` are stored: their attempts did not fail."""
        rows = [(message,) for message in dict.fromkeys(messages)]
        if not rows:
            return
        with self._lock, transaction(self._db):
            self._db.executemany("DELETE FROM attempt WHERE message = ?", rows)

    def forget_older_than(self, seconds: float) -> None:
        with self._lock, transaction(self._db):
            self._db.execute("DELETE FROM attempt WHERE updated < ?", (time.time() - seconds,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
