"""Shared pieces of the store integration tests: accounts, publishing, mailbox inspection."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import aiormq

from common.broker import Publisher
from common.envelope import Envelope, Recipient
from common.ids import new_queue_id
from common.settings import Settings
from common.topology import DELIVER_ROUTING_KEY
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import user_path
from tests.support import check_bodies, eventually

DOMAIN = "example.test"
QUEUE_ID_HEADER = re.compile(rb"^X-Test-Queue-Id: (\S+)\r$", re.MULTILINE)


def add_users(settings: Settings, users: Iterable[str]) -> None:
    accounts = AccountDB.for_store(settings.store_dir)
    try:
        accounts.add_domain(DOMAIN)
        for user in users:
            accounts.add_user(user, "not-a-real-hash")  # no logins in these tests
    finally:
        accounts.close()


def make_message(*owners: str, junk: bool = False, padding: int = 0) -> tuple[Envelope, bytes]:
    """A small test message, or one with about `padding` more octets of body text."""
    queue_id = new_queue_id()
    text = "hello\r\n" + ("x" * 76 + "\r\n") * (padding // 78)
    body = (f"From: sender@remote.test\r\nTo: {', '.join(owners)}\r\n"
            f"Subject: test {queue_id}\r\nX-Test-Queue-Id: {queue_id}\r\n\r\n{text}").encode()
    envelope = Envelope(
        queue_id=queue_id, mail_from="sender@remote.test",
        recipients=tuple(Recipient(o, (o,)) for o in owners),
        client_ip="127.0.0.1", client_helo="remote.test", received_at=time.time(),
        size=len(body), junk=junk)
    return envelope, body


async def publish_all(settings: Settings, messages: list[tuple[Envelope, bytes]],
                      concurrency: int = 200, routing_key: str = DELIVER_ROUTING_KEY) -> None:
    publisher = Publisher(settings.amqp_url, settings.topology)
    limit = asyncio.Semaphore(concurrency)

    async def one(envelope: Envelope, body: bytes) -> None:
        async with limit:
            await publisher.publish(envelope, body, routing_key)

    try:
        await publisher.ensure_connected()
        await asyncio.gather(*(one(e, b) for e, b in messages))
    finally:
        await publisher.close()


async def queue_counts(settings: Settings, queue: str) -> int:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


wait_for = eventually


def stored_count(store_dir: Path, users: Iterable[str]) -> int:
    """Messages in all the users' mailboxes, read straight from the index files (any process)."""
    maildb_root = store_dir / "mail"
    total = 0
    for user in users:
        index = user_path(maildb_root, user) / "index.sqlite"
        if not index.exists():
            continue
        conn = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            total += conn.execute("SELECT count(*) FROM message").fetchone()[0]
        except sqlite3.OperationalError:
            pass
        finally:
            conn.close()
    return total


def check_mailboxes(store_dir: Path, users: Iterable[str],
                    by_mailbox: dict[str, set[str]] | None = None,
                    inline_max: int | None = None) -> Counter[str]:
    """Verify every index against its bodies (inline and files); return how often each test
    queue id was stored. With `inline_max`, also that each body is inline exactly when the
    store's threshold says so.

    `by_mailbox`, when given, is filled with mailbox name -> queue ids found in it.
    """
    seen: Counter[str] = Counter()
    root = store_dir / "mail"
    for user in users:
        base = user_path(root, user)
        index = base / "index.sqlite"
        if not index.exists():
            continue
        bodies = check_bodies(base)  # integrity, one body per row, no orphans, no tmp files
        conn = sqlite3.connect(index)
        try:
            rows = conn.execute(
                "SELECT uid, guid, size, modseq, name, uidnext, highestmodseq FROM message"
                " JOIN mailbox ON mailbox.id = message.mailbox_id ORDER BY name, uid").fetchall()
            delivered = {r[0] for r in conn.execute("SELECT queue_id FROM delivered")}
        finally:
            conn.close()
        uids = [(mailbox, uid) for uid, _, _, _, mailbox, _, _ in rows]
        assert len(uids) == len(set(uids)), f"duplicate uids for {user}"
        for uid, guid, size, modseq, mailbox, uidnext, highest in rows:
            assert 0 < uid < uidnext and modseq <= highest, f"{user} {mailbox} uid {uid}"
            data = bodies[guid]
            assert len(data) == size, f"{user} uid {uid}: size mismatch"
            if inline_max is not None:
                assert (guid in bodies.inline) == (0 < size <= inline_max), f"{user} {uid}"
            match = QUEUE_ID_HEADER.search(data)
            assert match, f"{user} uid {uid}: no test queue id in the stored message"
            seen[match.group(1).decode()] += 1
            if by_mailbox is not None:
                by_mailbox.setdefault(mailbox, set()).add(match.group(1).decode())
            assert match.group(1).decode() in delivered
    return seen
