"""What the store's protocol servers (IMAP, POP3) share about their listening sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from common.budget import OpenCounts
from common.ratelimit import Network, ip_subject
from common.tls import describe_handshake_failure, refusal_alerts

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0  # seconds for a client to take our close before the socket is reset
# Lingering close (see hang_up): how long, and how many octets, a client may go on sending
# after our last words before the socket is closed anyway. 2 s is Apache's short lingering
# close (SECONDS_TO_LINGER, its choice against denial of service; 30 s otherwise) and ample
# for a client to read one line on any network; it is also the most it adds to a shutdown.
# 1 MiB is far more than a client has in flight with commands pipelined, and bounds the
# reading a client that sends without end makes us do.
LINGER_SECONDS = 2.0
LINGER_OCTETS = 1024 * 1024
LINGER_READ = 64 * 1024


class ClientUnreachable(ConnectionError):
    """A read from or a write to a client failed with a socket error that is no
    ConnectionError: EHOSTUNREACH or ENETUNREACH (what Linux reports once its retransmissions
    to a client that vanished behind a router sending ICMP errors time out), ENOTCONN. The
    client is gone as surely as after a reset."""


@contextlib.contextmanager
def client_io() -> Iterator[None]:
    """Around a read from or a drain to a client: such errors become ClientUnreachable, so
    the servers end the session as a lost connection instead of logging an unexpected error
    with a traceback; a timeout stays a timeout."""
    try:
        yield
    except (ConnectionError, TimeoutError, ssl.SSLError):
        raise
    except OSError as exc:
        raise ClientUnreachable(exc.errno, exc.strerror) from exc


class ListenerSessions:
    """The session tasks of one listener. Its connection limit counts them together with
    its sibling's (`shared`: the plain port and the implicit-TLS one share one limit)."""

    def __init__(self, shared: set[asyncio.Task[None]], limit: int) -> None:
        self._shared = shared
        self._limit = limit
        self._own: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._own)

    @property
    def full(self) -> bool:
        return len(self._shared) >= self._limit

    @contextlib.contextmanager
    def running(self, task: asyncio.Task[None]) -> Iterator[None]:
        """Around a session task's work. The cancellation that `cancel()` sends at shutdown
        ends here, once the session has closed its connection: a connection task that
        ended cancelled is logged at ERROR by asyncio's stream callback ("Exception in
        callback"), for every session open at shutdown."""
        self._shared.add(task)
        self._own.add(task)
        try:
            yield
        except asyncio.CancelledError:
            pass
        finally:
            self._own.discard(task)
            self._shared.discard(task)

    def cancel(self) -> None:
        for task in self._own:
            task.cancel()

    async def wait(self) -> None:
        if self._own:
            await asyncio.gather(*self._own, return_exceptions=True)


class SessionEnded(Exception):
    """The session was ended from outside (its account was deleted) while it waited for its
    client, or before it began to wait."""


class ClientWait:
    """A session's waits for its client, which `end()` can cut short from outside.

    The end takes effect at once when the session is waiting for the client (between
    commands, in IMAP IDLE, for a literal), otherwise the next time it would wait: a response
    being written is finished first, never cut in half. The wait is then SessionEnded."""

    def __init__(self) -> None:
        self.ended = False
        self.timeout: asyncio.Timeout | None = None  # of the wait under way, if one is

    def end(self) -> None:
        self.ended = True
        timeout = self.timeout
        if timeout is not None and not timeout.expired():
            timeout.reschedule(asyncio.get_running_loop().time())

    def within(self, seconds: float) -> _Waiting:
        """`async with wait.within(seconds):` around a read from the client: TimeoutError
        after `seconds`, SessionEnded at `end()`. Cancelling the read loses nothing:
        asyncio's StreamReader keeps what arrived in its buffer."""
        return _Waiting(self, seconds)


class _Waiting:
    """One wait of a ClientWait. A class rather than a generator-based context manager: it
    is entered for every command a client sends, and adds less than half as much to
    asyncio.timeout's cost this way (2 µs instead of 5)."""

    __slots__ = ("_wait", "_timeout")

    def __init__(self, wait: ClientWait, seconds: float) -> None:
        self._wait = wait
        self._timeout = asyncio.timeout(seconds)

    async def __aenter__(self) -> None:
        if self._wait.ended:
            raise SessionEnded
        await self._timeout.__aenter__()
        self._wait.timeout = self._timeout

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._wait.timeout = None
        try:
            await self._timeout.__aexit__(kind, error, traceback)
        except TimeoutError:
            if self._wait.ended:
                raise SessionEnded from None
            raise


class ClientConnections:
    """Connections (or sessions) open at once per client address, optionally per account
    too. IPv6 addresses count per /64; addresses in the exempt networks (rate_limit_exempt:
    loopback by default, where webmail and local tools connect for many people) are not
    counted; a limit of 0 counts nothing."""

    def __init__(self, limit: int, exempt: Sequence[Network] = ()) -> None:
        self._limit = limit
        self._exempt = tuple(exempt)
        self._open = OpenCounts(limit)

    def admit(self, ip: str, account: str = "") -> Callable[[], None] | None:
        """None when `limit` are open already; otherwise a function that ends this one's
        count (call it once, when it ends)."""
        subject = ip_subject(ip, self._exempt) if self._limit else None
        if subject is None:
            return _nothing
        key = (account, subject)
        if not self._open.take(key):
            return None
        return lambda: self._open.give_back(key)

    def count(self, ip: str, account: str = "") -> int:
        subject = ip_subject(ip, self._exempt)
        return 0 if subject is None else self._open.count((account, subject))


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Refusal:
    reply: bytes  # what the client reads instead of the greeting
    why: str  # for the log


@dataclass(frozen=True)
class ConnectionGate:
    """A listener's connection limits, and what a connection past them reads."""

    sessions: ListenerSessions
    clients: ClientConnections  # shared with the sibling listener
    too_many: bytes
    too_many_from_address: bytes
    protocol: str  # "imap" or "pop3", for the log events

    def enter(self, ip: str) -> Callable[[], None] | Refusal:
        """The function that ends this connection's count (call it once, when it ends), or
        the refusal of a connection past a limit."""
        if self.sessions.full:
            return Refusal(self.too_many, "too many connections")
        uncount = self.clients.admit(ip)
        if uncount is None:
            return Refusal(self.too_many_from_address, "too many connections from one address")
        return uncount

    async def hold(self, uncount: Callable[[], None], work: Awaitable[None]) -> None:
        """`work` as a session of this listener, then the end of the count `enter` began."""
        task = asyncio.current_task()
        assert task is not None
        try:
            with self.sessions.running(task):
                await work
        finally:
            uncount()


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve_counted(gate: ConnectionGate, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, serve: Serve) -> None:
    """A plain port's connection: counted against `gate`'s limits while `serve` runs, or
    refused."""
    entered = gate.enter(peer_ip(writer))
    if isinstance(entered, Refusal):
        await refuse_connection(writer, entered.reply, gate.protocol, entered.why)
        return
    await gate.hold(entered, serve(reader, writer))


# A connection refused on an implicit-TLS port reads its refusal over TLS, so the handshake
# comes first, but briefly, and for a bounded number of such connections at once (they hold no
# place under the limits): past that, one is closed without a word.
REFUSAL_HANDSHAKE_TIMEOUT = 5.0
MAX_REFUSAL_HANDSHAKES = 64
ACCEPT_RETRY_DELAY = 1.0  # after running out of descriptors, as asyncio's own servers wait
# What accept(2) reports of one pending connection (the network errors Linux passes on, which
# its manual says to take as EAGAIN, and EPERM from a firewall rule): the next one is fine.
_CONNECTION_ERRORS = frozenset(
    getattr(errno, name) for name in (
        "ENETDOWN", "EPROTO", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "EPERM", "ETIMEDOUT")
    if hasattr(errno, name))


class ImplicitTlsServer(asyncio.AbstractServer):
    """The listener of an implicit-TLS port (IMAPS, POP3S), which counts a connection against
    the connection limits from its accept, before its TLS handshake.

    asyncio's start_server(ssl=) makes the handshake before any code of ours sees the
    connection: one that never finished it held a descriptor for the whole handshake timeout
    counted nowhere, and a flood of them went past every limit (found in review). Taking a
    plain stream over with start_tls once counted does not work on uvloop (the store's
    loop): its transports start reading after `connection_made` even when that paused them,
    so a ClientHello sent at once was read as plaintext and the client saw an EOF. So this
    server accepts the sockets itself, counts each, and hands it still unread to the loop
    (`connect_accepted_socket`) for the handshake."""

    def __init__(self, gate: ConnectionGate, context: ssl.SSLContext, serve: Serve, *,
                 handshake_timeout: float, limit: int = 2**16) -> None:
        self._gate = gate
        self._context = context
        self._serve = serve
        self._handshake_timeout = handshake_timeout
        self._limit = limit
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._refusing = 0

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._sockets = await listening_sockets(host, port)
        self._accepting = [loop.create_task(self._accept_forever(sock))
                           for sock in self._sockets]
        for task in self._accepting:
            task.add_done_callback(self._accepting_ended)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def close(self) -> None:
        """Stop accepting. Connections go on, as asyncio's servers leave theirs."""
        for task in self._accepting:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def is_serving(self) -> bool:
        return bool(self._sockets)

    async def start_serving(self) -> None:
        pass  # serving from `listen`

    async def serve_forever(self) -> None:
        await asyncio.gather(*self._accepting)

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)

    async def _accept_forever(self, listener: socket.socket) -> None:
        """Accept until closed. No error ends it: the listening socket would stay open and
        the kernel would go on queueing connections that nobody accepts."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except ConnectionAbortedError:  # reset while waiting in the accept queue
                continue
            except OSError as exc:
                if exc.errno in _CONNECTION_ERRORS:
                    log.info("a %s connection failed before it was accepted: %s",
                             self._gate.protocol, exc.strerror or exc,
                             extra={"event": f"{self._gate.protocol}-accept-failed"})
                    continue
                # Out of descriptors (EMFILE, ENFILE) or memory, or something unforeseen.
                log.error("cannot accept %s connections: %s; trying again in %g s",
                          self._gate.protocol, exc.strerror or exc, ACCEPT_RETRY_DELAY,
                          extra={"event": f"{self._gate.protocol}-accept-failed"})
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            sock.setblocking(False)
            task = loop.create_task(self._connection(sock))
            self._connections.add(task)
            task.add_done_callback(self._connection_done)

    def _accepting_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s no longer accepts connections", self._gate.protocol,
                         exc_info=task.exception())

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s connection failed", self._gate.protocol, exc_info=task.exception())

    async def _connection(self, sock: socket.socket) -> None:
        try:
            ip = sock.getpeername()[0]
        except OSError:  # the client has gone already
            sock.close()
            return
        entered = self._gate.enter(ip)
        if isinstance(entered, Refusal):
            await self._refuse(sock, entered)
            return
        await self._gate.hold(entered, self._handshake_and_serve(sock))

    async def _handshake_and_serve(self, sock: socket.socket) -> None:
        streams = await self._handshake(sock, self._handshake_timeout)
        if streams is not None:
            await self._serve(*streams)

    async def _refuse(self, sock: socket.socket, refusal: Refusal) -> None:
        if self._refusing >= MAX_REFUSAL_HANDSHAKES:
            peer = _address(sock)
            log.warning("%s, closing %s before its TLS handshake", refusal.why, peer,
                        extra={"peer": peer, "event": f"{self._gate.protocol}-refused"})
            sock.close()
            return
        self._refusing += 1
        try:
            streams = await self._handshake(sock, REFUSAL_HANDSHAKE_TIMEOUT)
            if streams is not None:
                await refuse_connection(streams[1], refusal.reply, self._gate.protocol,
                                        refusal.why)
        finally:
            self._refusing -= 1

    async def _handshake(self, sock: socket.socket, within: float
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The connection's streams once its TLS handshake is made; None (the connection
        closed) when it fails or takes longer than `within`."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self._limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        peer = _address(sock)
        try:
            with refusal_alerts(sock):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=self._context, ssl_handshake_timeout=within)
        except OSError as exc:  # ssl.SSLError, a reset, the handshake timeout
            log.info("TLS handshake failed: %s", describe_handshake_failure(exc),
                     extra={"peer": peer, "event": f"{self._gate.protocol}s-tls-failed"})
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def listening_sockets(host: str, port: int, backlog: int = 100) -> list[socket.socket]:
    """Non-blocking sockets listening on every address `host` names (as asyncio's
    create_server binds them: SO_REUSEADDR, IPv6 sockets IPv6 only)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _address(sock: socket.socket) -> str:
    try:
        peername = sock.getpeername()
    except OSError:
        return "?"
    return f"{peername[0]}:{peername[1]}"


def peer_ip(writer: asyncio.StreamWriter) -> str:
    """The client's address without its port."""
    peername = writer.get_extra_info("peername")
    return peername[0] if isinstance(peername, tuple) else str(peername)


def peer_of(writer: asyncio.StreamWriter) -> str:
    """The client as `ip:port`, for logs."""
    peername = writer.get_extra_info("peername")
    return f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)


async def refuse_connection(writer: asyncio.StreamWriter, reply: bytes, protocol: str,
                            why: str = "too many connections") -> None:
    """Over a connection limit: `reply` instead of the greeting, and the connection
    closed before any session state exists."""
    peer = peer_of(writer)
    log.warning("%s, refusing %s", why, peer,
                extra={"peer": peer, "event": f"{protocol}-refused"})
    writer.write(reply)
    await close_connection(writer, abort=False)


class SessionEndingServer(asyncio.AbstractServer):
    """An asyncio server that also ends its open sessions when closed.

    Python 3.11's Server.close() leaves accepted connections running; on shutdown each
    protocol ends its sessions its own way (IMAP `* BYE`, POP3 without UPDATE, RFC 1939
    section 6), so mailboxes are unlocked and nothing touches the store after it is closed.
    """

    def __init__(self, server: asyncio.AbstractServer, sessions: ListenerSessions) -> None:
        self._server = server
        self._sessions = sessions

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def sockets(self) -> tuple[object, ...]:
        return tuple(getattr(self._server, "sockets", ()))

    def close(self) -> None:
        self._server.close()
        self._sessions.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
        await self._sessions.wait()


def write_or_lost(writer: asyncio.StreamWriter, data: bytes) -> None:
    """`writer.write`, where a connection the client has already reset is a
    ConnectionResetError as it is when the reset comes during the write: uvloop's transport
    (the store's loop) refuses a write once closed with a RuntimeError instead."""
    if writer.transport.is_closing():
        raise ConnectionResetError("connection closed by the client")
    writer.write(data)


def read_timer(idle_timeout: float, login_left: float | None) -> tuple[float, bool]:
    """The next read's timeout, and whether it is the login deadline (`login_left`: seconds
    until it, None once logged in). Decided when the timer is armed, not from the clock
    after it fired: an event loop may fire a timer a little before its time."""
    if login_left is not None and login_left < idle_timeout:
        return max(0.0, login_left), True
    return idle_timeout, False


async def end_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                         abort: bool) -> None:
    """The end of a session's connection: reset at once when `abort` (lost, stalled,
    broken), else hung up politely after our last words."""
    if abort:
        await close_connection(writer, abort=True)
    else:
        await hang_up(reader, writer)


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a connection after our last words (BYE, -ERR, +OK to QUIT) without losing them.

    Closing a TCP socket with unread input resets the connection: our kernel drops what it
    has not sent yet (the client's receive window may be full of earlier replies), and
    clients may drop what they received but had not read (asyncio's StreamReader raises at
    once; some TCP stacks discard it). A client still sending (pipelined commands, a command
    in flight at a timeout) would see ECONNRESET instead of the reason. So, as Apache's
    lingering close (nginx has one too): our side is half-closed where the transport
    can (plain TCP; TLS cannot), then input is read and dropped until the client closes, for
    LINGER_SECONDS or LINGER_OCTETS at most, and only then the socket is closed. No command
    is processed meanwhile; the connection still counts towards the connection limits."""
    try:
        if not writer.transport.is_closing():
            if writer.can_write_eof():
                writer.write_eof()  # FIN after what is still queued
            await _discard_input(reader)
    except OSError:  # the client reset the connection (or TLS failed), or the bound passed
        pass
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    await close_connection(writer, abort=False)


async def _discard_input(reader: asyncio.StreamReader) -> None:
    discarded = 0
    async with asyncio.timeout(LINGER_SECONDS):
        while discarded < LINGER_OCTETS:
            data = await reader.read(LINGER_READ)
            if not data:
                return
            discarded += len(data)


async def close_connection(writer: asyncio.StreamWriter, abort: bool) -> None:
    """Close a client connection, never waiting more than CLOSE_TIMEOUT for a client that
    does not take the close (or the TLS close_notify). With `abort`, at once: what is still
    queued is dropped, TLS sends no close_notify, and the kernel resets the connection only
    if input is left unread."""
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        # Gone already: a reset, a TLS failure, or (uvloop) ENOTCONN from the half-close
        # of a connection the client reset after our last read.
        pass
