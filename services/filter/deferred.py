"""The deferred scanner: drains `<prefix>.scan`, the messages accepted while a scanner was down
(policy `defer`), and scans them before the store ever sees them.

    ham   -> `deliver`, scan headers prepended (same queue id: the store deduplicates)
    spam  -> `deliver` with junk=True (any spam verdict, even reject: it can no longer be
             refused, so it goes to the recipient's Junk folder)
    virus -> `quarantine`, with X-Tiermail-Virus naming the signature

Each message is published with a publisher confirm first and acked on the scan queue only
then: a crash in between gives a duplicate (deduplicated by the store), never a loss.

While a scanner is down, or the broker does not take publishes (unreachable, or stalled by a
resource alarm: common.broker.Publisher.ready), the drainer does not consume at all: it
probes every configured scanner (rspamd GET /ping, clamd PING, spamd PING) and the publisher
with exponential backoff and starts consuming when all answer. A scanner failure (or a failed
publish) in the middle of a message returns that message to the queue (nack, requeue) and
stops consuming again, so an outage never churns through redeliveries. A scanner that
fails on a message but answers a ping right after has failed on that message alone (unless
the scan never got to it: refused at connect, the scanner back a moment later): it goes
back to the queue while the rest flows, and after services/filter/poison.py's
POISON_STRIKES it is dead-lettered for the operator instead of blocking the scan queue until
the delivery limit (100). Every filter worker with scanners configured runs one drainer:
they are competing consumers, each with a small prefetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

from aiormq.abc import AbstractChannel, DeliveredMessage

from common.broker import PublishFailed, close_connection, open_channel, with_heartbeat
from common.envelope import Envelope, EnvelopeError
from common.settings import Settings
from common.tasks import pause
from common.topology import (
    DELIVER_ROUTING_KEY,
    QUARANTINE_ROUTING_KEY,
    RESENT_AT_HEADER,
    envelope_from_properties,
)
from services.filter.backends.availability import never_reached
from services.filter.backends.errors import ScannerUnavailable, StreamTooLarge
from services.filter.backends.scanners import Scanners
from services.filter.poison import UNDECIDED, Strikes
from services.filter.protocol.message import without_own_received
from services.filter.protocol.scan_headers import (
    NOT_SCANNED_HEADER,
    Header,
    header_safe,
    virus_header,
)
from services.filter.rules.base import format_headers
from services.filter.rules.spam import SpamJudge, SpamJudgement
from services.filter.session import MessagePublisher
from services.filter.stats import WorkerStats

log = logging.getLogger(__name__)

SCAN_PREFETCH = 4
CONNECT_TIMEOUT = 5.0
CONSUMER_HEARTBEAT = 5  # seconds: a silent broker is given up after about 18
PROBE_MIN = 0.2
PROBE_MAX = 30.0
_TOO_BIG = "\0too-big"  # not a signature clamd can name
TOO_BIG_HEADER: Header = (NOT_SCANNED_HEADER, "not scanned (too big for the virus scanner)")
# AMQP headers a scanned message keeps when it is published on: a retried dead letter's
# resend time, from which the store counts its delivery lag.
CARRIED_HEADERS = frozenset({RESENT_AT_HEADER})


@dataclass(frozen=True)
class Routed:
    routing_key: str
    headers: tuple[Header, ...]
    junk: bool
    outcome: str  # for the log and the counters: ham, junk, quarantined


class DeferredScanner:
    def __init__(self, settings: Settings, scanners: Scanners, judge: SpamJudge | None,
                 publisher: MessagePublisher, stats: WorkerStats,
                 prefetch: int = SCAN_PREFETCH) -> None:
        self._settings = settings
        self._topology = settings.topology
        self._scanners = scanners
        self._judge = judge
        self._publisher = publisher
        self._stats = stats
        self._prefetch = prefetch
        self._strikes = Strikes()
        # Messages of this session taken from the broker and not yet settled: a failure
        # while others are being scanned is evidence against the message (poison.py).
        self._unsettled = 0
        # Set from basic.consume until every message taken has been acked or given back
        # (for tests: while it is set, messages may still leave the queue for good).
        self.consuming = asyncio.Event()

    async def run(self) -> None:
        """Probe, consume until a scanner or the broker fails, repeat; until cancelled."""
        delay = PROBE_MIN
        reported: list[str] = []
        while True:
            down = await self._scanners.unavailable()
            if not await self._publisher.ready():
                down.append("RabbitMQ (publishes)")  # stalled or unreachable
            if down:
                if down != reported:
                    log.warning("deferred scanning paused: %s not answering", ", ".join(down),
                                extra={"event": "scan-paused"})
                    reported = down
                await pause(delay)
                delay = min(delay * 2, PROBE_MAX)
                continue
            if reported:
                log.info("scanners answer again: deferred scanning resumes",
                         extra={"event": "scan-resumed"})
                reported = []
            verdicts = self._strikes.verdicts
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("scan queue session ended: %s: %s", type(exc).__name__, exc,
                            extra={"event": "amqp-disconnected"})
                await pause(1.0)
                continue
            # Ended by a failure. A scanner that answers pings but came to no verdict at all
            # would be back at once: the same backoff as for one that does not answer.
            if self._strikes.verdicts > verdicts:
                delay = PROBE_MIN
            else:
                await pause(delay)
                delay = min(delay * 2, PROBE_MAX)

    async def _session(self) -> None:
        """Consume the scan queue until a scanner fails (return) or the broker goes (raise)."""
        # A short heartbeat: a consumer connection whose path died held the messages it
        # had taken for the three minutes RabbitMQ's default takes to notice (found in
        # review), while status showed a consumer and nothing wrong.
        connection, channel = await open_channel(
            with_heartbeat(self._settings.amqp_url, CONSUMER_HEARTBEAT), self._topology,
            CONNECT_TIMEOUT, confirms=False)
        inbox: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        failed = asyncio.Event()
        workers: list[asyncio.Task[None]] = []
        self._unsettled = 0  # what an earlier session held went back with its connection
        try:
            async def on_message(message: DeliveredMessage) -> None:
                self._unsettled += 1
                inbox.put_nowait(message)

            # aiormq waits for these answers without a deadline (see open_channel).
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await channel.basic_qos(prefetch_count=self._prefetch)
                ok = await channel.basic_consume(self._topology.scan_queue, on_message,
                                                 no_ack=False)
            self.consuming.set()
            workers = [asyncio.create_task(self._work(channel, inbox, failed))
                       for _ in range(self._prefetch)]
            failing = asyncio.ensure_future(failed.wait())
            closing = connection.closing
            try:
                await asyncio.wait({failing, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                failing.cancel()
            if closing.done():
                raise ConnectionError("broker connection closed")
            # A scanner failed: stop taking messages, give back what we hold, let the
            # messages being scanned finish (each is acked or nacked by its worker).
            with contextlib.suppress(Exception):
                await channel.basic_cancel(ok.consumer_tag or "", timeout=5)
            while not inbox.empty():
                message = inbox.get_nowait()
                if message is not None:
                    self._unsettled -= 1
                    await _nack(channel, message)
            for _ in workers:
                inbox.put_nowait(None)
            await asyncio.gather(*workers, return_exceptions=True)
            self.consuming.clear()  # only now: the workers above may still have acked some
        finally:
            self.consuming.clear()
            for worker in workers:
                worker.cancel()
            # Anything still unacked goes back to the queue.
            await close_connection(connection)

    async def _work(self, channel: AbstractChannel,
                    inbox: asyncio.Queue[DeliveredMessage | None], failed: asyncio.Event) -> None:
        while (message := await inbox.get()) is not None:
            try:
                if failed.is_set():
                    await _nack(channel, message)
                    continue
                await self._handle(channel, message, failed)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deferred scan failed unexpectedly; message returned to the queue")
                await _nack(channel, message)
            finally:
                self._unsettled -= 1

    async def _handle(self, channel: AbstractChannel, message: DeliveredMessage,
                      failed: asyncio.Event) -> None:
        try:
            envelope = envelope_from_properties(message.header.properties)
        except EnvelopeError as exc:
            # The queue id the broker has in message_id, which `deadletters list` shows.
            log.error("undecodable message on the scan queue, dead-lettered: %s", exc,
                      extra={"queue_id": message.header.properties.message_id or None,
                             "event": "dead-letter"})
            await channel.basic_reject(message.delivery_tag or 0, requeue=False)
            return
        extra = {"queue_id": envelope.queue_id}
        body = bytes(message.body)
        try:
            routed = await self._scan(envelope, body)
        except ScannerUnavailable as exc:
            await self._scan_failed(channel, message, envelope, exc, failed)
            return
        self._strikes.scanned(envelope.queue_id)
        head = format_headers(routed.headers)
        out = replace(envelope, junk=envelope.junk or routed.junk, size=len(head) + len(body))
        carried = {name: value for name, value in (message.header.properties.headers or {}).items()
                   if name in CARRIED_HEADERS}
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT + self._settings.publish_timeout):
                await self._publisher.publish(out, head + body, routed.routing_key, carried)
        except (PublishFailed, TimeoutError) as exc:
            # Like a scanner failure: stop taking messages until publishes go out again,
            # or every redelivery would be scanned anew and count toward the delivery limit.
            log.warning("deferred scan result not published (%s): returned to the queue", exc,
                        extra=extra)
            await self._give_back(channel, message, pause=failed)
            return
        await channel.basic_ack(message.delivery_tag or 0)
        self._count(routed)
        log.info("deferred scan: %s, published to %s", routed.outcome, routed.routing_key,
                 extra=extra)

    async def _scan_failed(self, channel: AbstractChannel, message: DeliveredMessage,
                           envelope: Envelope, exc: ScannerUnavailable,
                           failed: asyncio.Event) -> None:
        extra = {"queue_id": envelope.queue_id}
        # A scan that never got to the scanner cannot be the message's doing, even when a
        # ping answers right after (the scanner back from a restart): no strike, a pause.
        if never_reached(exc) or await self._scanners.unavailable():
            log.warning("%s unavailable during a deferred scan (%s): returned to the queue",
                        exc.scanner, exc.reason, extra=extra)
            await self._give_back(channel, message, pause=failed)
            return
        strikes = self._strikes.failed(envelope.queue_id)
        if strikes is UNDECIDED:
            # Whether the scanner works on other mail: the next outcome of another message
            # held says (none held: nothing will).
            strikes = (await self._strikes.decided(envelope.queue_id,
                                                   self._settings.scan_timeout)
                       if self._unsettled > 1 else None)
        if strikes is None:
            log.warning("%s answers pings but fails on every message (%s): returned to the "
                        "queue, deferred scanning pauses", exc.scanner, exc.reason, extra=extra)
            await self._give_back(channel, message, pause=failed)
            return
        if self._strikes.poisoned(strikes):
            self._stats.deferred_dead_lettered += 1
            log.error("%s failed on this message %d times (%s) while it scanned other mail: "
                      "dead-lettered, see `tiermail deadletters`", exc.scanner, strikes,
                      exc.reason, extra={**extra, "event": "scan-poison"})
            with contextlib.suppress(Exception):
                await channel.basic_reject(message.delivery_tag or 0, requeue=False)
            return
        log.warning("%s failed on this message (%s) but answers pings: returned to the queue "
                    "(strike %d of %d)", exc.scanner, exc.reason, strikes, self._strikes.limit,
                    extra=extra)
        await self._give_back(channel, message, pause=None)

    async def _give_back(self, channel: AbstractChannel, message: DeliveredMessage,
                         pause: asyncio.Event | None) -> None:
        """Return the message to the queue; with `pause` (the session's failure event) set,
        the drainer stops taking messages until the probes pass."""
        self._stats.deferred_requeued += 1
        if pause is not None:
            pause.set()
        await _nack(channel, message)

    async def _scan(self, envelope: Envelope, body: bytes) -> Routed:
        judge = self._judge
        content = without_own_received(body, envelope.queue_id)  # what DATA would scan
        try:
            async with asyncio.TaskGroup() as group:
                virus_task = group.create_task(self._virus(content))
                spam_task = group.create_task(judge.judge(envelope, content)) \
                    if judge is not None else None
        except* ScannerUnavailable as errors:
            error = errors.exceptions[0]
            raise error from error.__cause__  # the cause says whether it got to the scanner
        signature = virus_task.result()
        if signature is _TOO_BIG:
            # Only when clamd's StreamMaxLength is below our setting (at DATA the size is
            # checked first). Unscannable and no longer refusable: quarantine, never deliver.
            return Routed(QUARANTINE_ROUTING_KEY, (TOO_BIG_HEADER,), False, "quarantined")
        if signature is not None:
            return Routed(QUARANTINE_ROUTING_KEY, (virus_header(signature),), False,
                          f"quarantined (virus {header_safe(signature, 200)})")
        judgement: SpamJudgement | None = spam_task.result() if spam_task is not None else None
        if judgement is None:
            return Routed(DELIVER_ROUTING_KEY, (), False, "ham")
        if judgement.is_spam:
            return Routed(DELIVER_ROUTING_KEY, judgement.headers, True, "junk")
        return Routed(DELIVER_ROUTING_KEY, judgement.headers, False, "ham")

    async def _virus(self, body: bytes) -> str | None:
        """The signature found, None when clean (or no virus scanner), _TOO_BIG."""
        if self._scanners.virus is None:
            return None
        try:
            return (await self._scanners.virus.scan(body)).signature
        except StreamTooLarge:
            return _TOO_BIG

    def _count(self, routed: Routed) -> None:
        if routed.routing_key == QUARANTINE_ROUTING_KEY:
            self._stats.deferred_quarantined += 1
        elif routed.junk:
            self._stats.deferred_junk += 1
        else:
            self._stats.deferred_ham += 1


async def _nack(channel: AbstractChannel, message: DeliveredMessage) -> None:
    with contextlib.suppress(Exception):
        await channel.basic_nack(message.delivery_tag or 0, requeue=True)
