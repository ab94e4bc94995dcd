"""The IMAP session state machine (RFC 3501 section 3): NOT_AUTHENTICATED -> AUTHENTICATED ->
SELECTED -> LOGOUT.

The session owns no socket. The server hands it one framed command at a time (`handle`) and
gives it a `Channel` to write responses and, for AUTHENTICATE and IDLE, to read a line. The
command table (commands.py) says which handler runs in which state; the state is checked once,
here, before dispatch. Storage is reached only through the MailStore interface, and every
failure becomes a reply in `responses.reply_for_failure`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from common.auththrottle import AuthThrottle
from common.budget import MemoryBudget
from common.directory import normalize_address
from common.logs import OncePerOutage
from common.sasl import parse_plain
from services.store.auth import authenticate
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MailDB
from services.store.backends.textindex import TextIndex, TextIndexer
from services.store.imap import responses as r
from services.store.imap.cache import FetchCache
from services.store.imap.commands import COMMANDS, CommandSpec, Cost, State
from services.store.imap.disconnect import Disconnect
from services.store.imap.lanes import LONG_SET, CommandLanes, LongTurn, ShortTurn, set_size
from services.store.imap.protocol import wire
from services.store.imap.protocol.command import Command, ParseError, SearchKey
from services.store.imap.protocol.grammar import announces_appended_message, parse_command
from services.store.imap.protocol.parser import (
    REASON_LITERAL_TOO_BIG,
    REASON_NO_MEMORY,
    LiteralWanted,
    RawCommand,
    Refused,
)
from services.store.imap.selected import InvalidSequence, SelectedMailbox, SelectedMailboxDeleted
from services.store.imap.userlimit import UserConnections
from services.store.logins import Logins
from services.store.mailbox import Changes, NoSuchMailbox, OutOfSpace

log = logging.getLogger(__name__)

T = TypeVar("T")

AUTH_FAILURE_DELAY = 1.0  # seconds after every failed login, as POP3
MAX_AUTH_FAILURES = 3  # failed logins per connection before BYE


class After(enum.Enum):
    CONTINUE = "continue"
    CLOSE = "close"


@dataclass(frozen=True)
class ImapDeps:
    """What every IMAP session uses, opened by the caller (main.py or a test) and passed in."""

    store: MailDB
    accounts: AccountDB
    throttle: AuthThrottle
    text_index: TextIndex | None = None  # None: SEARCH TEXT/BODY read the messages
    indexer: TextIndexer | None = None  # fed the messages a search found unindexed
    auth_failure_delay: float = AUTH_FAILURE_DELAY
    # Shared by every session; a default so tests that build ImapDeps get a private one.
    fetch_cache: FetchCache = field(default_factory=FetchCache)
    lanes: CommandLanes = field(default_factory=CommandLanes)
    # Literals arriving on all connections; None: start_imap_servers makes one of
    # settings.imap_literal_memory (main.py passes its own, to report what it holds).
    literals: MemoryBudget | None = None
    # Large messages read whole for FETCH; None: start_imap_servers makes one of
    # settings.imap_fetch_memory (main.py passes its own, to report what it holds).
    fetch_memory: MemoryBudget | None = None
    # Sessions per account and client address; None: start_imap_servers makes one of
    # settings.imap_max_userip_connections.
    user_connections: UserConnections | None = None
    # The store's logged-in sessions, ended when their account is deleted; None: never.
    logins: Logins | None = None
    # A full disk met by every SELECT (\Recent) and FETCH (\Seen): one WARNING each per
    # outage, not one per command of every client.
    recent_unclaimed: OncePerOutage = field(default_factory=OncePerOutage)
    seen_unset: OncePerOutage = field(default_factory=OncePerOutage)


@dataclass(frozen=True)
class SessionConfig:
    tls_available: bool
    plaintext_auth_allowed: bool
    max_errors: int  # settings.imap_max_errors
    append_limit: int  # settings.imap_max_literal (RFC 7889 APPENDLIMIT)
    default_quota: int  # octets; 0 = unlimited
    max_mailboxes: int = 0  # settings.imap_max_mailboxes; 0 = unlimited
    idle_poll: float = 60.0  # IDLE re-checks this often even without a change wakeup
    idle_keepalive: float = 120.0  # settings.imap_idle_keepalive; 0: no keepalives


class Channel(Protocol):
    """The connection as the session sees it (implemented by the server)."""

    peer_ip: str

    async def write(self, data: bytes) -> None:
        """Queue `data` for the client (sent by `flush`, or once enough is queued)."""
        ...

    def sends_now(self, size: int) -> bool:
        """Whether writing `size` more octets sends (rather than only queues)."""
        ...

    async def flush(self) -> None:
        """Send what is queued. The server flushes after every command and before it reads
        from the client; a handler flushes itself only while it waits for something else."""
        ...

    async def read_line(self) -> bytes | Refused:
        """One client line without CRLF (AUTHENTICATE responses, IDLE's DONE)."""
        ...

    async def start_tls(self, reply: bytes) -> bool:
        """Write `reply` and start TLS at once; False when the connection must close."""
        ...

    async def start_compression(self, reply: bytes) -> bool:
        """Write `reply`, then compress both ways (RFC 4978); False, nothing changed, when
        the client pipelined more behind COMPRESS."""
        ...

    @property
    def compressing(self) -> bool:
        """COMPRESS DEFLATE is on."""
        ...

    def logged_in(self) -> None:
        """The client has authenticated: the idle timer becomes the autologout timer
        (settings.imap_timeout) instead of the shorter one before login, and literals may be
        as large as settings.imap_max_literal instead of a few KiB."""
        ...

    def end_session(self) -> None:
        """End the connection with `* BYE Account deleted` when it next waits for the client
        (at once if it waits now, in IDLE too); a response being written is finished
        first."""
        ...

    def client_gone(self) -> bool:
        """Whether the client is known to have gone (the connection closed, or reset by the
        client after something was sent to it)."""
        ...

    def wants_probe(self) -> bool:
        """True once, after the client has closed its sending side: whether it closed the
        connection or only half-closed it (as scripts do, and still read) shows only when
        something is sent to it."""
        ...


@dataclass
class Enabled:
    """RFC 5161 ENABLE state (and CONDSTORE implied by its first use, RFC 7162 3.1)."""

    condstore: bool = False
    qresync: bool = False


class Session:
    def __init__(self, deps: ImapDeps, config: SessionConfig, channel: Channel, *,
                 session_id: str, peer: str, tls_active: bool) -> None:
        self.deps = deps
        self.store = deps.store
        self.config = config
        self.channel = channel
        self.session_id = session_id
        self.peer = peer
        self.tls_active = tls_active
        self.state = State.NOT_AUTHENTICATED
        self.user: str | None = None
        self.selected: SelectedMailbox | None = None
        self.enabled = Enabled()
        self._errors = 0
        self._auth_failures = 0
        self._turn: LongTurn | None = None  # held while a long command runs (lanes.py)
        self._inside_response = False  # one response goes out in pieces (a large FETCH)
        self._short: ShortTurn | None = None  # held while a short command runs
        self._farewell = r.BYE_LOGOUT  # the BYE before the connection closes
        # Set by a command whose tagged OK carries the mailbox's HIGHESTMODSEQ: the value
        # is taken after the command's last sync, never below one that sync announced.
        self.highestmodseq_in_reply = False
        # What the end of the session undoes: its user+IP count, its place in `Logins`.
        self._on_end: list[Callable[[], None]] = []

    # The server's entry points

    def ended(self) -> None:
        """The connection is gone (the server calls this once, however it ended)."""
        while self._on_end:
            self._on_end.pop()()

    async def greeting(self) -> None:
        await self.send(r.OK_GREETING.with_code(self.capability_code()).untagged())

    async def handle(self, raw: RawCommand) -> After:
        parsed = parse_command(raw)
        if isinstance(parsed, ParseError):
            return await self.bad(parsed.tag, r.Reply("BAD", parsed.text))
        key = f"UID {parsed.name}" if parsed.uid else parsed.name
        spec = COMMANDS.get(key)
        if spec is None:
            return await self.bad(parsed.tag, r.BAD_UNKNOWN)
        if self.state not in spec.states:
            return await self.bad(parsed.tag, r.BAD_WRONG_STATE)
        reply = await self._run(spec, parsed)
        if reply is None:  # the handler wrote its own completion (STARTTLS)
            return After.CLOSE if self.state is State.LOGOUT else After.CONTINUE
        if reply.status == "BAD":
            return await self.bad(parsed.tag, reply)
        self._errors = 0  # BADs in a row end a session; one now and then in a long one not
        if self.state is State.LOGOUT:
            await self.send(self._farewell.untagged() + reply.tagged(parsed.tag))
            return After.CLOSE
        await self.send(reply.tagged(parsed.tag))
        if self._auth_failures >= MAX_AUTH_FAILURES:
            await self.send(r.BYE_TOO_MANY_FAILED_LOGINS.untagged())
            return After.CLOSE
        return After.CONTINUE

    async def refused(self, refusal: Refused) -> After:
        """The parser dropped a command: over the line limit or the literal limit, or no memory
        for its literal right now."""
        if refusal.reason == REASON_LITERAL_TOO_BIG:
            # RFC 7889: APPEND larger than APPENDLIMIT gets [TOOBIG]; not a protocol error.
            reply = r.Reply("NO", "Literal larger than the server accepts", "TOOBIG")
            await self.send(reply.tagged(refusal.tag))
            after = After.CONTINUE
        elif refusal.reason == REASON_NO_MEMORY:
            log.warning("no memory for a literal now, refused", extra=self.log_context)
            await self.send(r.NO_BUSY.tagged(refusal.tag))
            after = After.CONTINUE
        else:
            after = await self.bad(refusal.tag, r.BAD_LINE_TOO_LONG)
        if refusal.close and after is After.CONTINUE:
            await self.send(r.BYE_TOO_MANY_ERRORS.untagged())
            return After.CLOSE
        return after

    async def accepts_literal(self, wanted: LiteralWanted) -> bool:
        """Whether to send `+` for a synchronizing literal; if not, the command has been
        answered. An APPEND's message larger than the room left under the account's quota
        gets NO [OVERQUOTA] before the client uploads it (RFC 3501 7.5 allows a NO in place
        of the continuation; Dovecot does the same). The literal is never larger than what
        would be stored (bare LFs become CRLF), so nothing that fits is refused here; the
        APPEND itself checks again."""
        if self.state not in (State.AUTHENTICATED, State.SELECTED):
            return True
        if not announces_appended_message(wanted.command):
            return True
        room = await self._room_left()
        if room is None or wanted.size <= room:
            return True
        log.info("APPEND of %d octets refused before its literal: over quota", wanted.size,
                 extra=self.log_context)
        await self.send(r.NO_OVERQUOTA.tagged(wanted.tag))
        return False

    async def _room_left(self) -> int | None:
        """Octets the account may still store; None when unlimited or not known now (then
        the APPEND itself reports what failed)."""
        try:
            limit = await self.quota_limit()
            return None if limit is None else limit - await self.store.usage(self.logged_in_user)
        except Exception:  # noqa: BLE001 - the APPEND maps it to its reply; not the session's end
            log.exception("quota not checked before an APPEND's literal", extra=self.log_context)
            return None

    def tls_started(self) -> None:
        self.tls_active = True

    @property
    def log_context(self) -> dict[str, object]:
        return {"session": self.session_id, "peer": self.peer, "user": self.user}

    # Helpers for handlers

    async def send(self, data: bytes) -> None:
        if self._turn is not None and self.channel.sends_now(len(data)):
            # A long command lets the lane go while the client takes its time.
            await self._turn.outside(self.channel.write(data))
        else:
            await self.channel.write(data)

    async def bad(self, tag: str, reply: r.Reply) -> After:
        self._errors += 1
        await self.send(reply.tagged(tag))
        if self._errors >= self.config.max_errors:
            log.info("too many bad commands, disconnecting", extra=self.log_context)
            await self.send(r.BYE_TOO_MANY_ERRORS.untagged())
            return After.CLOSE
        return After.CONTINUE

    async def _run(self, spec: CommandSpec, command: Command) -> r.Reply | None:
        if self._is_long(spec, command):
            async with self.deps.lanes.long() as turn:
                self._turn = turn
                try:
                    return await self._execute(spec, command)
                finally:
                    self._turn = None
        with self.deps.lanes.short() as short:
            self._short = short
            try:
                return await self._execute(spec, command)
            finally:
                self._short = None

    async def outside_lane(self, waiting: Awaitable[T]) -> T:
        """Wait for the client (or a delay) without holding the command's lane (lanes.py):
        other sessions' commands need not wait for this client."""
        turn = self._turn or self._short
        return await (waiting if turn is None else turn.outside(waiting))

    async def between_steps(self) -> None:
        """A pause in a command's work: other sessions run, and a long command lets the short
        commands in progress finish first. A command whose client has gone ends here: a
        SEARCH nobody will read must not run on for a minute, holding the long lane."""
        await self._check_client()
        if self._turn is not None:
            await self._turn.step()
        else:
            await asyncio.sleep(0)

    @contextlib.contextmanager
    def inside_response(self) -> Iterator[None]:
        """Around a response sent in pieces with steps between them (a large message's
        literal): nothing else may go out in between."""
        self._inside_response = True
        try:
            yield
        finally:
            self._inside_response = False

    async def _check_client(self) -> None:
        if self.channel.client_gone():
            raise Disconnect("lost")
        if not self._inside_response and self.channel.wants_probe():
            # A client that closed its socket answers what we send with a reset, which the
            # next step's client_gone sees; one that only half-closed reads this line.
            await self.send(r.OK_STILL_WORKING.untagged())
            await self.outside_lane(self.channel.flush())

    def _is_long(self, spec: CommandSpec, command: Command) -> bool:
        if spec.cost is Cost.LONG:
            return True
        sequence = getattr(command.args, "sequence", None)
        selected = self.selected
        if spec.cost is Cost.SHORT or sequence is None or selected is None:
            return False
        return set_size(sequence, selected.count, command.uid, selected.uidnext) > LONG_SET

    async def _execute(self, spec: CommandSpec, command: Command) -> r.Reply | None:
        try:
            if spec.uses_messages:
                # Message numbers in the command mean what they meant when the client sent
                # it: expunges announced first would renumber them under it (a COPY or MOVE
                # would then take the wrong messages). Those wait until after the command.
                await self.sync(allow_expunge=spec.expunge_ok and not _numbers_messages(command))
            reply = await spec.handler(self, command)
            if self.selected is not None:
                await self.sync(allow_expunge=spec.expunge_ok)
                if self.highestmodseq_in_reply and reply is not None and reply.status == "OK":
                    reply = reply.with_code(f"HIGHESTMODSEQ {self.selected.highestmodseq}")
            return reply
        except InvalidSequence:
            return r.BAD_INVALID_SET
        except SelectedMailboxDeleted:
            # Nothing a client could still do with it; it reconnects and lists again.
            log.info("selected mailbox deleted by another session, disconnecting",
                     extra=self.log_context)
            self._farewell = r.BYE_MAILBOX_DELETED
            self.state = State.LOGOUT
            if command.name == "IDLE":  # no completion before the client's DONE (RFC 2177)
                await self.send(self._farewell.untagged())
                return None
            return r.NO_NONEXISTENT
        except Disconnect:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a reply, logged with traceback
            return self.failure(exc, command.name)
        finally:
            self.highestmodseq_in_reply = False

    def failure(self, exc: BaseException, command: str, *, trycreate: bool = False
                ) -> r.Reply:
        reply = r.reply_for_failure(exc, trycreate=trycreate)
        if reply is r.NO_SERVERBUG:
            log.exception("internal error in %s", command, extra=self.log_context,
                          exc_info=exc)
        else:
            log.info("%s refused: %r", command, exc, extra=self.log_context)
        return reply

    @property
    def plaintext_ok(self) -> bool:
        return self.tls_active or self.config.plaintext_auth_allowed

    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.config.tls_available and not self.tls_active:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self.plaintext_ok else "LOGINDISABLED")
        caps += ["UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS",
                 "SPECIAL-USE", "CREATE-SPECIAL-USE", "CONDSTORE", "QRESYNC", "ESEARCH",
                 "SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES",
                 "QUOTA", "QUOTA=RES-STORAGE", "STATUS=SIZE",
                 f"APPENDLIMIT={self.config.append_limit}"]
        if self.state is not State.NOT_AUTHENTICATED:
            caps.append("COMPRESS=DEFLATE")  # a command of the authenticated state
        return caps

    def capability_code(self) -> str:
        return "CAPABILITY " + " ".join(self.capabilities())

    @property
    def logged_in_user(self) -> str:
        assert self.user is not None, "the command table admits this only after login"
        return self.user

    @property
    def mailbox(self) -> SelectedMailbox:
        assert self.selected is not None, "the command table admits this only when selected"
        return self.selected

    async def quota_limit(self) -> int | None:
        """The account's storage quota in octets (settings.default_quota applied), None when
        unlimited."""
        return await asyncio.to_thread(self.deps.accounts.quota, self.logged_in_user,
                                       self.config.default_quota)

    # Keeping the selected mailbox current

    async def sync(self, *, allow_expunge: bool) -> None:
        """Take in other sessions' (and our own) changes and announce what may be announced.
        Costs no query when MailDB's change counter has not moved."""
        selected = self.selected
        if selected is None:
            return
        await self.take_in_changes()
        pieces = selected.updates_in_steps(allow_expunge=allow_expunge,
                                           qresync=self.enabled.qresync,
                                           condstore=self.enabled.condstore)
        for number, lines in enumerate(pieces):
            if number:
                await self.between_steps()
            await self.send(b"".join(lines))

    async def take_in_changes(self, *, claim_recent: bool = True) -> None:
        """Bring the selected mailbox's state up to date with every session's changes,
        announcing nothing yet (`sync` announces). New mail is \\Recent for this session
        unless it is about to leave the mailbox without being told (CLOSE)."""
        selected = self.selected
        if selected is None:
            return
        user = self.logged_in_user
        version = self.store.version(user)
        if version == selected.version:
            return
        selected.version = version  # before the query: a change during it bumps again
        changes = await self._changes(selected)
        new: list[int] = []
        for _ in selected.apply_in_steps(changes, new):
            await self.between_steps()
        if new and claim_recent:
            with contextlib.suppress(OutOfSpace):  # a full disk: new mail, not \Recent
                selected.mark_recent(new, await self._recent_from(selected))

    async def _recent_from(self, selected: SelectedMailbox) -> int:
        """Where the new messages this session is the first to be told of start (RFC 3501
        2.3.2). A read-write session claims them up to what `changes` held (mail delivered
        since is claimed when announced); a read-only one is shown the unclaimed ones as
        \\Recent and leaves them for the next read-write session (as EXAMINE does)."""
        user = self.logged_in_user
        if selected.readonly:
            return await self.store.first_unclaimed(user, selected.name)
        return await self.store.claim_recent(user, selected.name, selected.uidnext)

    async def _changes(self, selected: SelectedMailbox) -> Changes:
        """What changed in the selected mailbox. Renamed by another session, it is followed
        under its new name (its UIDVALIDITY names it for good); deleted, the session ends."""
        user = self.logged_in_user
        try:
            changes = await self.store.changes_since(user, selected.name,
                                                     selected.highestmodseq)
            if changes.status.uidvalidity == selected.uidvalidity:
                return changes
            # A new mailbox now has the old name: the selected one is elsewhere, or gone.
        except NoSuchMailbox:
            pass
        renamed = [info.name for info in await self.store.list_mailboxes(user)
                   if info.uidvalidity == selected.uidvalidity]
        if not renamed:
            raise SelectedMailboxDeleted(selected.name)
        log.info("selected mailbox renamed to %r by another session", renamed[0],
                 extra=self.log_context)
        selected.name = renamed[0]
        return await self.store.changes_since(user, selected.name, selected.highestmodseq)

    def deselect(self) -> None:
        self.selected = None
        self.state = State.AUTHENTICATED

    # Authentication (LOGIN and AUTHENTICATE PLAIN)

    async def login(self, address: str, password: str) -> r.Reply:
        if not self.plaintext_ok:
            return r.NO_PRIVACY_REQUIRED
        user = normalize_address(address)[:320]
        ip = self.channel.peer_ip
        throttle = self.deps.throttle
        verdict = await throttle.check(
            ip, user, lambda: authenticate(self.deps.accounts, user, password))
        if verdict == "throttled":
            log.info("login throttled", extra={**self.log_context, "user": user})
            return await self._login_refused(r.NO_AUTH_THROTTLED)
        if verdict == "wrong":
            log.info("login failed", extra={**self.log_context, "user": user})
            return await self._login_refused(r.NO_AUTH_FAILED)
        if self.deps.user_connections is not None:
            uncount = self.deps.user_connections.admit(user, ip)
            if uncount is None:
                log.info("login refused: too many sessions of this account from this address",
                         extra={**self.log_context, "user": user})
                return r.NO_TOO_MANY_USER_SESSIONS
            self._on_end.append(uncount)
        if self.deps.logins is not None:
            leave = await self.deps.logins.admit(user, self.channel.end_session)
            if leave is None:
                self.ended()
                log.info("login failed: account deleted meanwhile",
                         extra={**self.log_context, "user": user})
                return r.NO_AUTH_FAILED
            self._on_end.append(leave)
        self.user = user
        self.state = State.AUTHENTICATED
        self.channel.logged_in()
        log.info("logged in", extra=self.log_context)
        return r.OK_LOGGED_IN.with_code(self.capability_code())

    async def authenticate_plain(self, initial: bytes | None) -> r.Reply:
        """RFC 4616 PLAIN, with the RFC 4959 initial response or after a `+` continuation.
        Undecodable base64 and the client's cancel are BAD (RFC 3501 6.2.2); a response
        that decodes but is no PLAIN message (an empty one, `=`, included) fails as wrong
        credentials do (common/sasl.py)."""
        if not self.plaintext_ok:
            return r.NO_PRIVACY_REQUIRED
        if initial is None:
            response = await self._sasl_response()
            if isinstance(response, r.Reply):
                return response
            initial = response
        credentials = parse_plain(initial)
        if credentials is None:
            log.info("login failed: not a PLAIN message", extra=self.log_context)
            return await self._login_refused(r.NO_AUTH_FAILED)
        # RFC 4616 2: we do not let one user act as another.
        if credentials.authzid and \
                normalize_address(credentials.authzid) != normalize_address(credentials.authcid):
            log.info("login failed: authorization as another user",
                     extra={**self.log_context, "user": credentials.authcid[:100]})
            return await self._login_refused(r.NO_AUTH_FAILED)
        return await self.login(credentials.authcid, credentials.password)

    async def unreadable_login(self) -> r.Reply:
        """LOGIN with a name or password that is not UTF-8: no account's, so it fails as a
        wrong password does, counted for the connection as a malformed PLAIN message is."""
        if not self.plaintext_ok:
            return r.NO_PRIVACY_REQUIRED
        log.info("login failed: name or password not UTF-8", extra=self.log_context)
        return await self._login_refused(r.NO_AUTH_FAILED)

    async def _sasl_response(self) -> bytes | r.Reply:
        """The client's response to an empty `+` challenge, decoded; BAD when it cancels
        or sends no base64."""
        await self.send(wire.continuation())
        line = await self.outside_lane(self.channel.read_line())
        if isinstance(line, Refused):
            return r.BAD_AUTH_MALFORMED
        if line.strip() == b"*":  # RFC 3501 6.2.2: the client cancels
            return r.BAD_AUTH_CANCELLED
        try:
            return base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            return r.BAD_AUTH_MALFORMED

    async def _login_refused(self, reply: r.Reply) -> r.Reply:
        """A login that failed or was throttled: delayed, and counted towards the
        connection's MAX_AUTH_FAILURES (then BYE), as in POP3."""
        self._auth_failures += 1
        await self.outside_lane(asyncio.sleep(self.deps.auth_failure_delay))
        return reply


def _numbers_messages(command: Command) -> bool:
    """Whether the command names messages by sequence number: its set (not in the UID form),
    or a sequence set in its search key (UID SEARCH, SORT and THREAD included)."""
    if not command.uid and getattr(command.args, "sequence", None) is not None:
        return True
    key = getattr(command.args, "key", None)
    return isinstance(key, SearchKey) and key.contains("SEQ")
