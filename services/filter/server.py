"""The SMTP listener: a hardened aiosmtpd SMTP subclass and the sockets of one worker.

Hardening over aiosmtpd 1.4.6 (see docs: design notes section 1):
- every 2xx/4xx/5xx reply carries an enhanced status code (`replies.enhance` in `push`);
- the idle timer is re-armed with the data timeout while DATA lines arrive, so a slow but
  alive upload is not cut off and a stalled one is (RFC 5321 4.5.3.2.5);
- at most `smtp_max_connections` sessions per worker, and `smtp_max_connections_per_ip` of
  them from one client address; the next one gets 421 and is closed;
- a client over its connection rate (counted in Redis across all workers, common/ratelimit.py)
  gets 421 instead of the greeting and is closed;
- per-connection command size limits (aiosmtpd keeps them in a class-level dict that every
  EHLO grows and every new connection clears);
- AUTH is neither advertised nor accepted (submission comes with a later issue);
- MAIL and RCPT parameters by RFC 5321's grammar (an unknown one 555, a malformed one 501),
  a MAIL parameter given twice 501, a non-ASCII address without SMTPUTF8 550/553 5.6.7
  (RFC 6531 3.5), BODY=BINARYMIME 555 (RFC 3030: not offered), a malformed sender 553 5.1.7,
  a MAIL inside a transaction 503 whatever its path;
- a non-ASCII HELO/EHLO argument 501 (RFC 6531 3.7.1, RFC 5321 4.1.2);
- a failed DATA transaction is always reset, so the client can start over.

Sockets are opened with `loop.create_server(..., reuse_port=True)`, so several worker
processes can share one port; nothing here is local state another worker would need.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, AnyStr, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, Envelope, syntax

from common.budget import MemoryBudget, OpenCounts
from common.listen import format_address
from common.ratelimit import UNLIMITED, Network, RateLimits, ip_subject, parse_networks
from common.settings import Settings
from common.tls import refusal_alerts
from services.filter.convert import peer_ip
from services.filter.hooks import BoundHooks, hook_dir, hooks_hidden
from services.filter.protocol import replies
from services.filter.protocol.address import (
    is_utf8,
    parse_legacy_sender,
    parse_path,
    parse_simple_path,
)
from services.filter.protocol.data import DataError, DataReceiver, DataResult
from services.filter.protocol.parameters import (
    MAIL_SYNTAX,
    RCPT_SYNTAX,
    parse_parameters,
    repeated_keyword,
)
from services.filter.rules import Rule
from services.filter.session import (
    FilterSession,
    MessagePublisher,
    RecipientDirectory,
    SessionPolicy,
)
from services.filter.stall import PublishWatch
from services.filter.stats import WorkerStats
from services.filter.unconfirmed import UnconfirmedLedger

log = logging.getLogger(__name__)

GREETING_IDENT = "ESMTP tiermail"
TIMEOUT_REPLY = "421 4.4.2 Timeout exceeded, closing connection"
# From the end of DATA to our reply the scanners may take TIERMAIL_SCAN_TIMEOUT (each call has
# its own timeout; they run concurrently) and the publish its deadline; this is for the rest
# (the local rules, the unconfirmed-publish ledger's Redis write), so that a timed-out scan or
# publish still gets its own reply instead of the session being cut with 421.
PROCESSING_SLACK = 10.0
# A worker with this share of its connection limit open is under stress: clients get
# ServerLimits.stress_timeout to send their next command, line or data line (as Postfix's
# smtpd under stress). It ends once the open connections are below STRESS_ENDS_AT.
STRESS_AT, STRESS_ENDS_AT = 0.8, 0.6
# aiosmtpd hangs up after BOGUS_LIMIT (5) unknown commands in a connection, never forgiven and
# whatever TIERMAIL_SMTP_MAX_ERRORS says. Their 500 replies count against that limit like every
# other client error (FilterSMTP.push), which a queued message forgives, so aiosmtpd's own
# count is lifted (it reads the constant when a connection starts).
aiosmtpd.smtp.BOGUS_LIMIT = 2**62


class HungUp(ConnectionResetError):
    """We ended the connection (421) after the reply in progress."""


@dataclass(frozen=True)
class ServerLimits:
    hostname: str
    max_message_size: int
    max_line_length: int  # RFC 5321 4.5.3.1.6: octets per line including CRLF
    max_connections: int
    max_connections_per_ip: int  # 0: no limit
    exempt: tuple[Network, ...]  # client networks the per-IP limit does not count
    command_timeout: float  # RFC 5321 4.5.3.2.7
    data_timeout: float  # RFC 5321 4.5.3.2.5
    stress_timeout: float  # both above while the worker is under stress; 0: never
    processing_timeout: float  # end of DATA until our reply (scan + publish)
    max_errors: int = 20  # client errors before we hang up, like Postfix's hard error limit
    data_memory: int = 1024 * 1024 * 1024  # message octets held at once, all sessions

    @classmethod
    def from_settings(cls, settings: Settings, publish_deadline: float) -> ServerLimits:
        return cls(
            hostname=settings.hostname,
            max_message_size=settings.max_message_size,
            max_line_length=settings.max_line_length,
            max_connections=settings.smtp_max_connections,
            max_connections_per_ip=settings.smtp_max_connections_per_ip,
            exempt=parse_networks(settings.rate_limit_exempt),
            command_timeout=settings.smtp_command_timeout,
            data_timeout=settings.smtp_data_timeout,
            stress_timeout=settings.smtp_stress_timeout,
            processing_timeout=settings.scan_timeout + publish_deadline + PROCESSING_SLACK,
            max_errors=settings.smtp_max_errors,
            data_memory=settings.smtp_data_memory,
        )


def format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_address(str(peer[0]), peer[1])
    return str(peer or "")


def _send_line(transport: asyncio.BaseTransport, line: str) -> None:
    """Write one reply straight to a transport (outside aiosmtpd's own writer).

    uvloop's transports do not subclass asyncio.WriteTransport, hence the cast.
    """
    cast(asyncio.WriteTransport, transport).write(line.encode() + b"\r\n")


class ConnectionRegistry:
    """The open sessions of one worker, bounded in all and per client address (the address
    as the rate limits count it: IPv6 per /64, exempt networks not at all)."""

    def __init__(self, limits: ServerLimits, stats: WorkerStats) -> None:
        self._limit = limits.max_connections
        self._stress_timeout = limits.stress_timeout
        self._stress_at = max(1, math.ceil(self._limit * STRESS_AT))
        self._stress_ends_at = math.ceil(self._limit * STRESS_ENDS_AT)
        self.stressed = False
        self._per_client_limit = limits.max_connections_per_ip
        self._exempt = limits.exempt
        self._stats = stats
        self._open: dict[FilterSMTP, str | None] = {}  # connection -> its client's subject
        self._per_client = OpenCounts(self._per_client_limit)
        self._empty = asyncio.Event()
        self._empty.set()

    def admit(self, connection: FilterSMTP, client_ip: str) -> str | None:
        """None when admitted, else the reply to refuse it with."""
        if len(self._open) >= self._limit:
            self._stats.refused_connections += 1
            return replies.TOO_MANY_CONNECTIONS
        subject = ip_subject(client_ip, self._exempt) if self._per_client_limit else None
        if subject is not None and not self._per_client.take(subject):
            self._stats.refused_client_connections += 1
            return replies.TOO_MANY_FROM_CLIENT
        self._open[connection] = subject
        self._empty.clear()
        self._stats.connections += 1
        self._stats.active = len(self._open)
        if (not self.stressed and self._stress_timeout
                and len(self._open) >= self._stress_at):
            self._stress_begins()
        return None

    def _stress_begins(self) -> None:
        """Many connections open at once: slow clients (slowloris: a byte now and then,
        which keeps every timer alive) must not hold them for minutes each."""
        self.stressed = True
        self._stats.stressed_since = time.time()
        self._stats.stress_periods += 1
        log.warning("%d of %d connections open: clients get %g s for each command or line "
                    "until fewer than %d are", len(self._open), self._limit,
                    self._stress_timeout, self._stress_ends_at, extra={"event": "stress"})
        for connection in self._open:
            connection.stress_began()

    def release(self, connection: FilterSMTP) -> None:
        subject = self._open.pop(connection, None)
        if subject is not None:
            self._per_client.give_back(subject)
        self._stats.active = len(self._open)
        if self.stressed and len(self._open) < self._stress_ends_at:
            self.stressed = False
            self._stats.stressed_since = 0.0
            log.info("%d of %d connections open: timeouts back to normal", len(self._open),
                     self._limit, extra={"event": "stress"})
            for other in self._open:
                other.stress_ended()
        if not self._open:
            self._empty.set()

    def __iter__(self) -> Any:
        return iter(list(self._open))

    async def wait_empty(self, grace: float) -> bool:
        try:
            async with asyncio.timeout(grace):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True


class FilterSMTP(SMTP):
    """One SMTP connection. aiosmtpd does the protocol; this class enforces our limits."""

    # RFC 5321 4.5.3.1.4: 512 octets with the CRLF. aiosmtpd compares the line without it,
    # so its 512 took lines of 513 and 514 octets (found in review).
    command_size_limit = 512 - len(b"\r\n")

    def __dir__(self) -> list[str]:
        return hook_dir(super().__dir__)  # see services/filter/hooks.py

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if not arg:
            return "", ""  # aiosmtpd answers its 501 syntax reply
        if self._reading_mail and self.envelope is not None and self.envelope.mail_from:
            return arg, ""  # not read: aiosmtpd answers 503 nested MAIL, whatever the path
        parsed = parse_simple_path(arg) or parse_path(arg, sender=self._reading_mail)
        if parsed is None and self._reading_mail:
            parsed = parse_legacy_sender(arg)
        if parsed is None:
            return None, None
        address, rest = parsed
        if not is_utf8(address):
            return None, None  # 553 5.1.7/5.1.3: permanent, not a 451 for every retry
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def __init__(
        self,
        handler: FilterSession,
        *,
        limits: ServerLimits,
        registry: ConnectionRegistry,
        stats: WorkerStats,
        tls_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
        data_memory: MemoryBudget,
        rate_limits: RateLimits = UNLIMITED,
    ) -> None:
        # Both are read by SMTP.__init__, so they are set first, on the instance.
        # +1: aiosmtpd's limit for what it reads (DATA lines are DataReceiver's, where a
        # transparency dot is not counted: RFC 5321 4.5.3.1.6).
        self.line_length_limit = limits.max_line_length + 1
        self._max_line_length = limits.max_line_length
        # The class's, not self's: a lambda holding self made each connection a reference
        # cycle, freed only by a garbage collection (found in review).
        self.command_size_limits = collections.defaultdict(lambda: FilterSMTP.command_size_limit)
        with hooks_hidden():  # aiosmtpd's tables of our hooks: services/filter/hooks.py
            super().__init__(
                handler,
                data_size_limit=limits.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=limits.hostname,
                ident=GREETING_IDENT,
                tls_context=tls_context,
                timeout=limits.command_timeout,
                auth_exclude_mechanism=["LOGIN", "PLAIN"],
                loop=loop,
            )
        # aiosmtpd declares dicts; it only reads them (get, in, items).
        self._smtp_methods = BoundHooks(self, "smtp_")  # type: ignore[assignment]
        self._handle_hooks = BoundHooks(handler, "handle_")  # type: ignore[assignment]
        self.handler = handler
        self._limits = limits
        self._registry = registry
        self._data_memory = data_memory
        self._stats = stats
        self._rate_limits = rate_limits
        self._admitted = False
        self._refused = False
        self._lost = False
        self._receiving_data = False
        self._busy = False
        self._closing = False
        self._eof_pending = False  # the client closed its side; its commands still answered
        self._helo_reply = False
        self._reading_mail = False  # inside aiosmtpd's MAIL: the path is the sender's
        self._recipients_asked: Envelope | None = None  # the transaction a RCPT came in
        self._client_errors = 0
        self._replies_in_turn = 0  # replies since the session last gave up the loop
        self._deadline = 0.0  # of the idle timer (_reset_timeout), by the loop's clock
        self._unstressed_deadline = 0.0  # what it would be without stress

    # Connection lifetime

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first_call = self._original_transport is None  # not the post-STARTTLS call
        if first_call:
            peer = transport.get_extra_info("peername")
            refusal = self._registry.admit(self, peer_ip(peer))
            if refusal is not None:
                self._refuse(transport, refusal)
                return
            self._admitted = True
            self.handler.peer = format_peer(peer)
            # Logging costs CPU per line: the opening is at DEBUG, the end at INFO only when the
            # connection queued nothing (below).
            log.debug("connection opened", extra=self.handler.log_extra())
        super().connection_made(transport)

    def _refuse(self, transport: asyncio.BaseTransport, reply: str) -> None:
        self._refused = True
        peer = format_peer(transport.get_extra_info("peername"))
        log.warning("refusing connection: %s", reply, extra={"peer": peer})
        _send_line(transport, reply)
        transport.close()

    async def _handle_client(self) -> None:
        try:
            await self._check_rate_and_converse()
        except HungUp:
            pass  # logged where it was decided
        except ConnectionError as exc:
            # The client reset the connection while a reply was being sent, and the task
            # was not cancelled by connection_lost as it should have been: the Redis client
            # of the connection rate check sometimes lets a cancellation go (a reset right
            # after connecting hit it nearly every time). aiosmtpd lets the error out of the
            # task, where nobody retrieves it: a traceback logged as an asyncio error for
            # each such connection. The connection is gone and released already.
            log.info("connection lost: %s", type(exc).__name__,
                     extra=self.handler.log_extra())

    async def _check_rate_and_converse(self) -> None:
        # The connection rate needs Redis, so it is checked here, before the greeting, rather
        # than in the synchronous connection_made. Refused: 421 instead of 220, then close.
        try:
            exceeded = await self._rate_limits.connection(
                peer_ip(self.session.peer if self.session else None), self.handler.log_extra())
        except Exception:  # a bug, not Redis (the limiter fails open on those): greet anyway
            log.exception("connection rate check failed", extra=self.handler.log_extra())
            exceeded = None
        if exceeded is not None:
            log.info("connection refused: rate limit %s", exceeded.value,
                     extra=self.handler.log_extra())
            await self.push(replies.RATE_CONNECTIONS)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            asyncio.StreamReaderProtocol.connection_lost(self, error)
            self._note_closed_error_seen()
            return
        if self._lost:
            return
        self._lost = True
        try:
            super().connection_lost(error)
            self._note_closed_error_seen()
            task = self._handler_coroutine
            if task is not None:
                task.add_done_callback(self._release_references)
        finally:
            if self._admitted:
                self._admitted = False
                self._registry.release(self)
                # A connection that queued mail is already in the log by its "queued" lines;
                # one that queued nothing (a probe, a refused sender) gets its INFO line here.
                level = logging.DEBUG if self.handler.queued else logging.INFO
                log.log(level, "connection closed, %d message(s) queued", self.handler.queued,
                        extra=self.handler.log_extra())

    def _note_closed_error_seen(self) -> None:
        """The stream protocol keeps the error that ended the connection (a reset) in a
        future nobody awaits, and retrieves it only in its __del__. A session still in a
        reference cycle is freed by the garbage collector, which finalizes the cycle's objects
        in no set order: the future first logged 'Future exception was never retrieved' with
        a traceback. The error is in our log already (the closing line)."""
        closed: asyncio.Future[None] = self._closed  # type: ignore[attr-defined]
        if closed.done() and not closed.cancelled():
            closed.exception()

    def _release_references(self, _: object) -> None:
        """Once the connection is gone and its task has ended, nothing runs for it any more:
        drop the references that make it a reference cycle (aiosmtpd keeps tables of our own
        bound methods; the ended task holds its CancelledError's frames, which hold us), so
        it is freed at once instead of waiting for, and lengthening, a garbage collection."""
        self._smtp_methods.clear()
        self._auth_methods.clear()
        self._handle_hooks.clear()
        self._handler_coroutine = None
        # asyncio's StreamReaderProtocol keeps aiosmtpd's bound connect callback, and the
        # StreamWriter refers back to us as its protocol.
        self._client_connected_cb = None
        self._writer = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._receiving_data and (not self._registry.stressed or b"\n" in data):
            # aiosmtpd resets its idle timer per command only; keep a live upload alive
            # (under stress only by whole lines: a byte now and then is a slowloris).
            self._reset_timeout(self._limits.data_timeout)
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if not self._refused and self._owes_answers():
            # A client that sends its whole session and then closes its sending side
            # (`printf ... | nc -N`, scripts, some MTAs) still reads our replies: cancelling
            # now would cut a publish short and leave a delivered message unanswered (it is
            # sent again). Its commands are answered first (`_end_after_eof`).
            self._eof_pending = True
            self.handler.client_closed = True
            return True  # keep the half-closed connection open for the replies
        if not self._refused:
            super().eof_received()  # cancels the session task
        # aiosmtpd keeps a half-closed connection open; when the task was cancelled before
        # it started (EOF right after connect) nothing ever closed it and it held a
        # connection slot until the idle timeout. False: the transport closes itself.
        return False

    def _owes_answers(self) -> bool:
        """Whether commands received before the client's EOF are still to be answered: a
        message being processed, DATA or a whole command line waiting to be read. Not over
        TLS, which has no half-close."""
        if self.session is None or self.session.ssl is not None:
            return False
        return self._busy or self._unanswered_input()

    def _unanswered_input(self) -> bool:
        buffered = self._reader._buffer  # type: ignore[attr-defined]  # as aiosmtpd reads it
        return bool(buffered) if self._receiving_data else b"\n" in buffered

    def _end_after_eof(self) -> None:
        """After a reply, once the client's EOF is all that is left: end as aiosmtpd ends a
        connection at EOF (the session task is cancelled, the connection closed)."""
        if self._eof_pending and not self._unanswered_input() and not self._receiving_data:
            task = self._handler_coroutine
            if task is not None:
                task.cancel()

    def stress_began(self) -> None:
        """The worker is under stress: a client we are waiting for gets the stress timeout
        from now, if that is sooner."""
        if not self._busy:
            unstressed = self._unstressed_deadline  # the client's own time, for stress_ended
            self._reset_timeout(self._limits.data_timeout if self._receiving_data else None)
            self._unstressed_deadline = unstressed

    def stress_ended(self) -> None:
        """The worker is no longer under stress: a client we are waiting for gets back the
        time that stress took from its timer (a slow client would else be cut by the
        stress timeout although the stress had ended)."""
        if not self._busy and self._unstressed_deadline > self._deadline:
            self._deadline = self._unstressed_deadline  # the timer re-arms when it fires

    def _reset_timeout(self, duration: float | None = None, *, ours: bool = False) -> None:
        """aiosmtpd's idle timer, which it cancels and arms anew after every command (and we
        for every chunk of DATA): here one timer stays armed while the new deadline is no
        sooner than it; when it fires early it is armed again for the rest. `ours`: the
        time is for our own processing, not for the client, and stress does not shorten
        it."""
        duration = duration or self._timeout_duration
        now = self.loop.time()
        self._unstressed_deadline = now + duration
        if not ours and self._registry.stressed:
            duration = min(duration, self._limits.stress_timeout)
        self._deadline = now + duration
        timer = self._timeout_handle
        if timer is not None and not timer.cancelled() and timer.when() <= self._deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        if self._deadline - self.loop.time() > _TIMER_SLACK:  # moved on since it was armed
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        log.info("timeout, closing", extra=self.handler.log_extra(self.handler.current_queue_id))
        if self.transport is not None and not self.transport.is_closing():
            _send_line(self.transport, TIMEOUT_REPLY)
        super()._timeout_cb()

    def request_close(self) -> None:
        """Shutdown: close now when idle, else right after the reply in progress, or after
        the message being uploaded has its reply (cut, the upload is lost and the client,
        still sending, reads a reset instead of a 421; the grace period bounds the wait)."""
        if self._busy or self._receiving_data:
            self._closing = True
            return
        if self.transport is not None and not self.transport.is_closing():
            _send_line(self.transport, replies.SHUTTING_DOWN)
            self.transport.close()

    # Replies

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            if status == replies.MALFORMED_ADDRESS and self._reading_mail:
                status = replies.BAD_SENDER_SYNTAX
            # RFC 2034 section 4: no enhanced codes in the replies to HELO/EHLO.
            if not (self._helo_reply and status.startswith("250")):
                status = replies.enhance(status)
            self._stats.count_reply(status)
            if log.isEnabledFor(logging.DEBUG):  # the context costs more than the line
                log.debug("<< %s", status,
                          extra=self.handler.log_extra(self.handler.current_queue_id))
        await self._write(status)
        if isinstance(status, str) and replies.is_client_error(status):
            await self._count_client_error()
        self._end_after_eof()

    async def _write(self, reply: AnyStr) -> None:
        """aiosmtpd's push without its chain of coroutines: the reply goes to the transport,
        and only when some of it is left unsent (a client that does not read: flow control)
        or the connection is closing does it wait for the writer's drain, which aiosmtpd
        awaited after every reply (seven replies per one-message connection, three
        coroutines deep each, were a measurable share of the filter's CPU)."""
        if isinstance(reply, str):
            data = reply.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        else:
            data = reply
        writer = self._writer
        writer.write(data + b"\r\n")
        transport = writer.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            await writer.drain()
        self._replies_in_turn += 1
        if self._replies_in_turn >= REPLIES_PER_TURN:
            # aiosmtpd reads a command already buffered without giving up the loop: 200,000
            # pipelined NOOPs held the worker for over a second (found in review).
            self._replies_in_turn = 0
            await asyncio.sleep(0)

    async def _count_client_error(self) -> None:
        self._client_errors += 1
        if self._client_errors < self._limits.max_errors or self.transport is None:
            return
        log.info("too many errors, hanging up",
                 extra=self.handler.log_extra(self.handler.current_queue_id))
        await self._hang_up(replies.TOO_MANY_ERRORS)

    async def _hang_up(self, reply: str) -> None:
        """Our last words, then the end of the session: HungUp ends its task, so nothing the
        client pipelined behind runs. Returning after the close, aiosmtpd went on with the
        commands already read (its loop ends only once connection_lost comes): one waiting
        for Redis then wrote its reply to the closed transport, an 'internal error' with a
        traceback in the log (found in review)."""
        await self._write(reply)
        if self.transport is not None:
            self.transport.close()
        raise HungUp(reply)

    # Commands

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and not hostname.isascii():
            await self.push(replies.NON_ASCII_HELO.format(command="HELO"))
            return
        self._helo_reply = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._helo_reply = False

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        """aiosmtpd's EHLO, with our keywords, in one write. aiosmtpd would push each line
        separately and, for a handler with an EHLO hook, run inspect.signature on it for
        every new connection."""
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        if not hostname.isascii():
            await self.push(replies.NON_ASCII_HELO.format(command="EHLO"))
            return
        assert self.session is not None
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        # RFC 1870 and RFC 6531 each allow a MAIL FROM parameter more (aiosmtpd's figures).
        self.command_size_limits.clear()
        self.command_size_limits["MAIL"] += 26 + 10
        await self._push_lines(replies.ehlo_lines(self.hostname, self._ehlo_keywords()))

    def _ehlo_keywords(self) -> list[str]:
        keywords = [f"SIZE {self.data_size_limit}", "8BITMIME", "SMTPUTF8"]
        if self.tls_context and not self._tls_protocol:
            keywords.append("STARTTLS")
        return [*keywords, "PIPELINING", "ENHANCEDSTATUSCODES"]

    async def _push_lines(self, lines: list[str]) -> None:
        """Several reply lines in one write (RFC 2034 4: no enhanced codes for EHLO)."""
        for line in lines:
            self._stats.count_reply(line)
        await self._write("\r\n".join(lines))

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, with what its shared path replies mean here: a malformed path is
        the sender's (553 5.1.7), and inside a transaction not read at all, so a MAIL there
        is 503 nested (RFC 5321 3.3, 4.1.4) whatever its path; aiosmtpd reads the path
        before it looks for a transaction and answered a malformed one 553 with RCPT's
        X.1.3."""
        self._reading_mail = True
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._reading_mail = False

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207 4.2: STARTTLS is not offered again once TLS is up; aiosmtpd would answer
        220 and start a second handshake inside the first, which breaks the connection.
        Without a certificate it is not offered at all: 502, not aiosmtpd's 454, which says
        "temporarily" (RFC 5321 4.2.4: a command recognised but not implemented is 502)."""
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        if not self.tls_context:
            await self.push(replies.STARTTLS_NOT_OFFERED)
            return
        assert self.transport is not None
        with refusal_alerts(self.transport):
            await super().smtp_STARTTLS(arg)
        handshake_began = self._original_transport is not None
        if handshake_began and self.session is not None and self.session.ssl is None:
            # The handshake ended without TLS and without an error: the connection was
            # closed under it (our timeout: a client that dribbles its ClientHello). asyncio's
            # SSLProtocol tells its app protocol nothing then (it never told it the TLS
            # connection was made), so the session would wait on a dead connection for
            # good, holding its connection slot; end it as aiosmtpd ends a failed handshake.
            log.info("connection closed during the TLS handshake",
                     extra=self.handler.log_extra())
            self.connection_lost(None)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        """RFC 5321 4.1.1.8 and 4.2.2: help is a 214 reply (aiosmtpd sends 250), an unknown
        topic 504."""
        if arg:
            method = self._smtp_methods.get(arg.upper())
            if method is None or not self._syntax_available(method):
                topic = arg[:40] if arg.isascii() and arg.isprintable() else "that topic"
                await self.push(f"504 5.5.4 No help for {topic}")
                return
            syntax_text = _HELP_SYNTAX.get(arg.upper(), method.__smtp_syntax__)
            await self.push(f"214 2.0.0 Syntax: {syntax_text}")
            return
        commands = sorted(name for name, method in self._smtp_methods.items()
                          if self._syntax_available(method))
        await self.push("214 2.0.0 Supported commands: " + " ".join(commands))

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(replies.AUTH_UNAVAILABLE)

    # Not SMTP but HTTP: a request sent to the SMTP port, perhaps by a web application made to
    # (server-side request forgery), whose body may hold SMTP commands that would then run
    # from that application's address. The connection ends at the request line, as with
    # Postfix's smtpd_forbidden_commands. (No @syntax: not listed by HELP.)

    async def smtp_GET(self, arg: str) -> None:
        await self._end_non_smtp("GET")

    async def smtp_POST(self, arg: str) -> None:
        await self._end_non_smtp("POST")

    async def smtp_CONNECT(self, arg: str) -> None:
        await self._end_non_smtp("CONNECT")

    async def _end_non_smtp(self, command: str) -> None:
        log.warning("non-SMTP command %s, closing", command,
                    extra=self.handler.log_extra(self.handler.current_queue_id))
        await self._hang_up(replies.NON_SMTP_COMMAND)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        """RFC 5321 3.5.3: a user name or a mailbox, neither verified (no address harvesting):
        252 for any. aiosmtpd answered a user name 502, and echoed octets that are not UTF-8
        into a reply it could then not encode (a 451 and a logged traceback)."""
        if not arg:
            await self.push("501 Syntax: VRFY <address>")
        elif not is_utf8(arg):
            await self.push("501 5.5.2 Syntax: VRFY <address> (not UTF-8)")
        else:
            await self.push(replies.CANNOT_VRFY)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT, noting that the transaction had one: a DATA after recipients that
        were all refused is 554 no valid recipients (RFC 5321 3.3, as Postfix answers; RFC
        2920 3.1), not the 503 of a transaction that never named one."""
        if self.envelope is not None and self.envelope.mail_from is not None:
            self._recipients_asked = self.envelope  # a new transaction has a new envelope
        await super().smtp_RCPT(arg)

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """The parameters by RFC 5321's grammar (protocol/parameters.py), so that aiosmtpd
        answers a well-formed one it does not know 555, and with RFC 1870's size-value: ASCII
        digits only. str.isdigit, which aiosmtpd relies on, also takes "²" (int() then fails:
        a 451 for a syntax error) and other scripts' digits. None: aiosmtpd answers its 501
        syntax reply."""
        if not all(is_utf8(param) for param in params):
            return None  # a parameter's fault, not the address's: 501, not 553
        result = parse_parameters(params)
        if result is None:
            return None
        size = result.get("SIZE")
        if isinstance(size, str) and not (size.isascii() and size.isdigit()):
            return None
        if isinstance(size, str) and self.data_size_limit and int(size) > self.data_size_limit:
            # aiosmtpd refuses it next (552), saying nothing in the log; not per reply in push.
            log.info("sender refused: its SIZE is over TIERMAIL_MAX_MESSAGE_SIZE (%d)",
                     self.data_size_limit,
                     extra=self.handler.log_extra(self.handler.current_queue_id))
        if result.get("BODY") == "BINARYMIME":  # aiosmtpd has the words in upper case
            # RFC 3030: only with BINARYMIME and CHUNKING advertised, which we do not offer.
            # Under its own name aiosmtpd counts it an unknown parameter: 555 (RFC 5321
            # 4.1.1.11: a parameter we cannot implement), not its 501 for a bad BODY value.
            result["BINARYMIME"] = result.pop("BODY")
        return result

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        """aiosmtpd calls the session's hook once a command has passed its own checks; ours
        of MAIL and RCPT come in between, so a refused MAIL counts nothing against the
        message rates and sets no sender."""
        if command == "MAIL":
            refusal = self._mail_refusal(*args)
        elif command == "RCPT":
            refusal = self._rcpt_refusal(args[0])
        else:
            refusal = None
        if refusal is not None:
            return refusal
        return await super()._call_handler_hook(command, *args)

    def _mail_refusal(self, address: str, words: Sequence[str]) -> str | None:
        assert self.envelope is not None
        repeated = repeated_keyword(words)
        if repeated is not None:
            return replies.REPEATED_PARAMETER.format(keyword=repeated)
        if not address.isascii() and not self.envelope.smtp_utf8:
            return replies.NON_ASCII_SENDER  # RFC 6531 3.5; a HELO session never has it
        return None

    def _rcpt_refusal(self, address: str) -> str | None:
        assert self.envelope is not None
        if not address.isascii() and not self.envelope.smtp_utf8:
            return replies.NON_ASCII_RECIPIENT  # RFC 6531 3.5
        return None

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, receiving the content in chunks (protocol/data.py) instead of one
        awaited line at a time; the checks before 354 and the replies are aiosmtpd's."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            if self._recipients_asked is self.envelope:
                await self.push(replies.NO_VALID_RECIPIENTS)
            else:
                await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        receiver = DataReceiver(self.data_size_limit, self._max_line_length, self._data_memory)
        try:
            await self._transaction(receiver)
        finally:
            receiver.release()  # published, refused or abandoned: the memory is free again
        if self._closing and self.transport is not None:
            await self.push(replies.SHUTTING_DOWN)
            self.transport.close()

    async def _transaction(self, receiver: DataReceiver) -> None:
        assert self.envelope is not None
        self._receiving_data = True
        try:
            received = await self._receive_data(receiver)
        finally:
            self._receiving_data = False
        try:
            if received.error is not None:
                reply = _DATA_ERRORS[received.error]
                if received.error is DataError.NO_ROOM:
                    self._stats.data_memory_full += 1
                    log.warning("no memory left for message data: the uploads of all sessions "
                                "hold TIERMAIL_SMTP_DATA_MEMORY (%d octets)",
                                self._limits.data_memory,
                                extra=self.handler.log_extra(self.handler.current_queue_id))
                self.handler.log_refused(self.envelope, received.error.value, reply)
                await self.push(reply)
                return
            self.envelope.content = self.envelope.original_content = received.content
            # The whole message is in: bound our own processing instead of the upload.
            self._busy = True
            self._reset_timeout(self._limits.processing_timeout, ours=True)
            status = await self._call_handler_hook("DATA")
            status = replies.OK if status is MISSING else status
            if replies.reply_code(status) == 250:
                # The error limit is for clients that err without delivering mail: a queued
                # message forgives what came before (as in Postfix's smtpd).
                self._client_errors = 0
            await self.push(status)
        finally:
            self._set_post_data_state()  # the transaction is over, whatever failed
            self._busy = False
            self._reset_timeout()

    async def _receive_data(self, receiver: DataReceiver) -> DataResult:
        while True:
            # More than the reader can hold (it stops reading at twice its limit, and one
            # transport read is at most 256 KiB), so each read empties its buffer and the
            # bytes after the end can go back in front of anything received later.
            if self._eof_pending and not self._unanswered_input():
                raise ConnectionResetError("connection closed during DATA")  # nothing to come
            chunk = await self._reader.read(READ_ALL)
            if not chunk:  # EOF: eof_received cancels this task; never reached in practice
                raise ConnectionResetError("connection closed during DATA")
            received = receiver.feed(chunk)
            if received is not None:
                if received.leftover:
                    self._reader.feed_data(received.leftover)
                return received


# HELP for the commands whose parameters we take (aiosmtpd's syntax texts name none).
_HELP_SYNTAX = {"MAIL": MAIL_SYNTAX, "RCPT": RCPT_SYNTAX}

_DATA_ERRORS = {
    DataError.TOO_MUCH: replies.MESSAGE_TOO_BIG,
    DataError.TOO_LONG: replies.LINE_TOO_LONG,
    DataError.NO_ROOM: replies.NO_MEMORY_FOR_DATA,
}
READ_ALL = 16 * 1024 * 1024
REPLIES_PER_TURN = 64  # replies a session writes before other sessions get a turn
_TIMER_SLACK = 0.001  # seconds: a timer that fires this close to its deadline has reached it


class FilterServer:
    """The listening sockets of one worker and the factory of its sessions."""

    def __init__(
        self,
        *,
        limits: ServerLimits,
        policy: SessionPolicy,
        directory: RecipientDirectory,
        publisher: MessagePublisher,
        rules: Sequence[Rule],
        stats: WorkerStats,
        tls_context: ssl.SSLContext | None,
        session_ids: Callable[[], str] = lambda: secrets.token_hex(5),
        rate_limits: RateLimits = UNLIMITED,
        unconfirmed: UnconfirmedLedger | None = None,
    ) -> None:
        self.limits = limits
        self.stats = stats
        self._policy = policy
        self._directory = directory
        self._publisher = publisher
        self._rules = list(rules)
        self._tls_context = tls_context
        self._session_ids = session_ids
        self._rate_limits = rate_limits
        self._registry = ConnectionRegistry(limits, stats)
        self._data_memory = MemoryBudget(limits.data_memory)
        self._publishes = PublishWatch()
        self.unconfirmed = UnconfirmedLedger(None, "") if unconfirmed is None else unconfirmed
        self._servers: list[asyncio.Server] = []

    def new_connection(self) -> FilterSMTP:
        handler = FilterSession(
            session_id=self._session_ids(),
            directory=self._directory,
            publisher=self._publisher,
            rules=self._rules,
            stats=self.stats,
            policy=self._policy,
            rate_limits=self._rate_limits,
            publishes=self._publishes,
            unconfirmed=self.unconfirmed,
        )
        return FilterSMTP(
            handler,
            limits=self.limits,
            registry=self._registry,
            data_memory=self._data_memory,
            stats=self.stats,
            tls_context=self._tls_context,
            loop=asyncio.get_running_loop(),
            rate_limits=self._rate_limits,
        )

    async def listen(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self.new_connection, host, port, reuse_port=True)
        self._servers.append(server)
        log.info("listening on %s", format_address(host, port), extra={"event": "smtp-listen"})
        return server

    @property
    def data_held(self) -> int:
        """Octets of message data held right now, out of limits.data_memory."""
        return self._data_memory.held

    @property
    def ports(self) -> list[int]:
        return [
            int(sock.getsockname()[1]) for server in self._servers for sock in server.sockets
        ]

    async def close(self, grace: float) -> None:
        """Stop listening, let replies in progress finish (up to `grace`), close the rest."""
        for server in self._servers:
            server.close()
        for connection in self._registry:
            connection.request_close()
        if not await self._registry.wait_empty(grace):
            for connection in self._registry:
                if connection.transport is not None:
                    connection.transport.close()
            await self._registry.wait_empty(5.0)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
