"""IMAP command handlers and the one command table (name -> handler, states, flags).

The session checks the state against the table before a handler runs, so handlers never do.
A handler writes its untagged data through the session and returns the tagged completion
(`None` when it already wrote it: STARTTLS). Storage errors propagate to the session, which
maps them in one place (responses.reply_for_failure); handlers catch them only where the reply
depends on the command (APPEND/COPY/MOVE targets get [TRYCREATE]).

RFC 3501 (IMAP4rev1) section 6, with RFC 2177 (IDLE), 2971 (ID), 4315 (UIDPLUS), 4731
(ESEARCH), 4959 (SASL-IR), 5161 (ENABLE), 5256 (SORT, THREAD), 5258 (LIST-EXTENDED), 5819
(LIST-STATUS), 6154 (SPECIAL-USE), 6851 (MOVE), 7162 (CONDSTORE, QRESYNC), 7888 (LITERAL+),
7889 (APPENDLIMIT), 9208 (QUOTA), 3691 (UNSELECT), 3348 (CHILDREN), 2342 (NAMESPACE).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, cast

from common.budget import Hold
from services.store.imap import responses as r
from services.store.imap.cache import FetchCache
from services.store.imap.disconnect import Disconnect
from services.store.imap.protocol import fetch as f
from services.store.imap.protocol import wire
from services.store.imap.protocol.command import (
    Append,
    Authenticate,
    Command,
    Compress,
    CopyMove,
    Enable,
    Fetch,
    FetchAtt,
    Id,
    ListArgs,
    Login,
    MailboxArg,
    QuotaRoot,
    Rename,
    Search,
    SearchKey,
    Select,
    SequenceSet,
    Sort,
    Status,
    Store,
    Thread,
    UidExpunge,
)
from services.store.imap.protocol.grammar import known_charset
from services.store.imap.protocol.pattern import ListPattern
from services.store.imap.protocol.sequence import covered, listed
from services.store.imap.search import (
    HEADER_BREAKS,
    MessageView,
    StoreMessageSource,
    read_header,
    search,
)
from services.store.imap.selected import (
    SelectedMailbox,
    SelectedMailboxDeleted,
    format_uids,
    too_many_keywords,
)
from services.store.imap.sort import BadSortCriteria, sort
from services.store.imap.thread import BadThreadAlgorithm, format_thread, thread
from services.store.mailbox import (
    HIERARCHY_DELIMITER,
    INBOX,
    SPECIAL_USE,
    MailboxInfo,
    MessageInfo,
    NoSuchMailbox,
    NoSuchMessage,
    OutOfSpace,
    every_spelling,
    in_known_spelling,
)

if TYPE_CHECKING:
    from services.store.imap.session import Session

log = logging.getLogger(__name__)

# Message bytes read from storage per worker-thread round trip while answering FETCH, and the
# response bytes gathered before a write: big enough to amortise, small enough that a FETCH of
# 100,000 messages neither holds them all in memory nor keeps other sessions waiting.
READ_BATCH_OCTETS = 4 * 1024 * 1024
READ_BATCH_MESSAGES = 256
WRITE_BATCH_OCTETS = 256 * 1024
READ_THREADS = 4  # parallel file reads per batch
DIRECT_READ_MAX = 64 * 1024  # a single message up to this size is read without a thread
# A whole-message FETCH of a message larger than this is sent from its file in chunks of
# STREAM_CHUNK: what a session holds stays near READ_BATCH_OCTETS whatever the message sizes.
STREAM_OVER = 256 * 1024
STREAM_CHUNK = 256 * 1024
# LIST and LSUB let other sessions run after this many matches of a name against a pattern
# (one LIST may carry 100 patterns; an account may have thousands of mailboxes).
LIST_STEP = 256
FETCH_TURN = 0.02  # seconds of answering a FETCH batch in the loop before others get a turn
SEEN = "\\Seen"
DELETED = "\\Deleted"


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


Handler = Callable[["Session", Command], Awaitable["r.Reply | None"]]


class Cost(enum.Enum):
    SHORT = "short"
    BY_SET = "by-set"
    LONG = "long"


@dataclass(frozen=True)
class CommandSpec:
    """One row of the command table."""

    handler: Handler
    states: frozenset[State]
    # Reads the selected mailbox's messages: bring the map up to date first.
    uses_messages: bool = False
    # RFC 3501 7.4.1: no EXPUNGE responses during FETCH, STORE or SEARCH (their UID forms may
    # send them: UIDs do not shift).
    expunge_ok: bool = True
    # Waits for the long lane (lanes.py): LONG always, BY_SET when its sequence set is large.
    cost: Cost = Cost.SHORT


# --- any state ---------------------------------------------------------------------------

async def capability(s: Session, c: Command) -> r.Reply:
    await s.send(wire.untagged(s.capability_code()))
    return r.OK_DONE


async def noop(s: Session, c: Command) -> r.Reply:
    return r.OK_DONE  # the session sends pending updates after every command


async def logout(s: Session, c: Command) -> r.Reply:
    s.state = State.LOGOUT
    return r.OK_LOGOUT


async def id_(s: Session, c: Command) -> r.Reply:
    params = cast(Id, c.args).params
    if params:
        log.info("client id %s", {k: v for k, v in list(params.items())[:10]},
                 extra=s.log_context)
    await s.send(wire.untagged(b'ID ("name" "tiermail" "vendor" "tiermail")'))
    return r.OK_DONE


# --- not authenticated -------------------------------------------------------------------

async def starttls(s: Session, c: Command) -> r.Reply | None:
    if s.tls_active:
        return r.Reply("BAD", "TLS already active")
    if not s.config.tls_available:
        return r.NO_TLS_UNAVAILABLE
    if not await s.channel.start_tls(r.OK_BEGIN_TLS.tagged(c.tag)):
        s.state = State.LOGOUT
    else:
        s.tls_started()
    return None


async def compress(s: Session, c: Command) -> r.Reply | None:
    """RFC 4978: DEFLATE from right after the tagged OK, both ways, for the rest of the
    connection (under TLS when TLS is on: compressed first, then encrypted)."""
    if cast(Compress, c.args).mechanism != "DEFLATE":
        return r.BAD_COMPRESS_MECHANISM
    if s.channel.compressing:
        return r.NO_COMPRESSION_ACTIVE
    if not await s.channel.start_compression(r.OK_COMPRESS.tagged(c.tag)):
        return r.BAD_COMPRESS_PIPELINED
    return None


async def login(s: Session, c: Command) -> r.Reply:
    args = cast(Login, c.args)
    if not args.readable:
        return await s.unreadable_login()
    return await s.login(args.user, args.password)


async def authenticate(s: Session, c: Command) -> r.Reply:
    args = cast(Authenticate, c.args)
    if args.mechanism != "PLAIN":
        return r.NO_AUTH_MECHANISM
    return await s.authenticate_plain(args.initial)


# --- authenticated -----------------------------------------------------------------------

async def enable(s: Session, c: Command) -> r.Reply:
    enabled = []
    for name in cast(Enable, c.args).capabilities:
        if name == "CONDSTORE":
            s.enabled.condstore = True
        elif name == "QRESYNC":
            s.enabled.qresync = s.enabled.condstore = True
        else:
            continue  # RFC 5161 3.1: unknown capabilities are ignored
        enabled.append(name)
    await s.send(wire.untagged(" ".join(["ENABLED", *enabled])))
    return r.OK_DONE


async def select(s: Session, c: Command) -> r.Reply:
    args = cast(Select, c.args)
    readonly = c.name == "EXAMINE"
    if args.qresync is not None and not s.enabled.qresync:
        # RFC 7162 3.2.5; refused as a BAD, the command did nothing: the mailbox stays selected
        return r.BAD_QRESYNC_NOT_ENABLED
    if s.selected is not None:
        s.deselect()
        await s.send(r.OK_CLOSED.untagged())  # RFC 7162 3.2.11
    if args.condstore:
        s.enabled.condstore = True
    user = s.logged_in_user
    version = s.store.version(user)  # first: anything committed later is synced later
    status = await s.store.status(user, args.mailbox)
    await s.between_steps()
    snapshot = await s.store.snapshot(user, args.mailbox)
    await s.between_steps()
    recent_from = (await _unclaimed_recent(s, args.mailbox) if readonly else
                   await _claim_recent(s, args.mailbox, snapshot.uids, status.uidnext))
    selected = SelectedMailbox(status.name, readonly=readonly, status=status,
                               snapshot=snapshot, recent_from=recent_from, version=version)
    lines = [
        wire.untagged(b"FLAGS " + selected.flag_list()),
        wire.untagged(b"OK [PERMANENTFLAGS "
                      + selected.permanent_flags()
                      + b"] Flags permitted"),
        wire.untagged(b"%d EXISTS" % selected.count),
        wire.untagged(b"%d RECENT" % selected.recent_count),
    ]
    unseen = selected.first_unseen_at_select
    if unseen is not None:
        lines.append(wire.untagged(b"OK [UNSEEN %d] First unseen" % (unseen + 1)))
    lines += [
        wire.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % selected.uidvalidity),
        wire.untagged(b"OK [UIDNEXT %d] Predicted next UID" % selected.uidnext),
        wire.untagged(b"OK [HIGHESTMODSEQ %d] Highest" % selected.highestmodseq),
    ]
    await s.send(b"".join(lines))
    s.selected = selected
    s.state = State.SELECTED
    if args.qresync is not None and args.qresync.uidvalidity == selected.uidvalidity:
        await _qresync(s, selected, args)
    code = "READ-ONLY" if readonly else "READ-WRITE"
    return r.Reply("OK", f"{c.name} completed", code)


async def _qresync(s: Session, selected: SelectedMailbox, args: Select) -> None:
    """RFC 7162 3.2.5: what changed since the client's MODSEQ, as VANISHED (EARLIER) and
    FETCH responses, so it need not fetch the flags of the whole mailbox."""
    params = args.qresync
    assert params is not None
    changes = await s.store.changes_since(s.logged_in_user, selected.name, params.modseq)
    known = params.known_uids
    largest = max(selected.uidnext - 1, 1)
    known_through = _expunges_known_through(selected, params.seq_match)
    vanished = [uid for uid in changes.expunged if uid > known_through]
    if known is not None:
        vanished = covered(known, vanished, largest)
    if vanished:
        await s.send(wire.untagged(b"VANISHED (EARLIER) " + format_uids(sorted(vanished))))
    positions = [selected.position_of(info.uid) for info in changes.changed]
    await _send_batched(s, selected.flags_fetches([p for p in positions if p is not None],
                                                  uid=True, modseq=True))


def _expunges_known_through(selected: SelectedMailbox,
                            seq_match: tuple[SequenceSet, SequenceSet] | None) -> int:
    """RFC 7162 3.2.5.2: the client's (sequence number, UID) pairs, in ascending order; while
    they still hold in the mailbox, the client has seen every expunge up to that UID, and
    VANISHED (EARLIER) leaves those out. 0: no pair holds (or none given)."""
    if seq_match is None:
        return 0
    through = 0
    for seq, uid in zip(listed(seq_match[0]), listed(seq_match[1]), strict=False):
        if not 1 <= seq <= selected.count or selected.info(seq - 1).uid != uid:
            break
        through = uid
    return through


async def create(s: Session, c: Command) -> r.Reply:
    args = cast(MailboxArg, c.args)
    # RFC 3501 6.3.3: one trailing delimiter only says the client intends to create
    # children. Anywhere else a name ending with it is refused (canonical_mailbox).
    name = args.mailbox.removesuffix(HIERARCHY_DELIMITER)
    if len(args.special_use) > 1 or any(use not in SPECIAL_USE.values()
                                        for use in args.special_use):
        return r.NO_USEATTR
    special = args.special_use[0] if args.special_use else None
    await s.store.create_mailbox(s.logged_in_user, name, special,
                                 max_mailboxes=s.config.max_mailboxes or None)
    return r.OK_DONE


async def delete(s: Session, c: Command) -> r.Reply:
    name = cast(MailboxArg, c.args).mailbox
    deleting_selected = await _is_selected(s, name)
    await s.store.delete_mailbox(s.logged_in_user, name)
    if deleting_selected:
        s.deselect()
        await s.send(r.OK_CLOSED.untagged())
    return r.OK_DONE


async def _is_selected(s: Session, name: str) -> bool:
    """Whether `name` is the selected mailbox, however the client spells it ("inbox/x" is
    "INBOX/x"): its UIDVALIDITY tells, as it does for a mailbox renamed under a session."""
    selected = s.selected
    if selected is None:
        return False
    try:
        status = await s.store.status(s.logged_in_user, name)
    except NoSuchMailbox:
        return False
    return status.uidvalidity == selected.uidvalidity


async def rename(s: Session, c: Command) -> r.Reply:
    args = cast(Rename, c.args)
    await s.store.rename_mailbox(s.logged_in_user, args.old, args.new,
                                 max_mailboxes=s.config.max_mailboxes or None)
    selected = s.selected
    if selected is not None and args.old != INBOX and (
            selected.name == args.old
            or selected.name.startswith(args.old + HIERARCHY_DELIMITER)):
        selected.name = args.new + selected.name[len(args.old):]
    return r.OK_DONE


async def subscribe(s: Session, c: Command) -> r.Reply:
    name = cast(MailboxArg, c.args).mailbox
    await s.store.set_subscribed(s.logged_in_user, name, c.name == "SUBSCRIBE",
                                 max_subscriptions=s.config.max_mailboxes or None)
    return r.OK_DONE


async def namespace(s: Session, c: Command) -> r.Reply:
    # RFC 2342: one personal namespace, no shared or other users' namespaces.
    await s.send(wire.untagged(b'NAMESPACE (("" "/")) NIL NIL'))
    return r.OK_DONE


async def list_(s: Session, c: Command) -> r.Reply:
    args = cast(ListArgs, c.args)
    if c.name == "LSUB":
        return await _lsub(s, args)
    if not args.extended and args.patterns == ("",):
        # RFC 3501 6.3.8: an empty pattern asks for the delimiter and root.
        await s.send(wire.untagged(b'LIST (\\Noselect) "/" ""'))
        return r.OK_DONE
    # RFC 5258 3: an extended LIST never reads "" so, and ignores it when matching.
    patterns = [pattern for pattern in args.patterns if pattern]
    user = s.logged_in_user
    mailboxes = {info.name: info for info in await s.store.list_mailboxes(user)}
    want_subscribed = ("SUBSCRIBED" in args.select_options
                       or "SUBSCRIBED" in args.return_options)
    subscribed = set(await s.store.subscriptions(user)) if want_subscribed else set()
    tree = _Tree(mailboxes, subscribed)
    matcher = _Matcher(args.reference, patterns)
    candidates = await _candidates(s, args, tree, matcher)
    lines: list[bytes] = []
    for count, name in enumerate(candidates, 1):
        if count % matcher.step == 0:
            await s.between_steps()  # many names and patterns: others are served meanwhile
        if not matcher.matches(name):
            continue
        attributes = tree.attributes(name, extended=args.extended)
        info = mailboxes.get(name)
        if "SPECIAL-USE" in args.select_options and (info is None or not info.special_use):
            continue
        status_lines: list[bytes] = []
        if args.return_status and info is not None:
            found = await _list_status(s, name, args.return_status)
            if found is None:
                # RFC 5819 2: deleted since the names were read, so it cannot be selected:
                # no STATUS, and the LIST response says so (\NonExistent implies \Noselect).
                tree.forget(name)
                attributes = tree.attributes(name, extended=True)
            status_lines = found or []
        if want_subscribed and name in subscribed:
            attributes.append("\\Subscribed")
        extra = b""
        # RFC 5258 5, example 9: also a subscribed mailbox tells of its subscribed children.
        if "RECURSIVEMATCH" in args.select_options and tree.has_subscribed_child(name):
            extra = b' ("CHILDINFO" ("SUBSCRIBED"))'
        lines.append(wire.untagged(b"LIST (" + " ".join(attributes).encode()
                                   + b') "/" ' + wire.mailbox(name) + extra))
        lines.extend(status_lines)  # RFC 5819 2: right after its mailbox's LIST response
        if len(lines) >= 256:
            await _send_batched(s, lines)
            lines = []
    await _send_batched(s, lines)
    return r.OK_DONE


async def _candidates(s: Session, args: ListArgs, tree: _Tree, matcher: _Matcher) -> list[str]:
    """The names LIST considers, in order. With RECURSIVEMATCH a parent that matches no
    selection option is one only for its CHILDINFO, and RFC 5258 3.5 says to return it only
    when a subscribed child of it is not returned itself (its name does not match)."""
    if "SUBSCRIBED" not in args.select_options:
        return tree.all_names()
    names = tree.subscribed_names(args.select_options)
    if "RECURSIVEMATCH" not in args.select_options:
        return names
    unlisted_below: set[str] = set()
    for count, name in enumerate(tree.subscribed, 1):
        if count % matcher.step == 0:
            await s.between_steps()
        if not matcher.matches(name):
            unlisted_below.update(_ancestors(name))
    return [name for name in names if name in tree.subscribed or name in unlisted_below]


async def _list_status(s: Session, name: str, items: Sequence[str]) -> list[bytes] | None:
    """RFC 5819 2: the mailbox's STATUS line; None when the mailbox no longer exists. One
    whose STATUS fails otherwise is left without it (the LIST still succeeds)."""
    try:
        return [await _status_line(s, name, items)]
    except NoSuchMailbox:
        return None
    except Exception as exc:  # noqa: BLE001 - one mailbox must not fail the LIST
        s.failure(exc, "LIST-STATUS")
        return []


async def _lsub(s: Session, args: ListArgs) -> r.Reply:
    user = s.logged_in_user
    existing = {info.name for info in await s.store.list_mailboxes(user)}
    subscribed = set(await s.store.subscriptions(user))
    matcher = _Matcher(args.reference, args.patterns)
    found: dict[str, bool] = {}  # name -> \Noselect
    for count, name in enumerate(subscribed, 1):
        if count % matcher.step == 0:
            await s.between_steps()
        if matcher.matches(name):
            found[name] = name not in existing
        # RFC 3501 6.3.9: "%" matching an unsubscribed parent lists it \Noselect.
        if matcher.has_percent:
            for parent in _ancestors(name):
                if parent not in subscribed and matcher.matches(parent):
                    found.setdefault(parent, True)
    lines = [wire.untagged(b"LSUB (" + (b"\\Noselect" if noselect else b"")
                           + b') "/" ' + wire.mailbox(name))
             for name, noselect in sorted(found.items(), key=lambda item: _order(item[0]))]
    await _send_batched(s, lines)
    return r.OK_DONE


async def status(s: Session, c: Command) -> r.Reply:
    args = cast(Status, c.args)
    await s.send(await _status_line(s, args.mailbox, args.items))
    return r.OK_DONE


def _sizes(item: str, messages: list[MessageInfo]) -> int:
    """STATUS SIZE (RFC 8438), DELETED (RFC 9051) and DELETED-STORAGE (RFC 9208 4.1.4: what
    an EXPUNGE would free, in units of 1024 octets, as QUOTA=RES-STORAGE requires)."""
    if item == "SIZE":
        return sum(info.size for info in messages)
    deleted = [info for info in messages if DELETED in info.flags]
    return len(deleted) if item == "DELETED" else _kib(sum(info.size for info in deleted))


async def _status_line(s: Session, name: str, items: Sequence[str]) -> bytes:
    user = s.logged_in_user
    current = await s.store.status(user, name)
    selected = s.selected if s.selected is not None and s.selected.name == current.name \
        else None
    values: list[bytes] = []
    messages: list[MessageInfo] | None = None
    for item in items:
        if item == "MESSAGES":
            value = current.messages
        elif item == "UIDNEXT":
            value = current.uidnext
        elif item == "UIDVALIDITY":
            value = current.uidvalidity
        elif item == "APPENDLIMIT":  # RFC 7889 3.1, 3.2: the same for every mailbox
            value = s.config.append_limit
        elif item == "HIGHESTMODSEQ":
            s.enabled.condstore = True
            value = current.highestmodseq
        elif item == "UNSEEN":
            value = await s.store.unseen(user, name)
        elif item == "RECENT":
            # Only a selecting session claims \Recent; STATUS counts what nobody has claimed
            # yet (RFC 3501 6.3.10), or this session's own recent messages.
            value = (selected.recent_count if selected is not None
                     else await s.store.recent(user, name))
        elif item in ("SIZE", "DELETED", "DELETED-STORAGE"):
            if messages is None:
                messages = await s.store.list_messages(user, name)
            value = _sizes(item, messages)
        else:
            continue
        values.append(b"%s %d" % (item.encode("ascii"), value))
    return wire.untagged(b"STATUS " + wire.mailbox(current.name) + b" ("
                         + b" ".join(values) + b")")


async def append(s: Session, c: Command) -> r.Reply:
    args = cast(Append, c.args)
    flags = frozenset(flag for flag in args.flags if flag != "\\Recent")
    date = args.date.timestamp() if args.date is not None else None
    try:
        if any(not flag.startswith("\\") for flag in flags):
            keywords = (await s.store.snapshot(s.logged_in_user, args.mailbox)).keywords
            flags = in_known_spelling(flags, keywords)
            if too_many_keywords(flags, keywords):
                return r.NO_TOO_MANY_KEYWORDS
        quota = await s.quota_limit()
        result = await s.store.append(s.logged_in_user, args.mailbox,
                                      crlf_line_ends(args.message), flags, date, quota)
    except Exception as exc:  # noqa: BLE001 - mapped in the one place, with TRYCREATE
        return s.failure(exc, "APPEND", trycreate=True)
    return r.Reply("OK", "APPEND completed", f"APPENDUID {result.uidvalidity} {result.uid}")


_BARE_LF = re.compile(rb"(?<!\r)\n")


def crlf_line_ends(message: bytes) -> bytes:
    """A message APPENDed with bare LF line ends (a script's, or a broken client's) stored
    with CRLF, as RFC 3501 has messages and as everything delivered by SMTP is: POP3's
    sizes count CRLF line ends (RFC 1939 11), so sizes and contents agree in both
    protocols. Dovecot stores LF and presents CRLF: the same to every client."""
    if message.count(b"\n") == message.count(b"\r\n"):
        return message
    return _BARE_LF.sub(b"\r\n", message)


async def idle(s: Session, c: Command) -> r.Reply:
    """RFC 2177: report changes as they happen until the client sends DONE."""
    await s.send(wire.continuation("idling"))
    user = s.logged_in_user
    reader = asyncio.ensure_future(s.channel.read_line())
    waiter: asyncio.Future[int] | None = None
    keepalive = _Keepalive(s.config.idle_keepalive)
    try:
        while True:
            await s.sync(allow_expunge=True)
            if keepalive.due():
                await s.send(r.OK_STILL_HERE.untagged())
            await s.channel.flush()  # the reader waits for DONE: nothing else would send it
            version = s.selected.version if s.selected is not None else s.store.version(user)
            waiter = asyncio.ensure_future(
                s.store.wait_change(user, version, keepalive.wait(s.config.idle_poll)))
            await s.outside_lane(
                asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED))
            if reader.done():
                break
    finally:
        # Awaited too: a cancelled read still waiting on the stream would fail the next
        # one, the read of what the client sends after a BYE.
        pending = [task for task in (reader, waiter) if task is not None and not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    line = reader.result()
    if not isinstance(line, bytes) or line.strip().upper() != b"DONE":
        return r.BAD_IDLE_DONE
    return r.OK_IDLE_DONE


class _Keepalive:
    """When IDLE next owes the client a line that keeps idle-dropping middleboxes open."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._next = self._loop.time() + interval

    def due(self) -> bool:
        if not self._interval or self._loop.time() < self._next:
            return False
        self._next = self._loop.time() + self._interval
        return True

    def wait(self, poll: float) -> float:
        """How long IDLE may wait for a change before it has to look again."""
        if not self._interval:
            return poll
        return max(0.0, min(poll, self._next - self._loop.time()))


async def getquotaroot(s: Session, c: Command) -> r.Reply:
    name = cast(MailboxArg, c.args).mailbox
    # RFC 9208 4.1.2: the name need not exist yet (a client asks before it creates one).
    name = INBOX if name.upper() == INBOX else name
    limit = await s.quota_limit()
    if limit is None:
        await s.send(wire.untagged(b"QUOTAROOT " + wire.mailbox(name)))
        return r.OK_DONE
    await s.send(wire.untagged(b'QUOTAROOT ' + wire.mailbox(name) + b' ""')
                 + await _quota_line(s, limit))
    return r.OK_DONE


async def getquota(s: Session, c: Command) -> r.Reply:
    root = cast(QuotaRoot, c.args).root
    limit = await s.quota_limit()
    if root != "" or limit is None:
        return r.NO_NO_QUOTA_ROOT
    await s.send(await _quota_line(s, limit))
    return r.OK_DONE


async def setquota(s: Session, c: Command) -> r.Reply:
    # No QUOTASET is advertised (RFC 9208 3.2), but clients of RFC 2087's QUOTA, which
    # included SETQUOTA, may send it: a NO ("can't set that data", RFC 2087 4.1) tells them
    # where a BAD would count against the session as an unknown command.
    return r.NO_QUOTA_SET_BY_OPERATOR


async def _quota_line(s: Session, limit: int) -> bytes:
    # RFC 9208 5.1: STORAGE is counted in units of 1024 octets; both rounded up, so that a
    # limit that is no whole number of units does not look full while there is room.
    used = await s.store.usage(s.logged_in_user)
    return wire.untagged(b'QUOTA "" (STORAGE %d %d)' % (_kib(used), _kib(limit)))


def _kib(octets: int) -> int:
    return (octets + 1023) // 1024


# --- selected ----------------------------------------------------------------------------

async def check(s: Session, c: Command) -> r.Reply:
    # RFC 3501 6.4.1, a checkpoint: the flag changes committed without waiting for the disk
    # (docs/architecture.md) are on it before the OK. Updates follow as for NOOP.
    await s.store.make_durable(s.logged_in_user)
    return r.OK_DONE


async def close(s: Session, c: Command) -> r.Reply:
    selected = s.mailbox
    if not selected.readonly:
        # RFC 3501 6.4.2: expunge silently, then leave the mailbox. What has \Deleted is the
        # mailbox's state now, with other sessions' flag changes since our last command.
        with contextlib.suppress(NoSuchMailbox, SelectedMailboxDeleted):  # nothing to expunge
            # Mail that arrived since the last command is never shown to this session: it
            # stays \Recent for the next one (RFC 3501 2.3.2).
            await s.take_in_changes(claim_recent=False)
            uids = [info.uid for info in selected.infos if DELETED in info.flags]
            if uids:
                await s.store.expunge(s.logged_in_user, selected.name, uids,
                                      uidvalidity=selected.uidvalidity, deleted_only=True)
    s.deselect()
    return r.OK_DONE


async def unselect(s: Session, c: Command) -> r.Reply:
    s.deselect()
    return r.OK_DONE


async def expunge(s: Session, c: Command) -> r.Reply:
    selected = s.mailbox
    if selected.readonly:
        return r.NO_READ_ONLY
    if c.uid:
        positions = selected.positions(cast(UidExpunge, c.args).sequence, uid=True)
        candidates: Iterable[MessageInfo] = (selected.info(p) for p in positions)
    else:
        candidates = selected.infos
    uids = [info.uid for info in candidates if DELETED in info.flags]
    if uids and await s.store.expunge(s.logged_in_user, selected.name, uids,
                                      uidvalidity=selected.uidvalidity, deleted_only=True):
        return await _removal_done(s)
    return r.OK_DONE  # the EXPUNGE (or VANISHED) responses come from the sync that follows


async def _removal_done(s: Session) -> r.Reply:
    """RFC 7162 3.2.7 and 3.2.9, RFC 6851 4.4: once EXPUNGE, UID EXPUNGE or MOVE removed a
    message, a QRESYNC client gets the mailbox's new HIGHESTMODSEQ in the tagged OK and takes
    it as how far it is in step (RFC 7162 6), so everything up to it is announced first.
    Without the code it keeps the MODSEQ of the last FETCH it saw, and its next SELECT
    (QRESYNC ...) is told again about the messages it removed itself."""
    if s.enabled.qresync:
        await s.sync(allow_expunge=True)
        s.highestmodseq_in_reply = True  # Session._execute adds it after its own last sync
    return r.OK_DONE


async def fetch(s: Session, c: Command) -> r.Reply:
    args = cast(Fetch, c.args)
    selected = s.mailbox
    positions = selected.positions(args.sequence, uid=c.uid)
    modseq_asked = args.changedsince is not None or any(a.name == "MODSEQ" for a in args.atts)
    if modseq_asked:
        s.enabled.condstore = True  # RFC 7162 3.1: the first CONDSTORE use enables it
    if args.vanished:
        if not (c.uid and args.changedsince is not None and s.enabled.qresync):
            return r.BAD_VANISHED
        await _vanished_earlier(s, selected, args)
    if args.changedsince is not None:
        since = args.changedsince
        positions = [p for p in positions if selected.info(p).modseq > since]
    seen_set = await _mark_seen(s, selected, positions, args.atts)
    try:
        skipped = await _render_fetch(s, selected, positions, args.atts, seen_set,
                                      uid=c.uid, modseq=modseq_asked)
    except _NoMemory:
        log.warning("no memory to read a large message for FETCH now", extra=s.log_context)
        return r.NO_BUSY
    return r.NO_EXPUNGED.with_code("EXPUNGEISSUED") if skipped else r.OK_DONE


async def _claim_recent(s: Session, mailbox: str, uids: Sequence[int], uidnext: int) -> int:
    """Claim \\Recent for this session. The claim is a write: with the disk full, SELECT
    shows the messages as EXAMINE does, unclaimed, rather than fail (reading mail must work
    when nothing can be written). Only what the snapshot holds is claimed: mail delivered
    since is new to this session too, and is claimed by the sync that announces it."""
    upto = max(uidnext, uids[-1] + 1 if uids else 1)
    try:
        first = await s.store.claim_recent(s.logged_in_user, mailbox, upto)
    except OutOfSpace:
        log.log(s.deps.recent_unclaimed.level(), "no space to claim \\Recent; showing it "
                "unclaimed (once per full disk, the rest at DEBUG)", extra=s.log_context)
        return await _unclaimed_recent(s, mailbox)
    if first < upto:  # it claimed some, so it wrote: the disk takes writes again
        s.deps.recent_unclaimed.over()
    return first


async def _unclaimed_recent(s: Session, mailbox: str) -> int:
    """EXAMINE shows \\Recent without claiming it (RFC 3501 6.3.2) for the messages no
    read-write session has claimed. Asked by UID, not by how many there are: a count taken
    after the message list was read includes mail delivered since, and counted back from the
    end of the list it made an already claimed message look recent."""
    return await s.store.first_unclaimed(s.logged_in_user, mailbox)


async def _vanished_earlier(s: Session, selected: SelectedMailbox, args: Fetch) -> None:
    assert args.changedsince is not None
    changes = await s.store.changes_since(s.logged_in_user, selected.name, args.changedsince)
    largest = max(selected.uidnext - 1, 1)
    vanished = covered(args.sequence, changes.expunged, largest)
    if vanished:
        await s.send(wire.untagged(b"VANISHED (EARLIER) " + format_uids(sorted(vanished))))


async def _mark_seen(s: Session, selected: SelectedMailbox, positions: list[int],
                     atts: Sequence[FetchAtt]) -> set[int]:
    """RFC 3501 6.4.5: a non-PEEK body fetch sets \\Seen; returns the UIDs it was set on."""
    if selected.readonly or not f.sets_seen(atts):
        return set()
    unseen = [selected.info(p).uid for p in positions
              if SEEN not in selected.info(p).flags and not selected.is_gone(p)]
    if not unseen:
        return set()
    try:
        result = await s.store.store_flags(s.logged_in_user, selected.name, unseen, "+",
                                           frozenset({SEEN}), uidvalidity=selected.uidvalidity)
    except OutOfSpace:
        # The body is still sent: a full disk must not make mail unreadable.
        log.log(s.deps.seen_unset.level(), "no space to set \\Seen; body sent without it "
                "(once per full disk, the rest at DEBUG)", extra=s.log_context)
        return set()
    if result.changed:
        s.deps.seen_unset.over()
    selected.update(result.changed)
    return {info.uid for info in result.changed}


async def _render_fetch(s: Session, selected: SelectedMailbox, positions: list[int],
                        atts: Sequence[FetchAtt], seen_set: set[int], *, uid: bool,
                        modseq: bool) -> bool:
    """Write the FETCH responses; True when some message was gone and left out."""
    atts = tuple(atts)
    if not f.needs_body(atts):
        await _render_metadata(s, selected, positions, atts, uid=uid, modseq=modseq)
        return False
    request = _BodyFetch(
        atts, atts if any(a.name == "FLAGS" for a in atts) else (*atts, FetchAtt("FLAGS")),
        f.cacheable(atts), f.needs_header_only(atts), seen_set, uid, modseq,
        not f.needs_only_cacheable(atts))
    skipped = False
    out = _Output(s)
    for batch in _batches(selected, positions):
        skipped |= await _fetch_batch(s, out, selected, batch, request)
    await out.flush()
    return skipped


@dataclass(frozen=True)
class _BodyFetch:
    """What a FETCH of items that need the stored messages asks for."""

    atts: tuple[FetchAtt, ...]
    with_flags: tuple[FetchAtt, ...]  # the items plus FLAGS, for a message it set \Seen on
    names: tuple[str, ...]  # the cacheable items asked for
    header_only: bool  # the items need only the header section
    seen_set: set[int]  # UIDs this FETCH set \Seen on
    uid: bool
    modseq: bool
    always_read: bool  # some item needs the message even when the cache has the rest


class _NoMemory(Exception):
    """The messages a FETCH must read whole do not fit in settings.imap_fetch_memory now."""


async def _fetch_batch(s: Session, out: _Output, selected: SelectedMailbox, batch: list[int],
                       request: _BodyFetch) -> bool:
    """Read and answer one batch; True when some message was gone and left out. A large
    message is answered on its own from its file (`_send_large`)."""
    names = request.names
    known = {p: s.deps.fetch_cache.get_many(selected.info(p).guid, names) for p in batch}
    # Only the header of a large message is read when that is all the items need.
    large = set() if request.header_only else {
        p for p in batch if selected.info(p).size > STREAM_OVER}
    unread = [p for p in batch if p not in large
              and (request.always_read or len(known[p]) < len(names))]
    raws = await _read_bodies(s, selected, unread, request.header_only) if unread else {}
    skipped = False
    turn_began = time.monotonic()
    for position in batch:
        if time.monotonic() - turn_began > FETCH_TURN:
            # Messages with many header fields take up to 0.2 s each to answer here: others
            # go on between them (a batch of 32 held the store for 2 s: found in review).
            await s.between_steps()
            turn_began = time.monotonic()
        if selected.is_gone(position):
            skipped = True
        elif position in large:
            skipped |= not await _send_large(s, out, selected, position, known[position],
                                             request)
        else:
            skipped |= not await _send_read(s, out, selected, position, raws.pop(position, None),
                                            known[position], request)
    return skipped


def _response_args(s: Session, selected: SelectedMailbox, position: int, request: _BodyFetch
                   ) -> tuple[tuple[FetchAtt, ...], frozenset[str], bool, bool]:
    """One message's items, session flags and whether UID and MODSEQ go with them."""
    just_seen = selected.info(position).uid in request.seen_set
    # RFC 3501 6.4.5: when \Seen was just set, the response carries the new FLAGS, and
    # RFC 7162 3.2.4: for a CONDSTORE session with UID and MODSEQ.
    wanted = request.with_flags if just_seen else request.atts
    recent = frozenset({"\\Recent"}) if selected.is_recent(position) else frozenset()
    changed = s.enabled.condstore and just_seen
    return wanted, recent, request.uid or changed, request.modseq or changed


async def _send_read(s: Session, out: _Output, selected: SelectedMailbox, position: int,
                     raw: bytes | None, derived: dict[str, bytes], request: _BodyFetch) -> bool:
    """Answer for a message read into memory (raw None: not read, the cache has every item);
    False when it was needed and is gone."""
    names = request.names
    if raw is None and (request.always_read or len(derived) < len(names)):
        return False
    info = selected.info(position)
    missing = [name for name in names if name not in derived]
    wanted, recent, uid, modseq = _response_args(s, selected, position, request)

    def derive_and_render() -> tuple[dict[str, bytes], bytes]:
        fresh = f.derive(missing, raw) if raw is not None and missing else {}
        return fresh, f.render_fetch(position + 1, info, wanted, raw, extra_flags=recent,
                                     include_uid=uid, include_modseq=modseq,
                                     derived={**derived, **fresh})

    # Only a header section is this large here (larger messages go to _send_large): parsing
    # its fields takes about 0.4 s per MB, too long for the event loop every session shares.
    large = raw is not None and len(raw) > STREAM_OVER
    fresh, line = await asyncio.to_thread(derive_and_render) if large else derive_and_render()
    _remember(s.deps.fetch_cache, info.guid, fresh)
    await out.write(line)
    return True


async def _send_large(s: Session, out: _Output, selected: SelectedMailbox, position: int,
                      derived: dict[str, bytes], request: _BodyFetch) -> bool:
    """Answer for a large message from its file, so that it is never held while a client
    takes it: the octets of the whole message, of a part or of its text are read a chunk at
    a time as they are sent. Items that need its structure (a part, TEXT, BODYSTRUCTURE not
    cached) have it read and parsed first, within settings.imap_fetch_memory, and let go
    before anything is sent. False when the message is gone. Once the response has begun, a
    failure to read ends the connection: the client was promised a literal of the announced
    length."""
    info = selected.info(position)
    try:
        file = await asyncio.to_thread(s.store.open_message, s.logged_in_user, info.guid)
    except (NoSuchMessage, FileNotFoundError):
        return False
    try:
        size = file.seek(0, io.SEEK_END)
        if f.streamable(request.atts, derived):
            wanted, recent, uid, modseq = _response_args(s, selected, position, request)
            pieces = f.render_pieces(position + 1, info, wanted, size, extra_flags=recent,
                                     include_uid=uid, include_modseq=modseq,
                                     derived=derived)
        else:
            pieces = await _parsed_pieces(s, file, size, selected, position, derived, request)
        await _send_pieces(s, out, file, pieces, info.guid)
    finally:
        file.close()
    return True


async def _parsed_pieces(s: Session, file: BinaryIO, size: int, selected: SelectedMailbox,
                         position: int, derived: dict[str, bytes], request: _BodyFetch
                         ) -> list[f.Piece]:
    """Read and parse a large message to render its response, with Spans for its long
    runs; the message itself is let go on return. The reading and the parsing (tens of
    milliseconds for 25 MB) run in a worker thread, not in the loop that serves everyone."""
    hold = Hold(s.deps.fetch_memory)
    if not hold.take(size, alone_ok=True):
        raise _NoMemory
    try:
        info = selected.info(position)
        missing = [name for name in request.names if name not in derived]
        wanted, recent, uid, modseq = _response_args(s, selected, position, request)

        def parse_and_render() -> tuple[dict[str, bytes], list[f.Piece]]:
            raw = _read_all(file)
            fresh = f.derive(missing, raw) if missing else {}
            return fresh, f.render_pieces(
                position + 1, info, wanted, raw, spans_over=STREAM_CHUNK, extra_flags=recent,
                include_uid=uid, include_modseq=modseq, derived={**derived, **fresh})

        fresh, pieces = await asyncio.to_thread(parse_and_render)
        _remember(s.deps.fetch_cache, info.guid, fresh)
        return pieces
    finally:
        hold.release()


def _read_all(file: BinaryIO) -> bytes:
    file.seek(0)
    return file.read()


async def _send_pieces(s: Session, out: _Output, file: BinaryIO, pieces: list[f.Piece],
                       guid: str) -> None:
    try:
        with s.inside_response():
            for piece in pieces:
                if isinstance(piece, bytes):
                    await out.write(piece)
                else:
                    await _send_octets(out, file, piece)
    except Disconnect:
        raise
    except Exception as exc:
        log.exception("reading message %s failed during FETCH", guid, extra=s.log_context)
        raise Disconnect("storage") from exc


async def _send_octets(out: _Output, file: BinaryIO, span: f.Span) -> None:
    file.seek(span.start)
    left = span.length
    while left:
        chunk = await asyncio.to_thread(file.read, min(left, STREAM_CHUNK))
        if not chunk:
            raise OSError(f"message file ends {left} octets early")
        await out.write(wire.literal_octets(chunk))
        left -= len(chunk)


def _remember(cache: FetchCache, guid: str, values: dict[str, bytes]) -> None:
    for name, value in values.items():
        cache.put(guid, name, value)


async def _render_metadata(s: Session, selected: SelectedMailbox, positions: list[int],
                           atts: tuple[FetchAtt, ...], *, uid: bool, modseq: bool) -> None:
    render = f.MetadataRenderer(atts, include_uid=uid, include_modseq=modseq)
    recent = frozenset({"\\Recent"})
    step = 4096  # lines rendered between writes, so a huge FETCH never holds all of them
    for start in range(0, len(positions), step):
        # A few hundred KiB per write: 4096 short lines.
        chunk = positions[start:start + step]
        await s.send(render.lines(chunk, *selected.infos_for(chunk), selected.recent_uids,
                                  recent))
        await s.between_steps()


class _Output:
    """Response lines gathered into writes of about WRITE_BATCH_OCTETS."""

    def __init__(self, s: Session) -> None:
        self._session = s
        self._lines: list[bytes] = []
        self._size = 0

    async def write(self, line: bytes) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= WRITE_BATCH_OCTETS:
            await self.flush()
            await self._session.between_steps()

    async def flush(self) -> None:
        if self._lines:
            await self._session.send(b"".join(self._lines))
            self._lines, self._size = [], 0


def _batches(selected: SelectedMailbox, positions: list[int]) -> Iterable[list[int]]:
    batch: list[int] = []
    octets = 0
    for position in positions:
        batch.append(position)
        octets += selected.info(position).size
        if len(batch) >= READ_BATCH_MESSAGES or octets >= READ_BATCH_OCTETS:
            yield batch
            batch, octets = [], 0
    if batch:
        yield batch


async def _read_bodies(s: Session, selected: SelectedMailbox, batch: list[int],
                       header_only: bool) -> dict[int, bytes]:
    """The stored bytes of a batch of messages (only their header section when that is all
    the items need), read in one worker-thread round trip; a message expunged meanwhile is
    left out."""
    user = s.logged_in_user
    wanted = [(p, selected.info(p).guid) for p in batch if not selected.is_gone(p)]

    def read(part: list[tuple[int, str]]) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        for position, guid in part:
            try:
                with s.store.open_message(user, guid) as file:
                    found[position] = _read_header(file) if header_only else file.read()
            except (NoSuchMessage, FileNotFoundError):
                continue
        return found

    if len(wanted) == 1 and selected.info(wanted[0][0]).size <= DIRECT_READ_MAX:
        # One small message (inline in the index, or one short file): reading it costs
        # less than the hand-over to a thread and back, which under load also waits for the
        # interpreter lock behind the other threads.
        return read(wanted)
    # Files not in the page cache wait on the disk one by one; a few threads keep several
    # reads in flight (what a disk, and SSDs most of all, serve best).
    parts = [wanted[i::READ_THREADS] for i in range(min(READ_THREADS, len(wanted)))]
    found: dict[int, bytes] = {}
    for result in await asyncio.gather(*(asyncio.to_thread(read, part) for part in parts)):
        found.update(result)
    return found


def _read_header(file: BinaryIO) -> bytes:
    data = read_header(file.read)
    if not any(sep in data for sep in HEADER_BREAKS):
        data += file.read()  # a giant header: read the whole message
    return data


async def store(s: Session, c: Command) -> r.Reply:
    args = cast(Store, c.args)
    selected = s.mailbox
    if selected.readonly:
        return r.NO_READ_ONLY
    if args.unchangedsince is not None:
        s.enabled.condstore = True
    positions = [p for p in selected.positions(args.sequence, uid=c.uid)
                 if not selected.is_gone(p)]
    requested = [flag for flag in args.flags if flag != "\\Recent"]
    if args.mode == "-":  # a mailbox from before the keyword rule may hold two spellings
        flags = every_spelling(requested, selected.keywords)
    else:
        flags = in_known_spelling(requested, selected.keywords)
    if args.mode != "-" and too_many_keywords(flags, selected.keywords):
        return r.NO_TOO_MANY_KEYWORDS
    all_uids = selected.uids
    uids = [all_uids[p] for p in positions]
    result = await s.store.store_flags(s.logged_in_user, selected.name, uids, args.mode, flags,
                                       args.unchangedsince, uidvalidity=selected.uidvalidity)
    selected.update(result.changed)
    modified = set(result.modified)
    condstore = s.enabled.condstore
    if modified:
        positions = [p for p, uid in zip(positions, uids, strict=True) if uid not in modified]
    if not args.silent:
        # RFC 7162 3.2.4: a CONDSTORE session gets UID and MODSEQ in every FETCH response
        lines = selected.flags_fetches(positions, uid=c.uid or condstore, modseq=condstore)
    elif condstore:
        # RFC 7162 3.1.3: even .SILENT reports the new MODSEQ of changed messages.
        changed = {info.uid for info in result.changed}
        lines = [_modseq_fetch(selected, p) for p in positions if all_uids[p] in changed]
    else:
        lines = []
    announcement = selected.keyword_announcement()  # before any FETCH showing a new keyword
    await _send_batched(s, announcement + lines if announcement else lines)
    if modified:
        numbers = modified if c.uid else {
            p + 1 for p in (selected.position_of(u) for u in modified) if p is not None}
        return r.Reply("OK", "Conditional STORE failed for some messages",
                       "MODIFIED " + format_uids(sorted(numbers)).decode())
    return r.OK_DONE


def _modseq_fetch(selected: SelectedMailbox, position: int) -> bytes:
    info = selected.info(position)
    return wire.untagged(b"%d FETCH (UID %d MODSEQ (%d))" % (position + 1, info.uid,
                                                              info.modseq))


async def copy(s: Session, c: Command) -> r.Reply:
    args = cast(CopyMove, c.args)
    selected = s.mailbox
    move = c.name == "MOVE"
    if move and selected.readonly:
        return r.NO_READ_ONLY
    uids = [selected.info(p).uid for p in selected.positions(args.sequence, uid=c.uid)
            if not selected.is_gone(p)]
    user = s.logged_in_user
    try:
        if not uids:
            # Nothing to copy (UIDs that match no message, or all expunged meanwhile): still
            # a destination that is not there is [TRYCREATE] (RFC 3501 6.4.7), not OK.
            await s.store.status(user, args.mailbox)
            return r.OK_DONE
        if move:
            result = await s.store.move(user, selected.name, uids, args.mailbox,
                                        uidvalidity=selected.uidvalidity)
        else:
            quota = await s.quota_limit()
            result = await s.store.copy(user, selected.name, uids, args.mailbox, quota,
                                        uidvalidity=selected.uidvalidity)
    except Exception as exc:  # noqa: BLE001 - mapped in the one place, with TRYCREATE
        return s.failure(exc, c.name, trycreate=True)
    code = (f"COPYUID {result.uidvalidity} {format_uids(result.source_uids).decode()} "
            f"{format_uids(result.dest_uids).decode()}")
    if result.source_uids and not _ascending_pairs(result.source_uids, result.dest_uids):
        code = _copyuid_unsorted(result.uidvalidity, result.source_uids, result.dest_uids)
    if not result.source_uids:
        return r.OK_DONE
    if move:
        # RFC 6851 4.3: COPYUID goes in an untagged OK before the EXPUNGE responses.
        await s.send(r.Reply("OK", "Moved", code).untagged())
        return await _removal_done(s)
    return r.Reply("OK", "COPY completed", code)


def _ascending_pairs(source: list[int], dest: list[int]) -> bool:
    return source == sorted(source) and dest == sorted(dest)


def _copyuid_unsorted(uidvalidity: int, source: list[int], dest: list[int]) -> str:
    # RFC 4315 4: the two sets pair up in order, so when compressing would reorder them
    # they are listed one by one.
    return (f"COPYUID {uidvalidity} {','.join(map(str, source))} "
            f"{','.join(map(str, dest))}")


async def search_(s: Session, c: Command) -> r.Reply:
    args = cast(Search, c.args)
    if args.charset is not None and not known_charset(args.charset):
        return r.NO_BADCHARSET
    selected = s.mailbox
    positions = await _search_positions(s, selected, args.key)
    numbers = [selected.info(p).uid if c.uid else p + 1 for p in positions]
    if args.return_options is None:
        modseq = _highest_modseq_found(s, args.key, positions)
        await s.send(wire.untagged(_numbers_response(b"SEARCH", numbers, modseq)))
        return r.OK_DONE
    returned = _esearch_returned(positions, args.return_options)
    modseq = _highest_modseq_found(s, args.key, returned)
    await s.send(_esearch(c, args.return_options, numbers, modseq))
    return r.OK_DONE


def _esearch_returned(positions: list[int], options: Sequence[str]) -> list[int]:
    """The messages an ESEARCH returns, whose highest MODSEQ its MODSEQ item is (RFC 4731
    3.2, RFC 7162 3.1.10): with only MIN and/or MAX asked for, the lowest and/or highest
    found; otherwise all found (`positions` ascend)."""
    wanted = set(options) or {"ALL"}
    if not positions or wanted & {"ALL", "COUNT"}:
        return positions
    return [p for p, name in ((positions[0], "MIN"), (positions[-1], "MAX")) if name in wanted]


def _highest_modseq_found(s: Session, key: SearchKey, positions: list[int]) -> int | None:
    """RFC 7162 3.1.5 and 3.1.9: a SEARCH or SORT with a MODSEQ criterion (which enables
    CONDSTORE) that found something reports the highest MODSEQ of what it found."""
    if not key.contains("MODSEQ"):
        return None
    s.enabled.condstore = True
    return max((s.mailbox.info(p).modseq for p in positions), default=None)


def _numbers_response(name: bytes, numbers: list[int], modseq: int | None) -> bytes:
    """`SEARCH 2 5 7 (MODSEQ 917)`, `SORT 7 2 5`, or the bare name when nothing matched."""
    if not numbers:
        return name
    line = name + b" " + wire.number_list(numbers)
    return line + b" (MODSEQ %d)" % modseq if modseq is not None else line


async def _search_positions(s: Session, selected: SelectedMailbox, key: SearchKey,
                            view: MessageView | None = None) -> list[int]:
    view = view or _view(s, selected)
    return await search(key, selected.infos, view.source,
                        recent=selected.recent_uids, view=view)


def _view(s: Session, selected: SelectedMailbox) -> MessageView:
    return MessageView(selected.infos, _source(s), pause=s.between_steps)


def _source(s: Session) -> StoreMessageSource:
    return StoreMessageSource(s.store, s.deps.text_index, s.logged_in_user,
                              indexer=s.deps.indexer)


def _esearch(c: Command, options: Sequence[str], numbers: list[int],
             modseq: int | None) -> bytes:
    """RFC 4731 3: `* ESEARCH (TAG "t") [UID] MIN n MAX n COUNT n ALL set`."""
    wanted = set(options) or {"ALL"}
    parts = [b"ESEARCH (TAG " + wire.quoted(c.tag) + b")"]
    if c.uid:
        parts.append(b"UID")
    if numbers:
        if "MIN" in wanted:
            parts.append(b"MIN %d" % min(numbers))
        if "MAX" in wanted:
            parts.append(b"MAX %d" % max(numbers))
    if "COUNT" in wanted:
        parts.append(b"COUNT %d" % len(numbers))
    if "ALL" in wanted and numbers:
        parts.append(b"ALL " + format_uids(sorted(numbers)))
    if modseq is not None:
        parts.append(b"MODSEQ %d" % modseq)
    return wire.untagged(b" ".join(parts))


async def sort_(s: Session, c: Command) -> r.Reply:
    args = cast(Sort, c.args)
    if args.return_options is not None:
        return r.Reply("BAD", "ESORT is not supported")
    if not known_charset(args.charset):
        return r.NO_BADCHARSET
    selected = s.mailbox
    view = _view(s, selected)
    positions = await _search_positions(s, selected, args.key, view)
    try:
        ordered = await sort(args.criteria, positions, selected.infos, view.source, view=view)
    except BadSortCriteria:
        return r.Reply("BAD", "Unknown sort criteria")
    numbers = [selected.info(p).uid if c.uid else p + 1 for p in ordered]
    modseq = _highest_modseq_found(s, args.key, ordered)
    await s.send(wire.untagged(_numbers_response(b"SORT", numbers, modseq)))
    return r.OK_DONE


async def thread_(s: Session, c: Command) -> r.Reply:
    args = cast(Thread, c.args)
    if not known_charset(args.charset):
        return r.NO_BADCHARSET
    selected = s.mailbox
    view = _view(s, selected)
    positions = await _search_positions(s, selected, args.key, view)
    try:
        threads = await thread(args.algorithm, positions, selected.infos, view.source,
                               view=view)
    except BadThreadAlgorithm:
        return r.Reply("BAD", "Unknown threading algorithm")

    def number(position: int) -> int:
        return selected.info(position).uid if c.uid else position + 1

    await s.send(format_thread(threads, number) + wire.CRLF)
    return r.OK_DONE


# --- helpers -----------------------------------------------------------------------------

async def _send_batched(s: Session, lines: list[bytes]) -> None:
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        if size >= WRITE_BATCH_OCTETS:
            await s.send(b"".join(chunk))
            chunk, size = [], 0
            await s.between_steps()
    if chunk:
        await s.send(b"".join(chunk))


def _ancestors(name: str) -> list[str]:
    parts = name.split(HIERARCHY_DELIMITER)
    return [HIERARCHY_DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def _order(name: str) -> tuple[bool, str]:
    return (name != INBOX, name)


class _Matcher:
    """LIST patterns (RFC 3501 6.3.8): "*" matches anything, "%" anything but the delimiter;
    the reference is prefixed to each pattern (our names never start with the delimiter, so
    no pattern is read as an absolute name). INBOX is a name in any case (RFC 3501 5.1), so
    `*b*` matches INBOX and `inbox/%` its children."""

    def __init__(self, reference: str, patterns: Sequence[str]) -> None:
        self._patterns = [ListPattern(reference + pattern, HIERARCHY_DELIMITER)
                          for pattern in dict.fromkeys(patterns)]
        self.has_percent = any("%" in pattern for pattern in patterns)
        # Names matched between the loop's turns: LIST_STEP name-pattern matches (one name
        # against 100 patterns is 100 matches of up to 1,000 characters each).
        self.step = max(1, LIST_STEP // max(1, len(self._patterns)))

    def matches(self, name: str) -> bool:
        inbox = name == INBOX or name.startswith(INBOX + HIERARCHY_DELIMITER)
        caseless = len(INBOX) if inbox else 0
        return any(pattern.matches(name, caseless) for pattern in self._patterns)


class _Tree:
    """The account's mailbox names with their implied parents, for LIST attributes."""

    def __init__(self, mailboxes: dict[str, MailboxInfo], subscribed: set[str]) -> None:
        self._mailboxes = mailboxes
        self._subscribed = subscribed
        self._parents: set[str] = set()
        for name in mailboxes:
            self._parents.update(_ancestors(name))
        self._subscribed_parents: set[str] = set()
        for name in subscribed:
            self._subscribed_parents.update(_ancestors(name))

    def all_names(self) -> list[str]:
        return sorted(set(self._mailboxes) | self._parents, key=_order)

    @property
    def subscribed(self) -> set[str]:
        return self._subscribed

    def subscribed_names(self, select_options: frozenset[str]) -> list[str]:
        names = set(self._subscribed)
        if "RECURSIVEMATCH" in select_options:
            names |= self._subscribed_parents
        return sorted(names, key=_order)

    def forget(self, name: str) -> None:
        """`name` turned out to have no mailbox any more (deleted by another session)."""
        self._mailboxes.pop(name, None)

    def has_subscribed_child(self, name: str) -> bool:
        return name in self._subscribed_parents

    def attributes(self, name: str, *, extended: bool) -> list[str]:
        info = self._mailboxes.get(name)
        attributes = []
        if info is None:
            # No mailbox has this name: a parent of one (its own mailbox deleted, RFC 3501
            # 6.3.4), or a subscription. RFC 3501's LIST says \Noselect; an extended LIST
            # says \NonExistent, which implies it (RFC 5258 3 and 3.5, example 11: a
            # missing parent is "\NonExistent \HasChildren"). Nothing of the name is stored.
            attributes.append("\\NonExistent" if extended else "\\Noselect")
        attributes.append("\\HasChildren" if name in self._parents else "\\HasNoChildren")
        if info is not None and info.special_use:
            attributes.append(info.special_use)
        return attributes


_ANY = frozenset(State)
_NOT_AUTH = frozenset({State.NOT_AUTHENTICATED})
_AUTH = frozenset({State.AUTHENTICATED, State.SELECTED})
_ENABLE = frozenset({State.AUTHENTICATED})  # RFC 5161 3.1: before any mailbox is selected
_SELECTED = frozenset({State.SELECTED})


def _in_mailbox(handler: Handler, *, expunge_ok: bool = True,
                cost: Cost = Cost.BY_SET) -> CommandSpec:
    return CommandSpec(handler, _SELECTED, uses_messages=True, expunge_ok=expunge_ok,
                       cost=cost)


# The one command table. UID forms are separate rows: RFC 3501 7.4.1 lets them send EXPUNGE.
COMMANDS: dict[str, CommandSpec] = {
    "CAPABILITY": CommandSpec(capability, _ANY),
    "NOOP": CommandSpec(noop, _ANY),
    "LOGOUT": CommandSpec(logout, _ANY),
    "ID": CommandSpec(id_, _ANY),
    "STARTTLS": CommandSpec(starttls, _NOT_AUTH),
    "LOGIN": CommandSpec(login, _NOT_AUTH),
    "AUTHENTICATE": CommandSpec(authenticate, _NOT_AUTH),
    "ENABLE": CommandSpec(enable, _ENABLE),
    "COMPRESS": CommandSpec(compress, _AUTH),
    "SELECT": CommandSpec(select, _AUTH, cost=Cost.LONG),
    "EXAMINE": CommandSpec(select, _AUTH, cost=Cost.LONG),
    "CREATE": CommandSpec(create, _AUTH),
    "DELETE": CommandSpec(delete, _AUTH),
    "RENAME": CommandSpec(rename, _AUTH),
    "SUBSCRIBE": CommandSpec(subscribe, _AUTH),
    "UNSUBSCRIBE": CommandSpec(subscribe, _AUTH),
    "LIST": CommandSpec(list_, _AUTH),
    "LSUB": CommandSpec(list_, _AUTH),
    "NAMESPACE": CommandSpec(namespace, _AUTH),
    "STATUS": CommandSpec(status, _AUTH),
    "APPEND": CommandSpec(append, _AUTH),
    "IDLE": CommandSpec(idle, _AUTH),
    "GETQUOTAROOT": CommandSpec(getquotaroot, _AUTH),
    "GETQUOTA": CommandSpec(getquota, _AUTH),
    "SETQUOTA": CommandSpec(setquota, _AUTH),
    "CHECK": CommandSpec(check, _SELECTED),
    "CLOSE": CommandSpec(close, _SELECTED),
    "UNSELECT": CommandSpec(unselect, _SELECTED),
    "EXPUNGE": _in_mailbox(expunge, cost=Cost.LONG),
    "UID EXPUNGE": _in_mailbox(expunge),
    "FETCH": _in_mailbox(fetch, expunge_ok=False),
    "UID FETCH": _in_mailbox(fetch),
    "STORE": _in_mailbox(store, expunge_ok=False),
    "UID STORE": _in_mailbox(store),
    "SEARCH": _in_mailbox(search_, expunge_ok=False, cost=Cost.LONG),
    "UID SEARCH": _in_mailbox(search_, cost=Cost.LONG),
    "COPY": _in_mailbox(copy),
    "UID COPY": _in_mailbox(copy),
    "MOVE": _in_mailbox(copy),
    "UID MOVE": _in_mailbox(copy),
    "SORT": _in_mailbox(sort_, expunge_ok=False, cost=Cost.LONG),
    "UID SORT": _in_mailbox(sort_, cost=Cost.LONG),
    "THREAD": _in_mailbox(thread_, expunge_ok=False, cost=Cost.LONG),
    "UID THREAD": _in_mailbox(thread_, cost=Cost.LONG),
}
