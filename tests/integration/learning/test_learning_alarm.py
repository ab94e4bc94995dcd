"""Spam learning while RabbitMQ blocks its publishers (a disk or memory alarm), on a broker
of the test's own: the store's learn jobs cannot go out, and neither the user, nor a store
being stopped, nor the jobs themselves may pay for it."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from common.ids import new_queue_id
from common.settings import Settings
from services.store import learning
from services.store.backends.maildb import MailDB
from services.store.learning import LearningHook, learn_queue
from services.store.mailbox import INBOX, JUNK, Delivery
from tests.integration.learning.test_learning import (
    ALICE,
    run_store_for_alice,
    unseen_message,
)
from tests.support import PrivateBroker, TierProcess, eventually, queue_depth, wait_until

MOVED = 3


@pytest.fixture
def broker() -> Iterator[PrivateBroker]:
    node = PrivateBroker()
    node.start()
    yield node
    node.stop()


def blocked_store_publish(broker: PrivateBroker) -> Callable[[], bool]:
    return lambda: broker.blocked_connections() > 0


def move_all_into_junk(client: imaplib.IMAP4) -> None:
    for _ in range(MOVED):
        assert client.append(INBOX, "", None, unseen_message())[0] == "OK"
    client.select(INBOX)
    assert client.uid("MOVE", "1:*", JUNK)[0] == "OK"


async def test_a_store_stopped_during_a_disk_alarm_stops_and_counts_what_it_gives_up(
        settings: Settings, broker: PrivateBroker,
        run_tier: Callable[..., TierProcess]) -> None:
    """The IMAP MOVE answers while the broker blocks the store's learn publish, and SIGTERM
    ends the store with one line counting the moves not learned. The publish waited as long
    as the alarm, and the stopping store for it: its thread kept the process from exiting,
    until the SIGKILL of whatever stopped it."""
    stack = settings.replace(amqp_url=broker.url, learn="rspamd")
    store = run_store_for_alice(stack, run_tier)
    await asyncio.to_thread(broker.set_disk_alarm, True)
    client = imaplib.IMAP4("127.0.0.1", stack.imap_port, timeout=30)  # a hang fails the test
    try:
        client.login(ALICE, "secret pw")
        await asyncio.to_thread(move_all_into_junk, client)
        await asyncio.to_thread(wait_until, blocked_store_publish(broker), timeout=60,
                                what="the store's learn publish to be blocked")
        assert client.noop()[0] == "OK"  # the session goes on meanwhile
    finally:
        client.shutdown()
    store.proc.send_signal(signal.SIGTERM)
    # Bounded only so that a store that never stops fails the test instead of hanging it.
    assert await asyncio.to_thread(store.proc.wait, 120) == 0, store.output()
    output = store.output()
    assert f"not learned: {MOVED} more messages of moves waiting for the broker (the store " \
        "is stopping; a publish it has not confirmed may yet go out)" in output, output


async def test_learn_jobs_blocked_by_an_alarm_go_out_once_it_clears_once_each(
        settings: Settings, broker: PrivateBroker, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A running store waits out the alarm on the blocked connection, saying so, and every
    job is published once the alarm clears, once. Nothing said the jobs waited. (Giving a
    blocked connection up after a timeout and publishing again, as pika's
    blocked_connection_timeout with dramatiq's six attempts does, queued the first job once
    per attempt into a broker out of disk: 8 jobs for these 3 moves.) The blocked publish
    outlives pika's heartbeat check, which gives up a broker that stopped answering: a
    broker in an alarm still sends its heartbeats."""
    monkeypatch.setattr(learning, "BROKER_HEARTBEAT", 1)
    monkeypatch.setattr(learning, "STALL_NOTICE", learning.broker_silence_limit() + 1)
    stack = settings.replace(amqp_url=broker.url, learn="rspamd")
    maildb = MailDB.for_store(stack.store_dir, inline_max=stack.store_inline_max)
    hook = LearningHook.from_settings(stack, maildb)
    maildb.add_listener(hook.on_change)
    caplog.set_level(logging.INFO, logger="services.store.learning")
    try:
        await maildb.deliver([Delivery(new_queue_id(), ALICE, unseen_message(), time.time(),
                                       INBOX) for _ in range(MOVED)])
        await asyncio.to_thread(broker.set_disk_alarm, True)
        await maildb.move(ALICE, INBOX, await maildb.uids(ALICE, INBOX), JUNK)
        await asyncio.to_thread(wait_until, blocked_store_publish(broker), timeout=60,
                                what="the store's learn publish to be blocked")
        await eventually(lambda: "which has not confirmed a publish" in caplog.text,
                         within=60, what="the store to say its learn jobs wait")
        await asyncio.to_thread(broker.set_disk_alarm, False)
        await eventually(lambda: caplog.text.count("learn job queued") == MOVED, within=120,
                         what="the jobs to be published")
        assert "learn jobs go out again" in caplog.text
    finally:
        await hook.close()
        await maildb.close()
    assert await asyncio.to_thread(queue_depth, stack, learn_queue(stack)) == MOVED
    assert "not learned" not in caplog.text, caplog.text
