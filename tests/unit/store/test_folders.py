"""MailDB: the standard special-use folders, delivery into Junk, the schema migration."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.store.backends.maildb import SCHEMA_VERSION, MailDB
from services.store.mailbox import (
    INBOX,
    JUNK,
    SPECIAL_USE,
    STANDARD_MAILBOXES,
    Delivery,
    MailboxInfo,
    NoSuchMailbox,
    StorageError,
)

ALICE = "alice@example.test"

# The index as schema 1 created it (before special_use and the standard folders).
SCHEMA_1 = """
CREATE TABLE mailbox (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL, uidnext INTEGER NOT NULL, highestmodseq INTEGER NOT NULL);
CREATE TABLE message (mailbox_id INTEGER NOT NULL REFERENCES mailbox(id), uid INTEGER NOT NULL,
    guid TEXT NOT NULL UNIQUE, size INTEGER NOT NULL, internaldate REAL NOT NULL,
    flags TEXT NOT NULL DEFAULT '', modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)) WITHOUT ROWID;
CREATE INDEX message_modseq ON message(mailbox_id, modseq);
CREATE TABLE expunged (mailbox_id INTEGER NOT NULL, uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL, PRIMARY KEY (mailbox_id, uid)) WITHOUT ROWID;
CREATE INDEX expunged_modseq ON expunged(mailbox_id, modseq);
CREATE TABLE delivered (queue_id TEXT PRIMARY KEY, mailbox_id INTEGER NOT NULL,
    uid INTEGER NOT NULL, delivered_at REAL NOT NULL) WITHOUT ROWID;
"""


def delivery(queue_id: str, mailbox: str = INBOX, user: str = ALICE) -> Delivery:
    body = f"Subject: {queue_id}\r\n\r\nhi\r\n".encode()
    return Delivery(queue_id=queue_id, user=user, body=body, received_at=1_700_000_000.0,
                    mailbox=mailbox)


@pytest.fixture
async def db(tmp_path: Path, inline_max: int) -> AsyncIterator[MailDB]:
    store = MailDB(tmp_path / "mail", inline_max=inline_max, max_open=4)
    yield store
    await store.close()


def index_rows(db: MailDB, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db.user_path(ALICE) / "index.sqlite")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_new_account_has_the_standard_folders(db: MailDB) -> None:
    mailboxes = await db.list_mailboxes(ALICE)  # never received mail: created on demand
    assert mailboxes[0] == MailboxInfo(INBOX, None, subscribed=True)
    assert all(m.subscribed for m in mailboxes), "clients showing subscribed folders see them"
    assert {m.name: m.special_use for m in mailboxes[1:]} == SPECIAL_USE
    assert {m.name for m in mailboxes} == set(STANDARD_MAILBOXES)
    statuses = [await db.status(ALICE, name) for name in STANDARD_MAILBOXES]
    validities = [s.uidvalidity for s in statuses]
    assert len(set(validities)) == len(validities), "each folder needs its own UIDVALIDITY"
    assert all((s.messages, s.uidnext, s.highestmodseq) == (0, 1, 1) for s in statuses)
    assert await db.list_messages(ALICE, JUNK) == []
    # A second account's folders get UIDVALIDITYs never used before in this store.
    bob = [(await db.status("bob@example.test", n)).uidvalidity for n in STANDARD_MAILBOXES]
    assert not set(bob) & set(validities)


async def test_first_delivery_creates_every_folder(db: MailDB) -> None:
    assert await db.deliver([delivery("q1")]) == [True]
    assert [m.name for m in await db.list_mailboxes(ALICE)] == [
        INBOX, "Archive", "Drafts", "Junk", "Sent", "Trash"]


async def test_delivery_into_junk(db: MailDB) -> None:
    uids = await db.deliver_uids([delivery("q1", JUNK), delivery("q2"), delivery("q3", JUNK)])
    assert uids == [1, 1, 2]  # UIDs are per mailbox
    junk = await db.list_messages(ALICE, JUNK)
    assert [m.uid for m in junk] == [1, 2]
    assert [m.uid for m in await db.list_messages(ALICE)] == [1]
    with db.open_message(ALICE, junk[0].guid) as f:
        assert f.read() == delivery("q1").body
    status = await db.status(ALICE, JUNK)
    assert (status.messages, status.uidnext) == (2, 3)
    assert status.highestmodseq == max(m.modseq for m in junk)
    # Dedup is per queue id per user, whichever folder the first copy went to.
    assert await db.deliver([delivery("q1"), delivery("q1", JUNK)]) == [False, False]
    assert len(await db.list_messages(ALICE)) == 1
    await db.expunge(ALICE, JUNK, [1])
    assert [m.uid for m in await db.list_messages(ALICE, JUNK)] == [2]


async def test_missing_standard_folder_is_recreated_by_delivery(db: MailDB,
                                                                inline_max: int) -> None:
    await db.deliver([delivery("q1")])
    old = (await db.status(ALICE, JUNK)).uidvalidity
    await db.close()
    conn = sqlite3.connect(db.user_path(ALICE) / "index.sqlite")
    with conn:
        conn.execute("DELETE FROM mailbox WHERE name = 'Junk'")  # e.g. a user deleted it
    conn.close()

    again = MailDB(db.root, inline_max=inline_max)
    try:
        assert await again.deliver([delivery("q2", JUNK)]) == [True]
        status = await again.status(ALICE, JUNK)
        assert status.messages == 1 and status.uidvalidity > old  # a new mailbox
        found = {(m.name, m.special_use) for m in await again.list_mailboxes(ALICE)}
        assert (JUNK, "\\Junk") in found
    finally:
        await again.close()


async def test_renamed_junk_still_receives_spam(db: MailDB, inline_max: int) -> None:
    await db.deliver([delivery("q1")])
    await db.close()
    conn = sqlite3.connect(db.user_path(ALICE) / "index.sqlite")
    with conn:
        conn.execute("UPDATE mailbox SET name = 'Spam' WHERE name = 'Junk'")
    conn.close()

    again = MailDB(db.root, inline_max=inline_max)
    try:
        # Two names for one mailbox in one batch must still give distinct UIDs.
        assert await again.deliver_uids([delivery("q2", JUNK), delivery("q3", "Spam")]) == [
            1, 2]
        assert len(await again.list_messages(ALICE, "Spam")) == 2
        names = {m.name for m in await again.list_mailboxes(ALICE)}
        assert "Spam" in names and JUNK not in names  # found by its \\Junk attribute
    finally:
        await again.close()


async def test_other_folder_names_are_refused(db: MailDB) -> None:
    with pytest.raises(NoSuchMailbox):
        await db.deliver([delivery("q1", "Nope")])
    with pytest.raises(NoSuchMailbox):
        await db.list_messages(ALICE, "Nope")
    with pytest.raises(NoSuchMailbox):
        await db.status(ALICE, "junk")  # only INBOX is case-insensitive (not even that yet)


def make_schema_1_index(db: MailDB, version: int) -> int:
    """An index as older code left it, with one message in INBOX; returns its UIDVALIDITY."""
    base = db.user_path(ALICE)
    for sub in ("m/ab", "tmp"):
        (base / sub).mkdir(parents=True)
    guid = "ab" + "0" * 30
    body = b"Subject: old\r\n\r\nold\r\n"
    (base / "m" / "ab" / guid).write_bytes(body)
    conn = sqlite3.connect(base / "index.sqlite")
    conn.executescript(SCHEMA_1)
    with conn:
        conn.execute("INSERT INTO mailbox VALUES (1, 'INBOX', 1600000000, 2, 2)")
        conn.execute("INSERT INTO message VALUES (1, 1, ?, ?, 0, '\\Seen', 2)",
                     (guid, len(body)))
        conn.execute("INSERT INTO delivered VALUES ('old-q', 1, 1, 0)")
    conn.execute(f"PRAGMA user_version={version}")
    conn.close()
    return 1600000000


# 1: what schema 1 wrote. 0: older code crashed between creating the tables and setting
# user_version (it did both outside one transaction).
@pytest.mark.parametrize("version", [1, 0])
async def test_schema_1_index_is_migrated(tmp_path: Path, version: int,
                                          inline_max: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        inbox_validity = make_schema_1_index(db, version)
        # A read comes first (POP3 login): it triggers the migration in the writer.
        [old] = await db.list_messages(ALICE)
        assert (old.uid, old.flags) == (1, frozenset({"\\Seen"}))
        assert [m.name for m in await db.list_mailboxes(ALICE)][0] == INBOX
        assert len(await db.list_mailboxes(ALICE)) == len(STANDARD_MAILBOXES)
        inbox = await db.status(ALICE)
        assert (inbox.uidvalidity, inbox.uidnext, inbox.messages) == (inbox_validity, 2, 1)
        assert (await db.status(ALICE, JUNK)).uidvalidity != inbox_validity
        assert index_rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        # Old delivery records still deduplicate; new spam lands in the new Junk.
        assert await db.deliver([delivery("old-q", JUNK), delivery("new-q", JUNK)]) == [
            False, True]
        assert [m.uid for m in await db.list_messages(ALICE, JUNK)] == [1]
        assert await db.deliver([delivery("next")]) == [True]
        assert [m.uid for m in await db.list_messages(ALICE)] == [1, 2]
    finally:
        await db.close()


async def test_schema_1_index_migrated_by_delivery(tmp_path: Path, inline_max: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        make_schema_1_index(db, 1)
        assert await db.deliver([delivery("spam", JUNK)]) == [True]
        assert [m.name for m in await db.list_mailboxes(ALICE)] == [
            INBOX, "Archive", "Drafts", "Junk", "Sent", "Trash"]
        assert index_rows(db, "SELECT name, special_use FROM mailbox WHERE name = 'Junk'") == [
            ("Junk", "\\Junk")]
    finally:
        await db.close()


async def test_newer_index_is_refused(tmp_path: Path, inline_max: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        make_schema_1_index(db, SCHEMA_VERSION + 1)
        with pytest.raises(StorageError, match="newer"):
            await db.deliver([delivery("q1")])
    finally:
        await db.close()
