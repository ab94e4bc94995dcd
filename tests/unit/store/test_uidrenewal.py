"""New UIDVALIDITYs after a restore (uidrenewal.py): above everything the lost history may
have handed out, with nothing else in the index changed."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from services.store.backends import uidrenewal
from services.store.backends.maildb import (
    SCHEMA_VERSION,
    UIDVALIDITY_FILE,
    MailDB,
    UidValidity,
    user_path,
)
from services.store.mailbox import Delivery, StorageError

ALICE = "alice@example.test"
BOB = "bob@example.test"


def delivery(queue_id: str, user: str = ALICE) -> Delivery:
    body = f"Subject: {queue_id}\r\n\r\nhi\r\n".encode()
    return Delivery(queue_id=queue_id, user=user, body=body, received_at=1_700_000_000.0)


def index_rows(root: Path, user: str, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(user_path(root, user) / "index.sqlite")
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def write(database: Path, statement: str, *parameters: object) -> None:
    """One statement, committed, in an index or the counter, as a restore or the past left it."""
    conn = sqlite3.connect(database)
    try:
        with conn:
            conn.execute(statement, parameters)
    finally:
        conn.close()


def uidvalidities(root: Path, user: str) -> dict[str, int]:
    return {str(name): int(str(value)) for name, value in
            index_rows(root, user, "SELECT name, uidvalidity FROM mailbox")}


def everything_but_uidvalidity(root: Path, user: str) -> list[tuple[object, ...]]:
    return (index_rows(root, user, "SELECT id, name, uidnext, highestmodseq, messages,"
                                   " recent_uid, modseq_reserved FROM mailbox ORDER BY id")
            + index_rows(root, user, "SELECT * FROM message ORDER BY mailbox_id, uid"))


async def test_new_values_are_above_those_handed_out_after_the_backup(tmp_path: Path) -> None:
    """The store's counter ran ahead of the clock (many mailboxes created: each takes
    last + 1 once the counter is past the clock). Values handed out after the backup are
    then just above the restored counter, where a renewal that merely takes the next
    values from it would land again."""
    root = tmp_path / "mail"
    ahead = int(time.time()) + 100_000
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1")])
    await db.close()
    counter = UidValidity(root / UIDVALIDITY_FILE)
    counter.take(1, above=ahead)  # as if 100,000 mailboxes had been created
    counter.close()
    backup = tmp_path / "backup"
    shutil.copytree(root, backup)

    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q2", BOB)])  # a new account: its six mailboxes
    await db.create_mailbox(ALICE, "Later")
    await db.close()
    handed_out = set(uidvalidities(root, BOB).values()) | {uidvalidities(root, ALICE)["Later"]}
    assert min(handed_out) == ahead + 2  # just above the counter the backup holds

    shutil.rmtree(root)
    shutil.copytree(backup, root)
    before = uidvalidities(root, ALICE)
    kept = everything_but_uidvalidity(root, ALICE)
    renewed = list(uidrenewal.renew(root, uidrenewal.indexed_users(root)))

    after = uidvalidities(root, ALICE)
    assert [(r.user, r.mailboxes) for r in renewed] == [(ALICE, 6)]
    assert after.keys() == before.keys()
    assert min(after.values()) > max(handed_out)
    assert min(after.values()) > max(before.values()) + uidrenewal.RENEWAL_MARGIN
    assert len(set(after.values())) == len(after)
    assert everything_but_uidvalidity(root, ALICE) == kept
    # The counter moved past them: a mailbox created from now on gets a value above too.
    counter = UidValidity(root / UIDVALIDITY_FILE)
    assert counter.last() == max(after.values())
    counter.close()


async def test_new_values_after_an_old_backup_are_above_the_clock(tmp_path: Path) -> None:
    """A backup from over a year ago holds a counter and indexes far behind the clock, while
    the store that ran since handed out values from the clock on (one a mailbox, past the
    clock when many are created at once). The margin above the backup's values (194 days)
    does not reach today: unless the new values start the margin above the clock, one may
    be a value a client already saw, and the client keeps its stale cache."""
    root = tmp_path / "mail"
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1")])
    await db.close()
    year_ago = int(time.time()) - 400 * 86400
    write(user_path(root, ALICE) / "index.sqlite", "UPDATE mailbox SET uidvalidity = ? + id",
          year_ago - 10)
    write(root / UIDVALIDITY_FILE, "UPDATE counter SET value = ?", year_ago)
    backup = tmp_path / "backup"
    shutil.copytree(root, backup)

    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q2", BOB)])  # a new account: six mailboxes from the clock on
    await db.close()
    handed_out = set(uidvalidities(root, BOB).values())

    shutil.rmtree(root)
    shutil.copytree(backup, root)
    now = int(time.time())
    list(uidrenewal.renew(root, [ALICE]))

    after = uidvalidities(root, ALICE)
    assert min(after.values()) > max(handed_out)
    assert min(after.values()) > now + uidrenewal.RENEWAL_MARGIN


async def test_an_index_copied_after_the_counter_is_respected(tmp_path: Path) -> None:
    """The documented backup copies the counter and the indexes one after the other: an
    index may hold values the restored counter never recorded."""
    root = tmp_path / "mail"
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1"), delivery("q2", BOB)])
    await db.close()
    high = int(time.time()) + 2 * uidrenewal.RENEWAL_MARGIN
    write(user_path(root, BOB) / "index.sqlite",
          "UPDATE mailbox SET uidvalidity = ? WHERE name = 'INBOX'", high)

    list(uidrenewal.renew(root, [ALICE]))

    assert min(uidvalidities(root, ALICE).values()) > high


async def test_a_second_run_gives_values_above_the_first(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1"), delivery("q2")])
    await db.store_flags(ALICE, "INBOX", [1], "+", frozenset({"\\Seen"}))
    await db.close()
    kept = everything_but_uidvalidity(root, ALICE)

    list(uidrenewal.renew(root, [ALICE]))
    first = uidvalidities(root, ALICE)
    list(uidrenewal.renew(root, [ALICE]))
    second = uidvalidities(root, ALICE)

    assert all(second[name] > max(first.values()) for name in first)
    assert everything_but_uidvalidity(root, ALICE) == kept


async def test_an_index_of_newer_code_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1"), delivery("q2", BOB)])
    await db.close()
    conn = sqlite3.connect(user_path(root, BOB) / "index.sqlite")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    before = uidvalidities(root, ALICE)

    with pytest.raises(StorageError, match="newer than this code"):
        list(uidrenewal.renew(root, [ALICE, BOB]))

    assert uidvalidities(root, ALICE) == before


async def test_an_unreadable_index_is_named_and_nothing_changes(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1"), delivery("q2", BOB)])
    await db.close()
    (user_path(root, BOB) / "index.sqlite").write_bytes(b"not a database" * 100)
    before = uidvalidities(root, ALICE)

    with pytest.raises(StorageError, match=f"index of {BOB}: file is not a database"):
        list(uidrenewal.renew(root, [ALICE, BOB]))

    assert uidvalidities(root, ALICE) == before


async def test_an_index_without_mailboxes_yet_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1")])
    await db.close()
    empty = user_path(root, BOB) / "index.sqlite"
    empty.parent.mkdir(parents=True)
    sqlite3.connect(empty).close()

    renewed = list(uidrenewal.renew(root, uidrenewal.indexed_users(root)))

    assert [r.user for r in renewed] == [ALICE]


class _SynchronousAtClose(sqlite3.Connection):
    """A real connection that notes, as it closes, its database and PRAGMA synchronous."""

    seen: list[tuple[str, int]] = []

    def close(self) -> None:
        [(_, _, database)] = self.execute("PRAGMA database_list").fetchall()
        self.seen.append((Path(database).name, self.execute("PRAGMA synchronous").fetchone()[0]))
        super().close()


async def test_the_counter_and_the_indexes_are_written_with_synchronous_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter's reservation must be on disk before any index holds a value from it (a
    power loss would let a second run hand the same values out again), and each rewritten
    index before the operator restarts the store: SQLite's synchronous=FULL (2) syncs the WAL
    at every commit, NORMAL (1) only at checkpoints."""
    root = tmp_path / "mail"
    db = MailDB(root, inline_max=0)
    await db.deliver([delivery("q1"), delivery("q2", BOB)])
    await db.close()
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: connect(
        *args, **kwargs, factory=_SynchronousAtClose))
    monkeypatch.setattr(_SynchronousAtClose, "seen", [])

    list(uidrenewal.renew(root, [ALICE, BOB]))

    assert sorted(set(_SynchronousAtClose.seen)) == [
        ("index.sqlite", 2), (UIDVALIDITY_FILE, 2)]
    assert [name for name, _ in _SynchronousAtClose.seen].count("index.sqlite") == 4
