"""MailDB: the per-user SQLite index plus immutable message files."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.store.backends.maildb import WRITER_JOB_OWNERS, MailDB, user_dir_name
from services.store.mailbox import INBOX, Delivery, NoSuchMailbox, NoSuchMessage, NoSuchUser
from tests.support import check_bodies

ALICE = "alice@example.test"
BOB = "bob@example.test"


def delivery(queue_id: str, user: str = ALICE, body: bytes | None = None) -> Delivery:
    if body is None:
        body = f"Subject: {queue_id}\r\n\r\nhi\r\n".encode()
    return Delivery(queue_id=queue_id, user=user, body=body, received_at=1_700_000_000.0)


@pytest.fixture
async def db(tmp_path: Path, inline_max: int) -> AsyncIterator[MailDB]:
    store = MailDB(tmp_path / "mail", inline_max=inline_max, max_open=4)
    yield store
    await store.close()


async def test_deliver_list_read(db: MailDB) -> None:
    assert await db.deliver([delivery("q1"), delivery("q2"), delivery("q3", BOB)]) == [
        True, True, True]
    messages = await db.list_messages(ALICE)
    assert [m.uid for m in messages] == [1, 2]
    assert all(m.flags == frozenset() for m in messages)
    with db.open_message(ALICE, messages[0].guid) as f:
        assert f.read() == delivery("q1").body
    assert messages[0].size == len(delivery("q1").body)
    assert messages[0].internaldate == 1_700_000_000.0
    status = await db.status(ALICE)
    assert (status.name, status.messages, status.uidnext) == (INBOX, 2, 3)
    assert status.uidvalidity > 0
    assert [m.uid for m in await db.list_messages(BOB)] == [1]
    # Message files belong to their owner: Bob cannot open Alice's by guid.
    with pytest.raises(NoSuchMessage):
        db.open_message(BOB, messages[0].guid)


async def test_redelivery_is_idempotent(db: MailDB) -> None:
    assert await db.deliver([delivery("q1")]) == [True]
    assert await db.deliver([delivery("q1")]) == [False]
    # Within one batch too, and mixed with new ones.
    assert await db.deliver([delivery("q2"), delivery("q2"), delivery("q1")]) == [
        True, False, False]
    messages = await db.list_messages(ALICE)
    assert len(messages) == 2
    assert len(check_bodies(db.user_path(ALICE)).guids) == 2
    # The same queue id for another user is a different delivery.
    assert await db.deliver([delivery("q1", BOB)]) == [True]


async def test_uids_never_reused_after_expunge_and_reopen(tmp_path: Path,
                                                          inline_max: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    await db.deliver([delivery(f"q{i}") for i in range(5)])
    before = await db.status(ALICE)
    messages = await db.list_messages(ALICE)
    await db.expunge(ALICE, INBOX, [messages[-1].uid, messages[-2].uid])
    assert messages[-1].guid not in check_bodies(db.user_path(ALICE)).guids
    await db.close()

    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        await db.deliver([delivery("q-new")])
        after = await db.list_messages(ALICE)
        assert [m.uid for m in after] == [1, 2, 3, 6]
        status = await db.status(ALICE)
        assert status.uidvalidity == before.uidvalidity
        assert status.uidnext == 7
        assert status.messages == 4
    finally:
        await db.close()


async def test_expunge_by_guid_says_which_guids_it_expunged(db: MailDB) -> None:
    """POP3's UPDATE state names messages by GUID and is told, by GUID, which were gone."""
    await db.deliver([delivery(f"q{i}") for i in range(3)])
    first, second, third = await db.list_messages(ALICE)
    await db.expunge(ALICE, INBOX, [second.uid])  # gone before, e.g. by an IMAP session
    expunged = await db.expunge_by_guid(ALICE, INBOX, [third.guid, second.guid])
    assert expunged == [third.guid]
    assert [m.guid for m in await db.list_messages(ALICE)] == [first.guid]


async def test_modseq_increases(db: MailDB) -> None:
    await db.deliver([delivery("q1")])
    first = await db.status(ALICE)
    await db.deliver([delivery("q2"), delivery("q3")])
    second = await db.status(ALICE)
    assert second.highestmodseq > first.highestmodseq
    messages = await db.list_messages(ALICE)
    modseqs = [m.modseq for m in messages]
    assert modseqs == sorted(set(modseqs))
    assert max(modseqs) == second.highestmodseq
    await db.expunge(ALICE, INBOX, [messages[0].uid])
    third = await db.status(ALICE)
    assert third.highestmodseq > second.highestmodseq


async def test_the_line_end_padding_of_a_delivery_is_that_of_its_body(db: MailDB) -> None:
    """POP3's sizes add what its stuffing adds to end the last line (`line_end_padding`). A
    delivery's head (the trace fields the store adds, each ending with CRLF) comes before
    its body: the body's end decides, not the head's."""
    head = b"Delivered-To: alice@example.test\r\n"
    bodies = [b"Subject: a\r\n\r\nno line end", b"Subject: b\r\n\r\nends in CR\r",
              b"Subject: c\r\n\r\nends well\r\n"]
    assert await db.deliver([Delivery(f"q{n}", ALICE, body, 1_700_000_000.0, head=head)
                             for n, body in enumerate(bodies)]) == [True] * 3
    assert await db.line_end_padding(ALICE) == {1: 2, 2: 1}


async def test_uidvalidity_unique_per_mailbox(db: MailDB) -> None:
    await db.deliver([delivery("q1", ALICE), delivery("q1", BOB)])
    a, b = await db.status(ALICE), await db.status(BOB)
    assert a.uidvalidity != b.uidvalidity
    assert abs(a.uidvalidity - time.time()) < 3600


async def test_status_of_user_without_mail(db: MailDB) -> None:
    assert await db.list_messages("carol@example.test") == []
    status = await db.status("carol@example.test")
    assert status.messages == 0 and status.uidnext == 1 and status.uidvalidity > 0
    with pytest.raises(NoSuchMailbox):
        await db.status("carol@example.test", "Nope")
    with pytest.raises(NoSuchMailbox):
        await db.deliver([Delivery("q", ALICE, b"x", 0.0, mailbox="Nope")])


async def test_orphan_sweep(tmp_path: Path, inline_max: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    await db.deliver([delivery("q1")])
    base = db.user_path(ALICE)
    # What a crash between rename and COMMIT, or mid-write, leaves behind.
    orphan = base / "m" / "ab" / ("ab" + "0" * 30)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    (base / "tmp" / ("cd" + "1" * 30)).write_bytes(b"half")
    await db.close()  # a clean close empties the inflight journal...
    (db.root / "inflight").write_text(ALICE + "\n")  # ...a crash leaves the batch's users

    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        result = await db.sweep()  # the journal names alice: she had a batch in flight
        assert result.files_removed == 2
        assert not orphan.exists()
        [message] = await db.list_messages(ALICE)
        with db.open_message(ALICE, message.guid) as f:
            assert f.read() == delivery("q1").body
        assert check_bodies(base).guids == {message.guid}
        assert (await db.sweep()).users == 0  # journal cleared
        orphan.write_bytes(b"again")
        assert (await db.sweep(full=True)).files_removed == 1
    finally:
        await db.close()


async def test_a_damaged_index_does_not_stop_the_sweep_of_the_others(
        tmp_path: Path, inline_max: int, caplog: pytest.LogCaptureFixture) -> None:
    """After an unclean stop the sweep opens the index of every user in the journal; one
    that is not a database any more stopped the whole store's start, at every restart."""
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    await db.deliver([delivery("q1"), delivery("q2", BOB)])
    orphan = db.user_path(ALICE) / "tmp" / ("cd" + "1" * 30)
    orphan.write_bytes(b"half")
    await db.close()
    index = db.user_path(BOB) / "index.sqlite"
    index.write_bytes(b"\xff" * 100 + index.read_bytes()[100:])
    (db.root / "inflight").write_text(f"{BOB}\n{ALICE}\n")

    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    try:
        result = await db.sweep()
        assert (result.users, result.files_removed) == (2, 1) and not orphan.exists()
        [unusable] = [r for r in caplog.records if r.msg.startswith("sweep: the index of")]
        assert unusable.levelname == "ERROR" and BOB in unusable.getMessage()
        assert [m.uid for m in await db.list_messages(ALICE)] == [1]
        assert (await db.sweep()).users == 0  # the journal is cleared all the same
    finally:
        await db.close()


async def test_a_delivery_to_many_owners_lets_other_writes_in_between(db: MailDB) -> None:
    """A large alias's message was one writer job, one commit per owner: every other
    write (an IMAP STORE of another user) waited for all of them, 4 s for 2,000 owners. The
    owners now go WRITER_JOB_OWNERS to a job, and writes queued meanwhile run in between."""
    await db.deliver([delivery("q0")])
    [first] = await db.list_messages(ALICE)
    owners = [f"user{i}@example.test" for i in range(3 * WRITER_JOB_OWNERS + 5)]
    deliveries = [delivery(f"q{i}", owner) for i, owner in enumerate(owners)]
    deliveries.insert(7, delivery("q-second", owners[0]))  # an owner with two, not adjacent
    delivering = asyncio.create_task(db.deliver_uids(deliveries))
    await asyncio.sleep(0)  # the first job is queued
    await db.store_flags(ALICE, INBOX, [first.uid], "+", frozenset({"\\Seen"}))
    assert not delivering.done()
    uids = await delivering
    assert uids == [1] * 7 + [2] + [1] * (len(deliveries) - 8)
    assert [m.uid for m in await db.list_messages(owners[0])] == [1, 2]
    assert await db.deliver_uids(deliveries) == [None] * len(deliveries)  # redelivered


@pytest.mark.parametrize("bad", [
    "../etc@x.test", "a/b@x.test", "a\x00@x.test", "..", ".hidden@x.test", "", "noat",
    "UPPER@x.test", "a\\b@x.test", "x" * 300 + "@x.test", "a\n@x.test",
])
async def test_path_safety(db: MailDB, bad: str) -> None:
    with pytest.raises(NoSuchUser):
        user_dir_name(bad)
    with pytest.raises(NoSuchUser):
        await db.deliver([delivery("q1", bad)])
    with pytest.raises(NoSuchUser):
        await db.list_messages(bad)
    with pytest.raises(NoSuchUser):
        db.open_message(bad, "0" * 32)
    assert not any(p.name.startswith("..") for p in db.root.rglob("*"))


async def test_guid_is_checked(db: MailDB) -> None:
    await db.deliver([delivery("q1")])
    for guid in ("../index.sqlite", "../../x", "0" * 31, "G" * 32):
        with pytest.raises(NoSuchMessage):
            db.open_message(ALICE, guid)


async def test_failed_batch_leaves_no_files(db: MailDB) -> None:
    await db.deliver([delivery("q1")])
    with pytest.raises(NoSuchMailbox):
        await db.deliver([delivery("q2"), Delivery("q3", ALICE, b"x", 0.0, mailbox="Nope")])
    assert len(await db.list_messages(ALICE)) == 1
    assert len(check_bodies(db.user_path(ALICE)).guids) == 1
    assert await db.deliver([delivery("q2")]) == [True]


async def test_connection_lru_bound(db: MailDB) -> None:
    users = [f"user{i}@example.test" for i in range(20)]
    await db.deliver([delivery("q", u) for u in users])
    assert len(db._open) <= 4  # max_open of the fixture
    for u in users:
        assert len(await db.list_messages(u)) == 1


async def test_index_is_durable_mode(db: MailDB) -> None:
    await db.deliver([delivery("q1")])
    conn = sqlite3.connect(db.user_path(ALICE) / "index.sqlite")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


@pytest.mark.slow
async def test_a_mailbox_of_100k_messages_lists_and_grows_correctly(db: MailDB) -> None:
    """Correctness at scale (the speed is measured by bench/mailbox_bench.py)."""
    body = b"Subject: x\r\n\r\nbody\r\n"
    n = 100_000
    await db.deliver([delivery(f"d{i}", body=body) for i in range(500)])
    # Bulk-load the index directly: 100k fsyncs would only exercise the disk.
    conn = sqlite3.connect(db.user_path(ALICE) / "index.sqlite", isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags, modseq)"
        " VALUES (1, ?, ?, 20, 0, ?, ?)",
        ((uid, f"{uid:032x}", "\\Seen" if uid % 3 else "", uid) for uid in range(1000, 1000 + n)),
    )
    conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ?", (1000 + n, 1000 + n))
    conn.execute("COMMIT")
    conn.close()
    messages = await db.list_messages(ALICE)
    assert len(messages) == n + 500
    uids = [m.uid for m in messages]
    assert uids == sorted(uids) and len(set(uids)) == len(uids)
    assert (await db.status(ALICE)).messages == n + 500
    assert await db.deliver([delivery("after", body=body)]) == [True]
    newest = (await db.list_messages(ALICE))[-1]
    assert newest.uid == 1000 + n  # allocated after the highest, never reused


async def test_a_relative_root_works_like_the_default_data_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_max: int) -> None:
    """TIERMAIL_DATA_DIR defaults to ./var: a relative store root must read and write."""
    monkeypatch.chdir(tmp_path)
    relative = MailDB(Path("var") / "store" / "mail", inline_max=inline_max)
    try:
        assert await relative.deliver([delivery("rel-1")]) == [True]
        assert [m.uid for m in await relative.list_messages(ALICE)] == [1]
    finally:
        await relative.close()
