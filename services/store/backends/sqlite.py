"""Helpers for the store's SQLite files: transactions (connections are opened with
isolation_level=None, so transactions are explicit) and read-only connections."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, durable: bool = True) -> Iterator[None]:
    """A write transaction that takes the write lock at once (no upgrade deadlocks).

    `durable=False` (for connections that otherwise run synchronous=FULL): the commit does
    not wait for the disk. In WAL mode that is synchronous=NORMAL: the database stays
    consistent whatever happens, a process crash loses nothing, a power failure may lose
    this commit; the next durable commit on the same database makes it durable too (the log
    is written in order). For changes a client can repeat, such as flags (IMAP STORE); one
    that hands out MODSEQs may skip the wait only below a durable reservation (maildb.py,
    "MODSEQ after a power loss")."""
    if not durable:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if not durable:
            conn.execute("PRAGMA synchronous=FULL")


@contextlib.contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction, so several queries see the same state (a status's counters and
    its message count, a snapshot and the changes after it)."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        # Readers keep their connections: a transaction left open would pin an old snapshot
        # of the index and hold the WAL back from checkpoints.
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")


def connect_reader(index: Path, schema: int) -> sqlite3.Connection | None:
    """A connection to an existing index that cannot write (`query_only`), or None when the
    file does not exist or its `user_version` is not `schema` (being created, or written by
    other code: the writer deals with that). Opened read-write at the file level: a WAL
    reader must be able to create the shared-memory file when it is the first to open it."""
    try:
        conn = sqlite3.connect(f"{index.as_uri()}?mode=rw", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30)
    except sqlite3.OperationalError:
        if not index.exists():
            return None
        raise
    try:
        conn.execute("PRAGMA query_only=1")
        current = conn.execute("PRAGMA user_version").fetchone()[0] == schema
    except BaseException:
        conn.close()
        raise
    if not current:
        conn.close()
        return None
    return conn
