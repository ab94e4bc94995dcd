"""The full-text index on a real MailDB: the background indexer, and SEARCH TEXT/BODY through
it agreeing with a brute-force scan of the files (encoded words, base64 and quoted-printable
bodies, HTML, non-ASCII, case), also while the index lags behind delivery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import quopri
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from services.store.backends import textindex
from services.store.backends.maildb import MailDB
from services.store.backends.textindex import (
    FILE_NAME,
    GARBAGE_FLOOR,
    SCHEMA_VERSION,
    MessageText,
    TextIndex,
    TextIndexer,
)
from services.store.imap.protocol.command import SearchKey
from services.store.imap.search import StoreMessageSource, search
from services.store.mailbox import INBOX, Delivery, MessageInfo
from tests.support import eventually, fill, tmpfs

USER = "alice@example.test"
WORDS = ["report", "budget", "meeting", "Ärger", "straße", "привет", "Καλημέρα", "日本語テキスト",
         "invoice", "holiday", "naïve café", "lunch", "deadline", "zebra"]


def make_message(i: int, rng: random.Random) -> bytes:
    """Message i carries the unique token `tok{i}q` in its subject (odd i) or body (even i),
    in one of several encodings."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
    token = f"tok{i}q"
    subject = f"note {rng.choice(WORDS)}" + (f" {token}" if i % 2 else "")
    text = f"Hello,\n{words}\n" + ("" if i % 2 else f"see {token} here\n")
    style = i % 4
    if style == 0:  # encoded-word subject, base64 UTF-8 body
        subject_field = "=?UTF-8?B?" + base64.b64encode(subject.encode()).decode() + "?="
        headers = ("Content-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: base64\r\n")
        body = base64.encodebytes(text.encode()).decode()
    elif style == 1:  # Q-encoded subject, quoted-printable Latin-1 body (non-Latin-1 dropped)
        subject_field = "=?UTF-8?Q?" + "".join(
            f"={b:02X}" for b in subject.encode()) + "?="
        latin = text.encode("latin-1", errors="ignore")
        headers = ("Content-Type: text/plain; charset=iso-8859-1\r\n"
                   "Content-Transfer-Encoding: quoted-printable\r\n")
        body = quopri.encodestring(latin).decode()
    elif style == 2:  # raw UTF-8 (RFC 6532) subject, HTML body
        subject_field = subject
        headers = "Content-Type: text/html; charset=utf-8\r\n"
        body = "<html><body><p>" + text.replace("\n", "<br>") + "</p></body></html>"
    else:  # multipart with a text part and a binary attachment
        subject_field = subject
        headers = 'Content-Type: multipart/mixed; boundary="XX"\r\n'
        body = ("--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text +
                "\r\n--XX\r\nContent-Type: application/octet-stream\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\n" +
                base64.encodebytes(b"zebra binary " * 5).decode() + "--XX--\r\n")
    raw = (f"From: sender{i}@example.org\r\nTo: {USER}\r\nSubject: {subject_field}\r\n"
           f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n{headers}\r\n{body}")
    return raw.replace("\r\n", "\n").replace("\n", "\r\n").encode()


@pytest.fixture
async def maildb(tmp_path: Path, inline_max: int) -> AsyncIterator[MailDB]:
    db = MailDB(tmp_path / "mail", inline_max=inline_max)
    yield db
    await db.close()


@pytest.fixture
async def indexer(maildb: MailDB) -> AsyncIterator[TextIndexer]:
    async with listening(maildb, TextIndexer(maildb, TextIndex(maildb.root), batch=50)) as w:
        yield w


async def deliver(maildb: MailDB, raws: list[bytes], start: int = 0) -> None:
    await maildb.deliver([Delivery(f"q{start + n}", USER, raw, time.time())
                          for n, raw in enumerate(raws)])


class CountingSource(StoreMessageSource):
    """Counts message files read, to tell index answers from scans."""

    reads = 0

    def _read(self, guid: str, limit: int | None) -> bytes:
        self.reads += 1
        return super()._read(guid, limit)


async def run(maildb: MailDB, index: TextIndex | None, kind: str, needle: str,
              messages: list[MessageInfo]) -> tuple[set[str], int]:
    source = CountingSource(maildb, index, USER)
    positions = await search(SearchKey(kind, needle), messages, source,
                             recent=frozenset())
    return {messages[p].guid for p in positions}, source.reads


NEEDLES = ["report", "REPORT", "ärger", "ÄRGER", "STRASSE", "straße", "ПРИВЕТ", "καλημέρα",
           "日本語", "naïve café", "Café", "hello,", "note zebra", "sender1", "zebra binary",
           "tok17q", "tok18q", "tok1", "<p>", "ok", "é", "subject: note", "nowhere-to-be-found"]


async def test_index_agrees_with_scan(maildb: MailDB, indexer: TextIndexer) -> None:
    rng = random.Random(4)
    await deliver(maildb, [make_message(i, rng) for i in range(200)])
    await indexer.wait_idle()
    messages = await maildb.list_messages(USER, INBOX)
    index = TextIndex(maildb.root)
    assert index.indexed(USER) == {m.guid for m in messages}

    for kind in ("TEXT", "BODY"):
        for needle in NEEDLES:
            indexed, reads = await run(maildb, index, kind, needle, messages)
            scanned, _ = await run(maildb, None, kind, needle, messages)
            assert indexed == scanned, (kind, needle)
            if len(needle) >= 3:
                assert reads == 0, (kind, needle)  # answered by the index alone

    by_position = {m.guid: n for n, m in enumerate(messages)}
    body_hits, _ = await run(maildb, index, "BODY", "tok18q", messages)
    subject_hits, _ = await run(maildb, index, "BODY", "tok17q", messages)
    text_hits, _ = await run(maildb, index, "TEXT", "tok17q", messages)
    assert [by_position[g] for g in body_hits] == [18]
    assert subject_hits == set()  # in the (encoded) Subject only: not BODY
    assert [by_position[g] for g in text_hits] == [17]
    binary, _ = await run(maildb, index, "BODY", "zebra binary", messages)
    assert binary == set()  # attachments are not text
    ascii_, _ = await run(maildb, index, "TEXT", "STRASSE", messages)
    assert ascii_ == set()  # "ß" is not folded to "ss", in the index or the scan


async def test_message_delivered_after_indexing_is_found_before_the_indexer_runs(
        maildb: MailDB, indexer: TextIndexer) -> None:
    rng = random.Random(5)
    await deliver(maildb, [make_message(i, rng) for i in range(20)])
    await indexer.wait_idle()
    maildb.remove_listener(indexer.notify)  # the indexer hears nothing more

    late = (b"From: late@example.org\r\nSubject: Late arrival\r\n\r\n"
            b"a very particular phrase\r\n")
    await deliver(maildb, [late], start=100)
    messages = await maildb.list_messages(USER, INBOX)
    index = TextIndex(maildb.root)
    assert messages[-1].guid not in index.indexed(USER)

    source = StoreMessageSource(maildb, index, USER, indexer=indexer)
    found = await search(SearchKey("TEXT", "PARTICULAR PHRASE"), messages, source,
                         recent=frozenset())
    assert found == [len(messages) - 1]
    # The search handed the unindexed message to the indexer.
    await indexer.wait_idle()
    assert messages[-1].guid in index.indexed(USER)


@pytest.mark.parametrize("needle", ["ZQXV", "7j"], ids=["indexable", "under-three-characters"])
async def test_text_far_into_a_large_body_is_found_before_the_indexer_runs(
        maildb: MailDB, indexer: TextIndexer, needle: str) -> None:
    """A message the index has not reached yet is read whole, not only its first 8 KiB (what
    a header search reads): a word near the end of a large message just delivered is found
    by TEXT and BODY. So is a needle too short for the index (always answered by reading)."""
    await deliver(maildb, [b"Subject: small\r\n\r\nnothing to see\r\n"])
    await indexer.wait_idle()
    maildb.remove_listener(indexer.notify)  # the indexer hears nothing more

    filler = b"filler text, line after line\r\n" * 700  # 21 KiB
    large = b"Subject: large\r\n\r\n" + filler + b"the code is zqxv 7j\r\n"
    await deliver(maildb, [large], start=100)
    messages = await maildb.list_messages(USER, INBOX)
    index = TextIndex(maildb.root)
    assert messages[-1].guid not in index.indexed(USER)

    for kind in ("TEXT", "BODY"):
        found = await search(SearchKey(kind, needle), messages,
                             StoreMessageSource(maildb, index, USER), recent=frozenset())
        assert found == [len(messages) - 1], kind


async def test_expunged_messages_are_forgotten(maildb: MailDB, indexer: TextIndexer) -> None:
    await deliver(maildb, [b"Subject: one\r\n\r\nshared words\r\n",
                           b"Subject: two\r\n\r\nshared words\r\n"])
    await indexer.wait_idle()
    messages = await maildb.list_messages(USER, INBOX)
    await maildb.expunge(USER, INBOX, [messages[0].uid])
    await indexer.wait_idle()
    index = TextIndex(maildb.root)
    assert index.indexed(USER) == {messages[1].guid}
    assert index.lookup(USER, "shared words", "BODY")[0] == {messages[1].guid}


async def test_an_index_rebuilt_after_a_large_expunge_holds_the_messages_left(
        maildb: MailDB, indexer: TextIndexer, caplog: pytest.LogCaptureFixture) -> None:
    """Expunging most of a large mailbox leaves an index file mostly garbage, which is
    deleted. The messages left must then be indexed again: they were in the old file, and
    forgotten with it, every TEXT search would read them all."""
    caplog.set_level(logging.INFO, logger="services.store.backends.textindex")
    await deliver(maildb, [f"Subject: old {n}\r\n\r\nold mail\r\n".encode()
                           for n in range(GARBAGE_FLOOR + 3)])
    await indexer.wait_idle()
    messages = await maildb.list_messages(USER, INBOX)

    await maildb.expunge(USER, INBOX, [m.uid for m in messages[:GARBAGE_FLOOR + 1]])
    await indexer.wait_idle()

    assert [r.event for r in caplog.records
            if getattr(r, "event", "") == "textindex-rebuild"] == ["textindex-rebuild"]
    kept = await maildb.list_messages(USER, INBOX)
    assert len(kept) == 2
    index = TextIndex(maildb.root)
    assert index.indexed(USER) == {m.guid for m in kept}
    assert index.lookup(USER, "old mail", "BODY")[0] == {m.guid for m in kept}


async def test_catch_up_at_startup_indexes_what_was_delivered_while_down(
        maildb: MailDB) -> None:
    rng = random.Random(6)
    await deliver(maildb, [make_message(i, rng) for i in range(30)])
    index = TextIndex(maildb.root)
    assert not (maildb.user_path(USER) / FILE_NAME).exists()

    worker = TextIndexer(maildb, index)
    await run_until_idle(worker, worker.request_all)
    messages = await maildb.list_messages(USER, INBOX)
    assert TextIndex(maildb.root).indexed(USER) == {m.guid for m in messages}
    assert worker.indexed == 30


# Found by BODY only through its attachment's name, which schema version 2 began to index.
ATTACHED_INVOICE = (
    b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n"
    b"see attachment\r\n--b\r\nContent-Type: application/pdf; name=invoice-4711.pdf\r\n"
    b"\r\nAAAA\r\n--b--\r\n")


async def test_index_from_an_older_extraction_is_rebuilt_at_startup(
        maildb: MailDB, indexer: TextIndexer) -> None:
    """A text.sqlite written by an earlier version (another PRAGMA user_version) holds text
    extracted the old way: it must not answer searches, and the catch-up at startup must
    rebuild it although it is newer than the mail index."""
    await deliver(maildb, [ATTACHED_INVOICE])
    await indexer.wait_idle()
    path = maildb.user_path(USER) / FILE_NAME
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION - 1}")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fresh = TextIndex(maildb.root)
    assert fresh.lookup(USER, "invoice-4711", "BODY") == (set(), frozenset())  # nothing indexed
    [message] = await maildb.list_messages(USER, INBOX)
    assert await search(SearchKey("BODY", "invoice-4711"), [message],
                        StoreMessageSource(maildb, fresh, USER), recent=frozenset()) == [0]

    worker = TextIndexer(maildb, fresh)
    await run_until_idle(worker, worker.request_all)
    assert worker.indexed == 1
    assert fresh.lookup(USER, "invoice-4711", "BODY")[0] == {message.guid}


async def test_index_from_an_older_extraction_is_rebuilt_after_a_clean_stop(
        maildb: MailDB) -> None:
    """The usual upgrade: the store stopped cleanly (no -wal file left), and its text index,
    written by the older version, is newer than the mail index. Only the schema version
    tells that it must be rebuilt at startup."""
    await deliver(maildb, [ATTACHED_INVOICE])
    first = TextIndexer(maildb, TextIndex(maildb.root))
    await run_until_idle(first, first.request_all)  # closed: no -wal file left
    path = maildb.user_path(USER) / FILE_NAME
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION - 1}")
    later = time.time() + 10
    os.utime(path, (later, later))  # written after the last delivery
    assert not path.with_name(FILE_NAME + "-wal").exists()

    fresh = TextIndex(maildb.root)
    worker = TextIndexer(maildb, fresh)
    await run_until_idle(worker, worker.request_all)
    [message] = await maildb.list_messages(USER, INBOX)
    assert worker.indexed == 1
    assert fresh.lookup(USER, "invoice-4711", "BODY")[0] == {message.guid}


async def test_corrupt_index_file_is_rebuilt(maildb: MailDB, indexer: TextIndexer) -> None:
    await deliver(maildb, [b"Subject: x\r\n\r\nfirst body\r\n"])
    await indexer.wait_idle()
    path = maildb.user_path(USER) / FILE_NAME
    fresh = TextIndex(maildb.root)
    path.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    messages = await maildb.list_messages(USER, INBOX)
    # Searching still works (a broken index counts as no index: everything is scanned).
    source = StoreMessageSource(maildb, fresh, USER)
    assert await search(SearchKey("BODY", "first"), messages, source,
                        recent=frozenset()) == [0]
    writer = TextIndexer(maildb, fresh)
    await run_until_idle(writer, lambda: writer.request(USER))
    assert fresh.indexed(USER) == {messages[0].guid}


def test_mostly_garbage_index_is_dropped(tmp_path: Path) -> None:
    index = TextIndex(tmp_path)
    folder = index.path(USER).parent
    folder.mkdir(parents=True)
    docs = [(f"{n:032x}", MessageText(f"Subject: {n}", "body")) for n in range(GARBAGE_FLOOR + 2)]
    assert index.add(USER, docs) == len(docs)
    assert index.add(USER, docs[:5]) == 0  # already there
    assert index.forget(USER, [g for g, _ in docs[:GARBAGE_FLOOR // 2]]) is False
    assert len(index.indexed(USER)) == len(docs) - GARBAGE_FLOOR // 2
    assert index.forget(USER, [g for g, _ in docs[: GARBAGE_FLOOR + 1]]) is True
    assert not index.path(USER).exists()
    assert index.indexed(USER) == frozenset()
    index.close()


def test_a_small_index_mostly_garbage_is_kept(tmp_path: Path) -> None:
    """Garbage outweighing live rows is not enough: below GARBAGE_FLOOR forgotten rows the
    file is kept (X6: no needless rebuilds). Else a small mailbox whose messages are expunged
    one by one would have its index deleted, and the messages left indexed again, each time."""
    index = TextIndex(tmp_path)
    index.path(USER).parent.mkdir(parents=True)
    docs = [(f"{n:032x}", MessageText(f"Subject: {n}", "body")) for n in range(3)]
    index.add(USER, docs)
    inode = index.path(USER).stat().st_ino

    assert index.forget(USER, [docs[0][0]]) is False
    assert index.forget(USER, [docs[1][0]]) is False  # two forgotten rows, one live

    assert index.path(USER).stat().st_ino == inode
    assert index.indexed(USER) == {docs[2][0]}
    index.close()


def test_a_message_indexed_after_an_expunge_does_not_match_the_expunged_one(
        tmp_path: Path) -> None:
    """The doc id of the newest message, forgotten, went to the next message indexed, and
    the forgotten message's postings (contentless FTS5 keeps them) matched it: SEARCH TEXT
    for a word of an expunged message found the new one (found in review)."""
    index = TextIndex(tmp_path)
    index.path(USER).parent.mkdir(parents=True)
    index.add(USER, [("a" * 32, MessageText("Subject: x", "hello apricot"))])
    index.forget(USER, ["a" * 32])
    index.add(USER, [("b" * 32, MessageText("Subject: y", "hello bananas"))])
    assert index.lookup(USER, "apricot", "TEXT")[0] == set()
    assert index.lookup(USER, "bananas", "TEXT")[0] == {"b" * 32}
    index.close()


async def run_until_idle(worker: TextIndexer, start: Callable[[], None]) -> None:
    """Run the indexer from `start` (a request) until it has nothing left to do."""
    task = asyncio.create_task(worker.run())
    try:
        start()
        await worker.wait_idle()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def listening(maildb: MailDB, worker: TextIndexer) -> AsyncIterator[TextIndexer]:
    maildb.add_listener(worker.notify)
    try:
        async with running(worker):
            yield worker
    finally:
        maildb.remove_listener(worker.notify)


@contextlib.asynccontextmanager
async def full_disk_behind_ten_indexed(tmp_path: Path, inline_max: int, seed: int,
                                       more: int) -> AsyncIterator[tuple[MailDB, Path]]:
    """A 16 MiB disk holding ten messages, indexed (the indexer closed: no -wal file left),
    and `more` not yet indexed, then filled: the MailDB and the file that fills the disk."""
    with tmpfs(tmp_path / "disk") as disk:
        maildb = MailDB(disk / "mail", inline_max=inline_max)
        try:
            rng = random.Random(seed)
            await deliver(maildb, [make_message(i, rng) for i in range(10)])
            first = TextIndexer(maildb, TextIndex(maildb.root), keep_free=0)
            await run_until_idle(first, first.request_all)
            await deliver(maildb, [make_message(i, rng) for i in range(10, 10 + more)],
                          start=10)
            yield maildb, fill(disk)
        finally:
            await maildb.close()


async def test_a_full_disk_pauses_indexing_and_keeps_the_index_until_space_returns(
        tmp_path: Path, inline_max: int, caplog: pytest.LogCaptureFixture) -> None:
    """SQLite's "database or disk is full" is no broken index file: the index is kept (it
    was deleted and rebuilt from scratch, each time), the work waits for the disk instead of
    failing with an ERROR per batch, and everything is indexed once there is space."""
    caplog.set_level(logging.INFO, logger="services.store.backends.textindex")
    async with full_disk_behind_ten_indexed(tmp_path, inline_max, seed=9, more=30) as (
            maildb, ballast):
        path = maildb.user_path(USER) / FILE_NAME
        index = TextIndex(maildb.root)
        worker = TextIndexer(maildb, index, keep_free=0)  # the disk's own ENOSPC only
        async with running(worker):
            worker.request_all()
            await eventually(lambda: events(caplog) == ["textindex-paused"],
                             within=30, what="indexing paused")
            assert path.exists()
            assert len(TextIndex(maildb.root).indexed(USER)) == 10
            ballast.unlink()
            await worker.wait_idle()
        messages = await maildb.list_messages(USER, INBOX)
        assert index.indexed(USER) == {m.guid for m in messages}
        assert worker.indexed == 30
        assert events(caplog) == ["textindex-paused", "textindex-resumed"]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_full_disk_when_the_index_is_opened_keeps_the_index(
        tmp_path: Path, inline_max: int, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """SQLite may already fail to open the index on a full (or read-only) disk. That is no
    broken file either: the index is kept, not deleted and rebuilt from scratch, indexing
    waits for the disk, and goes on from where it was once there is space."""
    caplog.set_level(logging.INFO, logger="services.store.backends.textindex")
    async with full_disk_behind_ten_indexed(tmp_path, inline_max, seed=13, more=10) as (
            maildb, ballast):
        path = maildb.user_path(USER) / FILE_NAME
        real_open = textindex._open_writer

        def open_writer(at: Path) -> sqlite3.Connection:
            if ballast.exists():
                raise sqlite3.OperationalError("database or disk is full")
            return real_open(at)

        monkeypatch.setattr(textindex, "_open_writer", open_writer)
        index = TextIndex(maildb.root)
        worker = TextIndexer(maildb, index, keep_free=0)  # the disk's own ENOSPC only
        async with running(worker):
            worker.request_all()
            await eventually(lambda: events(caplog) or not path.exists(),
                             within=30, what="indexing paused (or the index deleted)")
            assert path.exists()
            assert events(caplog) == ["textindex-paused"]
            assert len(TextIndex(maildb.root).indexed(USER)) == 10
            ballast.unlink()
            await worker.wait_idle()
        messages = await maildb.list_messages(USER, INBOX)
        assert index.indexed(USER) == {m.guid for m in messages}
        assert worker.indexed == 10  # the first ten were not indexed again
        assert events(caplog) == ["textindex-paused", "textindex-resumed"]
        # Not "text index unreadable; rebuilding", nor an ERROR.
        assert [r.getMessage() for r in caplog.records if r.name == textindex.__name__
                and r.levelno >= logging.WARNING
                and getattr(r, "event", "") != "textindex-paused"] == []


async def test_indexing_leaves_the_room_mail_needs(
        tmp_path: Path, inline_max: int, caplog: pytest.LogCaptureFixture) -> None:
    """The index is derived data. It pauses before it writes while its file system has less
    free than it keeps for mail, instead of growing into the room a freed disk gave back to
    deliveries (a review filled 136 MiB freed on a full disk with the index and its WAL
    within 45 s, and mail stopped again), and resumes once there is room."""
    caplog.set_level(logging.INFO, logger="services.store.backends.textindex")
    with tmpfs(tmp_path / "disk", "32m") as disk:
        maildb = MailDB(disk / "mail", inline_max=inline_max)
        try:
            rng = random.Random(11)
            await deliver(maildb, [make_message(i, rng) for i in range(20)])
            ballast = fill(disk)
            index = TextIndex(maildb.root)
            worker = TextIndexer(maildb, index, keep_free=4 * 1024 * 1024)
            async with running(worker):
                worker.request_all()
                await eventually(lambda: events(caplog) == ["textindex-paused"],
                                 within=30, what="indexing paused")
                assert not (maildb.user_path(USER) / FILE_NAME).exists()  # nothing written
                ballast.unlink()
                await worker.wait_idle()
            assert worker.indexed == 20
            assert events(caplog) == ["textindex-paused", "textindex-resumed"]
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        finally:
            await maildb.close()


async def test_a_transaction_indexes_a_bounded_amount_of_mail(
        maildb: MailDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of 50 large bodies was one transaction of hundreds of MB (its WAL as large):
    a transaction stops taking messages once it holds BATCH_OCTETS of mail."""
    rng = random.Random(12)
    raws = [make_message(i, rng) for i in range(6)]
    await deliver(maildb, raws)
    monkeypatch.setattr(textindex, "BATCH_OCTETS", len(raws[0]) + 1)
    index = TextIndex(maildb.root)
    added: list[int] = []
    real_add = index.add

    def counting_add(user: str, docs: Sequence[tuple[str, MessageText]]) -> int:
        added.append(len(docs))
        return real_add(user, docs)

    monkeypatch.setattr(index, "add", counting_add)
    worker = TextIndexer(maildb, index, keep_free=0)
    await run_until_idle(worker, worker.request_all)
    assert sum(added) == worker.indexed == 6
    assert max(added) <= 2  # one message passes the bound; the next one is the next batch's


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.event for r in caplog.records
            if getattr(r, "event", "") in ("textindex-paused", "textindex-resumed")]


@contextlib.asynccontextmanager
async def running(worker: TextIndexer) -> AsyncIterator[TextIndexer]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_indexing_waits_while_the_store_is_delivering(maildb: MailDB) -> None:
    delivering = True
    async with listening(maildb, TextIndexer(
            maildb, TextIndex(maildb.root), quiet_in=lambda: 0.1 if delivering else 0.0,
            max_yield=30.0)) as worker:
        await deliver(maildb, [b"Subject: x\r\n\r\nbody\r\n"])
        await asyncio.sleep(0.5)
        assert worker.indexed == 0  # delivery goes first
        delivering = False
        await asyncio.wait_for(worker.wait_idle(), 10)
        assert worker.indexed == 1


async def test_indexing_yields_for_at_most_max_yield(maildb: MailDB) -> None:
    async with listening(maildb, TextIndexer(maildb, TextIndex(maildb.root),
                                             quiet_in=lambda: 0.1, max_yield=0.3)) as worker:
        await deliver(maildb, [b"Subject: x\r\n\r\nbody\r\n"])
        await asyncio.wait_for(worker.wait_idle(), 10)  # busy for ever, indexed anyway
        assert worker.indexed == 1


class NotedIndex(TextIndex):
    """Says when a write begins (the text already extracted)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writing = threading.Event()

    def add(self, user: str, docs: Sequence[tuple[str, MessageText]]) -> int:
        self.writing.set()
        return super().add(user, docs)


async def test_a_stop_ends_the_indexing_of_a_large_body_and_the_next_start_resumes_it(
        maildb: MailDB) -> None:
    """Indexing one large text body takes seconds (up to about 1 s per MB here), and a
    stopping store waited for it: its process exited 13 s after `store stopped` with the 20 MB
    message of the inbound tests just delivered (the indexer's thread is joined at exit),
    and past a container's stop timeout it is SIGKILLed. A stop now interrupts the write
    (rolled back: the message is not indexed), and the next start's catch-up indexes it."""
    rng = random.Random(7)
    # Text with a large alphabet (nearly every trigram new) indexes slowly, about 1.7 s for
    # these 3 MB here: the write lasts long past the stop.
    text = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(1_000_000))
    big = ("Subject: long report\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           f"{text}\r\n").encode()
    index = NotedIndex(maildb.root)
    stopped = TextIndexer(maildb, index)
    async with listening(maildb, stopped):
        await deliver(maildb, [big])
        assert await asyncio.to_thread(index.writing.wait, 60)
    assert stopped.indexed == 0
    assert not await asyncio.to_thread(TextIndex(maildb.root).indexed, USER)

    restarted = TextIndexer(maildb, TextIndex(maildb.root))
    restarted.request_all()
    async with listening(maildb, restarted):
        await asyncio.wait_for(restarted.wait_idle(), 120)
    assert restarted.indexed == 1


class StoppedBetweenStatements(TextIndex):
    """The stop comes after message `at`'s statements, while no statement runs: then SQLite's
    interrupt does nothing."""

    def __init__(self, root: Path, at: int) -> None:
        super().__init__(root)
        self._left = at + 1
        self.begun = 0

    def _add_one(self, conn: sqlite3.Connection, guid: str, text: MessageText) -> bool:
        self.begun += 1
        added = super()._add_one(conn, guid, text)
        self._left -= 1
        if self._left == 0:
            self.stop_writing()
        return added


@pytest.mark.parametrize("at", [0, 1, 2], ids=["first", "middle", "last"])
def test_a_stop_between_statements_rolls_the_write_back(tmp_path: Path, at: int) -> None:
    """A stop whose interrupt found no statement running let the write go on and commit: a CI
    run saw a 3 MB body indexed by the stopped indexer after its stop. Whatever moment the
    stop lands, the write it overlaps is undone, so the next start indexes those messages."""
    index = StoppedBetweenStatements(tmp_path, at)
    index.path(USER).parent.mkdir(parents=True)
    docs = [(f"{n:032x}", MessageText(f"Subject: {n}", "body")) for n in range(3)]
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        index.add(USER, docs)
    assert index.begun == min(at + 2, len(docs))  # the one after the stop raised at once
    index.close()
    assert index.path(USER).stat().st_mtime == 0  # dated back: the next start catches up
    assert TextIndex(tmp_path).indexed(USER) == frozenset()
    assert TextIndex(tmp_path).add(USER, docs) == 3  # nothing half-written is left


def test_a_text_index_left_open_mid_write_is_caught_up(tmp_path: Path) -> None:
    """A store that stopped in the middle of a write leaves that write rolled back and the
    text index's WAL newer than the mail: by the times alone the user was up to date, and
    the messages of that write were never indexed (a CI run under load saw it)."""
    folder = tmp_path / "ab" / "alice@example.test"
    folder.mkdir(parents=True)
    (folder / "index.sqlite").write_bytes(b"")
    text = folder / textindex.FILE_NAME
    with contextlib.closing(sqlite3.connect(text)) as db:
        db.execute(f"PRAGMA user_version = {textindex.SCHEMA_VERSION}")
    later = time.time() + 10
    os.utime(text, (later, later))
    assert textindex._users_behind(tmp_path) == []  # up to date by the times
    wal = folder / (textindex.FILE_NAME + "-wal")
    wal.write_bytes(b"frames of a write that never committed")
    assert textindex._users_behind(tmp_path) == ["alice@example.test"]
