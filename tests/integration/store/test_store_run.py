"""What the store's start wires together (services/store/main.py, `run`), with the real
RabbitMQ and Redis, the store run in this process so that a test can change its intervals."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import json
import time
from collections.abc import AsyncIterator

import pytest

from common import health
from common.passwords import hash_password
from common.redisconn import open_redis
from common.settings import Settings
from services.store import main as store_main
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MAIL_DIR, MailDB
from services.store.backends.textindex import TextIndex
from services.store.learning import Learning
from services.store.mailbox import JUNK, Delivery
from tests.support import eventually, port_open, queue_depth

USER = "alice@example.test"


@contextlib.asynccontextmanager
async def store_running(settings: Settings, monkeypatch: pytest.MonkeyPatch
                        ) -> AsyncIterator[None]:
    monkeypatch.setattr(store_main, "freeze_startup_objects", lambda: None)  # not pytest's
    stop = asyncio.Event()
    store = asyncio.create_task(store_main.run(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(store, 60)


async def test_a_consumer_that_connects_is_reported_at_once_not_at_the_next_beat(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first beat goes out before the consumer has connected; the store beats again as
    soon as it has, so `tiermail status` does not show a store without a consumer for up to
    a heartbeat interval after each start or reconnect. With the interval at an hour, only
    that beat can say so."""
    monkeypatch.setattr(health, "INTERVAL", 3600.0)
    client = open_redis(settings)
    key = health.heartbeat_key(settings.redis_prefix, "store")

    async def reported_connected() -> bool:
        beat = await client.get(key)
        return beat is not None and json.loads(beat).get("consumer_connected") is True

    try:
        async with store_running(settings, monkeypatch):
            await eventually(lambda: client.exists(key), within=60,
                             what="the store's first beat")
            await eventually(reported_connected, within=60,
                             what="a beat saying the consumer is on")
    finally:
        await client.aclose()


async def delivered_before_the_start(settings: Settings, password_hash: str) -> set[str]:
    """An account with one message in its INBOX, written while no store ran: its GUID."""
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.add_domain("example.test")
    accounts.add_user(USER, password_hash)
    accounts.close()
    maildb = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
    try:
        await maildb.deliver([Delivery("q1", USER, b"Subject: before\r\n\r\nkept words\r\n",
                                       time.time())])
        return {info.guid for info in await maildb.list_messages(USER, "INBOX")}
    finally:
        await maildb.close()


async def test_a_start_indexes_the_text_of_mail_delivered_while_no_indexer_ran(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mail that came in while the text index was not kept (an older store, a crash before
    the indexer's step, a deleted text.sqlite) is indexed by the next start's catch-up,
    not only when a search happens to meet it."""
    guids = await delivered_before_the_start(settings, "not-a-real-hash")
    root = settings.store_dir / MAIL_DIR
    assert guids and not TextIndex(root).indexed(USER)

    async with store_running(settings, monkeypatch):
        await eventually(lambda: TextIndex(root).indexed(USER) == guids, within=60,
                         what="the start's catch-up to index the message")


def imap_move_to_junk(settings: Settings, password: str) -> None:
    imap = imaplib.IMAP4("127.0.0.1", settings.imap_port)
    try:
        imap.login(USER, password)
        imap.select("INBOX")
        status, _ = imap.uid("MOVE", "1", JUNK)
        assert status == "OK"
    finally:
        imap.logout()


async def test_a_move_into_junk_over_imap_queues_a_spam_lesson(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """With learning on, the store's start hangs the learning hook on its mailboxes: a
    client's move into Junk puts a job on the learn queue (for the learner to teach
    rspamd; none runs here, so the job waits there)."""
    learning = settings.replace(learn="rspamd")
    await delivered_before_the_start(learning, hash_password("secret"))
    learner_side = Learning(learning)
    try:
        learner_side.declare()  # as a learner does at its start
    finally:
        learner_side.close()
    queue = learner_side.queue_name

    async def queued() -> bool:
        return await asyncio.to_thread(queue_depth, learning, queue) == 1

    async with store_running(learning, monkeypatch):
        await eventually(lambda: port_open("127.0.0.1", learning.imap_port), within=60,
                         what="the store's IMAP listener")
        await asyncio.to_thread(imap_move_to_junk, learning, "secret")
        await eventually(queued, within=60, what="a learn job on the queue")
