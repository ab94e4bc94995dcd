"""MailDB's inline bodies: where each kind of body goes, what is (not) journalled or fsynced,
COPY, expunge, DELETE and sweep with both kinds side by side, the 3 -> 4 and 5 -> 6
migrations, and the per-thread read connections of open_message."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.store.backends import bodies, maildb
from services.store.backends.maildb import SCHEMA_VERSION, MailDB
from services.store.mailbox import (
    ARCHIVE,
    INBOX,
    Delivery,
    NoSuchMessage,
    StorageError,
)
from tests.support import check_bodies, eventually, record_fsyncs

ALICE = "alice@example.test"
BOB = "bob@example.test"
INLINE_MAX = 1000  # small enough that a test builds messages on both sides cheaply


def message(n: int, size: int) -> bytes:
    head = f"Subject: message {n}\r\n\r\n".encode()
    return head + b"b" * (size - len(head))


SMALL, LARGE = message(1, 100), message(2, 5000)


def delivery(queue_id: str, body: bytes, user: str = ALICE) -> Delivery:
    return Delivery(queue_id=queue_id, user=user, body=body, received_at=1_700_000_000.0)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MailDB]:
    store = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    yield store
    await store.close()


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the store's own code fsynced since the test started, in order."""
    return record_fsyncs(monkeypatch)


@pytest.fixture
def fsyncs(synced: list[str]) -> Callable[[], int]:
    """The number of os.fsync calls by the store's own code since the test started."""
    return lambda: len(synced)


def files_under(db: MailDB, user: str = ALICE) -> list[Path]:
    return [p for p in (db.user_path(user) / "m").rglob("*")]


def message_files(db: MailDB, user: str = ALICE) -> list[Path]:
    """The files under m/ (not the m/xx directories)."""
    return [path for path in files_under(db, user) if path.is_file()]


def read(db: MailDB, guid: str) -> bytes:
    with db.open_message(ALICE, guid) as f:
        return f.read()


async def guids(db: MailDB, mailbox: str = INBOX) -> list[str]:
    return [m.guid for m in await db.list_messages(ALICE, mailbox)]


# Writing


async def test_a_batch_of_small_bodies_is_one_commit_and_nothing_else(
        db: MailDB, fsyncs: Callable[[], int]) -> None:
    await db.list_messages(ALICE)  # the index exists (creating it makes directories)
    before = fsyncs()
    assert await db.deliver([delivery(f"q{i}", message(i, 100 + i)) for i in range(16)]) == [
        True] * 16
    assert fsyncs() == before, "no journal, file or directory fsync for inline bodies"
    assert not (db.root / "inflight").exists()
    assert files_under(db) == [], "no m/xx directory, no file"
    stored = check_bodies(db.user_path(ALICE))
    assert len(stored.inline) == 16 and not stored.files
    assert [read(db, guid) for guid in await guids(db)] == [
        message(i, 100 + i) for i in range(16)]


async def test_a_mixed_batch_journals_and_writes_files_for_the_large_ones_only(
        db: MailDB, fsyncs: Callable[[], int]) -> None:
    assert await db.deliver([delivery("s1", SMALL), delivery("l1", LARGE),
                             delivery("s2", message(3, INLINE_MAX)),
                             delivery("l2", message(4, INLINE_MAX + 1))]) == [True] * 4
    assert fsyncs() > 0
    assert (db.root / "inflight").exists()
    small, large, at_limit, over = await guids(db)
    stored = check_bodies(db.user_path(ALICE))
    assert set(stored.inline) == {small, at_limit}
    assert set(stored.files) == {large, over}
    assert [read(db, g) for g in (small, large, at_limit, over)] == [
        SMALL, LARGE, message(3, INLINE_MAX), message(4, INLINE_MAX + 1)]
    assert await db.usage(ALICE) == sum(map(len, (SMALL, LARGE))) + 2 * INLINE_MAX + 1


async def test_a_redelivery_found_stored_syncs_the_index_and_its_directory(
        db: MailDB, synced: list[str]) -> None:
    """A delivery found already stored writes nothing, so it is reported (and acked) only
    after the index is synced: the commit that stored it may be one a killed store wrote
    but never synced. Its WAL, and the user's directory: that store may have died while
    creating the index or the WAL, whose names only the directory's fsync makes durable."""
    assert await db.deliver([delivery("q1", SMALL)]) == [True]
    synced.clear()
    assert await db.deliver([delivery("q1", SMALL)]) == [False]
    user_dir = db.user_path(ALICE)
    assert synced == [str(user_dir / "index.sqlite-wal"), str(user_dir)]


async def test_the_journal_starts_again_once_it_has_grown_large(db: MailDB) -> None:
    """Each batch that writes files adds its users to the inflight journal; between batches
    every earlier one has finished, so past 1 MiB the journal is emptied before the next
    batch's users are written, instead of growing (and the sweep's reading) for good."""
    assert await db.deliver([delivery("l1", LARGE)]) == [True]
    journal = db.root / "inflight"
    with journal.open("a") as earlier:  # what many batches since the last start wrote
        earlier.write(f"{BOB}\n" * (2**20 // len(BOB)))
    assert await db.deliver([delivery("l2", LARGE)]) == [True]
    assert journal.read_text() == f"{ALICE}\n"


async def test_redelivery_and_duplicates_in_a_batch_store_one_body(db: MailDB) -> None:
    assert await db.deliver([delivery("q1", SMALL), delivery("q1", SMALL)]) == [True, False]
    assert await db.deliver([delivery("q1", SMALL), delivery("q2", LARGE)]) == [False, True]
    stored = check_bodies(db.user_path(ALICE))
    assert (len(stored.inline), len(stored.files)) == (1, 1)


async def test_threshold_zero_stores_every_body_as_a_file(tmp_path: Path) -> None:
    db = MailDB(tmp_path / "mail", inline_max=0)
    try:
        await db.deliver([delivery("q1", b""), delivery("q2", SMALL)])
        await db.append(ALICE, INBOX, b"x", frozenset())
        stored = check_bodies(db.user_path(ALICE))
        assert not stored.inline and len(stored.files) == 3
    finally:
        await db.close()
    with pytest.raises(ValueError):
        MailDB(tmp_path / "mail", inline_max=-1)


async def test_append_of_a_small_body_writes_and_journals_nothing(
        db: MailDB, fsyncs: Callable[[], int]) -> None:
    await db.list_messages(ALICE)
    before = fsyncs()
    small = await db.append(ALICE, INBOX, SMALL, frozenset({"\\Seen"}))
    assert fsyncs() == before and not (db.root / "inflight").exists()
    large = await db.append(ALICE, INBOX, LARGE, frozenset())
    assert fsyncs() > before and (db.root / "inflight").exists()
    assert (small.uid, large.uid) == (1, 2)
    small_guid, large_guid = await guids(db)
    stored = check_bodies(db.user_path(ALICE))
    assert (set(stored.inline), set(stored.files)) == ({small_guid}, {large_guid})


async def test_a_failed_transaction_leaves_no_body(db: MailDB) -> None:
    await db.deliver([delivery("q0", SMALL)])
    with pytest.raises(StorageError):  # NoSuchMailbox, after the large body's file is written
        await db.deliver([delivery("q1", SMALL), delivery("q2", LARGE),
                          Delivery("q3", ALICE, SMALL, 0.0, mailbox="Nope")])
    stored = check_bodies(db.user_path(ALICE))
    assert (len(stored.inline), len(stored.files)) == (1, 0)


async def test_the_journal_is_made_durable_before_the_first_file(
        db: MailDB, synced: list[str]) -> None:
    """The inflight journal is what the sweep reads after a crash to find half-written
    batches: its directory entry is synced when the file is created, before the journal's
    own fsync and before any message file."""
    await db.list_messages(ALICE)  # the index exists (creating it makes directories)
    synced.clear()
    await db.deliver([delivery("l1", LARGE)])
    assert synced[:2] == [str(db.root), str(db.root / "inflight")]


async def test_a_batch_whose_file_cannot_be_written_leaves_no_file(
        db: MailDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second large body of a batch fails to be written (EIO): the first one's file,
    already in m/xx/, is removed with it; nothing of the batch is stored."""
    real_write = maildb._write_file
    writes: list[Path] = []

    def second_fails(path: Path, *parts: bytes) -> None:
        writes.append(path)
        if len(writes) == 2:
            raise OSError(errno.EIO, "I/O error", str(path))
        real_write(path, *parts)

    monkeypatch.setattr(maildb, "_write_file", second_fails)
    with pytest.raises(OSError):
        await db.deliver([delivery("l1", LARGE), delivery("l2", message(3, 5000))])
    assert len(writes) == 2
    assert message_files(db) == []
    assert check_bodies(db.user_path(ALICE)).guids == set()


async def test_a_failed_append_of_a_large_body_leaves_no_file(
        db: MailDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """APPEND writes a large body's file before its transaction; when the transaction fails,
    the file goes with it (docs: "A failed transaction removes the files it wrote")."""
    await db.deliver([delivery("s", SMALL)])

    def failing_usage(conn: sqlite3.Connection, octets: int) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(maildb, "_add_usage", failing_usage)
    with pytest.raises(sqlite3.OperationalError):
        await db.append(ALICE, INBOX, LARGE, frozenset())
    assert message_files(db) == []
    assert len(check_bodies(db.user_path(ALICE)).guids) == 1


async def test_a_copy_where_links_are_refused_is_a_synced_copy_of_the_bytes(
        db: MailDB, synced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system that refuses hard links (or a file at its link limit), COPY writes
    the bytes to a file of its own, fsynced before the index names it."""
    await db.deliver([delivery("l", LARGE)])
    [large] = await guids(db)

    def refused(source: object, target: object) -> None:
        raise OSError(errno.EMLINK, "Too many links")

    monkeypatch.setattr(os, "link", refused)
    synced.clear()
    await db.copy(ALICE, INBOX, [1], ARCHIVE)
    [copy] = await guids(db, ARCHIVE)
    assert read(db, copy) == LARGE
    assert db.message_path(ALICE, copy).stat().st_ino != \
        db.message_path(ALICE, large).stat().st_ino
    assert str(db.user_path(ALICE) / "tmp" / copy) in synced
    assert str(db.message_path(ALICE, copy).parent) in synced
    assert set(check_bodies(db.user_path(ALICE)).files) == {large, copy}


# COPY, MOVE, expunge, DELETE


async def test_copy_copies_inline_rows_and_links_files(
        db: MailDB, fsyncs: Callable[[], int]) -> None:
    await db.deliver([delivery("s", SMALL), delivery("l", LARGE)])
    small, large = await guids(db)
    before = fsyncs()
    inline_copy = await db.copy(ALICE, INBOX, [1], ARCHIVE)
    assert fsyncs() == before, "copying an inline body journals and links nothing"
    assert inline_copy.dest_uids == [1]
    await db.copy(ALICE, INBOX, [1, 2], ARCHIVE)
    assert fsyncs() > before
    copies = await guids(db, ARCHIVE)
    assert [read(db, g) for g in copies] == [SMALL, SMALL, LARGE]
    stored = check_bodies(db.user_path(ALICE))
    assert set(stored.inline) == {small, copies[0], copies[1]}
    assert set(stored.files) == {large, copies[2]}
    assert db.message_path(ALICE, copies[2]).stat().st_ino == \
        db.message_path(ALICE, large).stat().st_ino

    # Each copy outlives its source.
    await db.expunge(ALICE, INBOX, [1, 2])
    assert [read(db, g) for g in copies] == [SMALL, SMALL, LARGE]
    assert db.message_path(ALICE, copies[2]).stat().st_nlink == 1
    assert check_bodies(db.user_path(ALICE)).guids == set(copies)
    assert await db.usage(ALICE) == 2 * len(SMALL) + len(LARGE)


async def test_move_keeps_both_kinds_of_body(db: MailDB, fsyncs: Callable[[], int]) -> None:
    await db.deliver([delivery("s", SMALL), delivery("l", LARGE)])
    before_guids = await guids(db)
    before = fsyncs()
    await db.move(ALICE, INBOX, [1, 2], ARCHIVE)
    assert fsyncs() == before
    assert await guids(db, ARCHIVE) == before_guids
    assert [read(db, g) for g in before_guids] == [SMALL, LARGE]
    check_bodies(db.user_path(ALICE))


async def test_expunge_deletes_inline_rows_and_unlinks_files(
        db: MailDB, fsyncs: Callable[[], int]) -> None:
    await db.deliver([delivery(f"s{i}", message(i, 200)) for i in range(3)] +
                     [delivery("l", LARGE)])
    small, _, _, large = await guids(db)
    os.truncate(db.root / "inflight", 0)  # the large body journalled alice
    before = fsyncs()
    assert await db.expunge(ALICE, INBOX, [1]) == [1]
    assert fsyncs() == before, "forgetting an inline body needs no journal"
    assert (db.root / "inflight").stat().st_size == 0
    with pytest.raises(NoSuchMessage):
        db.open_message(ALICE, small)
    assert await db.expunge(ALICE, INBOX, [2, 4]) == [2, 4]
    assert ALICE in (db.root / "inflight").read_text()  # a file was left to unlink
    assert not db.message_path(ALICE, large).exists()
    stored = check_bodies(db.user_path(ALICE))
    assert len(stored.inline) == 1 and not stored.files
    assert await db.usage(ALICE) == 200


async def test_delete_mailbox_removes_both_kinds(db: MailDB) -> None:
    await db.create_mailbox(ALICE, "Box")
    await db.append(ALICE, "Box", SMALL, frozenset())
    await db.append(ALICE, "Box", LARGE, frozenset())
    await db.append(ALICE, INBOX, SMALL, frozenset())
    await db.delete_mailbox(ALICE, "Box")
    stored = check_bodies(db.user_path(ALICE))
    assert stored.guids == set(await guids(db)) and len(stored.inline) == 1
    assert not stored.files
    assert await db.usage(ALICE) == len(SMALL)


# Sweep


async def test_sweep_removes_orphan_files_and_keeps_every_body(tmp_path: Path) -> None:
    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await db.deliver([delivery("s", SMALL), delivery("l", LARGE)])
    base = db.user_path(ALICE)
    orphan = base / "m" / "cd" / ("cd" + "2" * 30)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    (base / "tmp" / ("ef" + "3" * 30)).write_bytes(b"half")
    await db.close()
    (db.root / "inflight").write_text(ALICE + "\n")  # as a crash mid-batch leaves it

    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        assert (await db.sweep()).files_removed == 2
        assert (await db.sweep(full=True)).files_removed == 0
        assert [read(db, g) for g in await guids(db)] == [SMALL, LARGE]
        stored = check_bodies(base)
        assert (len(stored.inline), len(stored.files)) == (1, 1)
    finally:
        await db.close()


# Schema 3 -> 4


def downgrade(index: Path, version: int, undo: str) -> None:
    """Make `index` what schema `version` was, by the statement `undo`."""
    conn = sqlite3.connect(index)
    try:
        conn.execute(undo)
        conn.execute(f"PRAGMA user_version={version}")
    finally:
        conn.close()


def downgrade_to_schema_3(index: Path) -> None:
    """What schema 3 was: everything but the `body` table."""
    downgrade(index, 3, "DROP TABLE body")


async def test_schema_3_index_is_migrated_in_place(tmp_path: Path) -> None:
    old = MailDB(tmp_path / "mail", inline_max=0)  # what schema 3 code stored: files
    await old.deliver([delivery("old", SMALL)])
    [old_guid] = await guids(old)
    await old.close()
    index = old.user_path(ALICE) / "index.sqlite"
    downgrade_to_schema_3(index)

    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        assert read(db, old_guid) == SMALL  # before any migration: the file
        assert await guids(db) == [old_guid]  # a read: the writer migrates
        conn = sqlite3.connect(index)
        try:
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert conn.execute("SELECT count(*) FROM body").fetchone() == (0,)
        finally:
            conn.close()
        await db.deliver([delivery("new", SMALL)])
        new_guid = (await guids(db))[1]
        # This thread read the schema 3 index before: it kept no connection to it.
        assert (read(db, old_guid), read(db, new_guid)) == (SMALL, SMALL)
        stored = check_bodies(db.user_path(ALICE))
        assert (set(stored.files), set(stored.inline)) == ({old_guid}, {new_guid})
    finally:
        await db.close()


# Schema 5 -> 6


def back_to_schema_5(index: Path) -> None:
    downgrade(index, 5, "ALTER TABLE message DROP COLUMN padding")


async def test_schema_5_index_gets_the_line_end_padding_of_what_it_holds(tmp_path: Path
                                                                        ) -> None:
    """message.padding (POP3's sizes) of the messages stored before it existed: from the last
    octet of each, inline or file."""
    bodies = [SMALL, LARGE, b"Subject: x\r\n\r\nends well\r\n", b"Subject: y\r\n\r\nCR\r",
              b"Subject: z\r\n\r\n" + b"a" * 5000 + b"\r"]
    old = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await old.deliver([delivery(f"q{n}", body) for n, body in enumerate(bodies)])
    assert await old.line_end_padding(ALICE) == {1: 2, 2: 2, 4: 1, 5: 1}
    await old.close()
    back_to_schema_5(old.user_path(ALICE) / "index.sqlite")

    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        assert await db.line_end_padding(ALICE) == {1: 2, 2: 2, 4: 1, 5: 1}
        assert await db.line_end_padding(ALICE, ARCHIVE) == {}
        await db.copy(ALICE, INBOX, [1, 3, 4], ARCHIVE)
        assert await db.line_end_padding(ALICE, ARCHIVE) == {1: 2, 3: 1}
    finally:
        await db.close()


async def test_schema_5_index_gives_no_padding_to_a_file_that_ends_its_last_line(
        tmp_path: Path) -> None:
    """A message kept in a file and ending with CRLF, as every large message that came by
    SMTP does, needs nothing added; the migration took its last octet alone for a bare LF
    and gave it 1, so POP3's LIST and STAT were an octet over what RETR sends."""
    large = b"Subject: big\r\n\r\n" + b"line\r\n" * 300
    old = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await old.deliver([delivery("q1", large)])
    assert await old.line_end_padding(ALICE) == {}
    await old.close()
    back_to_schema_5(old.user_path(ALICE) / "index.sqlite")

    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        assert await db.line_end_padding(ALICE) == {}
    finally:
        await db.close()


async def test_schema_5_index_counts_the_bare_line_feeds_of_appended_messages(
        tmp_path: Path) -> None:
    """Before IMAP APPEND turned bare LFs into CRLF (8fa5827, after schema 5), an appended
    message kept them; POP3 sends each as CRLF, so its padding counts them as well as the
    last line's. The migration read only the last octet: LIST stayed short of RETR."""
    inline = b"Subject: lf\n\nbare\nlines\n"  # 4 bare LFs, all lines ended
    large = b"Subject: big\n\n" + b"line\n" * 300 + b"last"  # 302 LFs, no final one
    delivered = b"Subject: q\r\n\r\nover SMTP\r\n"
    old = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await old.append(ALICE, INBOX, inline, frozenset())
    await old.append(ALICE, INBOX, large, frozenset())
    await old.deliver([delivery("q1", delivered)])
    await old.close()
    back_to_schema_5(old.user_path(ALICE) / "index.sqlite")

    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        assert await db.line_end_padding(ALICE) == {1: 4, 2: 302 + 2}
    finally:
        await db.close()


async def test_computing_the_paddings_holds_up_no_write_and_no_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The migration's paddings are computed outside the writer, which every user's
    deliveries share: with that computation held up, another user's delivery and this
    user's reads, COPY, MOVE and EXPUNGE go through; POP3's paddings wait for it and are
    right, those of the copies made meanwhile and of an appended message with bare LFs
    too. When all are computed, the migration's helper indexes are gone."""
    old = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await old.deliver([delivery(f"q{n}", message(n, 5000)) for n in range(3)])  # files
    await old.append(ALICE, INBOX, b"Subject: lf\n\nbare\n", frozenset())  # inline
    await old.close()
    back_to_schema_5(old.user_path(ALICE) / "index.sqlite")
    held = threading.Event()
    real = maildb._padding_after

    def held_up(last_octet: bytes) -> int:  # a delivered file's last octet, being read
        held.wait(60)
        return real(last_octet)

    monkeypatch.setattr(maildb, "_padding_after", held_up)
    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        migrating = asyncio.create_task(db.deliver([delivery("q4", SMALL)]))  # migrates
        await asyncio.wait_for(db.deliver([delivery("bob", SMALL, BOB)]), 30)
        await asyncio.wait_for(migrating, 30)
        assert len(await asyncio.wait_for(db.list_messages(ALICE), 30)) == 5
        await asyncio.wait_for(db.copy(ALICE, INBOX, [1, 4], ARCHIVE), 30)
        await asyncio.wait_for(db.move(ALICE, INBOX, [2], ARCHIVE), 30)
        await asyncio.wait_for(db.expunge(ALICE, INBOX, [3]), 30)
        pop3 = asyncio.create_task(db.line_end_padding(ALICE))
        held.set()
        assert await asyncio.wait_for(pop3, 30) == {1: 2, 4: 3, 5: 2}
        assert await db.line_end_padding(ALICE, ARCHIVE) == {1: 2, 2: 3, 3: 2}
        conn = sqlite3.connect(db.user_path(ALICE) / "index.sqlite")
        try:
            assert conn.execute("SELECT count(*) FROM message WHERE padding IS NULL"
                                ).fetchone() == (0,)

            def helper_indexes_gone() -> bool:
                # The fill drops them in a writer transaction of its own after its last
                # batch, which POP3's read may already have seen complete.
                return conn.execute("SELECT count(*) FROM sqlite_master WHERE name IN (?, ?)",
                                    (maildb.PADDING_PENDING, maildb.PADDING_DELIVERED)
                                    ).fetchone() == (0,)

            await eventually(helper_indexes_gone, within=30, what="the helper indexes dropped")
        finally:
            conn.close()
    finally:
        held.set()
        await db.close()


# open_message's connections


def _opens_counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The index paths open_message's readers open from now on, in order."""
    opened: list[Path] = []
    real_open = bodies._open

    def counting(index: Path, schema: int) -> bodies._Reader | None:
        opened.append(index)
        return real_open(index, schema)

    monkeypatch.setattr(bodies, "_open", counting)
    return opened


async def test_connections_are_cached_per_thread_and_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    users = [f"user{i}@example.test" for i in range(bodies.PER_THREAD + 2)]
    opened = _opens_counted(monkeypatch)
    try:
        await db.deliver([delivery(f"q{n}", message(n, 100), user)
                          for user in users for n in range(4)])
        found = {user: [m.guid for m in await db.list_messages(user)] for user in users}
        opened.clear()  # the listings' own connections, in MailDB's reader threads

        def read_all(rounds: int) -> None:
            for _ in range(rounds):
                for n in range(4):
                    with db.open_message(users[0], found[users[0]][n]) as f:
                        assert f.read() == message(n, 100)

        await asyncio.to_thread(read_all, 10)
        assert len(opened) == 1, "40 reads of one user, one connection"

        def read_each() -> int:
            for user in users:
                with db.open_message(user, found[user][0]) as f:
                    assert f.read() == message(0, 100)
            return len(db._bodies._thread_readers().lru)

        assert await asyncio.to_thread(read_each) == bodies.PER_THREAD  # oldest closed
        # Four threads reading at once (as FETCH does) each get their own connections.
        threads = [threading.Thread(target=read_all, args=(5,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        await db.close()
    with pytest.raises(StorageError):
        db.open_message(users[0], found[users[0]][0])


async def _read_through(writer: MailDB, reader: MailDB) -> str:
    """One message (q1, SMALL) delivered by `writer` and read by `reader`, which now holds
    a connection to ALICE's index; its guid."""
    await writer.deliver([delivery("q1", SMALL)])
    [first] = await guids(writer)
    assert read(reader, first) == SMALL
    return first


async def _account_deleted(writer: MailDB) -> None:
    """ALICE's account directory removed, with `writer` closed first."""
    await writer.close()
    shutil.rmtree(writer.user_path(ALICE))


async def _account_back(tmp_path: Path) -> MailDB:
    """ALICE's account made again with one message (q2, `message(7, 300)`); its writer."""
    writer = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await writer.deliver([delivery("q2", message(7, 300))])
    return writer


async def test_a_replaced_index_is_noticed(tmp_path: Path) -> None:
    """The user's directory is removed and made again (an account deleted and recreated)
    while a reader holds a connection to the old index: the new messages are found."""
    writer = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    reader = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        first = await _read_through(writer, reader)
        await _account_deleted(writer)

        writer = await _account_back(tmp_path)
        [second] = await guids(writer)
        assert read(reader, second) == message(7, 300)
        with pytest.raises(NoSuchMessage):
            read(reader, first)
    finally:
        await writer.close()
        await reader.close()


async def test_closing_while_threads_read_is_safe(tmp_path: Path) -> None:
    """Closing the body connections waits for each thread's lookup in flight (closing a
    connection under a running statement crashes the sqlite3 module); afterwards every read
    is refused rather than opening a connection again."""
    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await db.deliver([delivery(f"q{n}", message(n, 900)) for n in range(20)])
    found = await guids(db)
    outcomes: list[str] = []
    reading = threading.Barrier(5)

    def read_until_closed() -> None:
        with db.open_message(ALICE, found[0]) as f:  # this thread's connection is open
            f.read()
        reading.wait()
        try:
            for _ in range(20_000):  # a bound far beyond what the close needs, not a clock
                for guid in found:
                    with db.open_message(ALICE, guid) as f:
                        assert len(f.read()) == 900
            outcomes.append("never closed")
        except StorageError:
            outcomes.append("closed")

    threads = [threading.Thread(target=read_until_closed) for _ in range(4)]
    for thread in threads:
        thread.start()
    reading.wait()  # all four have a connection open and are reading now
    db._bodies.close()  # what MailDB.close() ends with, here while the reads run
    for thread in threads:
        thread.join()
    await db.close()
    assert outcomes == ["closed"] * 4


async def test_the_least_recently_read_connection_is_the_one_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-thread cache is an LRU: a user read again keeps their connection when a
    reader of many accounts (the text indexer, spam learning) goes past the bound. Each
    connection has the small page cache the docs state."""
    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    users = [f"user{i}@example.test" for i in range(bodies.PER_THREAD + 1)]
    opened = _opens_counted(monkeypatch)
    try:
        await db.deliver([delivery(f"q{n}", SMALL, user) for n, user in enumerate(users)])
        found = {user: (await db.list_messages(user))[0].guid for user in users}

        def reads_of(first: str) -> int:
            """All in one thread: the first PER_THREAD users, `first` again, then one
            more user; the connections opened by reading `first` once more."""
            for user in [*users[:-1], first, users[-1]]:
                with db.open_message(user, found[user]) as f:
                    assert f.read() == SMALL
            opened.clear()
            with db.open_message(first, found[first]) as f:
                f.read()
            assert db._bodies.connection(first).execute(
                "PRAGMA cache_size").fetchone()[0] == -bodies.CACHE_KIB
            return len(opened)

        assert await asyncio.to_thread(reads_of, users[0]) == 0
    finally:
        await db.close()


async def test_reads_of_the_index_notice_it_was_replaced(tmp_path: Path) -> None:
    """Not only bodies: listings through a reader thread's kept connection see the index that
    replaced the one it opened (the account deleted and created again), not the old one."""
    writer = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    reader = MailDB(tmp_path / "mail", inline_max=INLINE_MAX, readers=1)
    try:
        await writer.deliver([delivery("q1", SMALL)])
        assert [m.guid for m in await reader.list_messages(ALICE)] == await guids(writer)
        await _account_deleted(writer)

        writer = await _account_back(tmp_path)
        assert [m.guid for m in await reader.list_messages(ALICE)] == await guids(writer)
        assert (await reader.status(ALICE)).messages == 1
    finally:
        await writer.close()
        await reader.close()


async def test_reads_work_again_once_a_deleted_account_is_back(tmp_path: Path) -> None:
    """A read that found the account's index gone (a message asked for after the account
    was deleted) drops the connection to it: once the account has mail again, it is read."""
    writer = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    reader = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    try:
        await _read_through(writer, reader)
        await _account_deleted(writer)
        with pytest.raises(NoSuchMessage):
            read(reader, "0" * 32)

        writer = await _account_back(tmp_path)
        [second] = await guids(writer)
        assert read(reader, second) == message(7, 300)
    finally:
        await writer.close()
        await reader.close()


async def test_no_connection_is_handed_out_after_close(tmp_path: Path) -> None:
    """After close, a thread that had a connection gets StorageError, not a new one that
    nothing would ever close."""
    db = MailDB(tmp_path / "mail", inline_max=INLINE_MAX)
    await db.deliver([delivery("q1", SMALL)])
    [guid] = await guids(db)
    await db.close()
    readers = bodies.BodyReaders(SCHEMA_VERSION, lambda user: db.user_path(user) / "index.sqlite")
    assert readers.connection(ALICE) is not None
    assert readers.body(ALICE, guid) == SMALL
    readers.close()
    with pytest.raises(StorageError):
        readers.connection(ALICE)
    with pytest.raises(StorageError):
        readers.body(ALICE, guid)
