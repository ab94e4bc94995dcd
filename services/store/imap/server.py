"""IMAP listeners: the plain port (with STARTTLS, RFC 3501 6.2.1) and the implicit-TLS port
(IMAPS, RFC 8314).

The server owns the sockets. It reads only when the command parser needs more bytes, so a
connection never buffers more than one command line plus its literals (both bounded by
settings, and oversized literals are refused before the client sends them); it answers
synchronizing literals with a continuation, applies the autologout timer (RFC 3501 5.4;
a shorter one until the client has logged in, as RFC 9051 5.4 allows, and a deadline for
logging in counted from connect),
waits for the client to take what we write (back-pressure), yields to other connections
between commands so a client that pipelines thousands of commands cannot starve the rest, and
caps the number of connections. The session (session.py) decides what to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
import ssl
import zlib
from typing import Any

from common.budget import MemoryBudget
from common.listen import binding, format_address
from common.ratelimit import parse_networks
from common.settings import Settings
from common.tls import describe_handshake_failure, refusal_alerts, server_context
from services.store.imap import responses as r
from services.store.imap.disconnect import Disconnect
from services.store.imap.protocol import wire
from services.store.imap.protocol.parser import (
    CommandParser,
    Complete,
    LiteralWanted,
    NeedMore,
    Refused,
)
from services.store.imap.session import (
    After,
    ImapDeps,
    Session,
    SessionConfig,
)
from services.store.imap.userlimit import UserConnections
from services.store.listening import (
    ClientConnections,
    ClientWait,
    ConnectionGate,
    ImplicitTlsServer,
    ListenerSessions,
    SessionEnded,
    SessionEndingServer,
    end_connection,
    peer_ip,
    peer_of,
    read_timer,
    serve_counted,
    write_or_lost,
)

__all__ = ["ImapDeps", "start_imap_servers"]

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024  # octets asked of the socket per read
FLUSH_AT = 64 * 1024  # queued response octets that are sent without waiting for the end
# COMPRESS=DEFLATE (RFC 4978): level 1 spends little of the event loop's time (RFC 4978 4
# suggests 1-5); client data is inflated at most this much at a time.
DEFLATE_LEVEL = 1
INFLATE_CHUNK = 64 * 1024
# Literals before login carry a user name or password (LOGIN) or an ID parameter: the
# APPEND-sized limit (50 MiB by default) would let every connection that never logs in make
# the store hold that much memory.
PRE_LOGIN_MAX_LITERAL = 8 * 1024
TLS_HANDSHAKE_TIMEOUT = 30.0
# Seconds a client may take no bytes of a response at all (one drain: the kernel's buffer and
# our 64 KiB above its high-water mark) before it is disconnected: 0.5 KB/s still passes.
WRITE_STALL = 120.0
LITERAL_CONTINUATION = wire.continuation("Ready for literal data")
_REDACTED_COMMANDS = (b"LOGIN", b"AUTHENTICATE")


async def start_imap_servers(settings: Settings, deps: ImapDeps) -> list[SessionEndingServer]:
    """Start IMAP on settings.imap_port and, when a certificate is configured, IMAPS on
    settings.imaps_port. Both count towards one settings.imap_max_connections. The caller
    closes the returned servers."""
    context = server_context(settings)
    sessions: set[asyncio.Task[None]] = set()
    exempt = parse_networks(settings.rate_limit_exempt)
    clients = ClientConnections(settings.imap_max_connections_per_ip, exempt)
    deps = dataclasses.replace(
        deps,
        literals=deps.literals or MemoryBudget(settings.imap_literal_memory),
        fetch_memory=deps.fetch_memory or MemoryBudget(settings.imap_fetch_memory),
        user_connections=deps.user_connections or UserConnections(
            settings.imap_max_userip_connections, exempt))
    plain = ImapListener(settings, deps, context, sessions, clients, implicit_tls=False)
    with binding("imap_port", settings.bind, settings.imap_port):
        plain_server = await asyncio.start_server(plain.serve, settings.bind, settings.imap_port)
    servers = [SessionEndingServer(plain_server, plain.sessions)]
    log.info("IMAP listening on %s", format_address(settings.bind, settings.imap_port),
             extra={"event": "imap-listen"})
    if context is None:
        log.warning("no TLS certificate: IMAPS disabled and STARTTLS not offered")
        return servers
    implicit = ImapListener(settings, deps, context, sessions, clients, implicit_tls=True)
    server = ImplicitTlsServer(implicit.gate, context, implicit.serve_counted,
                               handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
    try:
        with binding("imaps_port", settings.bind, settings.imaps_port):
            await server.listen(settings.bind, settings.imaps_port)
    except BaseException:
        servers[0].close()
        raise
    servers.append(SessionEndingServer(server, implicit.sessions))
    log.info("IMAPS listening on %s", format_address(settings.bind, settings.imaps_port),
             extra={"event": "imaps-listen"})
    return servers


class Connection:
    """One client connection as the session's Channel: framed reads through the command
    parser, writes with back-pressure, STARTTLS. Every way the connection can end surfaces as
    `Disconnect`, which the session lets through."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 settings: Settings, context: ssl.SSLContext | None,
                 literals: MemoryBudget | None = None) -> None:
        self.reader = reader
        self.writer = writer
        # Until `logged_in`: a short idle timer and small literals, so that connections that
        # never log in can neither hold the connection slots nor the memory for long.
        self.parser = CommandParser(settings.imap_max_line, PRE_LOGIN_MAX_LITERAL,
                                    memory=literals)
        self._max_literal = settings.imap_max_literal
        self._timeout = settings.imap_login_timeout
        self._autologout = settings.imap_timeout
        # Counted from connect, not restarted by commands as the idle timer is; None once
        # logged in.
        self._login_by: float | None = (asyncio.get_running_loop().time()
                                        + settings.imap_login_deadline)
        self._context = context
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._deflate: Any = None  # zlib objects once COMPRESS DEFLATE is active
        self._inflate: Any = None
        self.client_wait = ClientWait()
        self._probed = False
        self._reset = False
        self.peer_ip = peer_ip(writer)
        self.peer = peer_of(writer)

    def logged_in(self) -> None:
        self._timeout = self._autologout
        self._login_by = None
        self.parser.limit_literals(self._max_literal)

    def end_session(self) -> None:
        self.client_wait.end()

    def client_gone(self) -> bool:
        if self._reset or self.writer.transport.is_closing():  # TLS closes at the client's EOF
            return True
        # Nothing reads the socket while a command runs, so a reset from the client stays
        # pending on it (EPIPE or ECONNRESET) until asked for. Asking clears it: remembered.
        sock = self.writer.get_extra_info("socket")
        self._reset = sock is not None and sock.getsockopt(socket.SOL_SOCKET,
                                                           socket.SO_ERROR) != 0
        return self._reset

    def wants_probe(self) -> bool:
        if self._probed or not _eof_received(self.reader):
            return False
        self._probed = True
        return True

    def farewell(self, bye: bytes) -> None:
        """Send `bye` as the connection's last words, without waiting for the client to take
        it (the connection is closed next, within listening.CLOSE_TIMEOUT); anything queued
        but not sent is dropped."""
        if self._deflate is not None:
            bye = self._deflate.compress(bye) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        with contextlib.suppress(ConnectionError):
            write_or_lost(self.writer, bye)

    async def write(self, data: bytes) -> None:
        """Queue `data`; it goes out at the next `flush` (the end of the command, or before
        the server waits for the client) or once FLUSH_AT octets are queued. A command's
        untagged responses and its completion thus leave in one send, not three."""
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= FLUSH_AT:
            await self.flush()

    def sends_now(self, size: int) -> bool:
        """Whether writing `size` more octets sends what is queued (and may wait for the
        client to take it)."""
        return self._pending_size + size >= FLUSH_AT

    async def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        if self._deflate is not None:
            # RFC 4978 4: a sync flush per send, so the client can decode all it was sent.
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        try:
            write_or_lost(self.writer, data)
            if self.writer.transport.get_write_buffer_size() == 0:
                return  # all taken by the kernel: nothing to wait for
            # A client that stops reading holds what we are sending it (a FETCH of a large
            # message: all of it) for as long as it waits here, so it waits WRITE_STALL at
            # most, not the 30-minute autologout. (Not asyncio.wait_for: in 3.11 it loses a
            # cancellation that coincides with the drain finishing, and shutdown would then
            # wait for the client.)
            async with asyncio.timeout(min(self._timeout, WRITE_STALL)):
                await self.writer.drain()
        except TimeoutError:
            raise Disconnect("write stall") from None
        except OSError as exc:  # a reset, TLS broken, EHOSTUNREACH (see ClientUnreachable)
            raise Disconnect("lost") from exc

    async def read_more(self) -> None:
        """Feed the parser the next bytes from the client (what is queued for it goes out
        first: it may be what the client waits for)."""
        await self.flush()
        if self._inflate is not None and self._inflate.unconsumed_tail:
            self.parser.feed(self._inflated(self._inflate.unconsumed_tail))
            return
        timeout, login_deadline = self._read_timeout()
        try:
            async with self.client_wait.within(timeout):
                data = await self.reader.read(READ_CHUNK)
        except TimeoutError:
            raise Disconnect("login deadline" if login_deadline else "timeout") from None
        except SessionEnded:
            raise Disconnect("ended") from None
        except OSError as exc:  # as in flush
            raise Disconnect("lost") from exc
        if not data:
            raise Disconnect("eof")
        self.parser.feed(data if self._inflate is None else self._inflated(data))

    def _read_timeout(self) -> tuple[float, bool]:
        return read_timer(self._timeout, None if self._login_by is None
                          else self._login_by - _now())

    def _inflated(self, data: bytes) -> bytes:
        # At most INFLATE_CHUNK octets at a time: a few compressed octets can stand for
        # gigabytes, and the parser's line and literal limits must see them before they
        # are all in memory (the rest waits in unconsumed_tail).
        try:
            return bytes(self._inflate.decompress(data, INFLATE_CHUNK))
        except zlib.error as exc:
            raise Disconnect("compression") from exc

    async def read_line(self) -> bytes | Refused:
        while True:
            line = self.parser.read_line()
            if line is not None:
                return line
            await self.read_more()

    async def start_tls(self, reply: bytes) -> bool:
        assert self._context is not None
        await self.flush()
        if self.parser.buffered or _buffered(self.reader):
            # RFC 3501 6.2.1 / CVE-2011-0411: nothing may follow STARTTLS unencrypted.
            await self.write(r.BYE_STARTTLS_PIPELINED.untagged())
            await self.flush()
            return False
        # No await between the OK and start_tls: the loop must not read the ClientHello into
        # the plaintext buffer (start_tls pauses reading first).
        self.writer.write(reply)
        try:
            with refusal_alerts(self.writer.transport):
                await self.writer.start_tls(self._context,
                                            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            raise Disconnect("tls") from exc
        return True

    async def start_compression(self, reply: bytes) -> bool:
        """RFC 4978: send `reply` (the tagged OK) as it is, then compress both ways. False,
        and nothing changed, when the client sent more behind COMPRESS (it must wait for the
        reply: what it sent could be either)."""
        if self.parser.buffered or _buffered(self.reader):
            return False
        await self.write(reply)
        await self.flush()
        self._deflate = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        return True

    @property
    def compressing(self) -> bool:
        return self._deflate is not None


def _now() -> float:
    return asyncio.get_running_loop().time()


def _eof_received(reader: asyncio.StreamReader) -> bool:
    # The client's FIN, with or without unread commands before it (at_eof() waits for those
    # to be read first).
    return bool(getattr(reader, "_eof", False))


def _buffered(reader: asyncio.StreamReader) -> int:
    # StreamReader has no public way to ask this; needed to refuse data pipelined behind
    # STARTTLS (as the POP3 server does for STLS).
    return len(getattr(reader, "_buffer", b""))


class ImapListener:
    def __init__(self, settings: Settings, deps: ImapDeps, context: ssl.SSLContext | None,
                 sessions: set[asyncio.Task[None]], clients: ClientConnections, *,
                 implicit_tls: bool) -> None:
        self._settings = settings
        self._deps = deps
        self._context = context
        self.sessions = ListenerSessions(sessions, settings.imap_max_connections)
        self.gate = ConnectionGate(self.sessions, clients, r.BYE_TOO_MANY_CONNECTIONS.untagged(),
                                   r.BYE_TOO_MANY_FROM_ADDRESS.untagged(), "imap")
        self._implicit_tls = implicit_tls
        self._config = SessionConfig(
            tls_available=context is not None,
            plaintext_auth_allowed=settings.plaintext_auth_allowed,
            max_errors=settings.imap_max_errors,
            append_limit=settings.imap_max_literal,
            default_quota=settings.default_quota,
            max_mailboxes=settings.imap_max_mailboxes,
            idle_keepalive=settings.imap_idle_keepalive,
        )

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A plain port's connection (the implicit-TLS port's come from ImplicitTlsServer)."""
        await serve_counted(self.gate, reader, writer, self.serve_counted)

    async def serve_counted(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """A connection counted against the limits."""
        await self._serve(Connection(reader, writer, self._settings, self._context,
                                     self._deps.literals))

    async def _serve(self, connection: Connection) -> None:
        session = Session(self._deps, self._config, connection,
                          session_id=secrets.token_hex(6), peer=connection.peer,
                          tls_active=self._implicit_tls)
        log.info("connected", extra={**session.log_context,
                                     "event": "imaps" if self._implicit_tls else "imap"})
        abort = False
        try:
            await self._converse(session, connection)
        except Disconnect as exc:
            abort = exc.reason not in _SAYING_GOODBYE
            if exc.reason == "timeout":
                log.info("autologout", extra=session.log_context)
                connection.farewell(r.BYE_TIMEOUT.untagged())
            elif exc.reason == "login deadline":
                log.info("not logged in within %g s, disconnecting",
                         self._settings.imap_login_deadline, extra=session.log_context)
                connection.farewell(r.BYE_LOGIN_DEADLINE.untagged())
            elif exc.reason == "ended":
                log.info("session ended: account deleted", extra=session.log_context)
                connection.farewell(r.BYE_ACCOUNT_DELETED.untagged())
            elif exc.reason == "tls":  # raised from the handshake's exception
                log.info("TLS handshake failed: %s",
                         describe_handshake_failure(exc.__cause__ or exc),
                         extra={**session.log_context, "event": "imap-tls-failed"})
            else:
                log.info("connection ended: %s", exc.reason, extra=session.log_context)
        except asyncio.CancelledError:
            log.info("session ended by shutdown", extra=session.log_context)
            connection.farewell(r.BYE_SHUTDOWN.untagged())
            raise
        except Exception:
            abort = True
            log.exception("connection failed", extra=session.log_context)
        finally:
            session.ended()
            connection.parser.discard()
            await end_connection(connection.reader, connection.writer, abort=abort)
            log.info("disconnected", extra=session.log_context)

    async def _converse(self, session: Session, connection: Connection) -> None:
        await session.greeting()
        parser = connection.parser
        while True:
            if connection.client_wait.ended:  # not even a command the client pipelined
                raise Disconnect("ended")
            event = parser.next_event()
            if isinstance(event, NeedMore):
                await connection.read_more()
                continue
            if isinstance(event, LiteralWanted):
                if await session.accepts_literal(event):
                    await connection.write(LITERAL_CONTINUATION)
                else:
                    parser.decline_literal()
                    await connection.flush()
                continue
            if isinstance(event, Refused):
                log.debug("C: <refused: %s>", event.reason, extra=session.log_context)
                after = await session.refused(event)
            else:
                assert isinstance(event, Complete)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("C: %s", _loggable(event.raw.line), extra=session.log_context)
                after = await session.handle(event.raw)
            if after is After.CONTINUE and parser.closed:
                # A line read inside the command (an AUTHENTICATE response, IDLE's DONE) ran
                # past all bounds: the parser reads nothing more, so say why and close, as
                # `Session.refused` does for a command line.
                log.info("line far over the limit inside a command, disconnecting",
                         extra=session.log_context)
                await session.send(r.BYE_TOO_MANY_ERRORS.untagged())
                after = After.CLOSE
            await connection.flush()  # the command's responses, in one send
            if after is After.CLOSE:
                return
            if parser.buffered or _buffered(connection.reader):
                # Fairness: a client with many commands pipelined in the buffers would
                # otherwise keep this loop busy without ever awaiting I/O. (With none
                # waiting, the next read awaits I/O anyway.)
                await asyncio.sleep(0)


# Disconnect reasons after which the connection is hung up politely (with our BYE, if any,
# not lost to a reset); after the others (lost, stalled, broken) it is reset at once.
_SAYING_GOODBYE = ("eof", "ended", "timeout", "login deadline")


def _loggable(line: bytes) -> str:
    """A command line for a DEBUG log: credentials redacted, long lines cut."""
    line = line.split(b"\r\n", 1)[0]  # up to the first literal
    words = line.split(None, 2)  # any whitespace: "a LOGIN<TAB>user<TAB>pass" is redacted too
    if len(words) >= 2 and words[1].upper() in _REDACTED_COMMANDS:
        return (words[0] + b" " + words[1] + b" ****").decode("ascii", "replace")
    return line[:200].decode("utf-8", "replace")
