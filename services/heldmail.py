"""Mail held in a queue for an operator to decide on: `tiermail deadletters` and
`tiermail quarantine`.

The dead-letter queue gets what the store cannot deliver: an envelope it cannot decode, a copy
for a mailbox owner that no longer exists (with an `x-tiermail-reason` header), a message
that failed `delivery_attempts` deliveries. The quarantine gets what a deferred scan found
infected (or could not scan) after the message had been accepted.

`browse` shows what is there without taking it away; `release` puts messages on the delivery
route (a dead letter once the cause is fixed, a quarantined message judged harmless), except
a dead letter of the scan queue, which was never scanned: it goes back to the scan queue;
`drop` deletes them. All three take the messages unacknowledged, one `basic.get` at a time, and
settle only those they act on; the rest return to the queue when the connection closes.
Only the messages being sent back are kept in memory with their bodies, until confirmed (at
most SETTLE_WINDOW of them, about SETTLE_BYTES): of the others only a description and a
delivery tag are kept, so a queue of thousands of 25 MB messages costs little memory.
A released message is acked only after the broker confirmed its copy on the delivery route:
a crash in between leaves it in both queues, and the store's deduplication by queue id and
recipient delivers it once (a later release of the leftover delivers nothing new). The same
holds when the broker ignores an ack (see `_settled`).

One command at a time works on a queue (it holds the queue's `.busy` lock, an exclusive
queue of the one connection that carries its work; another waits up to LOCK_WAIT, then is
refused): the messages one takes are invisible to the others until it ends, so a second
command at the same time saw part of the queue, listed `0 of 97` of 200, and a drop of a
message the first held said `not dead-lettered` and did nothing (found in review).
`tiermail status` says when a command holds a queue, whose count then leaves out what it
holds. The lock's connection asks for a HEARTBEAT-second AMQP heartbeat, so the broker lets
go of a command whose path to it died (its host down, a firewall's state lost) within
seconds: with the default heartbeat the queue stayed locked, and the messages the command
had taken held, for up to three minutes.

A held message can be in its queue more than once: a process that published it there and
was killed before acking what it came from (a filter worker quarantining, the store
dead-lettering) publishes it again when that is redelivered. Copies are told apart as the
store tells deliveries apart, by queue id and recipients (`copy_key`): all four commands take
them as one held message (listed once, with how many copies), a release sends one copy back
and removes the rest, a drop removes them all.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import math
import shlex
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp import commands as spec

from common.broker import close_connection, connect, setting_up, with_heartbeat
from common.settings import Settings
from common.topology import (
    MAILBOXES_HEADER,
    REASON_HEADER,
    RESENT_AT_HEADER,
    SCAN_DELIVERY_LIMIT,
    SCAN_ROUTING_KEY,
    Topology,
    delivery_route,
    envelope_from_properties,
)
from services.filter.protocol.scan_headers import NOT_SCANNED_HEADER, VIRUS_HEADER

# On a message sent back: which release sent it, so that the same release's later passes do
# not send it again when it failed again and is back already (the headers survive that).
RELEASE_HEADER = "x-tiermail-release"
# Headers about the message's earlier life in the queues, dropped when it is sent back.
_HISTORY_HEADERS = frozenset({REASON_HEADER, MAILBOXES_HEADER, RELEASE_HEADER, RESENT_AT_HEADER,
                              "x-death", "x-delivery-count",
                              "x-first-death-exchange", "x-first-death-queue",
                              "x-first-death-reason", "x-last-death-exchange",
                              "x-last-death-queue", "x-last-death-reason"})
# What the broker's dead-lettering reasons mean here: for the delivery queues, and for the
# scan queue (services/filter/deferred.py), whose messages were never scanned.
_BROKER_REASONS = {
    "rejected": "rejected by the store (undecodable)",
    "delivery_limit": "delivery failed too often (TIERMAIL_DELIVERY_ATTEMPTS)",
}
_SCAN_REASONS = {
    "rejected": "not scanned: rejected by the deferred scanner (undecodable, or a scanner "
                "failed on it again and again: the filter's log says which)",
    "delivery_limit": f"not scanned: given back to the scan queue {SCAN_DELIVERY_LIMIT} times",
}
_FIRST_DEATH_QUEUE = "x-first-death-queue"
# The headers a deferred scan puts on top of a message it quarantines
# (services/filter/deferred.py): the signature found, or why it was not scanned.
_VIRUS = VIRUS_HEADER.lower().encode("ascii")
_NOT_SCANNED = NOT_SCANNED_HEADER.lower().encode("ascii")
MAX_SCAN_HEAD = 8192  # octets of a quarantined message looked at for its scan headers
MAX_TAKEN = 10_000  # messages one command looks at (list, release, retry, drop); run it again
SETTLE_WINDOW = 32  # messages sent back and acked at a time (RabbitMQ's quorum_commands_soft_limit)
SETTLE_BYTES = 32 * 1024 * 1024  # a window is sent back once it holds this many body octets
RESETTLE_PASSES = 3
RESETTLE_PAUSE = 0.5  # seconds for the broker to return messages whose acks it ignored
CONNECT_TIMEOUT = 5.0
CONFIRM_TIMEOUT = 30.0
LOCK_WAIT = 15.0  # seconds a command waits for another's lock on the queue before giving up
LOCK_RETRY = 0.25
HEARTBEAT = 5  # seconds; the broker gives up a silent command after two or three


class QueueBusy(Exception):
    """Another deadletters or quarantine command is working on the queue."""


class LockNameTaken(Exception):
    """A queue that is not a command's lock has the lock's name (Topology.held_lock_queue)."""


class NoSuchQueue(Exception):
    """The queue is not on the broker: no tier has run with these settings (prefix, vhost)."""


@dataclass(frozen=True)
class HeldQueue:
    """A queue of held mail and how to tell why a message is in it."""

    queue: str
    reason: Callable[[dict[str, Any], bytes], str]  # from the AMQP headers and the body
    scan_queue: str = ""  # dead letters: what the scan queue dead-lettered was never scanned


def dead_letters(topology: Topology) -> HeldQueue:
    return HeldQueue(topology.dead_queue, functools.partial(_dead_letter_reason,
                                                            topology.scan_queue),
                     scan_queue=topology.scan_queue)


def quarantine(topology: Topology) -> HeldQueue:
    return HeldQueue(topology.quarantine_queue, _quarantine_reason)


@dataclass(frozen=True)
class HeldMessage:
    """What an operator needs to decide about one held message."""

    queue_id: str  # "" when the message carries none
    reason: str
    sender: str | None  # None: the envelope could not be decoded
    recipients: tuple[str, ...]  # its mailboxes; only those not delivered to, where known
    size: int
    received_at: datetime.datetime | None
    copies: int = 1  # how often it is in the queue (a crash's leftovers: see copy_key)
    to_be_scanned: bool = False  # a release sends it back to the scan queue (_route_back)

    def as_dict(self) -> dict[str, Any]:
        return {"queue_id": self.queue_id, "reason": self.reason, "sender": self.sender,
                "recipients": list(self.recipients), "size": self.size,
                "received_at": self.received_at.isoformat() if self.received_at else None,
                "copies": self.copies}


CopyKey = tuple[str, tuple[str, ...]]


def copy_key(held: HeldMessage) -> CopyKey | None:
    """What copies of one held message share: its queue id and recipients, by which the store
    delivers at most once. None: no queue id, never taken for a copy of another."""
    return (held.queue_id, tuple(sorted(held.recipients))) if held.queue_id else None


def grouped(messages: Iterable[HeldMessage]) -> list[HeldMessage]:
    """Each held message once, in the order first seen, with the number of its copies."""
    each: list[HeldMessage] = []
    at: dict[CopyKey, int] = {}
    for held in messages:
        key = copy_key(held)
        if key is None or key not in at:
            if key is not None:
                at[key] = len(each)
            each.append(held)
        else:
            first = each[at[key]]
            each[at[key]] = replace(first, copies=first.copies + 1)
    return each


def describe(properties: spec.Basic.Properties, body: bytes,
             reason: Callable[[dict[str, Any], bytes], str],
             scan_queue: str = "") -> HeldMessage:
    """The operator's view of one held message, from what the broker holds."""
    headers = properties.headers or {}
    sender: str | None = None
    recipients: tuple[str, ...] = ()
    received_at = properties.timestamp  # whole seconds; the envelope has the fraction
    try:
        envelope = envelope_from_properties(properties)
    except Exception:  # noqa: BLE001 - one held message the tools cannot read stops none
        pass
    else:
        sender, recipients = envelope.mail_from, envelope.mailboxes
        received_at = datetime.datetime.fromtimestamp(envelope.received_at, datetime.UTC)
    missing = _text(headers.get(MAILBOXES_HEADER))
    if missing:
        recipients = tuple(missing.split(","))
    return HeldMessage(
        queue_id=properties.message_id or "",
        reason=reason(headers, body),
        sender=sender,
        recipients=recipients,
        size=len(body),
        received_at=received_at,
        to_be_scanned=_from_the_scan_queue(headers, scan_queue),
    )


def _dead_letter_reason(scan_queue: str, headers: dict[str, Any], body: bytes) -> str:
    ours = _text(headers.get(REASON_HEADER))
    if ours:
        return ours
    broker = _text(headers.get("x-first-death-reason"))
    unscanned = _text(headers.get(_FIRST_DEATH_QUEUE)) == scan_queue
    return (_SCAN_REASONS if unscanned else _BROKER_REASONS).get(broker, broker or "unknown")


def _from_the_scan_queue(headers: dict[str, Any], scan_queue: str) -> bool:
    return bool(scan_queue) and _text(headers.get(_FIRST_DEATH_QUEUE)) == scan_queue


def _route_back(topology: Topology, message: DeliveredMessage) -> str:
    """Where a held message is sent back to: one that the scan queue dead-lettered was never
    scanned, so back to the scan queue (scanned before any mailbox sees it, as policy
    `defer` promises); anything else to the store."""
    headers = message.header.properties.headers or {}
    if _from_the_scan_queue(headers, topology.scan_queue):
        return SCAN_ROUTING_KEY
    return delivery_route(len(message.body))


def _quarantine_reason(headers: dict[str, Any], body: bytes) -> str:
    """From the scan headers on top of the message (read up to its first blank line)."""
    for line in body[:MAX_SCAN_HEAD].split(b"\n"):
        name, colon, value = line.partition(b":")
        if not colon or not line.strip():
            break
        if name.strip().lower() == _VIRUS:
            return "virus " + value.strip().decode("ascii", errors="replace")
        if name.strip().lower() == _NOT_SCANNED:
            return value.strip().decode("ascii", errors="replace")
    return "quarantined"


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else ""


def resend_properties(properties: spec.Basic.Properties,
                      release: str | None = None) -> spec.Basic.Properties:
    """The message's properties for the delivery route, without its dead-letter history,
    marked with the release that sends it and when."""
    headers = {k: v for k, v in (properties.headers or {}).items() if k not in _HISTORY_HEADERS}
    headers[RESENT_AT_HEADER] = int(time.time() * 1000)
    if release is not None:
        headers[RELEASE_HEADER] = release
    return spec.Basic.Properties(
        delivery_mode=properties.delivery_mode, message_id=properties.message_id,
        content_type=properties.content_type, timestamp=properties.timestamp, headers=headers)


async def browse(settings: Settings, where: HeldQueue, limit: int
                 ) -> tuple[list[HeldMessage], int]:
    """Up to `limit` held messages, oldest first by when the filter received them, each once
    (see copy_key), and how many there are; none is taken. The queue's own order is no guide:
    the messages that a command takes and gives back (show, release, drop; a listing too) go
    back behind the others. So every message is read, up to MAX_TAKEN; those past it are
    counted as messages."""
    async with _locked(settings, where) as connection, \
            _opened(connection, settings, where) as channel:
        read = [seen async for _, seen in _taken(channel, where, MAX_TAKEN)]
        ok = await channel.queue_declare(where.queue, passive=True)
    held = sorted(grouped(read), key=_received_order)
    return held[:limit], len(held) + int(ok.message_count or 0)


def _received_order(held: HeldMessage) -> float:
    return held.received_at.timestamp() if held.received_at is not None else math.inf


async def peek(settings: Settings, where: HeldQueue, queue_id: str) -> bytes | None:
    """The stored message (as the store would deliver it) of a held message, None when no
    held message has that queue id; nothing is taken away."""
    async with _locked(settings, where) as connection, \
            _opened(connection, settings, where) as channel:
        async for message, seen in _taken(channel, where, MAX_TAKEN):
            if seen.queue_id == queue_id:
                return bytes(message.body)
        return None


@dataclass
class Outcome:
    """What a release or drop has done, filled in as it goes: after a failure, what it did
    before."""

    settled: list[HeldMessage] = field(default_factory=list)  # each copy, as it is settled
    unread: int = 0  # messages past the first MAX_TAKEN, not looked at: run it again


async def release(settings: Settings, where: HeldQueue, chosen: Callable[[HeldMessage], bool],
                  outcome: Outcome | None = None) -> list[HeldMessage]:
    """Put the chosen held messages on the delivery route, one copy of each; returns them,
    each once. A copy is in `outcome` once its message is confirmed on the delivery route."""
    return await _settled(settings, where, chosen, resend=True, outcome=outcome or Outcome())


async def drop(settings: Settings, where: HeldQueue, chosen: Callable[[HeldMessage], bool],
               outcome: Outcome | None = None) -> list[HeldMessage]:
    """Delete the chosen held messages for good, every copy; returns them, each once.
    A copy is in `outcome` once it is acked."""
    return await _settled(settings, where, chosen, resend=False, outcome=outcome or Outcome())


async def _settled(settings: Settings, where: HeldQueue,
                   chosen: Callable[[HeldMessage], bool], *, resend: bool,
                   outcome: Outcome) -> list[HeldMessage]:
    """Act on the chosen held messages, then on any of them that came back.

    RabbitMQ 3.x can ignore acks that reach a quorum queue just before the channel closes
    (rabbitmq-server issue 10327): those messages return to the queue instead of leaving it.
    Nothing is lost that way, but the operator's release or drop would not have happened
    for them, so the queue is looked at again for the queue ids just settled. One sent back
    twice is delivered once (the store deduplicates by queue id); one that this release sent
    back and that failed again in the meantime is left alone (it carries this release's
    mark), so a retry makes one attempt per message. Of the copies of one held message
    (copy_key) only the first found is sent back, in this pass or a later one."""
    release = uuid.uuid4().hex if resend else None
    sent: set[CopyKey] = set()
    # The lock for every pass (found in review: between two, another command took the
    # queue, and a drop done said "nothing was done"), and each pass on a channel of the
    # lock's own connection, so that a command that lost its lock can do nothing more
    # (found in review: with only the lock's connection cut, a drop went on beside another
    # command and said done with 1,338 of 3,000 left).
    async with _locked(settings, where) as connection:
        first = await _one_pass(connection, settings, where, chosen, resend=resend,
                                release=release, sent=sent, outcome=outcome)
        pending = {held.queue_id for held in first if held.queue_id}
        for _ in range(RESETTLE_PASSES):
            if not pending:
                break
            await asyncio.sleep(RESETTLE_PAUSE)
            again = await _one_pass(connection, settings, where,
                                    functools.partial(_named, pending),
                                    resend=resend, release=release, sent=sent)
            pending = {held.queue_id for held in again}
    return grouped(first)


def _named(queue_ids: set[str], held: HeldMessage) -> bool:
    return held.queue_id in queue_ids


@dataclass
class _Window:
    """Messages taken to be settled together: their descriptions and delivery tags, and the
    bodies of those to send back (kept until confirmed)."""

    held: list[HeldMessage] = field(default_factory=list)
    tags: list[int] = field(default_factory=list)
    resends: list[DeliveredMessage] = field(default_factory=list)

    def full(self) -> bool:
        return (len(self.tags) >= SETTLE_WINDOW
                or sum(len(m.body) for m in self.resends) >= SETTLE_BYTES)


async def _one_pass(connection: AbstractConnection, settings: Settings, where: HeldQueue,
                    chosen: Callable[[HeldMessage], bool], *, resend: bool,
                    release: str | None = None, sent: set[CopyKey] | None = None,
                    outcome: Outcome | None = None) -> list[HeldMessage]:
    """Settle the chosen messages (every copy), adding each to the outcome's `settled`
    (returned) once it is settled; one whose copy_key is in `sent` is not sent back again,
    only acked, and always after the copy that was sent back is confirmed."""
    outcome = Outcome() if outcome is None else outcome
    settled = outcome.settled
    sent = set() if sent is None else sent
    window = _Window()
    taken = 0
    async with _opened(connection, settings, where) as channel:
        async for message, seen in _taken(channel, where, MAX_TAKEN):
            taken += 1
            if not chosen(seen) or _sent_by(message, release):
                continue  # its body is let go; it returns to the queue at the end
            window.held.append(seen)
            window.tags.append(_tag(message))
            if resend and _first_copy(seen, sent):
                window.resends.append(message)
            if window.full():
                await _settle(channel, settings.topology, where.queue, window, release, settled)
                window = _Window()
        await _settle(channel, settings.topology, where.queue, window, release, settled)
        if taken == MAX_TAKEN:
            ok = await channel.queue_declare(where.queue, passive=True)
            outcome.unread = int(ok.message_count or 0)
    return settled


def _first_copy(held: HeldMessage, sent: set[CopyKey]) -> bool:
    """Whether no copy of `held` was sent back yet; from now on one is."""
    key = copy_key(held)
    if key is None:
        return True
    if key in sent:
        return False
    sent.add(key)
    return True


def _sent_by(message: DeliveredMessage, release: str | None) -> bool:
    headers = message.header.properties.headers or {}
    return release is not None and _text(headers.get(RELEASE_HEADER)) == release


async def _settle(channel: AbstractChannel, topology: Topology, queue: str, window: _Window,
                  release: str | None, settled: list[HeldMessage]) -> None:
    await asyncio.gather(*(channel.basic_publish(
        message.body, exchange=topology.inbound_exchange,
        routing_key=_route_back(topology, message), mandatory=True,
        timeout=CONFIRM_TIMEOUT,
        properties=resend_properties(message.header.properties, release))
        for message in window.resends))
    if window.resends:  # sent back: so it is, even if an ack below does not get through
        settled.extend(window.held)
    for tag in window.tags:  # after the confirms: each one sent back is on the delivery route
        await channel.basic_ack(tag)
    if not window.resends and window.tags:
        # Only dropped (or copies of one sent back before) once the broker has the acks. An
        # ack has no answer, but a channel's methods are handled in order: the answer to a
        # later one proves them.
        await channel.queue_declare(queue, passive=True)
        settled.extend(window.held)


def _tag(message: DeliveredMessage) -> int:
    assert message.delivery_tag is not None  # basic.get-ok always carries one
    return message.delivery_tag


@asynccontextmanager
async def _opened(connection: AbstractConnection, settings: Settings,
                  where: HeldQueue) -> AsyncIterator[AbstractChannel]:
    """A channel with publisher confirms, on the connection that holds the queue's lock, on
    which the queue's messages are taken; whatever is not acked goes back to the queue when
    the channel closes (or the connection, and with it the lock)."""
    if connection.is_closed:  # (aiormq raises a bare RuntimeError for a channel of it)
        raise ConnectionError("the broker connection holding the queue's lock was lost")
    async with setting_up(connection, CONNECT_TIMEOUT):
        channel = await connection.channel()
        try:
            # Passive: a mistyped TIERMAIL_QUEUE_PREFIX must not create a topology of its own.
            await channel.queue_declare(where.queue, passive=True)
            await channel.exchange_declare(settings.topology.inbound_exchange, passive=True)
        except aiormq.ChannelNotFoundEntity:
            raise NoSuchQueue(where.queue) from None
        await channel.confirm_delivery()
    try:
        yield channel
    finally:
        if not channel.is_closed and not connection.is_closed:
            async with setting_up(connection, CONNECT_TIMEOUT):
                await channel.close()


@asynccontextmanager
async def _locked(settings: Settings,
                  where: HeldQueue) -> AsyncIterator[AbstractConnection]:
    """A connection holding the queue's lock (Topology.held_lock_queue) for as long as this
    lasts, for the command's channels; waits up to LOCK_WAIT for another command's."""
    connection = await connect(with_heartbeat(settings.amqp_url, HEARTBEAT), CONNECT_TIMEOUT)
    try:
        await _take_lock(connection, where.queue)
        yield connection
    finally:
        await close_connection(connection)


async def _take_lock(connection: AbstractConnection, queue: str) -> None:
    lock = Topology.held_lock_queue(queue)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        # (Not setting_up: it closes the connection on the refusal this waits out.)
        async with asyncio.timeout(CONNECT_TIMEOUT):
            channel = await connection.channel()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await channel.queue_declare(lock, exclusive=True, auto_delete=True,
                                            arguments={"x-queue-type": "classic"})
            return
        except aiormq.exceptions.ChannelLockedResource:
            # RabbitMQ refuses an exclusive declare of a queue that is no command's lock
            # but has its name as it refuses another command's lock, but lets it be looked
            # at (found in review: every command waited 15 s and blamed another command).
            if await _lock_seen(connection, lock) == "a queue":
                raise LockNameTaken(lock) from None
            if time.monotonic() >= deadline:
                raise QueueBusy(queue) from None
        await asyncio.sleep(LOCK_RETRY)


def delete_queue_command(settings: Settings, queue: str) -> str:
    """The rabbitmqctl command that deletes `queue` in the settings' vhost (rabbitmqctl's
    own default is `/`: another stack's, on a shared broker)."""
    path = urllib.parse.urlsplit(settings.amqp_url).path
    vhost = urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"
    return f"rabbitmqctl -p {shlex.quote(vhost)} delete_queue {shlex.quote(queue)}"


async def lock_state(connection: AbstractConnection, queue: str) -> str:
    """What is under the name of `queue`'s lock (tiermail status): `_lock_seen`; "held"
    while a deadletters or quarantine command works on `queue`."""
    return await _lock_seen(connection, Topology.held_lock_queue(queue))


async def _lock_seen(connection: AbstractConnection, lock: str) -> str:
    """What a passive declare finds under the lock's name: "held" (exclusive to another
    connection: a command's lock), "absent", or "a queue" anyone may look at (no command's
    lock, or one being deleted)."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        channel = await connection.channel()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await channel.queue_declare(lock, passive=True)
    except aiormq.exceptions.ChannelLockedResource:
        return "held"
    except aiormq.exceptions.ChannelNotFoundEntity:
        return "absent"
    await channel.close()
    return "a queue"


async def _taken(channel: AbstractChannel, where: HeldQueue, limit: int
                 ) -> AsyncIterator[tuple[DeliveredMessage, HeldMessage]]:
    """Up to `limit` messages of the queue, oldest first, taken unacknowledged."""
    for _ in range(limit):
        message = await channel.basic_get(where.queue, no_ack=False, timeout=CONNECT_TIMEOUT)
        if isinstance(message.delivery, spec.Basic.GetEmpty):
            return
        yield message, describe(message.header.properties, message.body, where.reason,
                                where.scan_queue)
