"""New UIDVALIDITYs for mailboxes restored from a backup (`tiermail uidvalidity renew`).

A restored index hands out again the UIDs (and MODSEQs) of the mail delivered after the
backup was taken, which the restore lost. An IMAP client that had cached UID n would never
fetch the different message that now gets n. RFC 3501 2.3.1.1 asks for a new UIDVALIDITY
whenever UIDs cannot be kept unique; clients then drop their caches and resynchronize, and a
CONDSTORE/QRESYNC client's saved MODSEQ, which goes with the UIDVALIDITY it saw (RFC 7162),
is dropped with them. Only the `mailbox.uidvalidity` column changes: UIDs, flags,
MODSEQs and GUIDs (POP3's UIDL) stay, so POP3 clients download nothing again.

The new values must be above any value the store handed out after the backup, which the
restore lost along with the counter (`uidvalidity.sqlite`) that recorded them. The counter
takes max(last + 1, clock), so after the backup it reached at most max(restored counter,
clock) + (mailboxes created since). The new values therefore start RENEWAL_MARGIN above the
largest of the restored counter, the clock and every index's UIDVALIDITY (an index copied
after the counter may hold values the counter does not know).

Runs only with the store stopped (the caller holds the store's directory lock): one pass reads
every index (the floor, and the mailboxes to renew), the counter reserves all the values in
one durable commit, then each index is rewritten in one transaction of its own. Interrupted,
it is run again: the counter has moved on, so the values of a second run are above the first.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.store.backends.maildb import (
    SCHEMA_VERSION,
    UIDVALIDITY_FILE,
    UidValidity,
    user_dir_name,
    user_path,
)
from services.store.backends.sqlite import transaction
from services.store.mailbox import NoSuchUser, StorageError

INDEX_FILE = "index.sqlite"
# Covers up to 2**24 (16.8 million) mailboxes created between the backup and the restore (six
# per new account), or the old machine's clock up to 194 days ahead of this one's. It costs
# 0.7% of the 32-bit space left (2.5e9 values until the clock itself reaches 2**32 in 2106)
# per run, and new mailboxes then take counter values up to 194 days ahead of the clock.
RENEWAL_MARGIN = 2**24


@dataclass(frozen=True)
class Renewed:
    """One account's mailboxes, given the UIDVALIDITYs first..last in mailbox id order."""

    user: str
    mailboxes: int
    first: int
    last: int


def indexed_users(root: Path) -> list[str]:
    """Every address with an index under the mail root `root`, accounts deleted with their
    mail kept included (`user add --reuse-mail` may give it back)."""
    users = []
    for index in sorted(root.glob(f"??/*/{INDEX_FILE}")):
        try:
            name = user_dir_name(index.parent.name)
        except NoSuchUser:
            continue
        if user_path(root, name) == index.parent:
            users.append(name)
    return users


def renew(root: Path, users: Sequence[str]) -> Iterator[Renewed]:
    """Give every mailbox of `users` (each with an index under `root`) a new UIDVALIDITY above
    anything handed out since the backup; yields each account as it is done. StorageError,
    changing nothing, for an index this code cannot write."""
    floor = 0
    counts: dict[str, int] = {}
    wanted = set(users)
    for user in indexed_users(root):
        highest, mailboxes = _read_index(root, user)
        floor = max(floor, highest)
        if user in wanted:
            counts[user] = mailboxes
    total = sum(counts.values())
    if not total:
        return
    counter = UidValidity(root / UIDVALIDITY_FILE)
    try:
        floor = max(floor, counter.last(), int(time.time())) + RENEWAL_MARGIN
        values = iter(counter.take(total, above=floor))
    finally:
        counter.close()
    for user in users:
        if counts.get(user):
            yield _rewrite_index(root, user, values)


def _read_index(root: Path, user: str) -> tuple[int, int]:
    """(largest UIDVALIDITY, number of mailboxes) of one index; (0, 0) for an index not
    initialised yet (the store creates its mailboxes from the counter)."""
    with _connect(root, user) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"index of {user} has schema {version}, newer than this code "
                               f"({SCHEMA_VERSION}); nothing was changed")
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'mailbox'").fetchone():
            return 0, 0  # created by a store that stopped before the first transaction
        highest, count = conn.execute(
            "SELECT coalesce(max(uidvalidity), 0), count(*) FROM mailbox").fetchone()
        return int(highest), int(count)


def _rewrite_index(root: Path, user: str, values: Iterator[int]) -> Renewed:
    with _connect(root, user) as conn, transaction(conn):
        ids = [int(row[0]) for row in conn.execute("SELECT id FROM mailbox ORDER BY id")]
        new = [next(values, 0) for _ in ids]
        if 0 in new:  # only if the index changed since it was read (the lock rules that out)
            raise StorageError(f"the mailboxes of {user} changed while being renewed")
        conn.executemany("UPDATE mailbox SET uidvalidity = ? WHERE id = ?",
                         zip(new, ids, strict=True))
    return Renewed(user, len(ids), new[0], new[-1])


@contextlib.contextmanager
def _connect(root: Path, user: str) -> Iterator[sqlite3.Connection]:
    index = user_path(root, user) / INDEX_FILE
    try:
        conn = sqlite3.connect(f"{index.as_uri()}?mode=rw", uri=True, isolation_level=None,
                               timeout=30)
    except sqlite3.Error as exc:
        raise StorageError(f"index of {user} cannot be opened: {exc}") from None
    try:
        conn.execute("PRAGMA synchronous=FULL")
        yield conn
    except sqlite3.Error as exc:  # not a database, a disk error, ...
        raise StorageError(f"index of {user}: {exc}") from None
    finally:
        conn.close()


def missing(root: Path, users: Iterable[str]) -> list[str]:
    """Those of `users` without an index under `root` (no mail yet, or no such account)."""
    return [user for user in users if not (user_path(root, user) / INDEX_FILE).exists()]
