"""Policy `defer`: intake survives a scanner outage, and nothing unscanned reaches a mailbox.

100 messages (ham, GTUBE, EICAR) are accepted while rspamd and clamd are "stopped" (settings
point at closed ports): all wait in the scan queue, none in deliver. Then a worker whose
settings reach the live scanners drains the scan queue: every ham goes to deliver without
junk, every GTUBE to deliver with junk=True, every EICAR to quarantine, each exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import pytest
from pamqp.commands import Basic

from common.envelope import Envelope, Recipient
from common.settings import Settings
from common.topology import (
    ENVELOPE_HEADER,
    RESENT_AT_HEADER,
    envelope_from_properties,
    message_properties,
)
from services.filter.deferred import CONNECT_TIMEOUT, SCAN_PREFETCH, TOO_BIG_HEADER
from services.filter.main import open_worker
from services.filter.poison import POISON_STRIKES
from services.filter.protocol.scan_headers import VIRUS_HEADER
from tests.integration.filter.conftest import amqp_channel
from tests.integration.scanning.conftest import (
    ALICE,
    SENDER,
    closed_address,
    depth,
    eicar_attachment,
    eventually,
    gtube,
    ham,
    message,
    send_one,
    take_all,
)
from tests.support import PrivateBroker, QuietProxy, Relayed, TcpProxy, broker_at, free_port

MESSAGES = 100
KINDS = ("ham", "gtube", "eicar")
MAKERS = {"ham": ham, "gtube": gtube, "eicar": eicar_attachment}


def send_mix(port: int, count: int) -> dict[str, str]:
    """Send `count` messages over one connection; queue id -> kind."""
    sent: dict[str, str] = {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.test",
                      timeout=60) as client:
        client.ehlo()
        for i in range(count):
            kind = KINDS[i % len(KINDS)]
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt(ALICE)[0] == 250
            code, text = client.data(MAKERS[kind](f"{kind} {i}"))
            assert code == 250, (kind, code, text)
            sent[text.decode().rsplit(" ", 1)[1]] = kind
    return sent


async def test_defer_then_drain_exactly_once(scan_settings: Settings) -> None:
    topology = scan_settings.topology
    stopped = scanners_stopped(scan_settings)
    async with open_worker(stopped) as intake:
        sent = await asyncio.to_thread(send_mix, intake.ports[0], MESSAGES)
        assert intake.stats.scan_deferred >= MESSAGES  # one per unavailable scanner call
        assert intake.drainer is not None and not intake.drainer.consuming.is_set()
    assert len(sent) == MESSAGES
    assert await depth(scan_settings, topology.scan_queue) == MESSAGES
    assert await depth(scan_settings, topology.deliver_queue) == 0

    # The scanners "return": a worker that reaches them drains the scan queue.
    async with open_worker(scan_settings.replace(scan_failure="defer"),
                           port=free_port()) as scanner:
        async def done() -> bool:
            stats = scanner.stats
            finished = stats.deferred_ham + stats.deferred_junk + stats.deferred_quarantined
            return finished >= MESSAGES and await depth(scan_settings, topology.scan_queue) == 0

        await eventually(done, within=120, what="the scan queue to be drained")
        assert scanner.stats.deferred_requeued == 0

    delivered = await take_all(scan_settings, topology.deliver_queue)
    quarantined = await take_all(scan_settings, topology.quarantine_queue)
    expected = Counter(sent.values())
    seen = Counter(m.envelope.queue_id for m in delivered + quarantined)
    assert set(seen) == set(sent) and set(seen.values()) == {1}, "each exactly once"
    for taken in delivered:
        kind = sent[taken.envelope.queue_id]
        if kind == "ham":
            assert not taken.envelope.junk
            assert (taken.header("X-Spam-Status") or "").startswith("No, ")
        else:
            assert kind == "gtube"
            assert taken.envelope.junk and taken.header("X-Spam") == "Yes"
        assert taken.envelope.size == len(taken.body)
    for taken in quarantined:
        assert sent[taken.envelope.queue_id] == "eicar"
        assert (taken.header(VIRUS_HEADER) or "").endswith(".UNOFFICIAL")
    assert Counter(sent[m.envelope.queue_id] for m in quarantined) == {"eicar": expected["eicar"]}
    assert len(delivered) == expected["ham"] + expected["gtube"]
    assert await depth(scan_settings, topology.scan_queue) == 0


async def defer_then_drain(scan_settings: Settings, data: bytes, drain: Settings) -> None:
    """`data` taken while the scanners are down (defer), then scanned from the scan queue
    by a worker with the settings `drain`."""
    stopped = scan_settings.replace(scan_failure="defer",
                                    rspamd_url=f"http://{closed_address()}",
                                    clamd_address=closed_address())
    async with open_worker(stopped, drain_scan_queue=False) as intake:
        assert (await asyncio.to_thread(send_one, intake.ports[0], data))[0] == 250
    assert await depth(scan_settings, scan_settings.topology.scan_queue) == 1
    async with open_worker(drain, port=free_port()) as scanner:
        stats = scanner.stats
        await eventually(lambda: stats.deferred_ham + stats.deferred_quarantined >= 1,
                         what="the deferred scan")


async def test_a_message_at_the_clamd_stream_limit_is_scanned_when_deferred_too(
        scan_settings: Settings) -> None:
    """A message of exactly TIERMAIL_CLAMD_STREAM_MAX octets is scanned at DATA. Accepted
    under `defer`, it waits in the scan queue with our Received header on top, and the
    deferred scan sent clamd that too: over the limit, so quarantined as too big (ham!)."""
    topology = scan_settings.topology
    data = ham("at the limit")
    at_limit = scan_settings.replace(clamd_stream_max=len(data), scan_failure="defer")
    async with open_worker(at_limit, drain_scan_queue=False) as worker:
        assert (await asyncio.to_thread(send_one, worker.ports[0], data))[0] == 250
        assert worker.stats.scan_oversize == 0  # at DATA it fits
    assert len(await take_all(scan_settings, topology.deliver_queue)) == 1

    await defer_then_drain(scan_settings, data, at_limit)
    assert await take_all(scan_settings, topology.quarantine_queue) == []
    [delivered] = await take_all(scan_settings, topology.deliver_queue)
    assert (delivered.header("X-Spam-Status") or "").startswith("No, ")
    assert delivered.body.endswith(data)


async def test_scanner_failure_mid_drain_pauses_without_churn(scan_settings: Settings) -> None:
    """clamd goes away in the middle of draining: the message being scanned goes back to the
    queue, the drainer stops consuming (no redelivery churn) and resumes when clamd answers;
    every message still comes out exactly once."""
    topology = scan_settings.topology
    count = 150
    stopped = scanners_stopped(scan_settings)
    async with open_worker(stopped, drain_scan_queue=False) as intake:
        sent = await asyncio.to_thread(send_hams, intake.ports[0], count)
    clamd_port = int(scan_settings.clamd_address.rpartition(":")[2])
    proxy = TcpProxy(clamd_port)
    try:
        via_proxy = scan_settings.replace(clamd_address=f"127.0.0.1:{proxy.port}")
        async with open_worker(via_proxy, port=free_port()) as worker:
            stats, drainer = worker.stats, worker.drainer
            assert drainer is not None
            await eventually(lambda: stats.deferred_ham >= 1, what="draining to start")
            proxy.cut()
            await eventually(lambda: not drainer.consuming.is_set(), what="consuming to stop")
            paused_at = stats.deferred_ham
            assert 0 < paused_at < count
            # What the drainer gave back (nacked: no reply in AMQP) is ready again a moment
            # later; a message lost or taken for good would keep the count short.
            await eventually(lambda: _equals(depth(scan_settings, topology.scan_queue),
                                             count - paused_at),
                             what=f"{count - paused_at} messages back in the scan queue")
            assert stats.deferred_ham == paused_at
            # Paused: nothing is taken from the queue while clamd does not answer.
            probes = stats.deferred_requeued
            assert probes <= 4  # at most the prefetched messages went back, once
            proxy.start()
            await eventually(lambda: stats.deferred_ham >= count, within=120,
                             what="the rest to be drained")
            assert stats.deferred_requeued == probes
    finally:
        proxy.cut()
    await delivered_once_each(scan_settings, sent)
    assert await depth(scan_settings, topology.scan_queue) == 0


async def test_publishes_blocked_mid_drain_pause_without_churn(scan_settings: Settings) -> None:
    """RabbitMQ raises a disk alarm while the scan queue drains: it still delivers to the
    drainer but blocks its publishes. The drainer stops taking messages (each would be
    scanned again and count toward the delivery limit) until the broker confirms again."""
    broker = PrivateBroker()
    broker.start()
    try:
        own = scan_settings.replace(amqp_url=broker.url, publish_timeout=2.0)
        stopped = scanners_stopped(own)
        count = 20
        async with open_worker(stopped, drain_scan_queue=False) as intake:
            sent = await asyncio.to_thread(send_hams, intake.ports[0], count)
        await asyncio.to_thread(broker.set_disk_alarm, True)
        async with open_worker(own.replace(scan_failure="defer"), port=free_port()) as worker:
            stats, drainer = worker.stats, worker.drainer
            assert drainer is not None
            await eventually(lambda: stats.deferred_requeued >= 1, within=60,
                             what="a publish to fail")
            await eventually(lambda: not drainer.consuming.is_set(), what="consuming to stop")
            await asyncio.sleep(5)  # a churning drainer would go round many times by now
            assert stats.deferred_requeued <= SCAN_PREFETCH and stats.deferred_ham == 0
            assert not drainer.consuming.is_set()
            await asyncio.to_thread(broker.set_disk_alarm, False)
            await eventually(lambda: stats.deferred_ham >= count, within=120,
                             what="the scan queue to drain once publishes go out")
        delivered = await take_all(own, own.topology.deliver_queue)
        seen = Counter(m.envelope.queue_id for m in delivered)
        assert set(sent) <= set(seen)
        # A publish that timed out may still have reached the queue: the store deduplicates
        # by queue id and mailbox, so at most those come twice.
        assert sum(seen.values()) - len(sent) <= SCAN_PREFETCH
    finally:
        broker.stop()


async def test_a_broker_quiet_mid_set_up_does_not_stop_deferred_scanning(
        scan_settings: Settings) -> None:
    """The broker answers the drainer's basic.qos and then nothing: aiormq waits for
    basic.consume-ok without a deadline, so the scan queue was not drained until the
    heartbeat gave up, minutes later. Now the drainer gives up on the session in time and
    the next one, once the broker answers again, drains."""
    stopped = scanners_stopped(scan_settings)
    async with open_worker(stopped, drain_scan_queue=False) as intake:
        sent = await asyncio.to_thread(send_hams, intake.ports[0], 3)
    proxy = QuietProxy(5672, after=Basic.QosOk)
    try:
        via_proxy = broker_at(scan_settings, proxy.port, scan_failure="defer")
        async with open_worker(via_proxy, port=free_port()) as worker:
            await eventually(lambda: proxy.fell_quiet >= 2, within=CONNECT_TIMEOUT + 20,
                             what="the drainer to give up on the quiet broker and try again")
            proxy.speak()
            await eventually(lambda: worker.stats.deferred_ham >= len(sent), within=60,
                             what="the scan queue to be drained")
    finally:
        proxy.cut()


class PoisonProxy(TcpProxy):
    """A relay to rspamd that cuts every connection carrying `marker`: a message that breaks
    the scanner, while the scanner answers pings and scans everything else."""

    def __init__(self, target_port: int, marker: bytes) -> None:
        self.marker = marker
        self.cuts = 0
        super().__init__(target_port)

    def _relay(self, client: socket.socket, to_target: bool) -> Callable[[bytes], Relayed]:
        def relay(data: bytes) -> Relayed:
            if to_target and self.marker in data:
                self.cuts += 1
                return b"", 0.0
            return data, None
        return relay


async def test_a_message_that_breaks_a_scanner_is_dead_lettered_while_the_rest_flows(
        scan_settings: Settings) -> None:
    """rspamd fails on one message every time but answers pings and scans the others: that
    message is dead-lettered after POISON_STRIKES attempts (it went round up to the scan
    queue's delivery limit of 100 before, the drainer pausing for it each time), and every
    other message is drained meanwhile, exactly once."""
    topology = scan_settings.topology
    stopped = scanners_stopped(scan_settings)
    marker = b"zq-breaks-the-scanner"
    async with open_worker(stopped, drain_scan_queue=False) as intake:
        [poison_id] = await asyncio.to_thread(send_each, intake.ports[0],
                                              [message("poison", marker + b"\r\n")])
        hams = await asyncio.to_thread(send_hams, intake.ports[0], 30)
    proxy = PoisonProxy(urlsplit(scan_settings.rspamd_url).port or 0, marker)
    try:
        via_proxy = scan_settings.replace(rspamd_url=f"http://127.0.0.1:{proxy.port}",
                                          scan_failure="defer")
        async with open_worker(via_proxy, port=free_port()) as worker:
            stats = worker.stats
            await eventually(lambda: _equals(depth(scan_settings, topology.dead_queue), 1),
                             within=90, what="the message to be dead-lettered")
            await eventually(lambda: stats.deferred_ham == len(hams), what="the hams drained")
            assert proxy.cuts == POISON_STRIKES
            assert stats.deferred_dead_lettered == 1
            assert stats.deferred_requeued == POISON_STRIKES - 1
    finally:
        proxy.cut()
    await delivered_once_each(scan_settings, hams)
    dead = await take_all(scan_settings, topology.dead_queue)
    assert [m.envelope.queue_id for m in dead] == [poison_id]
    assert await depth(scan_settings, topology.scan_queue) == 0


@pytest.mark.parametrize("queued", [12, 1])
async def test_a_scanner_that_fails_on_every_message_dead_letters_none(
        scan_settings: Settings, queued: int) -> None:
    """rspamd answers pings but fails every scan (overloaded, misconfigured): that is no
    message's fault, so none is dead-lettered; the drainer backs off, and once rspamd scans
    again every message comes out exactly once. Also a message alone in the queue, which
    collected its strikes within milliseconds (found in review)."""
    topology = scan_settings.topology
    stopped = scanners_stopped(scan_settings)
    async with open_worker(stopped, drain_scan_queue=False) as intake:
        hams = await asyncio.to_thread(send_hams, intake.ports[0], queued)
    failures = 3 * SCAN_PREFETCH if queued > 1 else POISON_STRIKES + 1
    proxy = PoisonProxy(urlsplit(scan_settings.rspamd_url).port or 0, b"POST /checkv2")
    try:
        via_proxy = scan_settings.replace(rspamd_url=f"http://127.0.0.1:{proxy.port}",
                                          scan_failure="defer")
        async with open_worker(via_proxy, port=free_port()) as worker:
            stats = worker.stats
            await eventually(lambda: proxy.cuts >= failures, within=30,
                             what="the scans to fail again and again")
            assert stats.deferred_dead_lettered == 0 and stats.deferred_ham == 0
            assert await depth(scan_settings, topology.dead_queue) == 0
            proxy.marker = b"\0nothing matches"
            await eventually(lambda: stats.deferred_ham == len(hams), within=60,
                             what="the scan queue to drain once rspamd scans again")
    finally:
        proxy.cut()
    await delivered_once_each(scan_settings, hams)
    assert await depth(scan_settings, topology.dead_queue) == 0


def scanners_stopped(settings: Settings) -> Settings:
    """`settings` with rspamd and clamd "stopped" and policy defer: all mail is deferred."""
    return settings.replace(rspamd_url=f"http://{closed_address()}",
                            clamd_address=closed_address(), scan_failure="defer")


async def delivered_once_each(settings: Settings, queue_ids: list[str]) -> None:
    """The deliver queue holds exactly these messages, each once (taken from it)."""
    seen = Counter(m.envelope.queue_id for m in
                   await take_all(settings, settings.topology.deliver_queue))
    assert set(seen) == set(queue_ids) and set(seen.values()) == {1}


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


def send_hams(port: int, count: int) -> list[str]:
    return send_each(port, [ham(f"ham {i}") for i in range(count)])


def send_each(port: int, messages: list[bytes]) -> list[str]:
    """Send each to Alice over one connection; their queue ids."""
    queue_ids: list[str] = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.test",
                      timeout=60) as client:
        client.ehlo()
        for data in messages:
            code, text = client.data(data) if _envelope(client) else (0, b"")
            assert code == 250, text
            queue_ids.append(text.decode().rsplit(" ", 1)[1])
    return queue_ids


def _envelope(client: smtplib.SMTP) -> bool:
    return client.mail(SENDER)[0] == 250 and client.rcpt(ALICE)[0] == 250


async def test_an_undecodable_message_on_the_scan_queue_is_logged_with_its_queue_id(
        scan_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """`tiermail deadletters list` shows such a message by the queue id in its message_id
    and says the filter's log says why; the log line had no queue id to find it by."""
    caplog.set_level(logging.INFO, logger="services.filter")
    topology = scan_settings.topology
    async with open_worker(scan_settings, port=free_port()):
        async with amqp_channel(scan_settings) as channel:
            await channel.basic_publish(
                b"Subject: x\r\n\r\nbody\r\n", routing_key=topology.scan_queue,
                properties=Basic.Properties(message_id="UNDECODABLE0001", delivery_mode=2,
                                            headers={ENVELOPE_HEADER: "{not json"}))
        await eventually(lambda: _equals(depth(scan_settings, topology.dead_queue), 1),
                         what="the message to be dead-lettered")
    [line] = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert getattr(line, "queue_id", None) == "UNDECODABLE0001", caplog.text


async def test_a_deferred_message_too_big_for_clamd_is_quarantined_not_delivered(
        scan_settings: Settings) -> None:
    """Taken while the scanners were down (defer), then found too big for clamd when
    drained: it goes to the quarantine with the header that says so, never to a mailbox
    unscanned (a mutation that delivered it passed every test)."""
    topology = scan_settings.topology
    data = ham("too big when drained")
    small = scan_settings.replace(scan_failure="defer", clamd_stream_max=len(data) - 1)
    await defer_then_drain(scan_settings, data, small)
    assert await take_all(scan_settings, topology.deliver_queue) == []
    [held] = await take_all(scan_settings, topology.quarantine_queue)
    assert held.header(TOO_BIG_HEADER[0]) == TOO_BIG_HEADER[1]


async def test_a_retried_message_keeps_its_resend_time_through_the_scan(
        scan_settings: Settings) -> None:
    """`deadletters retry` sends a message the scan queue dead-lettered back there, marked
    with when (RESENT_AT_HEADER); scanned, it is published again for the store, which
    counts its delivery lag from that mark: it must survive the new publish."""
    topology = scan_settings.topology
    body = ham("retried")
    envelope = Envelope(queue_id="RETRIED0000001", mail_from=SENDER,
                        recipients=(Recipient(ALICE, (ALICE,)),), client_ip="127.0.0.1",
                        client_helo="client.remote.test", received_at=time.time() - 86_400,
                        size=len(body))
    properties = message_properties(envelope)
    resent_at = int(time.time() * 1000)
    properties.headers = {**(properties.headers or {}), RESENT_AT_HEADER: resent_at}
    async with open_worker(scan_settings, port=free_port()) as scanner:
        async with amqp_channel(scan_settings) as channel:
            await channel.basic_publish(body, routing_key=topology.scan_queue,
                                        properties=properties)
        await eventually(lambda: _equals(depth(scan_settings, topology.deliver_queue), 1),
                         what="the scanned message in the delivery queue")
        assert scanner.stats.deferred_ham == 1
    async with amqp_channel(scan_settings) as channel:
        got = await channel.basic_get(topology.deliver_queue, no_ack=True)
    headers = got.header.properties.headers or {}
    assert headers[RESENT_AT_HEADER] == resent_at
    assert envelope_from_properties(got.header.properties).queue_id == envelope.queue_id
