"""MailDB's IMAP operations on a real index and real files: mailboxes, subscriptions, APPEND,
STORE, COPY, MOVE, CONDSTORE/QRESYNC changes, \\Recent, quota usage and change notification."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.store.backends import maildb
from services.store.backends.maildb import MAX_NAME_DEPTH, SCHEMA_VERSION, MailDB
from services.store.mailbox import (
    ARCHIVE,
    INBOX,
    JUNK,
    TRASH,
    CannotDelete,
    ChangeEvent,
    Delivery,
    InvalidMailboxName,
    MailboxExists,
    MailboxInfo,
    MailboxReplaced,
    NoSuchMailbox,
    OverQuota,
)
from tests.support import check_bodies, record_fsyncs

ALICE = "alice@example.test"
BOB = "bob@example.test"
UNBOUNDED = 2**31  # claim_recent up to whatever uidnext is
# Subscribed for every new account, in the order `subscriptions` lists them.
STANDARD_SUBSCRIPTIONS = ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"]
SEEN, FLAGGED, DELETED, ANSWERED = "\\Seen", "\\Flagged", "\\Deleted", "\\Answered"


def body(n: int) -> bytes:
    return f"Subject: message {n}\r\n\r\nbody {n}\r\n".encode()


@pytest.fixture
async def db(tmp_path: Path, inline_max: int) -> AsyncIterator[MailDB]:
    store = MailDB(tmp_path / "mail", inline_max=inline_max, max_open=4)
    yield store
    await store.close()


async def append_n(db: MailDB, n: int, mailbox: str = INBOX, user: str = ALICE) -> list[int]:
    return [(await db.append(user, mailbox, body(i), frozenset())).uid for i in range(n)]


def stored(db: MailDB, user: str = ALICE) -> set[str]:
    """GUIDs that have a body (inline or a file), each exactly one, none orphaned."""
    return check_bodies(db.user_path(user)).guids


async def indexed_guids(db: MailDB, user: str = ALICE) -> set[str]:
    guids: set[str] = set()
    for info in await db.list_mailboxes(user):
        guids.update(m.guid for m in await db.list_messages(user, info.name))
    return guids


async def total_size(db: MailDB, user: str = ALICE) -> int:
    total = 0
    for info in await db.list_mailboxes(user):
        total += sum(m.size for m in await db.list_messages(user, info.name))
    return total


def read(db: MailDB, guid: str, user: str = ALICE) -> bytes:
    with db.open_message(user, guid) as f:
        return f.read()


# Mailboxes


async def test_create_makes_missing_parents(db: MailDB) -> None:
    await db.create_mailbox(ALICE, "Work/Projects/2024")
    names = [m.name for m in await db.list_mailboxes(ALICE)]
    assert {"Work", "Work/Projects", "Work/Projects/2024"} <= set(names)
    statuses = [await db.status(ALICE, n) for n in ("Work", "Work/Projects", "Work/Projects/2024")]
    assert all((s.messages, s.uidnext) == (0, 1) for s in statuses)
    assert len({s.uidvalidity for s in statuses}) == 3
    with pytest.raises(MailboxExists):
        await db.create_mailbox(ALICE, "Work/Projects")
    await db.create_mailbox(ALICE, "Work/Other")  # an existing parent is fine
    with pytest.raises(MailboxExists):
        await db.create_mailbox(ALICE, "inbox")  # INBOX in any case is INBOX
    await db.create_mailbox(ALICE, "inbox/Sub")
    assert "INBOX/Sub" in [m.name for m in await db.list_mailboxes(ALICE)]
    assert (await db.status(ALICE, "Inbox/Sub")).messages == 0


async def test_create_with_special_use(db: MailDB) -> None:
    await db.create_mailbox(ALICE, "Old Junk", "\\Junk")
    assert MailboxInfo("Old Junk", "\\Junk") in await db.list_mailboxes(ALICE)
    with pytest.raises(InvalidMailboxName):
        await db.create_mailbox(ALICE, "All Mail", "\\All")  # a virtual folder we lack
    assert "All Mail" not in [m.name for m in await db.list_mailboxes(ALICE)]


@pytest.mark.parametrize("name", [
    "", "/a", "a/", "a//b", ".", "..", "a/../b", "a/./b", "a\x00b", "a\tb", "a\x7fb",
    "a\x85b", "x" * 256, "/".join(["d"] * 33), "é" * 200 + "/" + "é" * 200 + "/" + "é" * 200,
    "a*b", "a%", "bad\ud800surrogate",
])
async def test_invalid_names_are_refused(db: MailDB, name: str) -> None:
    before = await db.list_mailboxes(ALICE)
    with pytest.raises(InvalidMailboxName):
        await db.create_mailbox(ALICE, name)
    with pytest.raises(InvalidMailboxName):
        await db.rename_mailbox(ALICE, ARCHIVE, name)
    with pytest.raises(InvalidMailboxName):
        await db.set_subscribed(ALICE, name, True)
    assert await db.list_mailboxes(ALICE) == before


async def test_a_name_with_an_empty_level_is_refused_where_it_is_looked_up(
        db: MailDB) -> None:
    """No mailbox is named "Box/", "/Box" or "Box//x": every lookup refuses such a name
    (IMAP: [CANNOT]) instead of finding nothing ([TRYCREATE] to an APPEND, whose CREATE
    "Box/" then made "Box"; [NONEXISTENT] to a SELECT of "Box//x")."""
    await db.create_mailbox(ALICE, "Box/x")
    [uid] = await append_n(db, 1, "Box")
    for name in ("Box/", "inbox/", "/", "/Box", "Box//x", "INBOX//x", "//", ""):
        lookups = [db.status(ALICE, name), db.snapshot(ALICE, name),
                   db.append(ALICE, name, body(1), frozenset()),
                   db.copy(ALICE, "Box", [uid], name), db.move(ALICE, "Box", [uid], name),
                   db.delete_mailbox(ALICE, name), db.rename_mailbox(ALICE, name, "Other"),
                   db.set_subscribed(ALICE, name, False), db.expunge(ALICE, name, [uid])]
        for lookup in lookups:
            with pytest.raises(InvalidMailboxName):
                await lookup
    assert [m.uid for m in await db.list_messages(ALICE, "Box")] == [uid]
    assert (await db.status(ALICE, "Box")).messages == 1
    assert (await db.status(ALICE, "Box/x")).messages == 0


async def test_a_rename_that_would_put_a_child_over_the_limits_is_refused(db: MailDB) -> None:
    """A child's new name is its old one with the prefix replaced: renaming to a longer or
    deeper name must not give it a name CREATE would refuse."""
    deepest = "/".join(["Deep", *(f"l{n}" for n in range(1, MAX_NAME_DEPTH))])
    await db.create_mailbox(ALICE, deepest)  # MAX_NAME_DEPTH levels: the most allowed
    long_child = "Long/" + "x" * 250 + "/" + "y" * 250 + "/" + "z" * 250 + "/" + "w" * 200
    await db.create_mailbox(ALICE, long_child)
    before = await db.list_mailboxes(ALICE)
    with pytest.raises(InvalidMailboxName):
        await db.rename_mailbox(ALICE, "Deep", "Deeper/Still")
    with pytest.raises(InvalidMailboxName):
        await db.rename_mailbox(ALICE, "Long", "L" + "o" * 200)
    assert await db.list_mailboxes(ALICE) == before
    await db.rename_mailbox(ALICE, "Deep", "Deeper")  # as deep as before: allowed
    assert (await db.status(ALICE, "Deeper" + deepest[len("Deep"):])).messages == 0


async def test_unusual_but_valid_names(db: MailDB) -> None:
    for name in ("Entwürfe", "日本語", "a b", "x" * 255, "emoji 👩‍💻", "[Gmail]/Sent Mail"):
        await db.create_mailbox(ALICE, name)
        assert (await db.status(ALICE, name)).name == name


async def test_delete_removes_messages_and_files_but_not_children(db: MailDB) -> None:
    await db.create_mailbox(ALICE, "Box/Child")
    await append_n(db, 2, "Box/Child")
    await append_n(db, 3, "Box")
    old = await db.status(ALICE, "Box")
    doomed = {m.guid for m in await db.list_messages(ALICE, "Box")}
    assert doomed <= stored(db)
    await db.set_subscribed(ALICE, "Box", True)

    await db.delete_mailbox(ALICE, "Box")
    names = [m.name for m in await db.list_mailboxes(ALICE)]
    assert "Box" not in names and "Box/Child" in names
    assert len(await db.list_messages(ALICE, "Box/Child")) == 2
    assert not doomed & stored(db)
    assert stored(db) == await indexed_guids(db)
    assert await db.usage(ALICE) == await total_size(db)
    # the subscription outlives the mailbox
    assert await db.subscriptions(ALICE) == sorted([*STANDARD_SUBSCRIPTIONS, "Box"],
                                                   key=lambda n: (n != "INBOX", n))
    with pytest.raises(NoSuchMailbox):
        await db.status(ALICE, "Box")
    with pytest.raises(NoSuchMailbox):
        await db.delete_mailbox(ALICE, "Box")

    # Recreated: a new mailbox, a new UIDVALIDITY, nothing of the old one (not even expunges).
    await db.create_mailbox(ALICE, "Box")
    new = await db.status(ALICE, "Box")
    assert new.uidvalidity > old.uidvalidity and (new.messages, new.uidnext) == (0, 1)
    assert (await db.changes_since(ALICE, "Box", 0)).expunged == []


async def test_inbox_cannot_be_deleted(db: MailDB) -> None:
    await append_n(db, 1)
    for name in (INBOX, "inbox"):
        with pytest.raises(CannotDelete):
            await db.delete_mailbox(ALICE, name)
    assert (await db.status(ALICE)).messages == 1


async def test_rename_takes_children_and_keeps_uidvalidity(db: MailDB) -> None:
    await db.create_mailbox(ALICE, "Work/Done")
    await db.create_mailbox(ALICE, "Workshop")  # shares a prefix but is not a child
    await append_n(db, 2, "Work")
    await append_n(db, 1, "Work/Done")
    before = {n: await db.status(ALICE, n) for n in ("Work", "Work/Done")}
    await db.set_subscribed(ALICE, "Work/Done", True)
    await db.set_subscribed(ALICE, "Workshop", True)

    await db.rename_mailbox(ALICE, "Work", "Archive/2024/Work")
    names = {m.name for m in await db.list_mailboxes(ALICE)}
    assert {"Archive/2024", "Archive/2024/Work", "Archive/2024/Work/Done", "Workshop"} <= names
    assert not {"Work", "Work/Done"} & names
    for old, new in (("Work", "Archive/2024/Work"), ("Work/Done", "Archive/2024/Work/Done")):
        status = await db.status(ALICE, new)
        assert (status.uidvalidity, status.uidnext, status.messages) == (
            before[old].uidvalidity, before[old].uidnext, before[old].messages)
    assert await db.subscriptions(ALICE) == sorted(
        [*STANDARD_SUBSCRIPTIONS, "Archive/2024/Work/Done", "Workshop"],
        key=lambda n: (n != "INBOX", n))


async def test_rename_keeps_special_use(db: MailDB) -> None:
    await db.rename_mailbox(ALICE, JUNK, "Spam")
    infos = {m.name: m.special_use for m in await db.list_mailboxes(ALICE)}
    assert infos["Spam"] == "\\Junk" and JUNK not in infos
    # Spam still lands there (found by its attribute).
    await db.deliver([Delivery("q1", ALICE, body(1), 0.0, JUNK)])
    assert len(await db.list_messages(ALICE, "Spam")) == 1


async def test_rename_refusals(db: MailDB) -> None:
    await db.create_mailbox(ALICE, "A/X")
    await db.create_mailbox(ALICE, "B/X")
    await db.create_mailbox(ALICE, "C")
    with pytest.raises(MailboxExists):
        await db.rename_mailbox(ALICE, "A", "C")
    with pytest.raises(MailboxExists):
        await db.rename_mailbox(ALICE, "A", "A")
    with pytest.raises(MailboxExists):
        await db.rename_mailbox(ALICE, "C", "inbox")
    with pytest.raises(MailboxExists):  # A/X would become B/X, which exists
        await db.rename_mailbox(ALICE, "A", "B")
    with pytest.raises(InvalidMailboxName):
        await db.rename_mailbox(ALICE, "A", "A/Inside")
    with pytest.raises(NoSuchMailbox):
        await db.rename_mailbox(ALICE, "Nope", "Other")
    names = {m.name for m in await db.list_mailboxes(ALICE)}
    assert {"A", "A/X", "B", "B/X", "C"} <= names and "Other" not in names


async def test_rename_onto_names_it_frees(db: MailDB) -> None:
    """Moving "w/w" up to "w" (once "w" is only a name) moves "w/w/w" to "w/w" and
    "w/w/w/x" to "w/w/x", names the rename itself frees: they are not taken, and no row
    meets another's name on the way (by name order, "w/w/w/x" is renamed before "w/w/x")."""
    for name in ("w/w/w/x", "w/w/x"):
        await db.create_mailbox(ALICE, name)
    await append_n(db, 2, "w/w/w/x")
    await db.set_subscribed(ALICE, "w/w/w/x", True)
    await db.delete_mailbox(ALICE, "w")
    moves = {"w/w": "w", "w/w/w": "w/w", "w/w/w/x": "w/w/x", "w/w/x": "w/x"}
    before = {old: await db.status(ALICE, old) for old in moves}

    await db.rename_mailbox(ALICE, "w/w", "w")
    for old, new in moves.items():
        status = await db.status(ALICE, new)
        assert (status.uidvalidity, status.messages) == (before[old].uidvalidity,
                                                         before[old].messages)
    names = {m.name for m in await db.list_mailboxes(ALICE)}
    assert set(moves.values()) <= names and "w/w/w/x" not in names
    subscribed = await db.subscriptions(ALICE)
    assert "w/w/x" in subscribed and "w/w/w/x" not in subscribed


async def test_rename_inbox_moves_its_messages(db: MailDB) -> None:
    await db.create_mailbox(ALICE, "INBOX/Child")
    await append_n(db, 3)
    await db.store_flags(ALICE, INBOX, [2], "+", frozenset({SEEN}))
    inbox = await db.status(ALICE)
    messages = await db.list_messages(ALICE)

    await db.rename_mailbox(ALICE, "inbox", "Old Mail")
    after = await db.status(ALICE)
    assert (after.uidvalidity, after.messages, after.uidnext) == (inbox.uidvalidity, 0, 4)
    old_mail = await db.status(ALICE, "Old Mail")
    assert old_mail.uidvalidity != inbox.uidvalidity
    moved = await db.list_messages(ALICE, "Old Mail")
    assert [m.uid for m in moved] == [1, 2, 3]
    assert [(m.guid, m.flags) for m in moved] == [(m.guid, m.flags) for m in messages]
    assert [read(db, m.guid) for m in moved] == [body(i) for i in range(3)]
    assert "INBOX/Child" in {m.name for m in await db.list_mailboxes(ALICE)}  # unaffected
    changes = await db.changes_since(ALICE, INBOX, inbox.highestmodseq)
    assert changes.expunged == [1, 2, 3] and changes.changed == []
    assert await db.usage(ALICE) == await total_size(db)
    # INBOX keeps working: new mail gets UIDs after the old ones.
    assert await append_n(db, 1) == [4]
    with pytest.raises(MailboxExists):
        await db.rename_mailbox(ALICE, INBOX, "Old Mail")


# Subscriptions


async def test_new_accounts_are_subscribed_to_the_standard_folders(db: MailDB) -> None:
    assert await db.subscriptions(ALICE) == STANDARD_SUBSCRIPTIONS
    assert all(m.subscribed for m in await db.list_mailboxes(BOB))


async def test_subscriptions_are_names(db: MailDB) -> None:
    for name in STANDARD_SUBSCRIPTIONS:
        await db.set_subscribed(ALICE, name, False)
    assert await db.subscriptions(ALICE) == []
    await db.set_subscribed(ALICE, "Not/Yet", True)  # a name that does not exist
    await db.set_subscribed(ALICE, "inbox", True)
    await db.set_subscribed(ALICE, ARCHIVE, True)
    await db.set_subscribed(ALICE, ARCHIVE, True)  # twice is once
    assert await db.subscriptions(ALICE) == [INBOX, ARCHIVE, "Not/Yet"]
    infos = {m.name: m.subscribed for m in await db.list_mailboxes(ALICE)}
    assert infos[INBOX] and infos[ARCHIVE] and not infos[TRASH]
    assert "Not/Yet" not in infos
    await db.set_subscribed(ALICE, ARCHIVE, False)
    await db.set_subscribed(ALICE, "never subscribed", False)  # no error
    assert await db.subscriptions(ALICE) == [INBOX, "Not/Yet"]
    await db.delete_mailbox(ALICE, TRASH)
    await db.set_subscribed(ALICE, TRASH, True)
    assert TRASH in await db.subscriptions(ALICE)
    assert await db.subscriptions(BOB) == STANDARD_SUBSCRIPTIONS


# APPEND


async def test_append_stores_durably_with_flags_and_date(db: MailDB) -> None:
    status = await db.status(ALICE, ARCHIVE)
    result = await db.append(ALICE, ARCHIVE, body(1),
                             frozenset({"\\SEEN", "\\Recent", "$Label1", "custom"}),
                             internaldate=1_600_000_000.5)
    assert (result.uidvalidity, result.uid) == (status.uidvalidity, 1)
    [info] = await db.list_messages(ALICE, ARCHIVE)
    assert info.flags == frozenset({SEEN, "$Label1", "custom"})  # \Recent is per session
    assert info.internaldate == 1_600_000_000.5 and info.size == len(body(1))
    assert read(db, info.guid) == body(1)
    assert info.modseq > status.highestmodseq
    assert (await db.status(ALICE, ARCHIVE)).highestmodseq == info.modseq
    second = await db.append(ALICE, ARCHIVE, body(2), frozenset())
    assert second.uid == 2
    assert await db.usage(ALICE) == len(body(1)) + len(body(2))
    with pytest.raises(NoSuchMailbox):
        await db.append(ALICE, "Nope", body(3), frozenset())
    assert stored(db) == await indexed_guids(db)
    assert not any((db.user_path(ALICE) / "tmp").iterdir())


async def test_append_over_quota_is_refused_and_writes_nothing(db: MailDB) -> None:
    size = len(body(1))
    await db.append(ALICE, INBOX, body(1), frozenset(), quota=size)  # exactly at the limit
    files = stored(db)
    with pytest.raises(OverQuota):
        await db.append(ALICE, INBOX, body(2), frozenset(), quota=2 * size - 1)
    assert stored(db) == files
    assert (await db.status(ALICE)).messages == 1 and await db.usage(ALICE) == size
    await db.append(ALICE, INBOX, body(2), frozenset(), quota=None)  # no limit
    assert await db.usage(ALICE) == 2 * size


# STORE


async def test_store_flags_modes_and_one_modseq_per_call(db: MailDB) -> None:
    await append_n(db, 4)
    start = (await db.status(ALICE)).highestmodseq
    result = await db.store_flags(ALICE, INBOX, [1, 2, 3, 99], "+", frozenset({"\\seen"}))
    assert [m.uid for m in result.changed] == [1, 2, 3] and result.modified == []
    assert {m.modseq for m in result.changed} == {start + 1}
    assert all(m.flags == {SEEN} for m in result.changed)
    assert (await db.status(ALICE)).highestmodseq == start + 1

    # Only messages whose flags really change get the new MODSEQ.
    again = await db.store_flags(ALICE, INBOX, [1, 2, 3, 4], "+", frozenset({SEEN}))
    assert [m.uid for m in again.changed] == [4]
    assert again.changed[0].modseq == start + 2
    assert [m.modseq for m in await db.list_messages(ALICE)] == [start + 1] * 3 + [start + 2]
    nothing = await db.store_flags(ALICE, INBOX, [1], "+", frozenset({SEEN}))
    assert nothing.changed == [] and (await db.status(ALICE)).highestmodseq == start + 2

    removed = await db.store_flags(ALICE, INBOX, [1, 2], "-", frozenset({SEEN, FLAGGED}))
    assert [(m.uid, m.flags) for m in removed.changed] == [(1, set()), (2, set())]
    replaced = await db.store_flags(ALICE, INBOX, [3], "", frozenset({"Work", DELETED}))
    assert replaced.changed[0].flags == {"Work", DELETED}
    flags = {m.uid: m.flags for m in await db.list_messages(ALICE)}
    assert flags == {1: set(), 2: set(), 3: {"Work", DELETED}, 4: {SEEN}}
    assert "work" not in flags[3]  # keywords keep their case
    with pytest.raises(ValueError, match="mode"):
        await db.store_flags(ALICE, INBOX, [1], "x", frozenset({SEEN}))
    with pytest.raises(NoSuchMailbox):
        await db.store_flags(ALICE, "Nope", [1], "+", frozenset({SEEN}))


async def test_store_unchangedsince(db: MailDB) -> None:
    await append_n(db, 3)
    await db.store_flags(ALICE, INBOX, [2], "+", frozenset({FLAGGED}))
    messages = {m.uid: m.modseq for m in await db.list_messages(ALICE)}
    watermark = messages[3]  # the client saw 1 and 3 as they are; 2 changed since
    assert messages[1] <= watermark < messages[2]
    result = await db.store_flags(ALICE, INBOX, [1, 2, 3], "+", frozenset({SEEN}),
                                  unchangedsince=watermark)
    assert result.modified == [2]
    assert [m.uid for m in result.changed] == [1, 3]
    assert {m.uid: m.flags for m in await db.list_messages(ALICE)} == {
        1: {SEEN}, 2: {FLAGGED}, 3: {SEEN}}
    zero = await db.store_flags(ALICE, INBOX, [1, 2, 3], "-", frozenset({SEEN}),
                                unchangedsince=0)
    assert zero.modified == [1, 2, 3] and zero.changed == []


async def test_the_first_flag_change_past_the_reservation_waits_for_the_disk(
        db: MailDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """A STORE commits without waiting for the disk only with a MODSEQ at most the mailbox's
    durable reservation; the one taking the first MODSEQ past it waits (and reserves the
    next ones). Else a power loss could take back a MODSEQ clients saw with no reservation
    above it, and the store would hand it out again (RFC 7162 3.1). Seen from CHECK
    (make_durable), which syncs only what did not wait for the disk."""
    monkeypatch.setattr(maildb, "MODSEQ_RESERVE", 1)
    await append_n(db, 1)
    synced = record_fsyncs(monkeypatch)
    # Past the reservation (none yet), within the one it made, past that one.
    for flag, waits in ((SEEN, True), (FLAGGED, False), (ANSWERED, True)):
        synced.clear()
        assert (await db.store_flags(ALICE, INBOX, [1], "+", frozenset({flag}))).changed
        await db.make_durable(ALICE)
        assert (not synced) == waits, f"STORE +{flag}, should wait: {waits}; CHECK: {synced}"


async def test_store_on_many_messages(db: MailDB) -> None:
    """A large UID set naming every message of a span is stored by flag set, a scattered
    one message by message: both give the same answers."""
    await append_n(db, 300)
    await db.expunge(ALICE, INBOX, [100])
    await db.store_flags(ALICE, INBOX, [7, 250], "+", frozenset({FLAGGED}))
    watermark = (await db.status(ALICE)).highestmodseq - 1  # before 7 and 300 changed
    span = await db.store_flags(ALICE, INBOX, list(range(1, 301)), "+", frozenset({SEEN}),
                                unchangedsince=watermark)
    assert span.modified == [7, 250]
    assert [m.uid for m in span.changed] == [u for u in range(1, 301) if u not in (7, 100, 250)]
    assert {m.modseq for m in span.changed} == {watermark + 2}
    assert all(m.flags == {SEEN} for m in span.changed)
    odd = list(range(1, 301, 2))
    scattered = await db.store_flags(ALICE, INBOX, odd, "-", frozenset({SEEN, FLAGGED}))
    assert [m.uid for m in scattered.changed] == odd
    flags = {m.uid: m.flags for m in await db.list_messages(ALICE)}
    assert flags[7] == set() and flags[250] == {FLAGGED} and flags[2] == {SEEN}
    assert flags[1] == set() and 100 not in flags
    replaced = await db.store_flags(ALICE, INBOX, await db.uids(ALICE), "", frozenset({"$X"}))
    assert len(replaced.changed) == 299
    assert {m.flags for m in await db.list_messages(ALICE)} == {frozenset({"$X"})}
    # The boundary, on a span and message by message: every message's MODSEQ is now the
    # mailbox's highest, and a MODSEQ equal to UNCHANGEDSINCE is unchanged since.
    current = (await db.status(ALICE)).highestmodseq
    for uids, flag in ((await db.uids(ALICE), SEEN), ([1, 2], FLAGGED)):
        boundary = await db.store_flags(ALICE, INBOX, uids, "+", frozenset({flag}),
                                        unchangedsince=current)
        assert boundary.modified == [] and len(boundary.changed) == len(uids)
        current = (await db.status(ALICE)).highestmodseq


@pytest.mark.parametrize("skipped", [{50, 51, 200}, {200}], ids=["holes", "a-one-uid-hole"])
@pytest.mark.parametrize("gaps_probed", [1000, 1], ids=["probe-each-gap", "read-the-span"])
async def test_store_on_a_large_set_with_gaps_leaves_the_messages_in_them(
        db: MailDB, gaps_probed: int, skipped: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large UID set with holes: holes left by expunged messages do not matter, a message
    in a hole keeps its flags (checked by one probe per hole, or with many holes by reading
    the span), also when the only hole is one UID wide."""
    monkeypatch.setattr(maildb, "_SPAN_GAPS_PROBED", gaps_probed)
    await append_n(db, 300)
    await db.expunge(ALICE, INBOX, [100, 101])
    every_left = [u for u in range(1, 301) if u not in (100, 101)]
    whole = await db.store_flags(ALICE, INBOX, every_left, "+", frozenset({"$All"}))
    assert [m.uid for m in whole.changed] == every_left
    wanted = [u for u in range(1, 301) if u not in skipped]  # 100 and 101 named, gone
    result = await db.store_flags(ALICE, INBOX, wanted, "+", frozenset({FLAGGED}))
    assert [m.uid for m in result.changed] == [u for u in every_left if u not in skipped]
    flags = {m.uid: m.flags for m in await db.list_messages(ALICE)}
    assert all(flags[u] == {"$All"} for u in skipped)
    assert all(flags[u] == {"$All", FLAGGED} for u in every_left if u not in skipped)


# COPY and MOVE


@pytest.mark.parametrize("cached", [False, True])
async def test_copy_and_move_spell_keywords_as_the_destination_does(db: MailDB,
                                                                   cached: bool) -> None:
    """With the destination's snapshot cached, the keywords set after it was taken count
    too (the cache is the fast path, the rows changed since complete it)."""
    await append_n(db, 4)
    await db.copy(ALICE, INBOX, [1, 2], ARCHIVE)
    await db.store_flags(ALICE, ARCHIVE, [1], "+", frozenset({"$Work"}))
    if cached:
        await db.snapshot(ALICE, ARCHIVE)
    await db.store_flags(ALICE, ARCHIVE, [2], "+", frozenset({"NonJunk"}))
    await db.store_flags(ALICE, INBOX, [3, 4], "+", frozenset({"$WORK", "nonjunk", "$New"}))

    await db.copy(ALICE, INBOX, [3], ARCHIVE)
    await db.move(ALICE, INBOX, [4], ARCHIVE)
    *_, copied, moved = await db.list_messages(ALICE, ARCHIVE)
    assert copied.flags == moved.flags == frozenset({"$Work", "NonJunk", "$New"})


async def test_copy_links_the_same_bytes_and_survives_the_source(db: MailDB,
                                                                 inline_max: int) -> None:
    await append_n(db, 3)
    await db.store_flags(ALICE, INBOX, [2], "+", frozenset({ANSWERED, "$Work"}))
    archive = await db.status(ALICE, ARCHIVE)
    sources = {m.uid: m for m in await db.list_messages(ALICE)}

    result = await db.copy(ALICE, INBOX, [3, 2, 42], ARCHIVE)
    assert (result.uidvalidity, result.source_uids, result.dest_uids) == (
        archive.uidvalidity, [2, 3], [1, 2])
    copies = await db.list_messages(ALICE, ARCHIVE)
    for copy, uid in zip(copies, [2, 3], strict=True):
        source = sources[uid]
        assert copy.guid != source.guid
        assert (copy.flags, copy.size, copy.internaldate) == (
            source.flags, source.size, source.internaldate)
        assert read(db, copy.guid) == read(db, source.guid)
        if inline_max:  # an inline source's bytes are copied into the copy's own body row
            assert not db.message_path(ALICE, copy.guid).exists()
            continue
        copy_stat = db.message_path(ALICE, copy.guid).stat()
        assert copy_stat.st_ino == db.message_path(ALICE, source.guid).stat().st_ino
        assert copy_stat.st_nlink == 2  # a hard link: no bytes were copied
    assert await db.usage(ALICE) == await total_size(db)

    await db.expunge(ALICE, INBOX, [1, 2, 3])
    assert [read(db, m.guid) for m in copies] == [body(1), body(2)]
    if not inline_max:
        assert db.message_path(ALICE, copies[0].guid).stat().st_nlink == 1
    assert stored(db) == await indexed_guids(db)
    assert await db.usage(ALICE) == await total_size(db)


async def test_copy_within_one_mailbox_and_nothing_to_copy(db: MailDB) -> None:
    await append_n(db, 2)
    result = await db.copy(ALICE, INBOX, [1, 2], INBOX)
    assert result.dest_uids == [3, 4]
    assert [read(db, m.guid) for m in await db.list_messages(ALICE)] == [
        body(0), body(1), body(0), body(1)]
    empty = await db.copy(ALICE, INBOX, [77], ARCHIVE)
    assert (empty.source_uids, empty.dest_uids) == ([], [])
    with pytest.raises(NoSuchMailbox):
        await db.copy(ALICE, INBOX, [1], "Nope")


async def test_copy_over_quota_is_refused_whole(db: MailDB) -> None:
    await append_n(db, 3)
    usage = await db.usage(ALICE)
    files = stored(db)
    with pytest.raises(OverQuota):
        await db.copy(ALICE, INBOX, [1, 2, 3], ARCHIVE, quota=usage + 2 * len(body(0)))
    assert (await db.status(ALICE, ARCHIVE)).messages == 0
    assert stored(db) == files and await db.usage(ALICE) == usage
    await db.copy(ALICE, INBOX, [1, 2, 3], ARCHIVE, quota=2 * usage)
    assert await db.usage(ALICE) == 2 * usage


async def test_move_is_one_step(db: MailDB) -> None:
    await append_n(db, 4)
    await db.store_flags(ALICE, INBOX, [2], "+", frozenset({SEEN}))
    inbox = await db.status(ALICE)
    trash = await db.status(ALICE, TRASH)
    before = {m.uid: m for m in await db.list_messages(ALICE)}
    usage = await db.usage(ALICE)

    result = await db.move(ALICE, INBOX, [4, 2, 9], TRASH)
    assert (result.uidvalidity, result.source_uids, result.dest_uids) == (
        trash.uidvalidity, [2, 4], [1, 2])
    assert [m.uid for m in await db.list_messages(ALICE)] == [1, 3]
    moved = await db.list_messages(ALICE, TRASH)
    # The file does not move, so the message keeps its GUID; flags travel.
    assert [(m.guid, m.flags) for m in moved] == [
        (before[2].guid, before[2].flags), (before[4].guid, before[4].flags)]
    assert [read(db, m.guid) for m in moved] == [body(1), body(3)]
    assert await db.usage(ALICE) == usage
    source_changes = await db.changes_since(ALICE, INBOX, inbox.highestmodseq)
    assert source_changes.expunged == [2, 4]
    assert source_changes.status.highestmodseq > inbox.highestmodseq
    dest_changes = await db.changes_since(ALICE, TRASH, trash.highestmodseq)
    assert [m.uid for m in dest_changes.changed] == [1, 2]
    assert stored(db) == await indexed_guids(db)

    # A failing move changes nothing at all.
    with pytest.raises(NoSuchMailbox):
        await db.move(ALICE, INBOX, [1, 3], "Nope")
    assert [m.uid for m in await db.list_messages(ALICE)] == [1, 3]
    assert (await db.status(ALICE)).highestmodseq == source_changes.status.highestmodseq


async def test_move_within_one_mailbox_renumbers(db: MailDB) -> None:
    await append_n(db, 2)
    result = await db.move(ALICE, INBOX, [1], INBOX)
    assert result.dest_uids == [3]
    assert [m.uid for m in await db.list_messages(ALICE)] == [2, 3]
    assert (await db.changes_since(ALICE, INBOX, 0)).expunged == [1]


# CONDSTORE / QRESYNC, infos, recent, unseen


async def test_changes_since(db: MailDB) -> None:
    await append_n(db, 5)
    mark = (await db.status(ALICE)).highestmodseq
    assert (await db.changes_since(ALICE, INBOX, mark)).changed == []

    await db.store_flags(ALICE, INBOX, [2], "+", frozenset({SEEN}))
    removed = await db.expunge(ALICE, INBOX, [3, 4, 77])
    assert removed == [3, 4]
    await db.move(ALICE, INBOX, [5], ARCHIVE)
    await append_n(db, 1)
    changes = await db.changes_since(ALICE, INBOX, mark)
    assert [(m.uid, m.flags) for m in changes.changed] == [(2, {SEEN}), (6, set())]
    assert changes.expunged == [3, 4, 5]
    status = await db.status(ALICE)
    assert changes.status == status and status.messages == 3
    assert all(m.modseq <= status.highestmodseq for m in changes.changed)
    everything = await db.changes_since(ALICE, INBOX, 0)
    assert [m.uid for m in everything.changed] == [1, 2, 6]
    nothing = await db.changes_since(ALICE, INBOX, status.highestmodseq)
    assert (nothing.changed, nothing.expunged) == ([], [])
    with pytest.raises(NoSuchMailbox):
        await db.changes_since(ALICE, "Nope", 0)



async def test_modseq_only_grows_through_removals_additions_and_a_restart(
        tmp_path: Path, inline_max: int) -> None:
    """RFC 7162 3.1 and 3.2: a mailbox's MODSEQ grows with an expunge and a move out of it
    too (QRESYNC orders them with the flag changes), every message added (copy, move,
    append) gets a MODSEQ above what its mailbox had, and a restarted store goes on from
    where it was, never handing out a MODSEQ a client has already seen."""
    db = MailDB(tmp_path / "mail", inline_max=inline_max)

    async def highest(mailbox: str = INBOX) -> int:
        return (await db.status(ALICE, mailbox)).highestmodseq

    try:
        await append_n(db, 4)
        inbox, archive = await highest(), await highest(ARCHIVE)
        await db.expunge(ALICE, INBOX, [1])
        assert await highest() > inbox
        copied = await db.copy(ALICE, INBOX, [2], ARCHIVE)
        moved = await db.move(ALICE, INBOX, [3], ARCHIVE)
        assert await highest() > inbox + 1
        added = await db.fetch_infos(ALICE, ARCHIVE, copied.dest_uids + moved.dest_uids)
        assert archive < added[0].modseq < added[1].modseq == await highest(ARCHIVE)
        inbox, archive = await highest(), await highest(ARCHIVE)
    finally:
        await db.close()
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        assert (await highest(), await highest(ARCHIVE)) == (inbox, archive)
        flagged = await db.store_flags(ALICE, INBOX, [4], "+", frozenset({SEEN}))
        assert flagged.changed[0].modseq == await highest() > inbox
        appended = await db.append(ALICE, ARCHIVE, body(9), frozenset())
        [info] = await db.fetch_infos(ALICE, ARCHIVE, [appended.uid])
        assert info.modseq == await highest(ARCHIVE) > archive
    finally:
        await db.close()


async def test_fetch_infos_uids_and_unseen(db: MailDB) -> None:
    await append_n(db, 600)
    await db.expunge(ALICE, INBOX, [5])
    await db.store_flags(ALICE, INBOX, list(range(1, 11)), "+", frozenset({SEEN}))
    infos = await db.fetch_infos(ALICE, INBOX, [3, 1, 5, 1000, 3])
    assert [m.uid for m in infos] == [1, 3]
    many = await db.fetch_infos(ALICE, INBOX, list(range(600, 0, -1)))  # the range path
    assert [m.uid for m in many] == [u for u in range(1, 601) if u != 5]
    assert many == await db.list_messages(ALICE)
    assert await db.uids(ALICE) == [m.uid for m in many]
    assert await db.unseen(ALICE) == 590
    assert await db.first_unseen(ALICE) == 10  # UID 11, sequence 10 (UID 5 is gone)
    await db.store_flags(ALICE, INBOX, [11], "+", frozenset({"\\SeenNot"}))
    assert await db.unseen(ALICE) == 590  # a lookalike keyword is not \Seen
    await db.store_flags(ALICE, INBOX, await db.uids(ALICE), "+", frozenset({SEEN}))
    assert await db.unseen(ALICE) == 0 and await db.first_unseen(ALICE) is None
    assert await db.unseen(ALICE, ARCHIVE) == 0
    with pytest.raises(NoSuchMailbox):
        await db.unseen(ALICE, "Nope")


async def test_claim_recent(db: MailDB) -> None:
    assert await db.claim_recent(ALICE, INBOX, UNBOUNDED) == 1  # nothing yet: uidnext
    await append_n(db, 3)
    assert await db.claim_recent(ALICE, "inbox", UNBOUNDED) == 1  # UIDs 1..3 are this one's
    assert await db.claim_recent(ALICE, INBOX, UNBOUNDED) == 4  # the next session sees none
    await db.deliver([Delivery("q1", ALICE, body(9), 0.0)])
    await db.move(ALICE, INBOX, [1], ARCHIVE)
    assert await db.claim_recent(ALICE, INBOX, UNBOUNDED) == 4
    assert await db.claim_recent(ALICE, INBOX, UNBOUNDED) == 5
    assert await db.claim_recent(ALICE, ARCHIVE, UNBOUNDED) == 1  # the moved message is new there
    with pytest.raises(NoSuchMailbox):
        await db.claim_recent(ALICE, "Nope", UNBOUNDED)


async def test_claim_recent_only_up_to_what_the_session_read(db: MailDB) -> None:
    """A session claims the messages it has read about (UIDs below `upto`); one delivered
    after its read stays \\Recent for whoever learns of it first, and a lower `upto` never
    takes back a claim."""
    await append_n(db, 3)
    assert await db.claim_recent(ALICE, INBOX, 3) == 1  # UIDs 1 and 2
    assert await db.claim_recent(ALICE, INBOX, 2) == 3  # nothing: 3 is still unclaimed
    assert await db.recent(ALICE, INBOX) == 1
    assert await db.claim_recent(ALICE, INBOX, UNBOUNDED) == 3  # UID 3
    assert await db.recent(ALICE, INBOX) == 0


async def test_expunge_returns_removed_uids_and_updates_usage(db: MailDB) -> None:
    await append_n(db, 3)
    assert await db.expunge(ALICE, INBOX, [3, 1, 1, 8]) == [1, 3]
    assert await db.expunge(ALICE, INBOX, [1]) == []
    assert await db.expunge(ALICE, INBOX, []) == []
    assert await db.usage(ALICE) == len(body(1))
    assert stored(db) == await indexed_guids(db)


async def test_expunge_of_deleted_only_takes_what_has_the_flag_now(db: MailDB) -> None:
    """IMAP's EXPUNGE and CLOSE name the messages their session saw with \\Deleted; another
    session may have taken the flag away since."""
    await append_n(db, 4)
    await db.store_flags(ALICE, INBOX, [1, 2], "+", frozenset({"\\Deleted", "\\Seen"}))
    await db.store_flags(ALICE, INBOX, [1], "-", frozenset({"\\Deleted"}))
    await db.store_flags(ALICE, INBOX, [3], "+", frozenset({"$Deletedish", "\\Flagged"}))
    assert await db.expunge(ALICE, INBOX, [1, 2, 3], deleted_only=True) == [2]
    assert [m.uid for m in await db.list_messages(ALICE)] == [1, 3, 4]


async def test_deliver_counts_in_usage(db: MailDB) -> None:
    assert await db.usage(ALICE) == 0
    await db.deliver([Delivery("q1", ALICE, body(1), 0.0),
                      Delivery("q2", ALICE, body(22), 0.0, JUNK),
                      Delivery("q1", ALICE, body(1), 0.0)])  # a redelivery adds nothing
    assert await db.usage(ALICE) == len(body(1)) + len(body(22)) == await total_size(db)
    assert await db.usage(BOB) == 0


# Change notification


async def test_listeners_and_versions(db: MailDB) -> None:
    events: list[ChangeEvent] = []
    db.add_listener(events.append)

    def broken(event: ChangeEvent) -> None:
        raise RuntimeError("a listener bug")

    db.add_listener(broken)  # logged, never breaks a write or the other listeners
    assert db.version(ALICE) == 0
    [uid] = await append_n(db, 1)
    assert db.version(ALICE) == 1  # bumped before the caller resumes
    await db.deliver([Delivery("q1", ALICE, body(5), 0.0, JUNK)])
    await db.store_flags(ALICE, INBOX, [uid], "+", frozenset({SEEN}))
    await db.store_flags(ALICE, INBOX, [uid], "+", frozenset({SEEN}))  # no change, no event
    copied = await db.copy(ALICE, INBOX, [uid], ARCHIVE)
    # Spam learning reads the messages through the GUIDs of the event.
    assert read(db, events[-1].guids[0]) == body(0)
    moved = await db.move(ALICE, JUNK, [1], INBOX)
    await db.expunge(ALICE, ARCHIVE, copied.dest_uids)
    await db.create_mailbox(ALICE, "New")
    await db.rename_mailbox(ALICE, "New", "Newer")
    await db.set_subscribed(ALICE, "Newer", True)
    await db.delete_mailbox(ALICE, "Newer")
    await db.claim_recent(ALICE, INBOX, UNBOUNDED)  # not a change anyone must hear about
    assert [(e.kind, e.mailbox, e.source) for e in events] == [
        ("append", INBOX, None), ("deliver", JUNK, None), ("flags", INBOX, None),
        ("copy", ARCHIVE, INBOX), ("move", INBOX, JUNK), ("expunge", JUNK, None),
        ("expunge", ARCHIVE, None), ("mailbox", "New", None), ("mailbox", "Newer", "New"),
        ("mailbox", "Newer", None), ("mailbox", "Newer", None)]
    assert all(e.user == ALICE for e in events)
    assert db.version(ALICE) == 10 and db.version(BOB) == 0  # a move is one change
    move_event = events[4]
    assert len(events[3].guids) == 1
    assert move_event.guids == tuple(m.guid for m in await db.fetch_infos(
        ALICE, INBOX, moved.dest_uids))
    assert read(db, move_event.guids[0]) == body(5)
    db.remove_listener(events.append)
    db.remove_listener(broken)
    await append_n(db, 1)
    assert len(events) == 11


async def test_copy_event_names_the_new_copies(db: MailDB) -> None:
    events: list[ChangeEvent] = []
    db.add_listener(events.append)
    await append_n(db, 2)
    result = await db.copy(ALICE, INBOX, [1, 2], JUNK)
    junk = await db.fetch_infos(ALICE, JUNK, result.dest_uids)
    assert events[-1].guids == tuple(m.guid for m in junk)
    assert [read(db, g) for g in events[-1].guids] == [body(0), body(1)]


async def test_wait_change(db: MailDB) -> None:
    version = db.version(ALICE)
    assert await db.wait_change(ALICE, version, 0.01) == version  # times out quietly
    assert await db.wait_change(ALICE, version + 5, 10) == version  # already different

    waiters = [asyncio.create_task(db.wait_change(ALICE, version, 30)) for _ in range(2)]
    bob = asyncio.create_task(db.wait_change(BOB, db.version(BOB), 0.3))
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    await append_n(db, 1)
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [version + 1] * 2
    assert await bob == 0  # Alice's change does not wake Bob
    assert db._wakeups == {} and db._waiting == {}  # nothing left behind


async def test_versions_of_many_users_are_bounded_and_still_move_on_change(
        tmp_path: Path) -> None:
    """A store with many accounts keeps the change versions of the users changed lately
    only; a dropped user's version still differs from any it had once it changes again."""
    db = MailDB(tmp_path / "mail", inline_max=0, max_open=4, versions_kept=10)
    try:
        users = [f"user{number}@example.test" for number in range(60)]
        held = {}
        for user in users:
            held[user] = db.version(user)
            await db.deliver([Delivery(f"q{user}", user, body(1), 0.0, INBOX)])
            assert db.version(user) != held[user]
            held[user] = db.version(user)
        assert len(db._versions) <= 10
        for user in users:
            before = db.version(user)
            await db.deliver([Delivery(f"r{user}", user, body(2), 0.0, INBOX)])
            assert db.version(user) not in (before, held[user])
        assert len(db._versions) <= 10
    finally:
        await db.close()


async def test_a_failed_write_notifies_nobody(db: MailDB) -> None:
    events: list[ChangeEvent] = []
    db.add_listener(events.append)
    with pytest.raises(OverQuota):
        await db.append(ALICE, INBOX, body(1), frozenset(), quota=1)
    with pytest.raises(NoSuchMailbox):
        await db.move(ALICE, INBOX, [1], "Nope")
    assert events == [] and db.version(ALICE) == 0


# Schema migration


# The index exactly as schema 2 created it.
SCHEMA_2 = """
CREATE TABLE mailbox (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL, uidnext INTEGER NOT NULL, highestmodseq INTEGER NOT NULL,
    special_use TEXT);
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


def make_schema_2_index(db: MailDB) -> list[bytes]:
    base = db.user_path(ALICE)
    (base / "tmp").mkdir(parents=True)
    conn = sqlite3.connect(base / "index.sqlite")
    conn.executescript(SCHEMA_2)
    bodies = [body(1), body(22), body(333)]
    with conn:
        for box_id, name, use in ((1, INBOX, None), (2, JUNK, "\\Junk"), (3, TRASH, "\\Trash"),
                                  (4, "Drafts", "\\Drafts"), (5, "Sent", "\\Sent"),
                                  (6, ARCHIVE, "\\Archive")):
            conn.execute("INSERT INTO mailbox VALUES (?, ?, ?, 1, 1, ?)",
                         (box_id, name, 1_600_000_000 + box_id, use))
        for uid, (box_id, data) in enumerate(zip((1, 1, 2), bodies, strict=True), start=1):
            guid = f"{uid:02x}" + "0" * 30
            (base / "m" / guid[:2]).mkdir(parents=True)
            (base / "m" / guid[:2] / guid).write_bytes(data)
            conn.execute("INSERT INTO message VALUES (?, ?, ?, ?, 0, '\\Seen', ?)",
                         (box_id, uid, guid, len(data), uid + 1))
        conn.execute("UPDATE mailbox SET uidnext = 3, highestmodseq = 3 WHERE id = 1")
        conn.execute("UPDATE mailbox SET uidnext = 4, highestmodseq = 4 WHERE id = 2")
        conn.execute("INSERT INTO expunged VALUES (1, 7, 3)")
    conn.execute("PRAGMA user_version=2")
    conn.close()
    return bodies


async def test_schema_2_index_is_migrated(tmp_path: Path, inline_max: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        bodies = make_schema_2_index(db)
        assert await db.usage(ALICE) == sum(len(b) for b in bodies)  # computed once
        conn = sqlite3.connect(db.user_path(ALICE) / "index.sqlite")
        try:
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute("SELECT name, recent_uid FROM mailbox WHERE id < 3"
                                " ORDER BY id").fetchall() == [(INBOX, 3), (JUNK, 4)]
        finally:
            conn.close()
        # What was there before the upgrade is not \Recent; what comes after is.
        assert await db.claim_recent(ALICE, INBOX, UNBOUNDED) == 3
        assert await db.subscriptions(ALICE) == STANDARD_SUBSCRIPTIONS
        inbox = await db.status(ALICE)
        assert (inbox.uidvalidity, inbox.uidnext, inbox.messages) == (1_600_000_001, 3, 2)
        assert (await db.changes_since(ALICE, INBOX, 0)).expunged == [7]
        assert await append_n(db, 1) == [3]
        assert await db.claim_recent(ALICE, INBOX, UNBOUNDED) == 3
        await db.move(ALICE, JUNK, [3], INBOX)
        assert await db.usage(ALICE) == await total_size(db)
        # The counts a migration computed are kept from then on.
        assert [(await db.status(ALICE, name)).messages for name in (INBOX, JUNK)] == [4, 0]
        assert [read(db, m.guid) for m in await db.list_messages(ALICE)] == [
            bodies[0], bodies[1], body(0), bodies[2]]
    finally:
        await db.close()


async def test_usage_survives_reopening(tmp_path: Path, inline_max: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    await append_n(db, 3)
    await db.copy(ALICE, INBOX, [1], ARCHIVE)
    await db.expunge(ALICE, INBOX, [2])
    expected = await total_size(db)
    await db.close()
    again = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        assert await again.usage(ALICE) == expected
        assert (await again.sweep(full=True)).files_removed == 0  # the links are all named
    finally:
        await again.close()



# The message-list cache


async def test_cached_message_lists_follow_every_change(tmp_path: Path,
                                                        inline_max: int) -> None:
    """A MailDB that keeps listing a mailbox (its cache merging changes) always agrees with a
    fresh MailDB reading the index, through deliveries, flag changes, expunges and moves."""
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        async def agrees() -> None:
            fresh = MailDB(tmp_path / "mail", inline_max=inline_max)
            try:
                for box in (INBOX, JUNK):
                    assert await db.list_messages(ALICE, box) == \
                        await fresh.list_messages(ALICE, box)
            finally:
                await fresh.close()

        await append_n(db, 20)
        await agrees()
        await db.store_flags(ALICE, INBOX, [2, 5, 9], "+", frozenset({"\\Seen"}))
        await agrees()
        await db.expunge(ALICE, INBOX, [1, 5])
        await agrees()
        await db.move(ALICE, INBOX, [3, 4], JUNK)
        await append_n(db, 3)
        await agrees()
        await db.delete_mailbox(ALICE, JUNK)
        await db.create_mailbox(ALICE, JUNK)
        await agrees()
    finally:
        await db.close()


async def test_writes_for_a_mailbox_replaced_under_its_name_do_nothing(db: MailDB) -> None:
    """An IMAP session's writes name its selected mailbox and its UIDVALIDITY: renamed away,
    with a new mailbox under the old name, they touch neither."""
    await db.create_mailbox(ALICE, "Work")
    await append_n(db, 2, mailbox="Work")
    selected = await db.status(ALICE, "Work")
    await db.rename_mailbox(ALICE, "Work", "Job")
    await db.create_mailbox(ALICE, "Work")
    [new_uid] = await append_n(db, 1, mailbox="Work")
    await db.store_flags(ALICE, "Work", [new_uid], "+", frozenset({DELETED}))
    before = {name: await db.list_messages(ALICE, name) for name in ("Work", "Job", ARCHIVE)}

    uv = selected.uidvalidity
    attempts = [
        db.store_flags(ALICE, "Work", [new_uid], "+", frozenset({SEEN}), uidvalidity=uv),
        db.expunge(ALICE, "Work", [new_uid], uidvalidity=uv),
        db.copy(ALICE, "Work", [new_uid], ARCHIVE, uidvalidity=uv),
        db.move(ALICE, "Work", [new_uid], ARCHIVE, uidvalidity=uv),
    ]
    for attempt in attempts:
        with pytest.raises(MailboxReplaced):
            await attempt
    assert {name: await db.list_messages(ALICE, name)
            for name in ("Work", "Job", ARCHIVE)} == before
    # The same calls with the UIDVALIDITY of the mailbox now under the name do act.
    current = (await db.status(ALICE, "Work")).uidvalidity
    assert await db.expunge(ALICE, "Work", [new_uid], uidvalidity=current) == [new_uid]
