"""The filter's publisher against the real broker: one message that cannot be published does
not cost the other sessions their shared connection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator

import pamqp.commands
import pytest

from common.broker import (
    Publisher,
    PublishFailed,
    close_connection,
    open_channel,
    with_heartbeat,
)
from common.envelope import Envelope
from common.settings import Settings
from common.topology import LARGE_MESSAGE
from services.filter.deferred import CONSUMER_HEARTBEAT
from tests.integration.store.helpers import make_message
from tests.support import (
    FreezingProxy,
    PrivateBroker,
    QuietProxy,
    TcpProxy,
    broker_at,
    eventually,
    queue_depth,
    rabbitmqctl,
)


async def test_an_envelope_that_cannot_be_encoded_fails_alone(settings: Settings) -> None:
    publisher = Publisher(settings.amqp_url, settings.topology)
    try:
        await publisher.ensure_connected()
        connection = publisher._connection  # noqa: SLF001 - the one the sessions share
        envelope, body = make_message("alice@example.test")
        # What a sender's non-UTF-8 octets look like once decoded with surrogateescape.
        broken = dataclasses.replace(envelope, client_helo="x\udcff.example")
        with pytest.raises(UnicodeEncodeError):
            await publisher.publish(broken, body)
        assert publisher.connected and publisher._connection is connection  # noqa: SLF001
        await publisher.publish(*make_message("alice@example.test"))
    finally:
        await publisher.close()
    assert await asyncio.to_thread(queue_depth, settings) == 1


async def test_a_message_the_broker_refuses_fails_alone(settings: Settings,
                                                       amqp_vhost: str) -> None:
    """A queue over its length limit (reject-publish, as docs/architecture.md suggests for
    capping a queue) nacks a publish. The publisher closed the connection the sessions share
    on it, aiormq cancelled every other confirm it awaited, and those sessions were dropped
    without a reply although the broker held their messages: their senders sent again, a
    second copy where the message has no Message-ID (found in review: 31 in 2,000)."""
    publisher = Publisher(settings.amqp_url, settings.topology)
    policy = f"{settings.queue_prefix}-full"
    large_queue = settings.topology.large_queue
    try:
        await publisher.ensure_connected()  # declares the queues
        await asyncio.to_thread(
            rabbitmqctl, "set_policy", "-p", amqp_vhost, "--apply-to", "queues", policy,
            f"^{re.escape(large_queue)}$", '{"max-length": 0, "overflow": "reject-publish"}')
        await eventually(lambda: asyncio.to_thread(_has_policy, amqp_vhost, large_queue,
                                                   policy), what="the policy")
        connection = publisher._connection  # noqa: SLF001 - the one the sessions share
        for _ in range(5):  # a quorum queue takes one message past its limit
            try:
                await publisher.publish(*_large_message())
            except PublishFailed as refused:
                assert not refused.maybe_queued
                break
        else:
            pytest.fail("the broker took every large message")
        outcomes = await asyncio.gather(
            publisher.publish(*_large_message()),
            *(publisher.publish(*make_message("alice@example.test")) for _ in range(40)),
            return_exceptions=True)
        assert isinstance(outcomes[0], PublishFailed) and not outcomes[0].maybe_queued
        assert outcomes[1:] == [None] * 40
        assert publisher._connection is connection  # noqa: SLF001
    finally:
        await publisher.close()
        await asyncio.to_thread(rabbitmqctl, "clear_policy", "-p", amqp_vhost, policy)
    assert await asyncio.to_thread(queue_depth, settings, settings.topology.deliver_queue) == 40


async def test_a_message_no_queue_takes_is_refused_not_confirmed(settings: Settings,
                                                                 amqp_vhost: str) -> None:
    """Published without `mandatory`, a message routed to no queue (the delivery queue
    deleted by hand, a binding lost) is confirmed and dropped: the sender's 250 for mail
    that is nowhere. The broker returns it instead, a refusal (451) that queued nothing."""
    publisher = Publisher(settings.amqp_url, settings.topology)
    try:
        await publisher.ensure_connected()  # declares the queues
        await asyncio.to_thread(rabbitmqctl, "delete_queue", "-p", amqp_vhost,
                                settings.topology.deliver_queue)
        with pytest.raises(PublishFailed, match="returned") as refused:
            await publisher.publish(*make_message("alice@example.test"))
        assert not refused.value.maybe_queued
    finally:
        await publisher.close()


@contextlib.asynccontextmanager
async def publishes_awaiting_confirms(settings: Settings, count: int) -> AsyncIterator[
        tuple[TcpProxy, Publisher, asyncio.Future[list[BaseException | None]]]]:
    """`count` publishes on one connection that the broker has persisted and whose confirms
    a proxy holds back: the proxy, the publisher, and the publishes' outcomes to come."""
    proxy = TcpProxy(5672)
    publisher = Publisher(broker_at(settings, proxy.port).amqp_url, settings.topology,
                          confirm_timeout=30.0)
    try:
        await publisher.ensure_connected()
        proxy.hold_replies()
        outcomes = asyncio.gather(
            *(publisher.publish(*make_message("alice@example.test")) for _ in range(count)),
            return_exceptions=True)

        async def persisted() -> bool:
            return await asyncio.to_thread(queue_depth, settings) == count

        await eventually(persisted, what="the publishes persisted, their confirms held")
        yield proxy, publisher, outcomes
    finally:
        proxy.cut()
        await publisher.close()


async def test_a_link_lost_before_the_confirms_may_have_queued_the_messages(
        settings: Settings) -> None:
    """The broker took the publishes and the connection went before their confirms came
    back: each message may be queued, so the session remembers its queue id for a retry
    (services/filter/unconfirmed.py) rather than give the retry a new one (a second copy).
    Several sessions' publishes share the connection: the one reading when it closes fails
    with the connection's error, aiormq cancels the confirms the others await."""
    async with publishes_awaiting_confirms(settings, 5) as (proxy, _, outcomes):
        proxy.cut()
        for outcome in await outcomes:
            assert isinstance(outcome, PublishFailed), outcome
            assert outcome.maybe_queued, outcome


async def test_publishes_cut_short_by_another_ones_failure_may_have_queued_their_messages(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish that fails in an unexpected way closes the connection the sessions share
    (its channel's state is unknown), and aiormq cancels the confirms the other sessions'
    publishes await. Those went out: each may be queued, like a lost confirm's."""
    async with publishes_awaiting_confirms(settings, 4) as (_, publisher, awaiting):

        def fails(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a failure of this publish alone")

        monkeypatch.setattr(publisher._channel, "basic_publish", fails)  # noqa: SLF001
        with pytest.raises(PublishFailed, match="a failure of this publish alone"):
            await publisher.publish(*make_message("alice@example.test"))
        for outcome in await awaiting:
            assert isinstance(outcome, PublishFailed), outcome
            assert outcome.maybe_queued, outcome
            assert "closed before the confirm" in str(outcome)


async def declare_topology(settings: Settings) -> None:
    """What a filter worker declares when it connects."""
    publisher = Publisher(settings.amqp_url, settings.topology)
    try:
        await publisher.ensure_connected()
    finally:
        await publisher.close()


async def test_every_queue_the_topology_declares_is_a_durable_quorum_queue(
        settings: Settings, amqp_vhost: str) -> None:
    """Mail waits in each of them (to be delivered, scanned, released from quarantine, or
    looked at as a dead letter): on disk before the confirm, and kept over a broker restart."""
    await declare_topology(settings)
    topology = settings.topology
    ours = {topology.deliver_queue, topology.large_queue, topology.scan_queue,
            topology.quarantine_queue, topology.dead_queue}
    listed = await asyncio.to_thread(rabbitmqctl, "list_queues", "-p", amqp_vhost, "name",
                                     "type", "durable")
    declared = {name: rest for name, *rest in (line.split() for line in listed.splitlines())
                if name.startswith(f"{settings.queue_prefix}.")}
    assert declared.keys() == ours
    assert all(rest == ["quorum", "true"] for rest in declared.values()), declared


async def test_every_queue_mail_is_delivered_from_dead_letters_what_it_cannot_deliver(
        settings: Settings, amqp_vhost: str) -> None:
    """The queues the store and the deferred scanner consume from hand a message that keeps
    coming back (a store that crashes on it, an envelope it cannot read) to the dead-letter
    exchange after their delivery limit, and refuse publishes when full (the publisher gets a
    nack and says 451) rather than dropping the oldest. The scan queue's limit is high: its
    messages may go back many times during one scanner outage."""
    await declare_topology(settings)
    topology = settings.topology
    listed = json.loads(await asyncio.to_thread(rabbitmqctl, "list_queues", "-p", amqp_vhost,
                                                "name", "arguments", "--formatter", "json"))
    arguments = {queue["name"]: {name: value for name, _, value in queue["arguments"]}
                 for queue in listed if queue["name"].startswith(f"{settings.queue_prefix}.")}

    def work_queue(limit: int) -> dict[str, object]:
        return {"x-queue-type": "quorum", "x-delivery-limit": limit,
                "x-dead-letter-exchange": topology.dead_exchange,
                "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}

    assert arguments == {
        topology.deliver_queue: work_queue(settings.delivery_attempts),
        topology.large_queue: work_queue(settings.delivery_attempts),
        topology.scan_queue: work_queue(100),
        topology.quarantine_queue: {"x-queue-type": "quorum"},
        topology.dead_queue: {"x-queue-type": "quorum"},
    }


def _large_message() -> tuple[Envelope, bytes]:
    return make_message("alice@example.test", padding=LARGE_MESSAGE + 1000)


def _has_policy(vhost: str, queue: str, policy: str) -> bool:
    listed = rabbitmqctl("list_queues", "-p", vhost, "name", "policy")
    return any(line.split() == [queue, policy] for line in listed.splitlines())


async def test_a_stall_lasts_as_long_as_the_alarm_across_a_new_connection(
        settings: Settings) -> None:
    """A resource alarm stalls the publisher; the broker then closes its connection (a
    restart, an operator's close_connection) while the alarm holds. RabbitMQ confirms the
    first publish of a connection opened during an alarm before it blocks it: a probe that
    took that confirm ended the stall at once, and the next sender waited out the confirm
    timeout again (the deferred scanner took and requeued its messages again, counting
    toward their delivery limit), once per probe cycle for as long as the alarm lasted."""
    broker = PrivateBroker()
    broker.start()
    publisher = Publisher(broker.url, settings.topology, confirm_timeout=2.0,
                          retry_interval=0.2)
    try:
        await publisher.publish(*make_message("alice@example.test"))
        await asyncio.to_thread(broker.set_disk_alarm, True)
        with pytest.raises(PublishFailed):
            await publisher.publish(*make_message("alice@example.test"))
        assert publisher.stalled
        first = publisher._connection  # noqa: SLF001 - to see the probe reconnect
        await asyncio.to_thread(broker.close_connections)
        await eventually(lambda: publisher._connection not in (None, first),  # noqa: SLF001
                         what="the probe to open a new connection")
        sent = publisher._probes_sent  # noqa: SLF001
        # The probe's second publish on the new connection waits out its timeout, and one
        # more round of probes goes out on the same (blocked) connection.
        await eventually(lambda: not publisher.stalled
                         or publisher._probes_sent >= sent + 3,  # noqa: SLF001
                         what="the probe to go round again, or the stall to end")
        assert publisher.stalled
        await asyncio.to_thread(broker.set_disk_alarm, False)
        await eventually(lambda: not publisher.stalled, what="the stall to end")
        await publisher.publish(*make_message("alice@example.test"))
    finally:
        await publisher.close()
        broker.stop()



async def test_close_returns_during_an_alarm_after_a_large_publish(settings: Settings) -> None:
    """A blocked connection stops reading: what a large publish left in the socket's buffer
    is never sent, and a polite close (Connection.Close, wait for Close-Ok, flush) waited for
    ever. A worker told to stop must stop; the unconfirmed message was never acknowledged."""
    broker = PrivateBroker()
    broker.start()
    publisher = Publisher(broker.url, settings.topology, confirm_timeout=2.0)
    try:
        await publisher.publish(*make_message("alice@example.test"))
        await asyncio.to_thread(broker.set_disk_alarm, True)
        envelope, _ = make_message("alice@example.test")
        with pytest.raises(PublishFailed):
            await publisher.publish(envelope, b"Subject: large\r\n\r\n" + b"x" * 20_000_000)
        # Bounded only so that a hang fails the test instead of the whole run.
        await asyncio.wait_for(publisher.close(), 60)
    finally:
        await asyncio.to_thread(broker.stop)


async def test_a_broker_quiet_after_the_handshake_is_given_up_on_in_time(
        settings: Settings) -> None:
    """aiormq waits for Channel.OpenOk and the declares' answers without a deadline: the
    publisher held its connect lock for as long as the broker kept quiet (until the
    heartbeat gave up, minutes later), and every MAIL FROM waited behind it instead of
    getting 451. Now the whole set-up has the connect timeout, and the next attempt, once
    the broker answers again, connects."""
    proxy = QuietProxy(5672, after=pamqp.commands.Connection.OpenOk)
    publisher = Publisher(broker_at(settings, proxy.port).amqp_url, settings.topology,
                          connect_timeout=1.0, retry_interval=0.1)
    try:
        started = time.monotonic()
        async with asyncio.timeout(30):  # the old code: about three minutes
            assert not await publisher.ready()
        assert time.monotonic() - started < 10
        assert not publisher.connected
        with pytest.raises(PublishFailed, match="no answer in time"):
            await publisher.publish(*make_message("alice@example.test"))

        proxy.speak()
        await asyncio.sleep(0.2)  # past the retry interval
        await publisher.publish(*make_message("alice@example.test"))
    finally:
        await publisher.close()
        proxy.cut()
    assert await asyncio.to_thread(queue_depth, settings) == 1


async def test_a_connection_whose_path_died_is_given_up_not_waited_on(
        settings: Settings) -> None:
    """The path to the broker went silent under the publisher's connection (new ones would
    pass). The probe kept waiting on it as if a resource alarm had blocked it: the worker
    answered 451 to every sender until aiormq's heartbeat gave the connection up, about
    three minutes later (found in review). A connection the broker has not blocked is now
    given up after one unconfirmed round, and the probe goes on over a new one."""
    proxy = FreezingProxy(5672)
    publisher = Publisher(broker_at(settings, proxy.port).amqp_url, settings.topology,
                          confirm_timeout=1.0, retry_interval=0.2)
    try:
        await publisher.publish(*make_message("alice@example.test"))
        dead = publisher._connection  # noqa: SLF001 - to see the probe give it up
        proxy.freeze()
        with pytest.raises(PublishFailed):
            await publisher.publish(*make_message("alice@example.test"))
        assert publisher.stalled
        await eventually(lambda: not publisher.stalled, within=20,
                         what="the probe to confirm over a new connection")
        assert publisher._connection not in (None, dead)  # noqa: SLF001
        await publisher.publish(*make_message("alice@example.test"))
    finally:
        await publisher.close()
        proxy.cut()


async def test_a_consumer_connection_with_a_short_heartbeat_notices_a_dead_path(
        settings: Settings) -> None:
    """The deferred scanner's consumer connection kept the messages it had taken for the
    three minutes RabbitMQ's default heartbeat takes to notice a dead path (found in
    review); it now asks for CONSUMER_HEARTBEAT, and the connection ends within seconds."""
    proxy = FreezingProxy(5672)
    url = with_heartbeat(broker_at(settings, proxy.port).amqp_url, CONSUMER_HEARTBEAT)
    connection, _ = await open_channel(url, settings.topology, 5.0, confirms=False)
    try:
        proxy.freeze()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(connection.closing), 4 * CONSUMER_HEARTBEAT + 10)
        assert connection.is_closed
    finally:
        await close_connection(connection, grace=0)
        proxy.cut()


def test_a_heartbeat_is_asked_for_only_if_the_url_asks_for_none_shorter() -> None:
    assert with_heartbeat("amqp://u:p@h/v", 5) == "amqp://u:p@h/v?heartbeat=5"
    assert with_heartbeat("amqp://u:p@h/v?heartbeat=60&a=1", 5) == \
        "amqp://u:p@h/v?a=1&heartbeat=5"
    assert with_heartbeat("amqp://u:p@h/v?heartbeat=2", 5) == "amqp://u:p@h/v?heartbeat=2"
    assert with_heartbeat("amqp://u:p@h/v?heartbeat=0", 5) == "amqp://u:p@h/v?heartbeat=5"
