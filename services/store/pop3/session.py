"""The POP3 session state machine (RFC 1939 section 3): AUTHORIZATION -> TRANSACTION -> UPDATE.

The session owns no socket. The server hands it one line at a time and writes back what it
returns: a reply, optionally followed by a message body to stream, and what to do next
(continue, start TLS, close). Storage is reached only through the MailStore protocol, and
every failure is turned into a reply by `reply_for_failure`, the one place that does so.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import BinaryIO

from common.auththrottle import AuthThrottle
from common.directory import normalize_address
from common.sasl import parse_plain
from services.store.auth import authenticate
from services.store.backends.accounts import AccountDB
from services.store.listening import ClientWait
from services.store.logins import Logins
from services.store.mailbox import (
    INBOX,
    MailStore,
    MessageInfo,
    NoSuchMailbox,
    NoSuchMessage,
    NoSuchUser,
    StorageError,
)
from services.store.pop3 import protocol as p
from services.store.pop3.locks import MailboxLocks

log = logging.getLogger(__name__)

# Protocol errors (unknown commands, bad syntax, wrong state) in a row before we hang up.
MAX_BAD_COMMANDS = 10
# Failed logins per connection before we hang up; each one already costs a delay.
MAX_AUTH_FAILURES = 3
AUTH_FAILURE_DELAY = 1.0  # seconds, after every failed login
READ_CHUNK = 256 * 1024  # message bytes read from storage per step while streaming
# Refused without checking the password: the client IP or the account has had too many failed
# logins lately (common/auththrottle.py). RFC 3206 SYS/TEMP: try again later, nothing wrong
# with the credentials as far as the client can tell.
ERR_AUTH_THROTTLED = p.err("too many failed logins, try again later", p.CODE_SYS_TEMP)


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


class After(enum.Enum):
    CONTINUE = "continue"
    START_TLS = "start-tls"
    CLOSE = "close"


class MessageStream:
    """A stored message (or its TOP) as dot-stuffed chunks ending with the terminator.

    Owns the open file: the server must call `close()` whether or not it streamed it all.
    """

    def __init__(self, file: BinaryIO, top_lines: int | None = None) -> None:
        self._file = file
        self._top_lines = top_lines

    async def chunks(self) -> AsyncIterator[bytes]:
        stuffer = p.DotStuffer()
        extractor = p.TopExtractor(self._top_lines) if self._top_lines is not None else None
        while True:
            data = await asyncio.to_thread(self._file.read, READ_CHUNK)
            if not data:
                break
            if extractor is not None:
                data = extractor.feed(data)
            out = stuffer.feed(data)
            if out:
                yield out
            if extractor is not None and extractor.done:
                break
        if extractor is not None and (rest := stuffer.feed(extractor.finish())):
            yield rest
        yield stuffer.finish()

    def close(self) -> None:
        self._file.close()


@dataclass
class Response:
    data: bytes  # the first line, or a complete multi-line response
    body: MessageStream | None = None  # streamed after `data` when present
    after: After = After.CONTINUE


def reply_for_failure(exc: BaseException) -> p.Reply:
    """The one mapping from storage (and unexpected) failures to POP3 replies (RFC 3206)."""
    if isinstance(exc, NoSuchMessage):
        return p.ERR_MESSAGE_GONE
    if isinstance(exc, NoSuchUser | NoSuchMailbox):
        return p.ERR_STORAGE_PERM
    if isinstance(exc, StorageError):
        return p.ERR_STORAGE_TEMP
    return p.ERR_INTERNAL


Handler = Callable[["Session", p.Command], Awaitable[Response]]


@dataclass(frozen=True)
class CommandSpec:
    handler: Handler
    states: frozenset[State]
    min_args: int = 0
    max_args: int = 0


class Session:
    def __init__(
        self,
        *,
        mailstore: MailStore,
        accounts: AccountDB,
        locks: MailboxLocks,
        session_id: str,
        peer: str,
        tls_available: bool,
        tls_active: bool,
        plaintext_auth_allowed: bool,
        auth_failure_delay: float = AUTH_FAILURE_DELAY,
        throttle: AuthThrottle | None = None,
        logins: Logins | None = None,
    ) -> None:
        self._mailstore = mailstore
        self._accounts = accounts
        self._locks = locks
        self.session_id = session_id
        self.peer = peer
        self._tls_available = tls_available
        self.tls_active = tls_active
        self._plaintext_auth_allowed = plaintext_auth_allowed
        self._auth_failure_delay = auth_failure_delay
        self._throttle = throttle
        self._logins = logins
        # The server waits for the client's lines through this; `Logins` ends it when the
        # account is deleted.
        self.client_wait = ClientWait()
        self._leave_logins: Callable[[], None] | None = None

        self.state = State.AUTHORIZATION
        self.user: str | None = None  # set once logged in (and the maildrop locked)
        self._holds_lock = False
        self._pending_user: str | None = None  # from USER, waiting for PASS
        self._sasl_pending = False  # AUTH PLAIN sent "+ ", waiting for the response line
        self._bad_commands = 0
        self._auth_failures = 0
        self._messages: list[MessageInfo] = []  # the snapshot taken at login
        self._sizes: list[int] = []  # octets RETR sends of each (lines ended with CRLF)
        self._deleted: set[int] = set()  # 0-based indexes into _messages

    # The server's entry points

    def greeting(self) -> Response:
        return Response(p.OK_GREETING.encode())

    async def handle_line(self, line: bytes) -> Response:
        if self._sasl_pending:
            self._sasl_pending = False
            return await self._sasl_plain_response(line)
        parsed = p.parse_command(line)
        if isinstance(parsed, p.BadCommand) or parsed.keyword != "PASS":
            # RFC 1939 section 7: PASS only immediately after a successful USER.
            self._pending_user = None
        if isinstance(parsed, p.BadCommand):
            return self._protocol_error(p.ERR_BAD_SYNTAX.format(reason=parsed.reason))
        spec = COMMANDS.get(parsed.keyword)
        if spec is None:
            return self._protocol_error(p.ERR_UNKNOWN_COMMAND)
        if self.state not in spec.states:
            return self._protocol_error(p.ERR_WRONG_STATE)
        if not spec.min_args <= len(parsed.args) <= spec.max_args:
            return self._protocol_error(p.ERR_BAD_SYNTAX.format(reason="wrong number of arguments"))
        errors = self._bad_commands
        try:
            response = await spec.handler(self, parsed)
        except Exception as exc:  # noqa: BLE001 - mapped to a reply, logged with traceback
            response = Response(self._failure(exc, parsed.keyword).encode())
        if self._bad_commands == errors:
            self._bad_commands = 0  # errors in a row end a session, one now and then not
        return response

    def line_too_long(self) -> Response:
        """The client sent a line longer than the server buffers: the connection ends (the
        rest of the line is not read), without UPDATE."""
        return Response(p.ERR_LINE_TOO_LONG.encode(), after=After.CLOSE)

    def tls_started(self) -> None:
        # RFC 2595 section 4: forget anything learnt before the handshake.
        self.tls_active = True
        self._pending_user = None

    async def close(self) -> None:
        """Connection gone (QUIT, disconnect, timeout, account deleted): release the maildrop,
        no UPDATE."""
        if self._holds_lock and self.user is not None:
            self._holds_lock = False
            self._locks.release(self.user)
        if self._leave_logins is not None:
            self._leave_logins()
            self._leave_logins = None

    def loggable(self, line: bytes) -> str:
        """The client line as it may appear in a DEBUG log: credentials redacted, and a line
        that is no command at all (a client sending its SASL response after the AUTH was
        refused, say) only counted."""
        if self._sasl_pending:
            return "****"
        words = line.split(None, 1)
        if not words or words[0].decode("ascii", "replace").upper() not in COMMANDS:
            return f"<{len(line)} octets, not a command>"
        return p.redact(line)

    @property
    def log_context(self) -> dict[str, object]:
        return {"session": self.session_id, "peer": self.peer, "user": self.user}

    # Helpers

    def _protocol_error(self, reply: p.Reply) -> Response:
        self._bad_commands += 1
        if self._bad_commands >= MAX_BAD_COMMANDS:
            log.info("too many bad commands, disconnecting", extra=self.log_context)
            return Response(p.ERR_TOO_MANY_ERRORS.encode(), after=After.CLOSE)
        return Response(reply.encode())

    def _failure(self, exc: BaseException, command: str) -> p.Reply:
        reply = reply_for_failure(exc)
        if reply is p.ERR_INTERNAL:
            log.exception("internal error in %s", command, extra=self.log_context)
        else:
            log.warning("storage error in %s: %r", command, exc, extra=self.log_context)
        return reply

    @property
    def _plaintext_ok(self) -> bool:
        return self.tls_active or self._plaintext_auth_allowed

    def _visible(self) -> list[tuple[int, MessageInfo]]:
        return [
            (index + 1, info)
            for index, info in enumerate(self._messages)
            if index not in self._deleted
        ]

    def _totals(self) -> tuple[int, int]:
        visible = self._visible()
        return len(visible), sum(self._sizes[number - 1] for number, _ in visible)

    def _lookup(self, arg: str) -> tuple[int, MessageInfo] | p.Reply:
        number = p.parse_message_number(arg)
        if number is None:
            return p.ERR_BAD_NUMBER
        if number > len(self._messages):
            return p.ERR_NO_SUCH_MESSAGE
        if number - 1 in self._deleted:
            return p.ERR_DELETED.format(number=number)
        return number - 1, self._messages[number - 1]

    @property
    def client_ip(self) -> str:
        return self.peer.rpartition(":")[0].strip("[]")

    async def _login(self, address: str, password: str) -> Response:
        verdict = await self._check_password(address, password)
        if verdict == "throttled":
            return await self._auth_failed(address, ERR_AUTH_THROTTLED, count=False,
                                           throttled=True)
        if verdict == "wrong":
            return await self._auth_failed(address, count=False)  # counted in the check
        user = normalize_address(address)
        leave = await self._admit(user)
        if leave is None:
            log.info("login failed: account deleted meanwhile", extra={**self.log_context,
                                                                        "user": user})
            return await self._auth_failed(address, count=False)
        if not self._locks.acquire(user):
            leave()
            log.info("maildrop locked by another session", extra={**self.log_context,
                                                                   "user": user})
            return Response(p.ERR_IN_USE.encode())
        try:
            messages = await self._mailstore.list_messages(user, INBOX)
            # RFC 1939 5, 7: sizes are those of what RETR sends, whose lines all end with
            # CRLF; a message stored without a final line end gets one (mailbox.py).
            padding = await self._mailstore.line_end_padding(user, INBOX)
        except (NoSuchUser, NoSuchMailbox):
            messages, padding = [], {}  # an account that never received mail: empty
        except BaseException:
            self._locks.release(user)
            leave()
            raise
        self._leave_logins = leave
        self.user = user
        self._holds_lock = True
        self._messages = messages
        self._sizes = [info.size + padding.get(info.uid, 0) for info in messages]
        self._deleted = set()
        self.state = State.TRANSACTION
        count, octets = self._totals()
        log.info("logged in", extra=self.log_context)
        return Response(p.OK_LOGGED_IN.format(user=user, count=count, octets=octets).encode())

    async def _admit(self, user: str) -> Callable[[], None] | None:
        """Count the session among the store's logins (services/store/logins.py); None when
        the account was deleted while its password was checked."""
        if self._logins is None:
            return lambda: None
        return await self._logins.admit(user, self.client_wait.end)

    async def _check_password(self, address: str, password: str) -> str:
        """"right", "wrong" (counted in the throttle) or "throttled" (not checked)."""
        def verify() -> Awaitable[bool]:
            return authenticate(self._accounts, address, password)

        if self._throttle is None:
            return "right" if await verify() else "wrong"
        return await self._throttle.check(self.client_ip, address, verify)

    async def _auth_failed(self, address: str, reply: p.Reply = p.ERR_AUTH_FAILED,
                           count: bool = True, throttled: bool = False) -> Response:
        """A refused login: counted in the throttle when `count` (a wrong password was
        counted by its attempt already), delayed, and after MAX_AUTH_FAILURES on one
        connection the connection is closed."""
        self._auth_failures += 1
        if count and self._throttle is not None:
            await self._throttle.failed(self.client_ip, address)
        log.info("login refused: too many failures" if throttled else "login failed",
                 extra={**self.log_context, "user": address[:100]})
        await asyncio.sleep(self._auth_failure_delay)
        after = After.CLOSE if self._auth_failures >= MAX_AUTH_FAILURES else After.CONTINUE
        return Response(reply.encode(), after=after)

    async def _sasl_plain_response(self, line: bytes) -> Response:
        text = line.rstrip(b"\r\n").decode("ascii", "replace")
        if text == "*":  # RFC 5034 section 4: the client cancels the exchange
            return Response(p.ERR_AUTH_CANCELLED.encode())
        return await self._auth_plain(text, initial=False)

    async def _auth_plain(self, response: str, *, initial: bool) -> Response:
        """RFC 4616 PLAIN. A response that is no base64 is a protocol error (RFC 5034 4);
        one that is no PLAIN message (an empty one, `=`, included) a failed login, as in
        IMAP (common/sasl.py)."""
        message = p.decode_sasl_response(response, initial=initial)
        if message is None:
            return self._protocol_error(p.ERR_AUTH_MALFORMED)
        credentials = parse_plain(message)
        if credentials is None:
            return await self._auth_failed("", count=False)
        # RFC 4616 section 2: we do not let one user act as another (an authzid naming the
        # same account in another spelling is that account, as in IMAP; not a failed login).
        if credentials.authzid and \
                normalize_address(credentials.authzid) != normalize_address(credentials.authcid):
            return await self._auth_failed(credentials.authcid, count=False)
        try:
            return await self._login(credentials.authcid, credentials.password)
        except Exception as exc:  # noqa: BLE001 - mapped to a reply, logged with traceback
            return Response(self._failure(exc, "AUTH").encode())

    # Command handlers: the state and argument count are checked before they run.

    async def cmd_capa(self, command: p.Command) -> Response:
        # RFC 2449 section 5: what AUTHORIZATION announces, TRANSACTION announces too (USER,
        # SASL and STLS included, though their commands are valid before login only).
        lines = ["TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
        if self._plaintext_ok:
            lines += ["USER", "SASL PLAIN"]
        if self._tls_available and not self.tls_active:
            lines.append("STLS")
        lines.append("IMPLEMENTATION tiermail")
        return Response(p.format_multiline(p.OK_CAPA, lines))

    async def cmd_user(self, command: p.Command) -> Response:
        if not self._plaintext_ok:
            return Response(p.ERR_STLS_FIRST.encode())
        self._pending_user = command.args[0]
        return Response(p.OK_USER.encode())

    async def cmd_pass(self, command: p.Command) -> Response:
        if not self._plaintext_ok:
            return Response(p.ERR_STLS_FIRST.encode())
        address, self._pending_user = self._pending_user, None
        if address is None:
            return self._protocol_error(p.ERR_NEED_USER)
        # RFC 1939 section 7: the one argument may contain spaces.
        return await self._login(address, command.rest)

    async def cmd_auth(self, command: p.Command) -> Response:
        if not command.args:
            # Not in RFC 5034, but what clients of the RFC 1734 era send to learn the
            # mechanisms (as SASL in CAPA tells newer ones), and what other servers answer.
            return Response(p.format_multiline(p.OK_AUTH_LIST,
                                               ["PLAIN"] if self._plaintext_ok else []))
        if command.args[0].upper() != "PLAIN":
            return Response(p.ERR_AUTH_MECHANISM.encode())
        if not self._plaintext_ok:
            return Response(p.ERR_STLS_FIRST.encode())
        if len(command.args) == 2:
            return await self._auth_plain(command.args[1], initial=True)
        self._sasl_pending = True
        return Response(p.SASL_CONTINUE)

    async def cmd_stls(self, command: p.Command) -> Response:
        if self.tls_active:
            return Response(p.ERR_TLS_ACTIVE.encode())
        if not self._tls_available:
            return Response(p.ERR_TLS_UNAVAILABLE.encode())
        return Response(p.OK_STLS.encode(), after=After.START_TLS)

    async def cmd_stat(self, command: p.Command) -> Response:
        count, octets = self._totals()
        return Response(p.OK_STAT.format(count=count, octets=octets).encode())

    async def cmd_list(self, command: p.Command) -> Response:
        if command.args:
            found = self._lookup(command.args[0])
            if isinstance(found, p.Reply):
                return Response(found.encode())
            index, _ = found
            return Response(p.OK_LIST_ONE.format(number=index + 1,
                                                 size=self._sizes[index]).encode())
        count, octets = self._totals()
        lines = [f"{number} {self._sizes[number - 1]}" for number, _ in self._visible()]
        return Response(p.format_multiline(p.OK_LIST_ALL.format(count=count, octets=octets),
                                           lines))

    async def cmd_uidl(self, command: p.Command) -> Response:
        if command.args:
            found = self._lookup(command.args[0])
            if isinstance(found, p.Reply):
                return Response(found.encode())
            index, info = found
            return Response(p.OK_UIDL_ONE.format(number=index + 1, uid=info.guid).encode())
        lines = [f"{number} {info.guid}" for number, info in self._visible()]
        return Response(p.format_multiline(p.OK_UIDL_ALL, lines))

    async def cmd_retr(self, command: p.Command) -> Response:
        return await self._send_message(command.args[0], None)

    async def cmd_top(self, command: p.Command) -> Response:
        lines = p.parse_line_count(command.args[1])
        if lines is None:
            return Response(p.ERR_BAD_SYNTAX.format(reason="invalid line count").encode())
        return await self._send_message(command.args[0], lines)

    async def _send_message(self, arg: str, top_lines: int | None) -> Response:
        found = self._lookup(arg)
        if isinstance(found, p.Reply):
            return Response(found.encode())
        index, info = found
        assert self.user is not None
        file = await asyncio.to_thread(self._mailstore.open_message, self.user, info.guid)
        first = p.OK_RETR.format(size=self._sizes[index]) if top_lines is None else p.OK_TOP
        return Response(first.encode(), body=MessageStream(file, top_lines))

    async def cmd_dele(self, command: p.Command) -> Response:
        found = self._lookup(command.args[0])
        if isinstance(found, p.Reply):
            return Response(found.encode())
        index, _ = found
        self._deleted.add(index)
        return Response(p.OK_DELE.format(number=index + 1).encode())

    async def cmd_rset(self, command: p.Command) -> Response:
        self._deleted.clear()
        count, octets = self._totals()
        return Response(p.OK_RSET.format(count=count, octets=octets).encode())

    async def cmd_noop(self, command: p.Command) -> Response:
        return Response(p.OK_NOOP.encode())

    async def cmd_quit(self, command: p.Command) -> Response:
        if self.state is State.AUTHORIZATION:
            return Response(p.OK_BYE.encode(), after=After.CLOSE)
        # RFC 1939 section 6: the UPDATE state commits the deletions.
        self.state = State.UPDATE
        assert self.user is not None
        # By GUID (the UIDL): a message IMAP moved meanwhile, even within INBOX, has a new
        # UID, and deleting by the UIDs seen at login left it there under its UIDL while
        # QUIT said +OK (found in review).
        guids = [self._messages[index].guid for index in sorted(self._deleted)]
        try:
            gone = await self._mailstore.expunge_by_guid(self.user, INBOX, guids) \
                if guids else []
        except Exception as exc:  # noqa: BLE001 - mapped to a reply, logged with traceback
            return Response(self._failure(exc, "QUIT").encode(), after=After.CLOSE)
        finally:
            await self.close()
        # Fewer than marked: IMAP expunged the rest, or moved them out of INBOX, meanwhile.
        log.info("maildrop updated: %d message%s deleted (%d marked)", len(gone),
                 "" if len(gone) == 1 else "s", len(guids),
                 extra={**self.log_context, "event": "update"})
        return Response(await self._farewell(self.user), after=After.CLOSE)

    async def _farewell(self, user: str) -> bytes:
        """QUIT's reply after UPDATE, counting what the maildrop holds now: mail that came
        during the session is in it, and messages IMAP expunged meanwhile are not. The
        deletions are committed already, so a count that cannot be read only shortens it."""
        try:
            remaining = (await self._mailstore.status(user, INBOX)).messages
        except Exception:  # noqa: BLE001 - the reply stays +OK; logged at DEBUG
            log.debug("no message count for QUIT", exc_info=True, extra=self.log_context)
            return p.OK_BYE.encode()
        return p.OK_BYE_UPDATED.format(count=remaining).encode()


_AUTH = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTH | _TRANS

# The one command table (RFC 1939 sections 4-7, RFC 2449, RFC 2595, RFC 5034).
COMMANDS: dict[str, CommandSpec] = {
    "CAPA": CommandSpec(Session.cmd_capa, _BOTH),
    "USER": CommandSpec(Session.cmd_user, _AUTH, 1, 1),
    "PASS": CommandSpec(Session.cmd_pass, _AUTH, 1, p.MAX_COMMAND_LINE),
    "AUTH": CommandSpec(Session.cmd_auth, _AUTH, 0, 2),
    "STLS": CommandSpec(Session.cmd_stls, _AUTH),
    "STAT": CommandSpec(Session.cmd_stat, _TRANS),
    "LIST": CommandSpec(Session.cmd_list, _TRANS, 0, 1),
    "UIDL": CommandSpec(Session.cmd_uidl, _TRANS, 0, 1),
    "RETR": CommandSpec(Session.cmd_retr, _TRANS, 1, 1),
    "TOP": CommandSpec(Session.cmd_top, _TRANS, 2, 2),
    "DELE": CommandSpec(Session.cmd_dele, _TRANS, 1, 1),
    "RSET": CommandSpec(Session.cmd_rset, _TRANS),
    "NOOP": CommandSpec(Session.cmd_noop, _TRANS),
    "QUIT": CommandSpec(Session.cmd_quit, _BOTH),
}
