"""Inline message bodies read from the users' indexes, for `MailDB.open_message`.

`open_message` runs in its callers' threads (FETCH's readers, POP3 through asyncio.to_thread,
the text indexer, spam learning), up to hundreds of times per FETCH. A new SQLite connection
per call would cost more than the read (open, schema parse, WAL index mapping), so each thread
keeps a small LRU of read-only connections, one per user it read from lately; `close()` closes
all of them (connections of a thread that ended are closed when it is collected). A connection
is used by its own thread only, under that thread's lock, which `close()` takes too: closing
a connection while another thread runs a statement on it crashes CPython's sqlite3 module.

Each lookup is one statement run to completion, so it is its own read transaction: a cached
connection always sees the latest commit and never holds the WAL back from a checkpoint. A
migration is done in place by the writer, and SQLite notices the schema change by itself; an
index below the current schema is never cached (it has no bodies yet). An index file
*replaced* under a cached connection (restored, rebuilt) is another file: the connection would
go on reading the old one. `body(..., recheck=True)` compares the file's identity first and
reopens; MailDB asks for that only when neither the table nor a file has the message, the one
answer staleness could make wrong (a GUID names the same bytes for life, so a hit is right).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.store.backends.sqlite import connect_reader
from services.store.mailbox import StorageError

PER_THREAD = 8  # users whose connection one thread keeps
# Page cache per connection. WAL readers drop it whenever the index changed anyway, and the
# bytes of a body are in the OS page cache; this only keeps the B-tree's upper pages.
CACHE_KIB = 512


@dataclass(frozen=True)
class _Reader:
    conn: sqlite3.Connection
    identity: tuple[int, int]  # (st_dev, st_ino) of the index it opened


class _ThreadReaders:
    """One thread's LRU, user -> reader (an object a WeakSet can hold)."""

    def __init__(self, closed: bool) -> None:
        self.lru: OrderedDict[str, _Reader] = OrderedDict()
        self.lock = threading.Lock()  # taken by its thread for each lookup, and by close()
        self.closed = closed

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for reader in self.lru.values():
                reader.conn.close()
            self.lru.clear()


class BodyReaders:
    """`index_of(user)` is the path of a user's index, asked only when a connection is opened
    or checked (building the path costs more than the lookup itself)."""

    def __init__(self, schema: int, index_of: Callable[[str], Path],
                 per_thread: int = PER_THREAD) -> None:
        self._schema = schema
        self._index_of = index_of
        self._per_thread = per_thread
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _every and _closed
        self._every: weakref.WeakSet[_ThreadReaders] = weakref.WeakSet()
        self._closed = False

    def body(self, user: str, guid: str, *, recheck: bool = False) -> bytes | None:
        """The inline body of `guid` in `user`'s index, or None: the message is a file, is
        gone, or the index is missing or not at the current schema. StorageError once
        closed."""
        readers = self._thread_readers()
        with readers.lock:
            if readers.closed:
                raise StorageError("mail store is closed")
            return self._lookup(readers.lru, user, guid, recheck)

    def connection(self, user: str) -> sqlite3.Connection | None:
        """This thread's read-only connection to `user`'s index, checked against the file
        (one stat), or None when the index is missing or not at the current schema. For
        MailDB's reader threads, which `close()` outlives (MailDB shuts them down first):
        opening a connection per read cost more than most reads (status, changes)."""
        readers = self._thread_readers()
        with readers.lock:
            if readers.closed:
                raise StorageError("mail store is closed")
            reader = self._reader(readers.lru, user, recheck=True)
            return None if reader is None else reader.conn

    def _lookup(self, readers: OrderedDict[str, _Reader], user: str, guid: str,
                recheck: bool) -> bytes | None:
        reader = self._reader(readers, user, recheck)
        if reader is None:
            return None
        # fetchall: the statement runs to its end, which ends the read transaction.
        rows = reader.conn.execute("SELECT data FROM body WHERE guid = ?", (guid,)).fetchall()
        return rows[0][0] if rows else None

    def _reader(self, readers: OrderedDict[str, _Reader], user: str,
                recheck: bool) -> _Reader | None:
        reader = readers.get(user)
        if (reader is not None and recheck
                and reader.identity != _identity(self._index_of(user))):
            del readers[user]
            reader.conn.close()
            reader = None
        if reader is None:
            reader = _open(self._index_of(user), self._schema)
            if reader is None:
                return None
            readers[user] = reader
            while len(readers) > self._per_thread:
                readers.popitem(last=False)[1].conn.close()
        else:
            readers.move_to_end(user)
        return reader

    def close(self) -> None:
        """Close every thread's connections, each once its lookup in flight is done; later
        lookups raise StorageError."""
        with self._lock:
            self._closed = True
            every = list(self._every)
        for readers in every:
            readers.close()

    def _thread_readers(self) -> _ThreadReaders:
        readers: _ThreadReaders | None = getattr(self._local, "readers", None)
        if readers is None:
            with self._lock:
                readers = self._local.readers = _ThreadReaders(self._closed)
                self._every.add(readers)
        return readers


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _open(index: Path, schema: int) -> _Reader | None:
    identity = _identity(index)
    if identity is None:
        return None
    conn = connect_reader(index, schema)
    if conn is None:
        return None
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return _Reader(conn, identity)
