"""The deferred scanner's own decisions (services/filter/deferred.py), with a fake channel,
scanner and publisher: what becomes of a message a worker takes, and when the drainer
pauses. Against the real broker and scanners: tests/integration/scanning/test_deferred.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, cast

import pytest
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from common.envelope import Envelope, Recipient
from common.settings import Settings
from common.topology import DELIVER_ROUTING_KEY, message_properties
from services.filter import deferred
from services.filter.backends.clamd import ClamdClient
from services.filter.backends.errors import ScannerUnavailable
from services.filter.backends.scanners import Scanners
from services.filter.deferred import PROBE_MAX, PROBE_MIN, DeferredScanner
from services.filter.poison import POISON_STRIKES
from services.filter.protocol.clamd import ClamdResult
from services.filter.stats import WorkerStats

ENVELOPE = Envelope(queue_id="Q1", mail_from="s@remote.test",
                    recipients=(Recipient("alice@example.test", ("alice@example.test",)),),
                    client_ip="192.0.2.1", client_helo="remote.test", received_at=1.0,
                    size=24)
TAG = 7


class FakeChannel:
    """What the drainer does to the messages it took: ("ack" | "nack" | "reject", tag,
    requeue)."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, int, bool]] = []

    async def basic_ack(self, delivery_tag: int) -> None:
        self.settled.append(("ack", delivery_tag, False))

    async def basic_nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self.settled.append(("nack", delivery_tag, requeue))

    async def basic_reject(self, delivery_tag: int, requeue: bool = True) -> None:
        self.settled.append(("reject", delivery_tag, requeue))


class FakeClamd:
    """A virus scanner that finds nothing, or raises `error`; its pings answer unless
    `answers` is False (down)."""

    name = "clamd"

    def __init__(self, error: Exception | None = None, answers: bool = True) -> None:
        self.error = error
        self.answers = answers
        self.scans = 0

    async def scan(self, content: bytes) -> ClamdResult:
        self.scans += 1
        if self.error is not None:
            raise self.error
        return ClamdResult(None)

    async def ping(self) -> bool:
        return self.answers


class FakePublisher:
    """Publishes go through at once, or (`hangs`) never come back."""

    def __init__(self, hangs: bool = False) -> None:
        self.hangs = hangs
        self.published: list[str] = []

    async def publish(self, envelope: Envelope, body: bytes,
                      routing_key: str = DELIVER_ROUTING_KEY,
                      headers: Mapping[str, Any] | None = None) -> None:
        if self.hangs:
            await asyncio.Event().wait()  # no confirm, no error: only a deadline ends it
        self.published.append(envelope.queue_id)

    async def ready(self) -> bool:
        return True

    @property
    def connected(self) -> bool:
        return True

    @property
    def stalled(self) -> bool:
        return False


def drainer(clamd: FakeClamd | None = None, publisher: FakePublisher | None = None,
            settings: Settings | None = None, stats: WorkerStats | None = None
            ) -> DeferredScanner:
    scanners = Scanners(None, cast(ClamdClient, clamd or FakeClamd()))
    return DeferredScanner(settings or Settings(), scanners, None, publisher or FakePublisher(),
                           stats or WorkerStats())


def taken(channel: FakeChannel) -> DeliveredMessage:
    """A message of the scan queue, as the broker hands it to the drainer."""
    return DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="drainer", delivery_tag=TAG,
                               routing_key="scan"),
        header=ContentHeader(properties=message_properties(ENVELOPE)),
        body=b"Subject: hi\r\n\r\nbody\r\n", channel=cast(AbstractChannel, channel))


async def work_on_one(scanner: DeferredScanner, channel: FakeChannel,
                      failed: asyncio.Event) -> None:
    """One of the session's workers takes one message, then is told to stop."""
    scanner._unsettled += 1  # taken from the broker, as the session's on_message counts it
    inbox: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
    inbox.put_nowait(taken(channel))
    inbox.put_nowait(None)
    await scanner._work(cast(AbstractChannel, channel), inbox, failed)


async def test_a_scan_that_fails_unexpectedly_gives_the_message_back() -> None:
    """A scanner client that raises something no one planned for (a bug) must not leave the
    message unacked: after SCAN_PREFETCH such messages the drainer would hold its whole
    prefetch and drain nothing more, while status showed it consuming."""
    channel = FakeChannel()
    clamd = FakeClamd(RuntimeError("a bug in the reply parser"))
    publisher = FakePublisher()
    await work_on_one(drainer(clamd, publisher), channel, asyncio.Event())
    assert clamd.scans == 1
    assert channel.settled == [("nack", TAG, True)]
    assert publisher.published == []


async def test_a_message_taken_after_a_scanner_failed_goes_back_unscanned() -> None:
    """Once a scanner has failed in this session, the messages still waiting are returned
    to the queue at once: scanning them would only fail again, or count toward the scan
    queue's delivery limit."""
    channel = FakeChannel()
    clamd, publisher = FakeClamd(), FakePublisher()
    failed = asyncio.Event()
    failed.set()
    await work_on_one(drainer(clamd, publisher), channel, failed)
    assert channel.settled == [("nack", TAG, True)]
    assert clamd.scans == 0 and publisher.published == []


async def test_a_publish_that_never_returns_pauses_the_drain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that takes the publish but never confirms it (nor fails it): at the deadline
    the message goes back to the queue, counted as requeued, and the drainer stops taking
    messages until publishes go out again. Without the pause every redelivery would be
    scanned again and use up the scan queue's delivery limit."""
    monkeypatch.setattr(deferred, "CONNECT_TIMEOUT", 0.0)
    channel = FakeChannel()
    publisher, stats = FakePublisher(hangs=True), WorkerStats()
    scanner = drainer(FakeClamd(), publisher, Settings(publish_timeout=0.05), stats)
    failed = asyncio.Event()
    await work_on_one(scanner, channel, failed)
    assert failed.is_set()
    assert stats.deferred_requeued == 1
    assert channel.settled == [("nack", TAG, True)]
    assert publisher.published == []


@pytest.mark.parametrize(("rounds", "pauses"), [
    # A scanner that answers pings but fails every scan: each round ends with no verdict,
    # and the drainer waits longer and longer before taking the same messages again (each
    # a redelivery counted against the scan queue's delivery limit).
    ([False, False, False], [PROBE_MIN, 2 * PROBE_MIN, 4 * PROBE_MIN]),
    # A round that came to a verdict ends the backoff: the next failure waits the least.
    ([False, False, True, False], [PROBE_MIN, 2 * PROBE_MIN, PROBE_MIN]),
    ([True, True], []),  # rounds that scanned mail: consuming again at once
])
async def test_rounds_without_a_verdict_back_off_before_consuming_again(
        monkeypatch: pytest.MonkeyPatch, rounds: list[bool], pauses: list[float]) -> None:
    """Each round (a session of consuming) ends with a scanner failure; the pings pass
    every time. Whether the drainer waits before the next round depends on whether the
    round scanned anything."""
    scanner = drainer()
    outcomes = list(rounds)
    waited: list[float] = []

    async def session() -> None:
        """A round of consuming, ended by a scanner failure: after a verdict (True) or
        none (False)."""
        if not outcomes:
            raise asyncio.CancelledError  # the test is over
        if outcomes.pop(0):
            scanner._strikes.scanned("GOOD")

    async def pause(seconds: float, wake: asyncio.Event | None = None) -> bool:
        waited.append(seconds)
        return False

    monkeypatch.setattr(scanner, "_session", session)
    monkeypatch.setattr(deferred, "pause", pause)
    with pytest.raises(asyncio.CancelledError):
        await scanner.run()
    assert waited == pauses


HANG = 30.0  # seconds: a test that waits this long has hung (nothing here waits at all)
FAILS_AT_CLAMD = ScannerUnavailable("clamd", "clamd closed without answering", reached=True)


def refused_at_connect() -> ScannerUnavailable:
    """A scan that never reached clamd, raised as ClamdClient raises it: from the socket's
    error, with nothing saying whether it got there (availability.py reads the cause)."""
    error = ScannerUnavailable("clamd", "ConnectionRefusedError: [Errno 111] refused")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return error


async def test_a_lone_message_a_scanner_fails_on_pauses_the_drain_without_waiting() -> None:
    """A message alone in the drainer's hands that the scanner fails on (pings pass): its
    second failure, with nothing scanned since its first strike, says nothing against it,
    and no other message held can say anything either. The drainer pauses at once; waiting
    for another outcome (up to scan_timeout, an hour here) would hold the message and the
    worker for nothing."""
    channel = FakeChannel()
    scanner = drainer(FakeClamd(FAILS_AT_CLAMD), settings=Settings(scan_timeout=3600.0))
    failed = asyncio.Event()
    await work_on_one(scanner, channel, failed)
    assert not failed.is_set()  # a first strike: back to the queue, the rest flows
    try:
        async with asyncio.timeout(HANG):
            await work_on_one(scanner, channel, failed)
    except TimeoutError:
        pytest.fail("the drainer waited for an outcome that no message it holds can bring")
    assert failed.is_set()
    assert channel.settled == [("nack", TAG, True)] * 2


async def test_probes_back_off_while_a_scanner_stays_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """clamd does not answer its pings: the drainer does not consume, and waits twice as
    long before each new probe, up to PROBE_MAX (a ping every PROBE_MIN through a long
    outage would only be noise)."""
    scanner = drainer(FakeClamd(answers=False))
    probes = 10
    waited: list[float] = []

    async def pause(seconds: float, wake: asyncio.Event | None = None) -> bool:
        waited.append(seconds)
        if len(waited) == probes:
            raise asyncio.CancelledError  # the test is over
        return False

    async def session() -> None:
        raise AssertionError("consuming while clamd does not answer")

    monkeypatch.setattr(scanner, "_session", session)
    monkeypatch.setattr(deferred, "pause", pause)
    with pytest.raises(asyncio.CancelledError):
        await scanner.run()
    assert waited == [min(PROBE_MIN * 2 ** probe, PROBE_MAX) for probe in range(probes)]


async def fail_rounds(scanner: DeferredScanner, channel: FakeChannel,
                      rounds: int) -> list[bool]:
    """`rounds` times: another message is scanned (the scanner works on other mail), then
    the scanner fails on this one. Whether the drain paused, each time."""
    paused = []
    for _ in range(rounds):
        scanner._strikes.scanned("GOOD")
        failed = asyncio.Event()
        await work_on_one(scanner, channel, failed)
        paused.append(failed.is_set())
    return paused


@pytest.mark.parametrize("clamd", [
    # Down: clamd went away in the middle of the scan, and the ping right after fails.
    pytest.param(lambda: FakeClamd(FAILS_AT_CLAMD, answers=False), id="outage"),
    # The scan never got to clamd, whose ping answers a moment later (a restart ending, a
    # flapping address): the message's bytes were never seen, so cannot be at fault.
    pytest.param(lambda: FakeClamd(refused_at_connect()), id="not-reached"),
])
async def test_failures_while_the_scanner_is_away_are_no_strikes(
        clamd: Callable[[], FakeClamd]) -> None:
    """A message whose scans fail because clamd is away is never dead-lettered, however
    often it goes round while other mail gets scanned: each time it goes back to the queue
    and the drainer pauses."""
    channel, stats = FakeChannel(), WorkerStats()
    scanner = drainer(clamd(), stats=stats)
    assert await fail_rounds(scanner, channel, 2 * POISON_STRIKES) == \
        [True] * (2 * POISON_STRIKES)
    assert channel.settled == [("nack", TAG, True)] * (2 * POISON_STRIKES)
    assert stats.deferred_dead_lettered == 0


async def test_a_message_a_healthy_scanner_fails_on_is_dead_lettered_at_the_limit() -> None:
    """The other side: clamd answers pings and scans other mail, and its scan of this
    message got to it and failed, every time: the message's own doing. It is rejected
    (dead-lettered) at its POISON_STRIKES-th failure, requeued before that."""
    channel, stats = FakeChannel(), WorkerStats()
    scanner = drainer(FakeClamd(FAILS_AT_CLAMD), stats=stats)
    assert await fail_rounds(scanner, channel, POISON_STRIKES) == [False] * POISON_STRIKES
    assert channel.settled == [("nack", TAG, True)] * (POISON_STRIKES - 1) + \
        [("reject", TAG, False)]
    assert stats.deferred_dead_lettered == 1
