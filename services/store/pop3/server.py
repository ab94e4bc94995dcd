"""POP3 listeners: the plain port (with STLS, RFC 2595) and the implicit-TLS port (POP3S).

The server owns the sockets: it reads lines with a hard length limit, applies the idle timeout
(RFC 1939 section 3), performs the TLS handshake, and writes what the session returns,
streaming message bodies in chunks with back-pressure.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl

from common.auththrottle import AuthThrottle
from common.listen import binding, format_address
from common.ratelimit import parse_networks
from common.settings import Settings
from common.tls import describe_handshake_failure, refusal_alerts, server_context
from services.store.backends.accounts import AccountDB
from services.store.listening import (
    ClientConnections,
    ConnectionGate,
    ImplicitTlsServer,
    ListenerSessions,
    SessionEnded,
    SessionEndingServer,
    client_io,
    end_connection,
    peer_of,
    read_timer,
    serve_counted,
    write_or_lost,
)
from services.store.logins import Logins
from services.store.mailbox import MailStore
from services.store.pop3 import protocol as p
from services.store.pop3.locks import MailboxLocks
from services.store.pop3.session import AUTH_FAILURE_DELAY, After, Response, Session, State

log = logging.getLogger(__name__)

# The longest line we buffer (RFC 5034 section 4 SASL responses may exceed RFC 2449's 255).
# A line that goes on beyond it is answered with -ERR and the connection closed, not read to
# its end: a client may send one without end, and no client sends 16 times RFC 2449's limit.
LINE_LIMIT = p.MAX_SASL_LINE
TLS_HANDSHAKE_TIMEOUT = 30.0


async def start_pop3_servers(
    settings: Settings,
    mailstore: MailStore,
    accounts: AccountDB,
    *,
    auth_failure_delay: float = AUTH_FAILURE_DELAY,
    locks: MailboxLocks | None = None,
    throttle: AuthThrottle | None = None,
    logins: Logins | None = None,
) -> list[SessionEndingServer]:
    """Start the POP3 listener on settings.pop3_port and, when a certificate is configured,
    POP3S on settings.pop3s_port. Both share one maildrop lock registry (`locks`, a new one
    unless given), the failed-login throttle and the store's `logins` (their sessions end
    when their account is deleted), if given. The caller closes the returned servers."""
    context = server_context(settings)
    if locks is None:
        locks = MailboxLocks()
    sessions: set[asyncio.Task[None]] = set()
    clients = ClientConnections(settings.pop3_max_connections_per_ip,
                                parse_networks(settings.rate_limit_exempt))
    plain = Pop3Listener(settings, mailstore, accounts, locks, context, auth_failure_delay,
                         sessions, clients, implicit_tls=False, throttle=throttle,
                         logins=logins)
    with binding("pop3_port", settings.bind, settings.pop3_port):
        plain_server = await asyncio.start_server(plain.serve, settings.bind,
                                                  settings.pop3_port, limit=LINE_LIMIT)
    servers: list[SessionEndingServer] = [SessionEndingServer(plain_server, plain.sessions)]
    log.info("POP3 listening on %s", format_address(settings.bind, settings.pop3_port),
             extra={"event": "pop3-listen"})
    if context is not None:
        implicit = Pop3Listener(settings, mailstore, accounts, locks, context,
                                auth_failure_delay, sessions, clients, implicit_tls=True,
                                throttle=throttle, logins=logins)
        server = ImplicitTlsServer(implicit.gate, context, implicit.serve_counted,
                                   handshake_timeout=TLS_HANDSHAKE_TIMEOUT, limit=LINE_LIMIT)
        try:
            with binding("pop3s_port", settings.bind, settings.pop3s_port):
                await server.listen(settings.bind, settings.pop3s_port)
        except BaseException:
            servers[0].close()
            raise
        servers.append(SessionEndingServer(server, implicit.sessions))
        log.info("POP3S listening on %s", format_address(settings.bind, settings.pop3s_port),
                 extra={"event": "pop3s-listen"})
    else:
        log.warning("no TLS certificate: POP3S disabled and STLS not offered")
    return servers


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One line including its LF, or None when it is longer than the reader's limit (the
    rest of it is not read). Raises IncompleteReadError at end of stream."""
    try:
        with client_io():
            return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        return None


def _buffered(reader: asyncio.StreamReader) -> int:
    # StreamReader has no public way to ask this; needed to refuse data pipelined behind STLS.
    return len(getattr(reader, "_buffer", b""))


class Pop3Listener:
    def __init__(self, settings: Settings, mailstore: MailStore, accounts: AccountDB,
                 locks: MailboxLocks, context: ssl.SSLContext | None,
                 auth_failure_delay: float, sessions: set[asyncio.Task[None]],
                 clients: ClientConnections, *, implicit_tls: bool,
                 throttle: AuthThrottle | None = None, logins: Logins | None = None) -> None:
        self._implicit_tls = implicit_tls
        self._throttle = throttle
        self._logins = logins
        self.sessions = ListenerSessions(sessions, settings.pop3_max_connections)
        # A negative greeting past a limit (RFC 3206's SYS/TEMP: try again later).
        self.gate = ConnectionGate(self.sessions, clients, p.ERR_TOO_MANY_CONNECTIONS.encode(),
                                   p.ERR_TOO_MANY_FROM_ADDRESS.encode(), "pop3")
        self._settings = settings
        self._mailstore = mailstore
        self._accounts = accounts
        self._locks = locks
        self._context = context
        self._timeout = settings.pop3_timeout
        self._login_deadline = settings.pop3_login_deadline
        self._auth_failure_delay = auth_failure_delay

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A plain port's connection (the implicit-TLS port's come from ImplicitTlsServer)."""
        await serve_counted(self.gate, reader, writer, self.serve_counted)

    async def serve_counted(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """A connection counted against the limits."""
        await self._serve(reader, writer, self._implicit_tls)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     implicit_tls: bool) -> None:
        peer = peer_of(writer)
        session = Session(
            mailstore=self._mailstore,
            accounts=self._accounts,
            locks=self._locks,
            session_id=secrets.token_hex(6),
            peer=peer,
            tls_available=self._context is not None,
            tls_active=implicit_tls,
            plaintext_auth_allowed=self._settings.plaintext_auth_allowed,
            auth_failure_delay=self._auth_failure_delay,
            throttle=self._throttle,
            logins=self._logins,
        )
        log.info("connected", extra={**session.log_context,
                                     "event": "pop3s" if implicit_tls else "pop3"})
        aborted = False
        try:
            await self._converse(session, reader, writer)
        except asyncio.IncompleteReadError:
            log.info("connection closed by client", extra=session.log_context)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            aborted = True
            log.info("connection lost: %s", type(exc).__name__, extra=session.log_context)
        except asyncio.CancelledError:
            aborted = True
            log.info("session ended by shutdown", extra=session.log_context)
            raise
        except Exception:
            aborted = True
            log.exception("connection failed", extra=session.log_context)
        finally:
            await session.close()
            await end_connection(reader, writer, abort=aborted)
            log.info("disconnected", extra=session.log_context)

    async def _converse(self, session: Session, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        await self._send(session, writer, session.greeting())
        loop = asyncio.get_running_loop()
        # Counted from connect: the idle timeout starts again at every command, and a client
        # sending CAPA now and then would otherwise stay in AUTHORIZATION forever.
        login_by = loop.time() + self._login_deadline
        while True:
            timeout, deadline_first = read_timer(
                self._timeout,
                login_by - loop.time() if session.state is State.AUTHORIZATION else None)
            try:
                async with session.client_wait.within(timeout):
                    line = await read_line(reader)
            except TimeoutError:
                if deadline_first:
                    log.info("not logged in within %g s, disconnecting", self._login_deadline,
                             extra=session.log_context)
                    await self._send(session, writer, Response(p.ERR_LOGIN_DEADLINE.encode()))
                    return
                # RFC 1939 section 3: an idle client is logged out without UPDATE and without
                # a response (which a client sending a command just then would take for the
                # command's answer).
                log.info("idle timeout", extra=session.log_context)
                return
            except SessionEnded:
                # As after a timeout: closed without UPDATE, so its DELEs are not committed.
                # The line is not waited for: the close gives it CLOSE_TIMEOUT.
                log.info("session ended: account deleted", extra=session.log_context)
                write_or_lost(writer, p.ERR_ACCOUNT_DELETED.encode())
                return
            if line is None:
                log.info("line longer than %d octets, disconnecting", LINE_LIMIT,
                         extra=session.log_context)
                response = session.line_too_long()
            else:
                if log.isEnabledFor(logging.DEBUG):  # loggable parses the line again
                    log.debug("C: %s", session.loggable(line), extra=session.log_context)
                response = await session.handle_line(line)
            if response.after is After.START_TLS:
                if not await self._start_tls(session, reader, writer, response):
                    return
                continue
            await self._send(session, writer, response)
            if response.after is After.CLOSE:
                return

    async def _start_tls(self, session: Session, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, response: Response) -> bool:
        assert self._context is not None
        if _buffered(reader):
            # RFC 2595 section 4 / CVE-2011-0411: nothing may follow STLS unencrypted.
            log.warning("data pipelined after STLS, closing", extra=session.log_context)
            await self._send(session, writer, Response(p.ERR_STLS_PIPELINED.encode()))
            return False
        # No await between the +OK and start_tls: the loop must not read the client's
        # ClientHello into the plaintext StreamReader buffer (start_tls pauses reading first).
        writer.write(response.data)
        log.debug("S: %s", response.data.rstrip(b"\r\n").decode(), extra=session.log_context)
        try:
            with refusal_alerts(writer.transport):
                await writer.start_tls(self._context, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.info("TLS handshake failed: %s", describe_handshake_failure(exc),
                     extra={**session.log_context, "event": "pop3-tls-failed"})
            writer.transport.abort()  # nothing more can be said on it
            return False
        session.tls_started()
        log.info("TLS started", extra=session.log_context)
        return True

    async def _send(self, session: Session, writer: asyncio.StreamWriter,
                    response: Response) -> None:
        write_or_lost(writer, response.data)
        if log.isEnabledFor(logging.DEBUG):
            first = response.data.split(b"\r\n", 1)[0].decode("utf-8", "replace")
            log.debug("S: %s", first, extra=session.log_context)
        if response.body is not None:
            try:
                async for chunk in response.body.chunks():
                    write_or_lost(writer, chunk)
                    await self._drain(writer)
            finally:
                response.body.close()
        await self._drain(writer)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        # A client that stops reading is as idle as one that stops writing. asyncio.timeout,
        # not wait_for: on 3.11 wait_for can lose a cancellation that lands as the drain ends,
        # and shutdown then waits for the client.
        async with asyncio.timeout(self._timeout):
            with client_io():
                await writer.drain()

