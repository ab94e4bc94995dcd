"""The delivery consumer: RabbitMQ deliver queue -> mailboxes, acked only once durable.

For each micro-batch (what the broker has handed us so far, up to the prefetch) the consumer
  1. decodes every envelope; an undecodable message is rejected without requeue, so the
     broker dead-letters it at once (at-least-once dead-lettering, see common.topology);
  2. checks every mailbox owner against the account database; a message for an owner that no
     longer exists is copied, with `x-tiermail-reason`, to the dead-letter exchange through a
     confirmed publish, never silently dropped;
  3. stores all deliveries of the batch with one `deliver` call (one transaction per user),
     into INBOX, or into Junk when the envelope carries a spam verdict (`junk`);
  4. acks (one `multiple` ack when the whole batch succeeded).
A storage failure falls back to delivering message by message, so one poison message cannot
hold the rest back: permanent failures (an unusable owner or mailbox) are dead-lettered like
unknown owners, anything else is nacked with requeue, and the quorum queue's delivery-limit
(settings.delivery_attempts, counted in x-delivery-count) dead-letters a message that keeps
failing. Unless the storage itself is failing (a full disk, a read-only or broken file
system: `MailDB.probe` cannot write): then the messages are held, unacked, and retried once
the probe succeeds again, so a full disk does not run every queued message through the
delivery limit in a second. A redelivery of something already stored is a no-op thanks to
the `delivered` table.

Connection drops count toward the delivery limit too (RabbitMQ 3.10): a redelivered message
whose count the store's own record of failed attempts does not explain is renewed near the
limit instead of dead-lettered (services/store/redelivery.py). A message with a failed or
unfinished attempt on record (the store may have died on it) is stored alone, after the rest
of its batch, so that it cannot take the others down with it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp.commands import Basic

from common.broker import TopologyMismatch, close_connection, connect_failure, open_channel
from common.directory import normalize_address
from common.envelope import Envelope, EnvelopeError
from common.settings import Settings
from common.tasks import being_cancelled, pause
from common.topology import (
    LARGE_PREFETCH,
    MAILBOXES_HEADER,
    PERSISTENT,
    REASON_HEADER,
    RESENT_AT_HEADER,
    envelope_from_properties,
)
from services.store.backends.accounts import AccountDB
from services.store.backends.attempts import FILE_NAME as ATTEMPTS_FILE
from services.store.backends.attempts import AttemptLog
from services.store.backends.maildb import MailDB, storage_pauses
from services.store.batching import ArrivalPace
from services.store.mailbox import (
    INBOX,
    JUNK,
    Delivery,
    NoSuchMailbox,
    NoSuchUser,
    OutOfSpace,
)
from services.store.redelivery import (
    Returns,
    attempt_key,
    failed_before,
    renewed_headers,
    returns_of,
    should_renew,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
BATCH_TARGET = 16  # messages worth waiting for under load (see settings.store_batch_wait)
CONFIRM_TIMEOUT = 30.0
# A round trip on the broker connection this often, unanswered this long marking the broker
# silent (ConsumerStats.broker_silent_since): a connection that hangs looks like an idle one.
PROBE_INTERVAL, PROBE_TIMEOUT = 10.0, 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.25, 10.0
# A message that failed while the storage works goes back to the queue after a wait that
# doubles with its delivery count: at once, a cause outside the message (a directory gone,
# files exhausted) used up the broker's delivery limit within milliseconds.
REQUEUE_DELAY_FIRST, REQUEUE_DELAY_MAX = 0.5, 30.0
PERMANENT = (NoSuchUser, NoSuchMailbox)
# The file system's fault, not the message's (full, read-only, failing): one line each, as
# many deliveries meet it at once; `storage is failing` follows once the probe fails too.
DISK_FAILURES = (OutOfSpace, OSError)


@dataclass
class ConsumerStats:
    delivered: int = 0  # mailbox copies newly stored
    duplicates: int = 0  # redeliveries found already stored
    dead_lettered: int = 0  # messages rejected or copied to the dead-letter exchange
    requeued: int = 0  # messages nacked back to the queue after a storage failure
    renewed: int = 0  # messages requeued as fresh copies, their delivery count from drops
    renewals_off_since: float = 0.0  # when a write to the attempt log failed; 0: it works
    storage_down_since: float = 0.0  # time the storage probe started failing; 0: it works
    batches: int = 0
    # Messages taken off the store's queues for good: stored, found stored already, their
    # copy dead-lettered, or rejected as undecodable (not those renewed or sent back). Its
    # rate is how fast the store works off a backlog (tiermail status).
    taken: int = 0
    broker_sessions: int = 0  # broker sessions started (reconnects show up here)
    consumer_connected: bool = False
    last_delivery_at: float = 0.0
    # How long the last copy stored had waited since the filter took it in (or since a
    # command sent it back from the dead letters or the quarantine): after an outage, how far
    # behind delivery still is.
    delivery_lag_seconds: float = 0.0
    broker_silent_since: float = 0.0  # the unanswered probe's time (_watch_broker); 0: answers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Item:
    message: DeliveredMessage
    envelope: Envelope | None = None
    owners: list[str] = field(default_factory=list)  # the envelope's, once decoded
    deliveries: list[Delivery] = field(default_factory=list)
    planned: list[Delivery] = field(default_factory=list)  # `deliveries` before any failed
    missing: list[str] = field(default_factory=list)  # owners to dead-letter a copy for
    reason: str = ""
    ok: bool = True

    @property
    def tag(self) -> int:
        return int(self.message.delivery_tag or 0)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id if self.envelope else str(
            self.message.header.properties.message_id)

    @functools.cached_property
    def returns(self) -> Returns:
        return returns_of(self.message.header.properties.headers)

    @functools.cached_property
    def attempt_key(self) -> str:
        assert self.envelope is not None
        return attempt_key(self.envelope)


def _probe_ended(watch: asyncio.Future[None]) -> None:
    if not watch.cancelled() and watch.exception() is not None:
        log.warning("broker probe failed: %s", watch.exception(), extra={"event": "amqp-silent"})


class Consumer:
    def __init__(self, settings: Settings, maildb: MailDB, accounts: AccountDB,
                 stats: ConsumerStats | None = None,
                 on_connection_change: Callable[[], None] | None = None) -> None:
        """`on_connection_change`: called when the consumer is registered and when its
        session ends (the store's heartbeat reports it then, not up to 5 s later)."""
        self._settings = settings
        self._on_connection_change = on_connection_change or (lambda: None)
        self._topology = settings.topology
        self._maildb = maildb
        self._accounts = accounts
        self._attempts: AttemptLog | None = None  # opened when first needed, closed by run()
        # Whether the log has taken every attempt so far: after a failed write it misses
        # some, and returns it does not explain may be failures; no renewals then.
        self._record_whole = True
        self._queues: dict[str, str] = {}  # this session's consumer tags -> their queues
        self.stats = stats or ConsumerStats()
        self._stopping = asyncio.Event()
        self.consuming = asyncio.Event()  # set while a consumer is registered (for tests)
        self._more = asyncio.Event()  # a message arrived (for _gather)
        # Delivery tags of failed messages waiting out their requeue delay (this session's
        # channel): while any is unsettled, no `multiple` ack may cover it.
        self._held: dict[int, asyncio.TimerHandle | asyncio.Future[None]] = {}
        self._pace = ArrivalPace(BATCH_TARGET, settings.store_batch_wait)

    async def run(self) -> None:
        """Consume until stop(); reconnect with backoff whenever the broker goes away."""
        try:
            await self._consume()
        finally:
            if self._attempts is not None:
                await asyncio.to_thread(self._attempts.close)
                self._attempts = None

    async def _consume(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stopping.is_set():
            started = time.monotonic()
            batches = self.stats.batches
            try:
                await self._session()
            except TopologyMismatch:
                raise
            except asyncio.CancelledError:
                if being_cancelled():
                    raise
                # aiormq gives a connection up that sent no frames for three heartbeats (a
                # broker that hangs, a path that drops packets) by cancelling what waits on
                # it: that ended the whole store, IMAP and POP3 with it.
                log.warning("broker session ended: the broker sent nothing for too long "
                            "(heartbeat); connecting again", extra={"event": "amqp-disconnected"})
            except Exception as exc:
                log.warning("broker session ended: %s", connect_failure(exc),
                            extra={"event": "amqp-disconnected"})
            finally:
                if self.stats.consumer_connected:
                    self.stats.consumer_connected = False
                    self._on_connection_change()
                self.consuming.clear()
            if self._stopping.is_set():
                break
            # A session that stored something worked: a link that breaks now and then is
            # not a broker that refuses us, and its messages wait while we back off.
            if self.stats.batches > batches or time.monotonic() - started > 30:
                backoff = BACKOFF_MIN
            await pause(backoff, self._stopping)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def stop(self) -> None:
        """Stop taking new messages; the batch being stored is finished and acked first."""
        self._stopping.set()

    async def _session(self) -> None:
        connection, channel = await open_channel(
            self._settings.amqp_url, self._topology, CONNECT_TIMEOUT, confirms=False)
        try:
            inbox: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()

            async def on_message(message: DeliveredMessage) -> None:
                inbox.put_nowait(message)
                self._pace.arrived()
                self._more.set()

            # The broker cancels a consumer whose queue was deleted (or became unavailable)
            # and keeps the channel open: without a new session nothing would be consumed
            # again, while the status said "connected".
            cancelled: list[str] = []

            def on_cancel(frame: Basic.Cancel) -> None:
                cancelled.append(str(frame.consumer_tag))
                inbox.put_nowait(None)

            channel.on_consumer_cancel_callbacks.add(on_cancel)
            consumer_tags = []
            # aiormq waits for these answers without a deadline: a broker gone quiet here
            # would stop delivery until the heartbeat noticed, minutes later.
            async with asyncio.timeout(CONNECT_TIMEOUT):
                publisher = await connection.channel(publisher_confirms=True,
                                                     on_return_raises=True)
                prober = await connection.channel()
                # One channel, so that delivery tags stay in order across both queues (a
                # batch's `multiple` ack covers exactly the messages before it). Each consumer
                # gets the prefetch set before it starts (basic.qos without `global` is per
                # consumer).
                for queue, prefetch in ((self._topology.deliver_queue,
                                         self._settings.store_prefetch),
                                        (self._topology.large_queue, LARGE_PREFETCH)):
                    await channel.basic_qos(prefetch_count=prefetch)
                    ok = await channel.basic_consume(queue, on_message, no_ack=False)
                    consumer_tags.append(ok.consumer_tag)
                    self._queues[str(ok.consumer_tag)] = queue
            self.stats.consumer_connected = True
            self.stats.broker_sessions += 1
            self.consuming.set()
            self._on_connection_change()
            log.info("consuming %s and %s", self._topology.deliver_queue,
                     self._topology.large_queue, extra={"event": "amqp-connected"})
            watch = asyncio.ensure_future(self._watch_broker(prober))
            watch.add_done_callback(_probe_ended)
            try:
                await self._loop(connection, channel, publisher, inbox, cancelled)
            finally:
                watch.cancel()
                self.stats.broker_silent_since = 0.0
            for tag in consumer_tags:
                if not channel.is_closed and tag:
                    with contextlib.suppress(Exception):
                        await channel.basic_cancel(tag, timeout=5)
        finally:
            for waiting in self._held.values():
                waiting.cancel()  # the broker requeues them with the rest
            self._held.clear()
            self._queues.clear()
            # Anything still unacked (prefetched, not yet stored) goes back to the queue.
            await close_connection(connection)

    async def _loop(self, connection: AbstractConnection, channel: AbstractChannel,
                    publisher: AbstractChannel,
                    inbox: asyncio.Queue[DeliveredMessage | None],
                    cancelled: list[str]) -> None:
        # A None in the inbox wakes the loop up to look at the stop flag and the connection.
        def wake(_: object) -> None:
            inbox.put_nowait(None)

        # Read once: each read of aiormq's `closing` is a new observer future, whose callback
        # stays on the connection until the observer is done. Read after every batch, they
        # piled up for as long as the connection lived (a future and two closures per batch).
        closing = connection.closing
        closing.add_done_callback(wake)
        stopping = asyncio.ensure_future(self._stopping.wait())
        stopping.add_done_callback(wake)
        try:
            while True:
                first = await inbox.get()
                if first is not None:
                    await self._gather(inbox)
                    batch = self._take_batch(first, inbox)
                    # Shielded: a stop or cancel mid-batch still lets this batch be stored
                    # and acked (otherwise it is simply redelivered and deduplicated).
                    await asyncio.shield(self._process(batch, channel, publisher))
                if self._stopping.is_set():
                    return
                if closing.done():
                    if not closing.cancelled():
                        closing.result()  # raises the reason, if any
                    raise ConnectionError("broker connection closed")
                if cancelled:
                    # A new session declares the topology again (the queue, if deleted)
                    # and consumes anew; what was unacked goes back to the queue.
                    raise ConnectionError(f"the broker cancelled consumer {cancelled[0]} "
                                          "(its queue deleted or unavailable?)")
        finally:
            closing.remove_done_callback(wake)
            closing.cancel()  # the observer ends: aiormq takes its callback off the connection
            stopping.cancel()

    async def _watch_broker(self, prober: AbstractChannel) -> None:
        """A round trip (a passive declare of the delivery queue) every PROBE_INTERVAL.

        A broker that hangs, or a path that starts dropping packets, leaves the connection
        open and quiet: the messages already sent to the store wait unacknowledged, which
        the queue depth does not count, and the AMQP heartbeat gives the connection up only
        after three of its intervals (3 minutes at RabbitMQ's default). Meanwhile status
        said healthy. A probe unanswered for PROBE_TIMEOUT marks the broker silent until it
        answers; it is never cancelled and sent again (aiormq would match a late answer to
        the next request)."""
        queue = self._topology.deliver_queue
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            asked = time.time()
            probe = asyncio.ensure_future(prober.queue_declare(queue, passive=True))
            done, _ = await asyncio.wait({probe}, timeout=PROBE_TIMEOUT)
            if done:
                probe.result()
                continue
            self.stats.broker_silent_since = asked
            log.warning("the broker has not answered for %.0f s; messages sent to the store "
                        "wait unacknowledged until it does or the heartbeat gives up",
                        time.time() - asked, extra={"event": "amqp-silent"})
            await probe
            self.stats.broker_silent_since = 0.0
            log.info("the broker answers again after %.0f s", time.time() - asked,
                     extra={"event": "amqp-answers"})

    async def _gather(self, inbox: asyncio.Queue[DeliveredMessage | None]) -> None:
        """Let more messages join the batch before it is stored.

        Always one turn of the loop: aiormq hands each message over in a task of its own.
        When more messages are already waiting (the store is behind: load) and they arrive
        fast enough to make BATCH_TARGET within `store_batch_wait` seconds (services/store/
        batching.py), also up to that long for them: each batch costs one index commit (an
        fsync), one writer-thread hand-over and one ack whatever its size, so batches of 16
        cost the store and the broker far less per message than batches of two. A message
        that finds nothing waiting, or a stream too slow to fill a batch in time, is stored
        at once, so a lightly or moderately loaded store keeps its latency."""
        await asyncio.sleep(0)
        if inbox.empty() or self._settings.store_batch_wait <= 0:
            return
        if not self._pace.fills_batch():
            return
        deadline = time.monotonic() + self._settings.store_batch_wait
        while inbox.qsize() + 1 < BATCH_TARGET and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._more.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):  # no task per wait, as wait_for makes
                    await self._more.wait()

    def _take_batch(self, first: DeliveredMessage,
                    inbox: asyncio.Queue[DeliveredMessage | None]) -> list[DeliveredMessage]:
        """`first` and whatever else has already arrived, up to the prefetch. No waiting: what
        arrives while this batch is being written makes the next one, so batches grow with the
        load while a lone message is stored at once. (A wake-up None met here needs nothing:
        the loop looks at the flags after every batch.)"""
        batch = [first]
        while len(batch) < self._settings.store_prefetch:
            try:
                message = inbox.get_nowait()
            except asyncio.QueueEmpty:
                break
            if message is not None:
                batch.append(message)
        return batch

    async def _process(self, batch: list[DeliveredMessage], channel: AbstractChannel,
                       publisher: AbstractChannel) -> None:
        self.stats.batches += 1
        items: list[_Item] = []
        for message in batch:
            item = _Item(message)
            try:
                item.envelope = envelope_from_properties(message.header.properties)
                item.owners = _owners(item.envelope)
                if not item.owners:
                    raise EnvelopeError("the envelope names no mailbox")
            except Exception as exc:  # noqa: BLE001 - this message's fault, whatever it is
                # Never out of this loop: that would end the broker session and send the
                # whole prefetched batch back, counting an attempt against each good message.
                log.error("undecodable message dead-lettered: %s", exc,
                          exc_info=not isinstance(exc, EnvelopeError | UnicodeDecodeError),
                          extra={"queue_id": item.queue_id, "event": "dead-letter"})
                await channel.basic_reject(item.tag, requeue=False)
                self.stats.dead_lettered += 1
                self.stats.taken += 1
                continue
            items.append(item)
        unfinished = await self._unfinished(items)
        items = await self._renew_where_due(items, unfinished, channel, publisher)
        if not items:
            return
        # Any copy's unfinished attempt: a renewed copy of a message that was in a batch
        # when the store died is as suspect as the message that killed it (found in review:
        # with three such messages, renewed copies met again in one batch, and the deaths
        # counted against them all dead-lettered two good ones).
        suspects = [item for item in items if item.returns.redelivered
                    and (unfinished or {}).get(item.attempt_key, 0)]
        if not suspects:
            await self._store(items, channel, publisher, lowest_tags=True)
            return
        # A message that may have killed the store (or fails) must not take the rest down
        # with it again, each death counted against them all: the others are stored first,
        # then each of these alone, begun (recorded) only when its turn comes.
        log.warning("%d message(s) of this batch failed before, or were being stored when "
                    "the store died: storing them one at a time", len(suspects),
                    extra={"event": "store-error"})
        suspect_tags = {item.tag for item in suspects}
        clean = [item for item in items if item.tag not in suspect_tags]
        if clean:
            await self._store(clean, channel, publisher, lowest_tags=False)
        for item in suspects:
            await self._store([item], channel, publisher, lowest_tags=False)

    async def _store(self, items: list[_Item], channel: AbstractChannel,
                     publisher: AbstractChannel, *, lowest_tags: bool) -> None:
        """Store `items` and settle them. `lowest_tags`: they hold the lowest unsettled
        delivery tags of the channel, so that one `multiple` ack can cover them."""
        owners = {owner for item in items for owner in item.owners}
        await self._attempts_begin(items)

        # A read of the WAL-mode account database never waits for a writer: no thread needed.
        cutoffs = self._accounts.mail_cutoffs(owners)
        deliveries: list[Delivery] = []
        for item in items:
            assert item.envelope is not None
            for owner in item.owners:
                cutoff = cutoffs.get(owner)
                if cutoff is not None and item.envelope.received_at >= cutoff:
                    item.deliveries.append(_delivery(item.envelope, owner, item.message.body))
                else:
                    # Gone, or deleted and added again since the message was accepted: the
                    # new account (often another person) does not get the old one's mail.
                    item.missing.append(owner)
                    item.reason = "no such mailbox owner"
            item.planned = list(item.deliveries)
            deliveries.extend(item.deliveries)

        try:
            uids = await self._maildb.deliver_uids(deliveries)
        except Exception as exc:
            _log_failure(exc, "batch of %d deliveries failed; retrying one by one",
                         len(deliveries), extra={"event": "store-error"})
            for item in items:
                await self._deliver_alone(item)
        else:
            position = 0
            for item in items:
                count = len(item.deliveries)
                self._log_stored(item, uids[position:position + count])
                position += count

        if not all(item.ok for item in items):
            await self._retry_once_storage_works(items)
        for item in items:
            if item.ok and item.missing:
                item.ok = await self._dead_letter_copy(publisher, item)

        # Before the ack, which a broken link may lose: stored is what counts.
        await self._attempts_finished(items)
        await self._settle(channel, items, lowest_tags=lowest_tags)

    async def _in_attempt_log(self, action: Callable[[AttemptLog], T]) -> T | None:
        """`action` on the attempt log, in a thread; None if the log cannot be used. A full
        or broken disk fails it: the messages are then stored (or held, as the storage
        fails too) without their record, never sent back to the queue for want of it, and
        no message is renewed (MAX_RENEWALS bounds what a later process does with the gap)."""
        try:
            if self._attempts is None:
                self._attempts = await asyncio.to_thread(AttemptLog.for_store,
                                                         self._settings.store_dir)
            return await asyncio.to_thread(action, self._attempts)
        except (sqlite3.Error, OSError) as exc:
            self._record_whole = False
            self.stats.renewals_off_since = self.stats.renewals_off_since or time.time()
            log.warning("the attempt log (%s) failed: %s; going on without it, renewing "
                        "nothing", ATTEMPTS_FILE, exc, extra={"event": "store-error"})
            return None

    async def _attempts_begin(self, items: list[_Item]) -> None:
        recorded = [item.attempt_key for item in items if item.returns.redelivered]
        if recorded:
            await self._in_attempt_log(lambda attempts: attempts.begin(recorded))

    async def _attempts_finished(self, items: list[_Item]) -> None:
        done = [item.attempt_key for item in items if item.ok and item.returns.redelivered]
        if done:
            await self._in_attempt_log(lambda attempts: attempts.finished(done))

    async def _unfinished(self, items: list[_Item]) -> dict[str, int] | None:
        """The recorded unfinished attempts at the redelivered `items` (a first delivery
        has none); None if the record cannot be read."""
        redelivered = [item.attempt_key for item in items if item.returns.redelivered]
        if not redelivered:
            return {}
        return await self._in_attempt_log(lambda attempts: attempts.unfinished(redelivered))

    async def _renew_where_due(self, items: list[_Item], unfinished: dict[str, int] | None,
                               channel: AbstractChannel,
                               publisher: AbstractChannel) -> list[_Item]:
        """`items` without those renewed (services/store/redelivery.py), which are settled.
        The fresh copies go out together, and each old copy is acked as soon as its copy is
        confirmed: one at a time, 64 renewals needed about 100 ms of unbroken link, and a link
        that broke in between (the reason for renewing) left the rest to be stored on a dead
        channel, their acks lost, dead-lettered though stored (found in review: 45 of 64)."""
        if unfinished is None or not self._record_whole:
            return items  # no whole record: every return may have been a failure
        limit = self._settings.delivery_attempts
        due: list[tuple[_Item, int]] = []
        for item in items:
            if not item.returns.redelivered:
                continue  # a first delivery (nearly every message): nothing to renew
            attempts = unfinished.get(item.attempt_key, 0)
            if should_renew(item.returns, attempts, limit):
                due.append((item, attempts))
        if not due:
            return items
        renewed = await asyncio.gather(*(self._renew(item, attempts, channel, publisher)
                                         for item, attempts in due))
        tags = {item.tag for (item, _), done in zip(due, renewed, strict=True) if done}
        return [item for item in items if item.tag not in tags]

    async def _renew(self, item: _Item, unfinished: int, channel: AbstractChannel,
                     publisher: AbstractChannel) -> bool:
        if not await self._publish_renewal(item, unfinished, publisher):
            return False
        await channel.basic_ack(item.tag)
        self._renewed(item, unfinished)
        return True

    async def _publish_renewal(self, item: _Item, unfinished: int,
                               publisher: AbstractChannel) -> bool:
        """A fresh copy of `item` queued; False (the message is then stored as it is) if
        the copy was not confirmed."""
        props = item.message.header.properties
        queue = self._queues.get(str(item.message.consumer_tag), self._topology.deliver_queue)
        properties = Basic.Properties(
            delivery_mode=PERSISTENT, message_id=props.message_id,
            content_type=props.content_type, timestamp=props.timestamp,
            headers=renewed_headers(props.headers, item.returns, unfinished))
        try:
            await publisher.basic_publish(item.message.body, exchange="", routing_key=queue,
                                          properties=properties, mandatory=True,
                                          timeout=CONFIRM_TIMEOUT)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and being_cancelled():
                raise
            # (aiormq cancels the confirms it waits for when its connection closes)
            log.warning("renewal not confirmed (%r); storing the message as it is", exc,
                        extra={"queue_id": item.queue_id, "event": "renew"})
            return False
        return True

    def _renewed(self, item: _Item, unfinished: int) -> None:
        returns = item.returns
        self.stats.renewed += 1
        log.warning("delivery count %d of %d, at most %d of them failed attempts, the rest "
                    "broken broker connections: renewed, a fresh copy queued (renewal %d)",
                    returns.count, self._settings.delivery_attempts,
                    failed_before(returns, unfinished) + (returns.renewals == 0),
                    returns.renewals + 1, extra={"queue_id": item.queue_id, "event": "renew"})

    async def _retry_once_storage_works(self, items: list[_Item]) -> None:
        """When the store cannot write at all, the failure is not the messages' fault: hold
        them (unacked, so nothing is lost if we die) until a probe write succeeds, then try
        them again. A message that still fails goes back to the queue and counts."""
        down_since = 0.0
        room_for = sum(len(item.message.body) for item in items if not item.ok)
        for wait in storage_pauses():
            if await self._storage_works(room_for):
                break
            if not down_since:
                down_since = self.stats.storage_down_since = time.time()
            log.error("storage is failing; holding %d messages, next try in %.1f s",
                      sum(not item.ok for item in items), wait,
                      extra={"event": "storage-down"})
            if await pause(wait, self._stopping):
                return  # stopping: _settle gives them back to the queue
        if not down_since:
            return  # storage works: the messages themselves failed
        log.warning("storage works again after %.1f s; retrying", time.time() - down_since,
                    extra={"event": "storage-up"})
        self.stats.storage_down_since = 0.0
        for item in items:
            if not item.ok:
                item.ok, item.deliveries = True, list(item.planned)
                await self._deliver_alone(item)

    async def _storage_works(self, room_for: int) -> bool:
        try:
            await self._maildb.probe(room_for)
        except OSError as exc:
            log.warning("storage probe failed: %s", exc, extra={"event": "storage-probe"})
            return False
        return True

    async def _deliver_alone(self, item: _Item) -> None:
        stored: list[Delivery] = []
        uids: list[int | None] = []
        for delivery in item.deliveries:
            try:
                [uid] = await self._maildb.deliver_uids([delivery])
            except PERMANENT as exc:
                log.error("cannot deliver to %s: %s", delivery.user, type(exc).__name__,
                          extra={"queue_id": delivery.queue_id, "user": delivery.user})
                item.missing.append(delivery.user)
                item.reason = f"mailbox unusable: {type(exc).__name__}"
                continue
            except Exception as exc:
                _log_failure(exc, "delivery failed; the message is held until the storage "
                             "works, or goes back to the queue",
                             extra={"queue_id": delivery.queue_id, "user": delivery.user})
                item.ok = False
                continue
            stored.append(delivery)
            uids.append(uid)
        item.deliveries = stored
        self._log_stored(item, uids)

    def _log_stored(self, item: _Item, uids: list[int | None]) -> None:
        waiting_since = _waiting_since(item)
        for delivery, uid in zip(item.deliveries, uids, strict=True):
            if uid is None:
                self.stats.duplicates += 1
                log.info("already delivered", extra={
                    "queue_id": delivery.queue_id, "user": delivery.user,
                    "event": "duplicate"})
            else:
                self.stats.delivered += 1
                self.stats.last_delivery_at = now = time.time()
                self.stats.delivery_lag_seconds = round(max(now - waiting_since, 0.0), 3)
                log.info("delivered uid=%d", uid, extra={
                    "queue_id": delivery.queue_id, "user": delivery.user,
                    "mailbox": delivery.mailbox, "event": "delivered"})

    async def _dead_letter_copy(self, publisher: AbstractChannel, item: _Item) -> bool:
        """Publish a copy for the owners we could not deliver to; True once confirmed."""
        props = item.message.header.properties
        headers = dict(props.headers or {})
        headers[REASON_HEADER] = item.reason
        headers[MAILBOXES_HEADER] = _listed(item.missing)
        properties = Basic.Properties(
            delivery_mode=PERSISTENT, message_id=props.message_id,
            content_type=props.content_type, timestamp=props.timestamp, headers=headers)
        try:
            await publisher.basic_publish(
                item.message.body, exchange=self._topology.dead_exchange,
                routing_key=self._topology.deliver_queue, properties=properties,
                mandatory=True, timeout=CONFIRM_TIMEOUT)
        except Exception as exc:
            log.error("dead-letter copy not confirmed (%s); message goes back to the queue",
                      exc, extra={"queue_id": item.queue_id, "event": "dead-letter"})
            return False
        self.stats.dead_lettered += 1
        log.warning("dead-lettered a copy for %s: %s", ",".join(item.missing), item.reason,
                    extra={"queue_id": item.queue_id, "event": "dead-letter"})
        return True

    async def _settle(self, channel: AbstractChannel, items: list[_Item], *,
                      lowest_tags: bool) -> None:
        if lowest_tags and all(item.ok for item in items) and not self._held:
            # The batch holds the lowest unsettled tags on this channel (FIFO), and the
            # rejected ones were settled above, so one multiple ack covers exactly the batch.
            await channel.basic_ack(max(item.tag for item in items), multiple=True)
            self.stats.taken += len(items)
            return
        for item in items:
            if item.ok:
                await channel.basic_ack(item.tag)
                self.stats.taken += 1
            else:
                self._requeue_later(channel, item)

    def _requeue_later(self, channel: AbstractChannel, item: _Item) -> None:
        """Give a failed message back to the queue once its delay is over, holding it
        unacknowledged meanwhile (a crash requeues it at once, as before)."""
        headers = item.message.header.properties.headers or {}
        count = headers.get("x-delivery-count", 0)
        count = count if isinstance(count, int) else 0
        delay = min(REQUEUE_DELAY_MAX, REQUEUE_DELAY_FIRST * 2 ** min(count, 16))
        self.stats.requeued += 1
        log.warning("delivery failed: back to the queue in %.1f s (delivery count %d)",
                    delay, count, extra={"queue_id": item.queue_id, "event": "requeue"})
        self._held[item.tag] = asyncio.get_running_loop().call_later(
            delay, self._requeue_now, channel, item.tag)

    def _requeue_now(self, channel: AbstractChannel, tag: int) -> None:
        nack = asyncio.ensure_future(channel.basic_nack(tag, requeue=True))
        self._held[tag] = nack  # until the nack is written: a multiple ack must wait

        def settled(done: asyncio.Future[None]) -> None:
            if self._held.get(tag) is done:
                del self._held[tag]
            if not done.cancelled() and done.exception() is not None:
                log.debug("requeue of delivery tag %d not sent: %r", tag, done.exception())
        nack.add_done_callback(settled)


# The owners named in a dead-letter copy's header: all of them would not fit in one AMQP
# frame for a large alias whose members were deleted (the broker drops the connection).
LISTED_OWNERS = 50


def _listed(owners: list[str]) -> str:
    shown = ",".join(owners[:LISTED_OWNERS])
    return shown if len(owners) <= LISTED_OWNERS else \
        f"{shown} and {len(owners) - LISTED_OWNERS} more"


def _owners(envelope: Envelope) -> list[str]:
    """The envelope's mailbox owners in the form accounts and mailboxes are keyed by."""
    return list(dict.fromkeys(normalize_address(m) for m in envelope.mailboxes))


def _delivery(envelope: Envelope, owner: str, body: bytes) -> Delivery:
    # RFC 5321 4.4: the final delivery adds Return-Path with the reverse-path; Delivered-To
    # (as Postfix and Dovecot add it) records which mailbox this copy was for.
    trace = f"Return-Path: <{_header_safe(envelope.mail_from)}>\r\n" \
            f"Delivered-To: {_header_safe(owner)}\r\n"
    # A spam verdict (the filter's, or a deferred scan's) files the copy into Junk.
    return Delivery(queue_id=envelope.queue_id, user=owner, body=body, head=trace.encode(),
                    received_at=envelope.received_at, mailbox=JUNK if envelope.junk else INBOX)


def _waiting_since(item: _Item) -> float:
    """When the message began to wait for the store: its acceptance, or a later resend."""
    assert item.envelope is not None
    resent_at = (item.message.header.properties.headers or {}).get(RESENT_AT_HEADER)
    if isinstance(resent_at, int) and not isinstance(resent_at, bool):
        return max(resent_at / 1000, item.envelope.received_at)
    return item.envelope.received_at


def _header_safe(value: str) -> str:
    return "".join(ch for ch in value if ch not in "\r\n\x00")


def _log_failure(exc: Exception, message: str, *args: object, extra: dict[str, str]) -> None:
    if isinstance(exc, DISK_FAILURES):
        log.warning(message + " (%s: %s)", *args, type(exc).__name__, exc, extra=extra)
    else:
        log.error(message, *args, exc_info=exc, extra=extra)


