"""The one place where the RabbitMQ topology is declared and messages are framed.

Every tier calls `Topology.declare` on connect (declarations are idempotent), so the filter can
accept mail before the store has ever run, and the store can start before any filter.

    filter --publish(persistent, mandatory, confirmed)--> <prefix>.inbound (direct exchange)
        --"deliver"--> <prefix>.deliver  (quorum queue, delivery-limit, at-least-once DLX)
                           \\--dead-lettered--> <prefix>.dead (fanout) --> <prefix>.deliver.dead
        --"deliver-large"--> <prefix>.deliver.large  (the same, for messages over 1 MiB)
        --"scan"--> <prefix>.scan  (accepted while a scanner was down; scanned, then routed on)
        --"quarantine"--> <prefix>.quarantine  (infected, found by a deferred scan)

The envelope rides in a header of at most ENVELOPE_HEADER_BUDGET octets; a message for more
mailboxes than that holds (a large alias) goes as several messages, one per part of them.

Messages over LARGE_MESSAGE octets travel in a queue of their own, which the store consumes
only LARGE_PREFETCH at a time: the broker can bound a consumer's unacknowledged messages only by
count, so with one queue a run of large mail would put store_prefetch (64) times the largest
message size (25 MiB) into the store's memory at once.

Quorum queues persist every message to disk before the publisher confirm and survive broker
restarts. Past `delivery_limit` redeliveries (a poison message, or a store that crashes on it
every time) the broker moves the message to the dead-letter queue with at-least-once
semantics, which needs overflow=reject-publish. A message the store cannot decode is rejected
without requeue and lands in the same dead-letter queue at once.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

from aiormq.abc import AbstractChannel
from dramatiq.common import dq_name, xq_name
from pamqp.commands import Basic

from common.envelope import Envelope, EnvelopeError

ENVELOPE_HEADER = "x-tiermail-envelope"
# The envelope travels in the content header, which AMQP allows one frame only; RabbitMQ's
# default frame_max is 128 KiB. A message whose aliases expand past this is published as
# several messages with the same queue id, each for some of the mailboxes (Envelope.split).
ENVELOPE_HEADER_BUDGET = 64 * 1024
# On the store's dead-letter copy for mailbox owners that no longer exist: why, and which.
REASON_HEADER = "x-tiermail-reason"
MAILBOXES_HEADER = "x-tiermail-mailboxes"
# On a held message sent back for delivery (deadletters retry, quarantine release): when, in
# milliseconds since the epoch (an integer: AMQP tables carry a Python float as a 32-bit one,
# a minute off). The store counts its wait from then, not from its acceptance.
RESENT_AT_HEADER = "x-tiermail-resent-at-ms"
DELIVER_ROUTING_KEY = "deliver"
LARGE_DELIVER_ROUTING_KEY = "deliver-large"
LARGE_MESSAGE = 1024 * 1024  # octets; a larger message goes to the large delivery queue
LARGE_PREFETCH = 2  # large messages the store holds unacknowledged at once
SCAN_ROUTING_KEY = "scan"  # accepted while a scanner was down (policy `defer`), not yet scanned
QUARANTINE_ROUTING_KEY = "quarantine"  # found infected after acceptance (deferred scans)
# Bound to no queue: the broker confirms such a message (not mandatory) and drops it, once
# it reads publishes at all; common.broker.Publisher probes with it after a stall.
PROBE_ROUTING_KEY = "probe"
PERSISTENT = 2
# Scan-pending messages may wait out a long scanner outage; their consumers stop consuming
# while a scanner is down, so returns are rare, but a generous limit keeps an unlucky
# message from being dead-lettered by an outage.
SCAN_DELIVERY_LIMIT = 100


@dataclass(frozen=True)
class Topology:
    prefix: str = "tiermail"
    delivery_limit: int = 10

    @property
    def inbound_exchange(self) -> str:
        return f"{self.prefix}.inbound"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def deliver_queue(self) -> str:
        return f"{self.prefix}.deliver"

    @property
    def large_queue(self) -> str:
        return f"{self.prefix}.deliver.large"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.deliver.dead"

    @property
    def scan_queue(self) -> str:
        return f"{self.prefix}.scan"

    @property
    def quarantine_queue(self) -> str:
        return f"{self.prefix}.quarantine"

    @staticmethod
    def held_lock_queue(queue: str) -> str:
        """An exclusive, auto-deleted queue held by the one `tiermail deadletters` or
        `quarantine` command working on `queue` (services/heldmail.py): the broker allows
        one connection to declare it, and deletes it with that connection."""
        return f"{queue}.busy"

    @property
    def learn_queue(self) -> str:
        """Spam-learning jobs: declared by dramatiq (its own classic queue and `.DQ`/`.XQ`
        companions, services/store/learning.py), not by `declare` below."""
        return f"{self.prefix}.learn"

    @property
    def learn_retry_queue(self) -> str:
        """Learn jobs waiting for their retry (rspamd failed them): dramatiq's delay companion
        of the learn queue. Each learner holds up to 20 of them, unacknowledged, until due."""
        return dq_name(self.learn_queue)

    @property
    def learn_dead_queue(self) -> str:
        """Learn jobs whose retries ran out: dramatiq's dead-letter companion of the learn
        queue, where they expire after dramatiq's dead_message_ttl (a week)."""
        return xq_name(self.learn_queue)

    def deliver_queue_arguments(self) -> dict[str, Any]:
        return self._work_queue_arguments(self.delivery_limit)

    def scan_queue_arguments(self) -> dict[str, Any]:
        return self._work_queue_arguments(SCAN_DELIVERY_LIMIT)

    def _work_queue_arguments(self, delivery_limit: int) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.dead_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    async def declare(self, channel: AbstractChannel) -> None:
        await channel.exchange_declare(self.inbound_exchange, exchange_type="direct", durable=True)
        await channel.exchange_declare(self.dead_exchange, exchange_type="fanout", durable=True)
        await channel.queue_declare(
            self.deliver_queue, durable=True, arguments=self.deliver_queue_arguments()
        )
        await channel.queue_bind(self.deliver_queue, self.inbound_exchange, DELIVER_ROUTING_KEY)
        await channel.queue_declare(
            self.large_queue, durable=True, arguments=self.deliver_queue_arguments()
        )
        await channel.queue_bind(self.large_queue, self.inbound_exchange,
                                 LARGE_DELIVER_ROUTING_KEY)
        await channel.queue_declare(
            self.scan_queue, durable=True, arguments=self.scan_queue_arguments()
        )
        await channel.queue_bind(self.scan_queue, self.inbound_exchange, SCAN_ROUTING_KEY)
        await channel.queue_declare(
            self.quarantine_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.queue_bind(
            self.quarantine_queue, self.inbound_exchange, QUARANTINE_ROUTING_KEY
        )
        await channel.queue_declare(
            self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.queue_bind(self.dead_queue, self.dead_exchange, "")


def delivery_route(size: int) -> str:
    """The routing key that takes a message of `size` octets to the store."""
    return LARGE_DELIVER_ROUTING_KEY if size > LARGE_MESSAGE else DELIVER_ROUTING_KEY


def message_properties(envelope: Envelope, encoded: bytes | None = None) -> Basic.Properties:
    """The AMQP properties of a message with this envelope (`encoded`, if the caller has
    already encoded it)."""
    encoded = envelope.encode() if encoded is None else encoded
    return Basic.Properties(
        delivery_mode=PERSISTENT,
        message_id=envelope.queue_id,
        content_type="message/rfc822",
        timestamp=_utc_timestamp(envelope.received_at),
        headers={ENVELOPE_HEADER: encoded.decode()},
    )


def envelope_from_properties(properties: Basic.Properties) -> Envelope:
    """Decode the envelope of a delivered message; EnvelopeError means dead-letter it."""
    headers = properties.headers or {}
    raw = headers.get(ENVELOPE_HEADER)
    if raw is None:
        raise EnvelopeError(f"message has no {ENVELOPE_HEADER} header")
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw).decode("utf-8", errors="replace")
    if not isinstance(raw, str):
        raise EnvelopeError(f"{ENVELOPE_HEADER} header is not a string")
    envelope = Envelope.decode(raw)
    if properties.message_id and properties.message_id != envelope.queue_id:
        raise EnvelopeError("message_id does not match the envelope's queue id")
    return envelope


def _utc_timestamp(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch or time.time(), tz=datetime.UTC)
