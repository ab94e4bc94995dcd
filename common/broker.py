"""Confirmed publishing to RabbitMQ, shared by every tier that publishes.

`publish` returns only after the broker has confirmed the message (it is on disk in a quorum
queue). Anything else raises PublishFailed: broker unreachable, a nack, a basic.return
(unroutable: aiormq raises on the ack that follows a return), a closed channel, or no
confirm within the timeout. The connection is re-opened on the next publish after a failure,
so a worker recovers on its own when the broker comes back.

`ready` tells, before a message is taken, whether a publish could go out now (the filter asks
at MAIL FROM, so a sender is not made to upload a message only to be told 451 at the end).
While the broker cannot be reached, a connect is tried at most every `retry_interval`
seconds; in between, `ready` and `publish` fail at once instead of each trying its own.

A broker that is reached but does not confirm (a resource alarm: RabbitMQ blocks publishing
connections while its disk or memory is low, which is where mail piles up while the store is
down for long) is `stalled` from the first confirm timeout on: `ready` and `publish` fail at
once, and one probe at a time, a message routed to no queue, waits for the broker to confirm
again. Without it every sender in turn uploaded its message and waited out the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from pamqp.commands import Basic
from yarl import URL

from common.envelope import Envelope, EnvelopeError
from common.settings import SettingsError
from common.tasks import being_cancelled, pause
from common.topology import (
    DELIVER_ROUTING_KEY,
    ENVELOPE_HEADER_BUDGET,
    PROBE_ROUTING_KEY,
    Topology,
    delivery_route,
    message_properties,
)

log = logging.getLogger(__name__)


class TopologyMismatch(SettingsError):
    """A queue exists on the broker with other arguments than these settings declare it
    with. RabbitMQ refuses the declaration every time: waiting cannot mend it, so a tier
    meeting it at start stops as with a bad setting."""


# RabbitMQ's reply: PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue
# 'tiermail.deliver' in vhost '/': received '5' but current is '10'
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for queue '([^']+)' in vhost "
                           r"'[^']*': received '?([^' ]*)'? but current is '?([^' ]*)'?")


def _topology_mismatch(exc: aiormq.exceptions.ChannelPreconditionFailed,
                       topology: Topology) -> TopologyMismatch:
    found = _INEQUIVALENT.search(str(exc))
    if found is None:
        return TopologyMismatch(f"the broker refused to declare the queues: {exc}")
    argument, queue, ours, theirs = found.groups()
    if argument == "x-delivery-limit" and queue in (topology.deliver_queue,
                                                    topology.large_queue):
        return TopologyMismatch(
            f"TIERMAIL_DELIVERY_ATTEMPTS={ours}: the queue {queue} exists with "
            f"x-delivery-limit {theirs}, and RabbitMQ cannot declare it again with another; "
            f"set {theirs}, or change the limit with a policy (docs/architecture.md)")
    return TopologyMismatch(
        f"the queue {queue} exists with {argument} {theirs} where this tiermail declares "
        f"{ours} (a queue of another version, or of a stack with the same "
        "TIERMAIL_QUEUE_PREFIX and vhost?)")


def connect_failure(exc: BaseException) -> str:
    """Why connecting to the broker failed, for an operator: aiormq says a refused vhost
    only as an unexpected frame, and a refused login as a guess."""
    if isinstance(exc, TopologyMismatch):
        return str(exc)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return ("login refused: the user name or password in TIERMAIL_AMQP_URL "
                "(rabbitmqctl list_users)")
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # aiormq keeps only the frame's name, not the broker's reason.
        return ("the broker refused the virtual host, the path of TIERMAIL_AMQP_URL: it does "
                "not exist, the user may not use it, or a connection limit of the vhost or "
                "user is reached (rabbitmqctl list_vhosts, list_permissions -p VHOST, "
                "list_vhost_limits; the broker's log names the reason)")
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError) and exc.args \
            and isinstance(exc.args[0], int) and len(exc.args) > 1:
        return str(exc.args[1])  # (errno, "Connect call failed ('127.0.0.1', 5672)")
    if isinstance(exc, StopAsyncIteration):  # aiormq's frame stream ended under a reader
        return "the broker connection closed"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class PublishFailed(Exception):
    """The broker did not confirm the message; the sender must be told to retry (451).
    `maybe_queued`: the publish went out, so the broker may hold the message all the same
    (services/filter/unconfirmed.py publishes the sender's retry under the same queue id)."""

    def __init__(self, message: str, *, maybe_queued: bool = False) -> None:
        super().__init__(message)
        self.maybe_queued = maybe_queued


# How long a close may wait for the broker's Close-Ok before the socket is cut.
CLOSE_GRACE = 5.0


class _KeptSocket(TransportFactory):
    """aiormq's own transport, kept so that a close the broker does not answer can be cut."""

    def __init__(self, url: str) -> None:
        secure = URL(url).scheme == "amqps"
        self._inner = TLSTransportFactory() if secure else TCPTransportFactory()
        self.writer: asyncio.StreamWriter | None = None

    async def create(self, url: URL, **kwargs: Any
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, self.writer = await self._inner.create(url, **kwargs)
        return reader, self.writer

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


_sockets: weakref.WeakKeyDictionary[AbstractConnection, _KeptSocket] = (
    weakref.WeakKeyDictionary())


async def connect(url: str, within: float) -> AbstractConnection:
    """Open a connection that `close_connection` can always close."""
    socket = _KeptSocket(url)
    async with asyncio.timeout(within):
        connection = await aiormq.connect(url, transport_factory=socket)
    _sockets[connection] = socket
    return connection


async def close_connection(connection: AbstractConnection, grace: float = CLOSE_GRACE
                           ) -> None:
    """Close politely if the broker answers within `grace` seconds, else cut the socket.

    A connection blocked by a resource alarm is one the broker no longer reads: whatever a
    large publish left in the socket's buffer is never taken, and aiormq's close waits for
    that buffer to drain for three heartbeat intervals (about three minutes), ignoring
    cancellation meanwhile. Nothing unconfirmed is lost by the cut: the broker requeues
    what a consumer had not acked, and a publisher's sender was never told 250.
    A grace of 0 cuts at once, without a word.
    """
    closing = asyncio.ensure_future(connection.close())
    try:
        await asyncio.wait({closing}, timeout=grace)
    finally:
        if not closing.done() and grace > 0:
            log.warning("the broker did not answer a close within %g s (a connection blocked "
                        "by a resource alarm?): cutting it", grace,
                        extra={"event": "amqp-close-cut"})
        if not closing.done():
            socket = _sockets.get(connection)
            if socket is not None:
                socket.abort()
    try:
        await closing
    except Exception:
        log.debug("the broker connection closed with an error", exc_info=True)


async def open_channel(
    url: str, topology: Topology, connect_timeout: float, confirms: bool
) -> tuple[AbstractConnection, AbstractChannel]:
    """A connection and a channel with the topology declared, each step within
    `connect_timeout`: aiormq waits for Channel.OpenOk and the declares' answers without a
    deadline, so a broker (or a path to it) that went quiet right after the handshake held
    the caller until the heartbeat gave up, minutes later; the publisher held its connect
    lock meanwhile, and every MAIL FROM waited behind it."""
    connection = await connect(url, connect_timeout)
    async with setting_up(connection, connect_timeout):
        channel = await connection.channel(publisher_confirms=confirms, on_return_raises=True)
        try:
            await topology.declare(channel)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _topology_mismatch(exc, topology) from None
    return connection, channel


@contextlib.asynccontextmanager
async def setting_up(connection: AbstractConnection, within: float) -> AsyncIterator[None]:
    """The steps that set up a new connection (channels, declares: aiormq waits for their
    answers without a deadline), within `within` seconds in all: TimeoutError after it.
    The connection is closed when they fail; cut at once when the broker did not answer,
    since it would not answer a polite close either."""
    try:
        async with asyncio.timeout(within):
            yield
    except TimeoutError:
        await close_connection(connection, grace=0)
        raise
    except BaseException:
        await close_connection(connection)
        raise


def connection_blocked(connection: AbstractConnection) -> bool:
    """Whether the broker has blocked `connection` (Connection.Blocked, sent while a
    resource alarm holds) and not unblocked it. aiormq keeps that in a private event; an
    aiormq without it counts every connection as blocked (waited on, never given up)."""
    unblocked = getattr(connection, "_Connection__connection_unblocked", None)
    return not isinstance(unblocked, asyncio.Event) or not unblocked.is_set()


def with_heartbeat(url: str, seconds: int) -> str:
    """`url` asking for an AMQP heartbeat of at most `seconds` (aiormq reads `heartbeat=`
    from the URL; it gives a connection up after about three intervals of silence)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    asked = next((value for key, value in query if key == "heartbeat"), "")
    if asked.isdigit() and 0 < int(asked) <= seconds:
        return url
    query = [(key, value) for key, value in query if key != "heartbeat"]
    query.append(("heartbeat", str(seconds)))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class Publisher:
    def __init__(
        self,
        url: str,
        topology: Topology,
        confirm_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._topology = topology
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._retry_interval = retry_interval
        self._clock = clock
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._connect_lock = asyncio.Lock()
        self._last_failure: tuple[float, str] | None = None  # when, and why, if unreachable
        self._probe: asyncio.Task[None] | None = None  # while stalled: waits for a confirm
        self._probes_sent = 0

    async def publish(self, envelope: Envelope, body: bytes,
                      routing_key: str = DELIVER_ROUTING_KEY,
                      headers: Mapping[str, Any] | None = None) -> None:
        """Publish and wait for the broker's confirm. DELIVER_ROUTING_KEY means "to the
        store": the body's size picks the delivery queue (common.topology.delivery_route).
        `headers`: AMQP headers to carry on beside the envelope's (a message taken from a
        queue and published again keeps RESENT_AT_HEADER).

        An envelope too large for one header frame goes as several messages (see
        Envelope.split); this returns when the broker has confirmed all of them.
        """
        if self.stalled:
            raise PublishFailed("the broker is not confirming publishes (a resource alarm?)")
        if routing_key == DELIVER_ROUTING_KEY:
            routing_key = delivery_route(len(body))
        # Before the channel: an envelope that cannot be encoded is this message's failure,
        # not a reason to drop the connection that other sessions' publishes share.
        all_properties = _properties_of_parts(envelope)
        if headers:
            for properties in all_properties:
                properties.headers = {**(properties.headers or {}), **headers}
        channel = await self._ready_channel()
        try:
            # aiormq's Channel takes `wait`; its abstract interface does not declare it.
            basic_publish = cast(aiormq.Channel, channel).basic_publish
            sends = [basic_publish(
                body,
                exchange=self._topology.inbound_exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=self._confirm_timeout,
                wait=False,  # no need to wait for the socket write: the confirm follows it
            ) for properties in all_properties]
            await (sends[0] if len(sends) == 1 else asyncio.gather(*sends))
        except asyncio.CancelledError as exc:
            if being_cancelled():
                raise
            _forget_frames(exc)
            # aiormq cancels the confirms still awaited when the connection closes (the
            # broker went away, or another session's failed publish discarded it): this
            # message's outcome is unknown, like a lost confirm's, not a cancelled session.
            raise PublishFailed("the broker connection closed before the confirm",
                                maybe_queued=True) from None
        except TimeoutError as exc:
            _forget_frames(exc)
            self._start_probe()
            raise PublishFailed(f"no confirm within {self._confirm_timeout:g} s",
                                maybe_queued=True) from exc
        except aiormq.exceptions.DeliveryError as exc:
            _forget_frames(exc)
            # A nack (a queue over its length limit with reject-publish) or a return (no
            # queue bound): the broker refused this message and keeps the channel, which
            # the other sessions' publishes share; none of a one-part message is queued.
            raise PublishFailed(f"refused by the broker: {_refusal(exc)}",
                                maybe_queued=len(sends) > 1) from exc
        except Exception as exc:
            _forget_frames(exc)
            await self._discard(channel)
            raise PublishFailed(f"{type(exc).__name__}: {exc}", maybe_queued=True) from exc

    @property
    def stalled(self) -> bool:
        """Whether a publish went unconfirmed and the broker has not confirmed one since."""
        return self._probe is not None

    def _start_probe(self) -> None:
        if self._probe is None:
            log.warning("the broker did not confirm within %g s: refusing mail until it "
                        "confirms again", self._confirm_timeout,
                        extra={"event": "amqp-stalled"})
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_confirmed())

    async def _probe_until_confirmed(self) -> None:
        """Publish messages routed to no queue until the broker confirms two in a row on one
        connection. A connection the broker has blocked (Connection.Blocked: a resource
        alarm) is kept while it waits (a probe not confirmed in time stays queued behind the
        others): it is unblocked, and the probes confirmed, the moment the alarm clears. Two,
        because RabbitMQ reads and confirms the first publish of a connection opened during
        an alarm before it blocks it; one probe on a new connection (after a broker restart,
        a closed channel) said "confirms again" while the alarm held, and the next sender
        waited out the confirm timeout again. A connection that was not blocked but
        confirmed nothing in time is given up (a dead path, a hung broker): kept, the worker
        refused mail until aiormq's heartbeat gave it up, three minutes later, though a new
        connection would have worked (found in review)."""
        try:
            while True:
                channel = None
                try:
                    await self._reconnect_unless_blocked()
                    channel = await self._ready_channel()
                    for _ in range(2):
                        self._probes_sent += 1
                        await cast(aiormq.Channel, channel).basic_publish(
                            b"", exchange=self._topology.inbound_exchange,
                            routing_key=PROBE_ROUTING_KEY, mandatory=False,
                            timeout=self._confirm_timeout)
                    break
                except asyncio.CancelledError:
                    raise
                except TimeoutError:
                    # Blocked: closing and reopening the connection would leave one blocked
                    # connection behind per attempt, and a new connection's first publish
                    # is confirmed whatever the alarm. (Not blocked: the next round's
                    # _reconnect_unless_blocked gives it up.)
                    log.debug("probe not confirmed in time")
                except Exception:
                    log.debug("probe not confirmed", exc_info=True)
                    if channel is not None:
                        await self._discard(channel)
                    await pause(self._retry_interval)
        finally:
            if self._probe is asyncio.current_task():
                self._probe = None
        log.info("the broker confirms again: taking mail", extra={"event": "amqp-confirming"})

    async def _reconnect_unless_blocked(self) -> None:
        """After a publish went unconfirmed: give up the connection unless the broker has
        blocked it (then the alarm's end unblocks it)."""
        connection = self._connection
        if connection is None or connection_blocked(connection):
            return
        log.warning("the broker confirmed nothing within %g s on a connection it has not "
                    "blocked (a dead path, a hung broker?): connecting again",
                    self._confirm_timeout, extra={"event": "amqp-reconnect"})
        if self._connection is connection:
            self._connection, self._channel = None, None
            await close_connection(connection, grace=0)

    async def ensure_connected(self) -> None:
        await self._ready_channel()

    async def ready(self) -> bool:
        """Whether a publish could go out now: connected, or connected by this call (at most
        one attempt per retry_interval while the broker is unreachable)."""
        if self.stalled:
            return False
        if self.connected:
            return True
        try:
            await self._ready_channel()
        except PublishFailed:
            return False
        return True

    @property
    def connected(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    @property
    def unreachable_because(self) -> str:
        """Why the last attempt to connect failed ("" after a success)."""
        return self._last_failure[1] if self._last_failure is not None else ""

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        await self._close_connection()

    async def _close_connection(self) -> None:
        if self._connection is not None:
            connection, self._connection, self._channel = self._connection, None, None
            await close_connection(connection)
            del connection
            # aiormq's tasks of a lost connection end in reference cycles (a cancelled
            # writer's traceback) that hold the frames it was writing, up to a whole 25 MB
            # message; cycles are collected only as container objects are allocated, which
            # large bytes are not, so a filter whose broker link broke mid-publish again and
            # again grew by megabytes per break. Connections are lost rarely: collect now.
            gc.collect()

    async def _ready_channel(self) -> AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._connect_lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            if self._last_failure is not None:
                failed_at, reason = self._last_failure
                if self._clock() - failed_at < self._retry_interval:
                    raise PublishFailed(f"broker unreachable: {reason}")
            await self._close_connection()
            try:
                self._connection, self._channel = await open_channel(
                    self._url, self._topology, self._connect_timeout, confirms=True
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = connect_failure(exc)
                self._last_failure = (self._clock(), reason)
                raise PublishFailed(f"broker unreachable: {reason}") from exc
            self._last_failure = None
            log.info("connected to broker", extra={"event": "amqp-connected"})
            return self._channel

    async def _discard(self, channel: AbstractChannel) -> None:
        # A failed publish may leave the channel in an unknown state; start afresh next time.
        if self._channel is channel:
            await self._close_connection()


def _forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of a failed publish's exceptions (their causes, contexts, and
    exceptions carried in their args). aiormq keeps the exception a dead connection ended
    the publish with (in the confirm's future, and its closing state), and its traceback
    holds aiormq's publish frame with the message body and its frames: about 30 MB kept
    per broker connection lost mid-publish of a 15 MB message, a filter at 575 MB after 30
    (found in review). The messages of these exceptions say all the log needs."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending.extend(e for e in (current.__cause__, current.__context__, *current.args)
                       if isinstance(e, BaseException))


def _refusal(exc: aiormq.exceptions.DeliveryError) -> str:
    frame = exc.frame
    if isinstance(frame, Basic.Return):
        return f"returned: {frame.reply_text}"
    return "nacked (a queue's length limit?)" if isinstance(frame, Basic.Nack) else str(exc)


def _properties_of_parts(envelope: Envelope) -> list[Basic.Properties]:
    encoded = envelope.encode()
    if len(encoded) <= ENVELOPE_HEADER_BUDGET:
        return [message_properties(envelope, encoded)]
    try:
        parts = envelope.split(ENVELOPE_HEADER_BUDGET)
    except EnvelopeError as exc:
        raise PublishFailed(str(exc)) from exc
    log.info("published as %d messages: %d mailboxes are more than one envelope header holds",
             len(parts), len(envelope.mailboxes), extra={"queue_id": envelope.queue_id})
    return [message_properties(part) for part in parts]
