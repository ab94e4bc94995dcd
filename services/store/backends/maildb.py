"""Mailbox storage: one SQLite index per user (WAL) holding small message bodies, plus
immutable per-message files for the large ones.

Layout under `root` (normally `<store_dir>/mail`), documented in docs/architecture.md:

    uidvalidity.sqlite              store-wide monotonic UIDVALIDITY counter
    inflight                        journal of users whose files may be ahead of their index
    <sha256(user)[:2]>/<user>/
        index.sqlite                the user's index (WAL, synchronous=FULL); created with
                                    INBOX, Drafts, Sent, Junk, Trash and Archive; bodies of
                                    at most `inline_max` octets (table `body`)
        m/<guid[:2]>/<guid>         a larger message's bytes, written once, never modified
        tmp/<guid>                  a message file being written (removed by the sweep)

Index tables (schema 7; older indexes are migrated in place when first opened):

    mailbox       id, name (unique, "/"-separated, INBOX spelled so), uidvalidity, uidnext,
                  highestmodseq (the mailbox's MODSEQ: CONDSTORE is per mailbox, RFC 7162 2),
                  special_use (RFC 6154), recent_uid (first UID no session has claimed as
                  \\Recent yet), modseq_reserved (commits that do not wait for the disk
                  may use MODSEQs up to this one: see "MODSEQ after a power loss" below)
    message       mailbox_id, uid, guid (unique: the body row's key or the file's name),
                  size, internaldate, flags (sorted, space-separated; system flags in
                  canonical case), modseq, padding (mailbox.line_end_padding: octets POP3
                  adds to end every line with CRLF; 0 for nearly every message; NULL: not
                  computed yet, only in an index migrated from schema 5 or older, whose
                  partial index `padding_pending` lists those rows until all are filled in)
    body          guid -> data: the bytes of an inline message, inserted and deleted in the
                  transactions that insert and delete its message row. A message has either
                  a body row or a file, never both; which one was decided when its bytes
                  were first stored, so changing `inline_max` moves nothing.
    expunged      mailbox_id, uid, modseq: every UID removed (expunge, move, delete of its
                  mailbox drops them), for QRESYNC's VANISHED; never pruned
    delivered     queue_id -> mailbox_id, uid: makes queue redelivery a no-op
    subscription  name: subscribed names; a name may outlive its mailbox (RFC 3501 6.3.6)
    account       one row: usage, the octets of every message row (kept in the same
                  transaction as each change that adds or removes rows); epoch, the store
                  epoch (epoch.py) in which the index's MODSEQs were last re-established

Adding messages (deliver, append, copy); the caller hears of success only after step 2:
    1. only when some body is a file: append the user to the `inflight` journal (fsynced);
       write each such body to tmp/, fsync it, rename it into m/xx/, fsync every directory
       touched (including parents that were just created). COPY writes no bytes of a file:
       each copy is a new name (a new GUID) hard-linked to the source's file (os.link), and
       the directories are fsynced the same way;
    2. BEGIN IMMEDIATE; allocate uid = uidnext++ and a new modseq; insert the rows, and the
       body rows of inline messages (COPY copies the source's row inside SQLite); update the
       usage; COMMIT (synchronous=FULL: the commit, inline bodies included, is durable when
       it returns).
A crash between 1 and 2 leaves names no index row points at. A batch of inline bodies only
is step 2 alone: one transaction, one commit, nothing else written or fsynced. A delivery
found already stored writes nothing, so the WAL is fsynced before it is reported: the
commit that stored it may be one a killed store wrote but never synced.

Removing messages (expunge, delete of a mailbox): the body rows go in the transaction that
deletes the message rows. When files are among them, the user goes to the journal before
that transaction commits, and only after it are the files unlinked; a crash in between leaves
names the index no longer knows. MOVE and RENAME touch no body: the rows change mailbox (MOVE
keeps the GUID, records the source UIDs in `expunged`), all in one transaction.

`sweep()` at startup removes, for exactly the users named in the journal, tmp files and the
message files no index row names, so a restart never has to walk 100,000 accounts;
`sweep(full=True)` walks all. Removing an orphan name never touches a hard-linked sibling.
Inline bodies cannot be orphans: they live and die with their rows.

Threads: every index write and every cached writer connection belongs to one dedicated thread
(SQLite serialises writers per database anyway, and one thread keeps the LRU of open
connections simple). Reads open a short-lived connection in a small reader pool, so a POP3
listing never waits behind a delivery batch; WAL lets them run beside the writer.
`open_message` runs in its caller's thread (FETCH readers, POP3, the indexer) and reads inline
bodies through a small per-thread LRU of read-only connections (`bodies.BodyReaders`).

MODSEQ after a power loss: flag changes (STORE) commit without waiting for the disk, so a
power loss may take back the last ones and the MODSEQs clients saw for them. Such a commit
may only use a MODSEQ at most `modseq_reserved`, which a commit that waited for the disk
raised beforehand (by MODSEQ_RESERVE at a time: one fsync per that many changes). When the
store starts after an unclean stop under another boot (epoch.py), the epoch goes up; the
first open of each index in a new epoch gives every mailbox with `modseq_reserved` above its
`highestmodseq` (changes may be lost there) the MODSEQ `modseq_reserved + 1` on every message:
above anything handed out, and a CONDSTORE client that saw lost changes is told every
message's flags again. Readers let the writer do that before they answer.

Change notification: after each committed change the writer schedules, in the caller's event
loop, a bump of the user's `version` (IDLE waits on it with `wait_change`) and a call of every
listener with a `ChangeEvent`. It is scheduled from the writer thread, so a caller cancelled
while the write ran still produces its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import io
import itertools
import logging
import os
import queue
import re
import shutil
import sqlite3
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from services.store.backends.bodies import BodyReaders
from services.store.backends.changefeed import ChangeFeeds
from services.store.backends.durable import allocate, fsync_dir, fsync_path, probe_file
from services.store.backends.epoch import begin_run, end_run
from services.store.backends.snapshots import (
    DEFAULT_CAPACITY,
    MERGE_LIMIT,
    MessageListCache,
    Snapshot,
    merge,
)
from services.store.backends.sqlite import read_snapshot, transaction
from services.store.mailbox import (
    HIERARCHY_DELIMITER,
    INBOX,
    SPECIAL_USE,
    STANDARD_MAILBOXES,
    AppendResult,
    CannotDelete,
    ChangeEvent,
    Changes,
    CopyResult,
    Delivery,
    FlagsResult,
    InvalidMailboxName,
    MailboxExists,
    MailboxInfo,
    MailboxReplaced,
    MailboxStatus,
    MessageInfo,
    NoSuchMailbox,
    NoSuchMessage,
    NoSuchUser,
    OutOfSpace,
    OverQuota,
    StorageError,
    TooManyMailboxes,
    in_known_spelling,
    line_end_padding,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# 1: mailbox, message, expunged, delivered. 2: mailbox.special_use (RFC 6154) and the
# standard folders (Drafts, Sent, Junk, Trash, Archive) in every index. 3: mailbox.recent_uid,
# subscription, account (usage). 4: body (inline message bodies). 5: mailbox.messages.
# 6: message.padding (mailbox.line_end_padding: what POP3 adds to close the lines).
# 7: mailbox.modseq_reserved and account.epoch (MODSEQs never reused after a power loss).
SCHEMA_VERSION = 7
MAIL_DIR = "mail"  # the mailboxes' root under the store's data directory
UIDVALIDITY_FILE = "uidvalidity.sqlite"  # the store-wide counter, under MAIL_DIR

# Schema 5 -> 6 adds message.padding as NULL ("not computed yet"), this partial index of the
# rows still NULL and the next one; `MailDB._fill_padding` computes the paddings in batches,
# outside the writer, and drops both indexes when none is left. An index created at schema 6
# never has NULLs.
PADDING_PENDING = "padding_pending"
# delivered(mailbox_id, uid): tells delivered mail (CRLF only: its last octet tells) from any
# other (read whole). Without it each lookup scanned `delivered`: 20,000 messages took 22 s.
PADDING_DELIVERED = "padding_delivered"
PADDING_BATCH = 1000  # rows computed, then committed in one short write transaction
WRITER_JOB_OWNERS = 32  # mailbox owners one delivery job commits before other writes go
# MODSEQs a mailbox's flag changes may use, without waiting for the disk, per durable
# reservation: one fsync per this many changes; a power loss skips at most this many.
MODSEQ_RESERVE = 1000
SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    special_use TEXT,
    recent_uid INTEGER NOT NULL DEFAULT 1,
    messages INTEGER NOT NULL DEFAULT 0,
    modseq_reserved INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS message (
    mailbox_id INTEGER NOT NULL REFERENCES mailbox(id),
    uid INTEGER NOT NULL,
    guid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    internaldate REAL NOT NULL,
    flags TEXT NOT NULL DEFAULT '',
    modseq INTEGER NOT NULL,
    padding INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_modseq ON message(mailbox_id, modseq);
-- Not in `message`, which a SELECT of a mailbox reads whole: blobs there would spread a
-- listing over many more pages, and WITHOUT ROWID tables are meant for small rows. A rowid
-- table, found through its primary key's index, the bytes in overflow pages of their own.
-- (No semicolons in these comments: the schema is split on them.)
CREATE TABLE IF NOT EXISTS body (
    guid TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS expunged (
    mailbox_id INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged(mailbox_id, modseq);
CREATE TABLE IF NOT EXISTS delivered (
    queue_id TEXT PRIMARY KEY,
    mailbox_id INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    delivered_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscription (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    usage INTEGER NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0
);
"""

# mailbox.messages, kept by the database itself: whatever statement adds, removes or moves a
# message row, the count moves in the same transaction. Counting instead took milliseconds
# for 100,000 messages, on every SELECT and every session's catching up.
MESSAGE_COUNT_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS message_added AFTER INSERT ON message BEGIN
        UPDATE mailbox SET messages = messages + 1 WHERE id = NEW.mailbox_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS message_removed AFTER DELETE ON message BEGIN
        UPDATE mailbox SET messages = messages - 1 WHERE id = OLD.mailbox_id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS message_moved AFTER UPDATE OF mailbox_id ON message
    WHEN NEW.mailbox_id != OLD.mailbox_id BEGIN
        UPDATE mailbox SET messages = messages - 1 WHERE id = OLD.mailbox_id;
        UPDATE mailbox SET messages = messages + 1 WHERE id = NEW.mailbox_id;
    END""",
)

_GUID_RE = re.compile(r"^[0-9a-f]{32}$")
_EMPTY_FLAGS: frozenset[str] = frozenset()
USER_PATH_MEMO = 10_000  # owners whose directory path is remembered
# Users whose change version is kept (see `MailDB.version`); past it the older half is dropped.
VERSIONS_KEPT = 10_000
PROBE_SIZE = 64 * 1024  # a probe write: more than the last few free blocks of a full disk
# Seconds between probes while the storage fails (doubling): the consumer and the indexer.
STORAGE_PAUSE_MIN, STORAGE_PAUSE_MAX = 0.5, 30.0
MAX_ADDRESS = 254  # RFC 5321 4.5.3.1.3 path limit minus the angle brackets

# Mailbox names live only in the index, never in a path; the limits keep LIST replies and the
# index sane. Dovecot allows 255 per component too.
MAX_MAILBOX_NAME = 1000  # octets of UTF-8, the whole hierarchical name
MAX_NAME_COMPONENT = 255  # characters between delimiters
MAX_NAME_DEPTH = 32
# "*" and "%" are LIST wildcards (RFC 3501 5.1): a name holding them could not be listed
# by itself.
_FORBIDDEN_NAME_CHARS = frozenset("*%")

_SYSTEM_FLAGS = {flag.lower(): flag for flag in (
    "\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")}
_RECENT = "\\recent"  # a session flag (RFC 3501 2.3.2), never stored
_SPECIAL_USE_VALUES = frozenset(SPECIAL_USE.values())

# Above this many UIDs a lookup reads the UID range and filters, instead of IN (...) chunks.
_RANGE_SCAN_THRESHOLD = 256
_SPAN_GAPS_PROBED = 1000  # a UID set with more gaps is checked by reading the span
_IN_CHUNK = 500

Listener = Callable[[ChangeEvent], None]


@dataclass(frozen=True)
class SweepResult:
    users: int
    files_removed: int


@dataclass(frozen=True)
class _Box:
    """A mailbox row as read inside a write transaction."""

    id: int
    name: str
    uidvalidity: int
    uidnext: int
    modseq: int
    messages: int
    reserved: int  # modseq_reserved


def storage_pauses() -> Iterator[float]:
    """The waits between storage probes while they fail: STORAGE_PAUSE_MIN doubling to
    STORAGE_PAUSE_MAX."""
    wait = STORAGE_PAUSE_MIN
    while True:
        yield wait
        wait = min(wait * 2, STORAGE_PAUSE_MAX)


def user_dir_name(user: str) -> str:
    """Validate a mailbox owner's address for use as a directory name; NoSuchUser if unsafe.

    Addresses reach here from the queue and from logins; nothing about them is trusted.
    """
    if (
        not user
        or len(user) > MAX_ADDRESS
        or user != user.strip().lower()
        or "/" in user
        or "\\" in user
        or "\x00" in user
        or ".." in user
        or user.startswith(".")
        or "@" not in user
        or not user.isprintable()
    ):
        raise NoSuchUser(f"not a valid mailbox owner: {user!r}")
    return user


def user_path(root: Path, user: str) -> Path:
    """`root/<sha256(user)[:2]>/<user>`: the directory of one mailbox owner."""
    name = user_dir_name(user)
    shard = hashlib.sha256(name.encode()).hexdigest()[:2]
    path = root / shard / name
    # Belt and braces: the validated name can only ever be one path component.
    if path.parent.parent != root or path.name != name:
        raise NoSuchUser(f"not a valid mailbox owner: {user!r}")
    return path


def store_user_path(store_dir: Path, user: str) -> Path:
    """`user_path` under a store's data directory (TIERMAIL_DATA_DIR/store)."""
    return user_path(store_dir / MAIL_DIR, user)


def canonical_mailbox(name: str) -> str:
    """The stored spelling of a name to look up: INBOX, as first component, in any case
    means INBOX (RFC 3501 5.1); anything else is compared exactly. Every name the store is
    given passes here (new names through `valid_mailbox_name`).

    InvalidMailboxName for a name with an empty hierarchy level: empty, or with a leading,
    trailing or doubled delimiter ("", "/a", "a/", "a//b"). No mailbox is named so
    (`valid_mailbox_name` lets none be made), and only CREATE gives a trailing delimiter a
    meaning (RFC 3501 6.3.3, handled by the IMAP command). Refused rather than looked up, so
    every command says the name is wrong, as Dovecot does, instead of "no such mailbox":
    an APPEND, COPY or MOVE to "Work/" then does not answer [TRYCREATE] to a client whose
    CREATE "Work/" made "Work", and a SELECT of "a//b" is not sent looking for it."""
    if "" in name.split(HIERARCHY_DELIMITER):
        raise InvalidMailboxName(f"mailbox name {name!r} has an empty hierarchy level")
    first, sep, rest = name.partition(HIERARCHY_DELIMITER)
    if first.upper() == INBOX and first != INBOX:
        return INBOX + sep + rest
    return name


def valid_mailbox_name(name: str) -> str:
    """The canonical form of a name a client wants to create, rename to or subscribe;
    InvalidMailboxName if it is empty, too long or too deep, holds a control character, a
    LIST wildcard, an empty (leading, trailing, doubled delimiter), "." or ".." component."""
    if not name:
        raise InvalidMailboxName("empty mailbox name")
    try:
        octets = len(name.encode())
    except UnicodeEncodeError:  # a lone surrogate from a broken modified UTF-7 name
        raise InvalidMailboxName("mailbox name is not valid Unicode") from None
    if octets > MAX_MAILBOX_NAME:
        raise InvalidMailboxName(f"mailbox name longer than {MAX_MAILBOX_NAME} octets")
    parts = name.split(HIERARCHY_DELIMITER)
    if len(parts) > MAX_NAME_DEPTH:
        raise InvalidMailboxName(f"mailbox name deeper than {MAX_NAME_DEPTH} levels")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidMailboxName(f"bad mailbox name component {part!r}")
        if len(part) > MAX_NAME_COMPONENT:
            raise InvalidMailboxName(f"mailbox name component longer than "
                                     f"{MAX_NAME_COMPONENT} characters")
    for char in name:
        if char in _FORBIDDEN_NAME_CHARS or _is_control(char):
            raise InvalidMailboxName(f"mailbox name holds the character {char!r}")
    return canonical_mailbox(name)


# Unicode's Bidi_Control characters: they reorder how the rest of a name is shown, so a
# folder can be made to read as another (the "Trojan Source" trick).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069")


def _is_control(char: str) -> bool:
    code = ord(char)
    # C0, DEL, C1; line and paragraph separators; surrogates; bidirectional controls.
    return (code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029)
            or 0xD800 <= code <= 0xDFFF or char in _BIDI_CONTROLS)


def _check_room(conn: sqlite3.Connection, table: str, adding: int, limit: int | None) -> None:
    """TooManyMailboxes if `adding` more rows would put `table` (mailbox or subscription)
    over `limit`; inside the write transaction that adds them, so sessions creating at once
    cannot pass it together."""
    if limit is None or adding == 0:
        return
    (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    if count + adding > limit:
        raise TooManyMailboxes(f"{count} {table} rows, limit {limit}")


def _parents(name: str) -> list[str]:
    """"a/b/c" -> ["a", "a/b"]."""
    parts = name.split(HIERARCHY_DELIMITER)
    return [HIERARCHY_DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def normalise_flags(flags: Iterable[str]) -> frozenset[str]:
    """Flags as stored: system flags in their canonical case, keywords as given (case
    preserved), \\Recent dropped (it is per session). StorageError for a flag the stored
    space-separated form cannot hold."""
    result: set[str] = set()
    for flag in flags:
        lowered = flag.lower()
        if lowered == _RECENT:
            continue
        if not flag or any(c.isspace() for c in flag):
            raise StorageError(f"flag cannot be stored: {flag!r}")
        result.add(_SYSTEM_FLAGS.get(lowered, flag))
    return frozenset(result)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every directory created so the entry survives a crash."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_dir(directory.parent)


def retire_mailbox(store_dir: Path, user: str) -> Path | None:
    """Move the mailbox directory a deleted account left behind to `store_dir/retired/`
    (out of the store's reach, kept for the operator) so that a new account with the same
    address starts empty; the new path, or None when there was none. Only while no store
    runs on `store_dir`: a running one may hold the directory's files open."""
    path = store_user_path(store_dir, user)
    if not path.exists():
        return None
    # retired/<UTC time>/<address>: the address alone can be as long as a file name may be
    # (254 of 255 octets), so the time cannot go into the same name.
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    retired = store_dir / "retired" / stamp / path.name
    _makedirs_durable(retired.parent)
    path.rename(retired)
    fsync_dir(path.parent)
    fsync_dir(retired.parent)
    return retired


def _flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


class _FlagSets:
    """Parses stored flag texts, sharing one frozenset per distinct text (a mailbox has few)."""

    def __init__(self) -> None:
        self._sets: dict[str, frozenset[str]] = {"": _EMPTY_FLAGS}

    def __call__(self, text: str) -> frozenset[str]:
        flags = self._sets.get(text)
        if flags is None:
            flags = self._sets[text] = frozenset(text.split())
        return flags


class UidValidity:
    """The store-wide monotonic UIDVALIDITY source, seeded from the clock (as Dovecot does).

    Only used when a mailbox is created, so a tiny SQLite file with one row is plenty.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK "
                         "(id = 1), value INTEGER NOT NULL)")

    def last(self) -> int:
        """The last value handed out (0: none yet)."""
        row = self._db.execute("SELECT value FROM counter WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def take(self, count: int, *, above: int = 0) -> list[int]:
        """`count` new values in one transaction (a new account's mailboxes: one fsync), all
        above `above` too."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            last = self.last()
            # RFC 3501 2.3.1.1: a 32-bit non-zero value that never goes backwards.
            first = max(last + 1, int(time.time()), above + 1)
            final = first + count - 1
            if final > 0xFFFFFFFF:
                raise StorageError("UIDVALIDITY space exhausted")
            db.execute("INSERT OR REPLACE INTO counter (id, value) VALUES (1, ?)", (final,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return list(range(first, final + 1))

    def close(self) -> None:
        self._db.close()


class MailDB:
    """The `MailStore` implementation. Construct with the mail root (or `for_store`) and the
    largest body stored inside the index (`Settings.store_inline_max`; 0: none)."""

    def __init__(self, root: Path, *, inline_max: int, max_open: int = 256, readers: int = 4,
                 snapshot_messages: int = DEFAULT_CAPACITY,
                 versions_kept: int = VERSIONS_KEPT) -> None:
        if inline_max < 0:
            raise ValueError(f"inline_max must be 0 or more, not {inline_max}")
        # Absolute: readers open the index by file: URI, and TIERMAIL_DATA_DIR is relative
        # by default (./var).
        self.root = root.absolute()
        self._inline_max = inline_max
        self._max_open = max_open
        _makedirs_durable(root)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maildb-writer")
        self._reader = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="maildb-read")
        # One thread computes the paddings of migrated indexes, one batch at a time.
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maildb-padding")
        # Users whose index the writer found with paddings to compute (writer -> event loop).
        self._padding_found: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Touched only in the writer thread.
        self._open: OrderedDict[str, sqlite3.Connection] = OrderedDict()
        self._uidvalidity: UidValidity | None = None
        self._journal_fd: int | None = None
        # Users with commits that did not wait for the disk since their index was last
        # synced (make_durable).
        self._unsynced: set[str] = set()
        self._closed = False
        # Touched only in the event loop.
        self._listeners: list[Listener] = []
        self._versions: OrderedDict[str, int] = OrderedDict()  # least recently changed first
        self._versions_kept = versions_kept
        self._last_version = 0  # versions are drawn from one counter for every user
        self._dropped_version = 0  # the highest version dropped from _versions
        self._wakeups: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._user_paths: dict[str, Path] = {}  # any thread; dict operations are atomic
        # Before any index is opened: the epoch tells the writer which to reconcile.
        self._epoch = begin_run(self.root)
        self._reconciled: set[str] = set()  # users whose index is in this epoch (any thread)
        # Shared by the reader threads (it has its own lock).
        self._snapshots = MessageListCache(snapshot_messages)
        self._feeds = ChangeFeeds()  # event loop only
        self._padding_fills: dict[str, asyncio.Task[None]] = {}  # event loop only
        # Per calling thread (open_message runs in its callers' threads).
        self._bodies = BodyReaders(SCHEMA_VERSION, self._index_file)

    @classmethod
    def for_store(cls, store_dir: Path, *, inline_max: int, **kwargs: int) -> MailDB:
        return cls(store_dir / MAIL_DIR, inline_max=inline_max, **kwargs)

    # Paths

    def user_path(self, user: str) -> Path:
        # Memoised: a FETCH of 500 bodies would otherwise validate and hash the address 500
        # times. Only validated addresses are kept; the memo is dropped when it grows large.
        path = self._user_paths.get(user)
        if path is None:
            path = user_path(self.root, user)
            if len(self._user_paths) >= USER_PATH_MEMO:
                self._user_paths.clear()
            self._user_paths[user] = path
        return path

    def message_path(self, user: str, guid: str) -> Path:
        return Path(self._message_file(user, guid))

    def _message_file(self, user: str, guid: str) -> str:
        if not _GUID_RE.match(guid):
            raise NoSuchMessage(f"not a message id: {guid!r}")
        return f"{self.user_path(user)}/m/{guid[:2]}/{guid}"

    def _index_file(self, user: str) -> Path:
        return self.user_path(user) / "index.sqlite"

    def _is_inline(self, size: int) -> bool:
        """Whether a body of `size` octets, stored now, goes into the index."""
        return self._inline_max > 0 and size <= self._inline_max

    # MailStore: reads

    async def status(self, user: str, mailbox: str = INBOX) -> MailboxStatus:
        return await self._read(self._status_sync, user, canonical_mailbox(mailbox))

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        return await self._read(self._mailboxes_sync, user, INBOX)

    async def list_messages(self, user: str, mailbox: str = INBOX) -> list[MessageInfo]:
        return (await self.snapshot(user, mailbox)).messages()

    async def snapshot(self, user: str, mailbox: str = INBOX) -> Snapshot:
        """The mailbox's messages as one shared, immutable Snapshot (with the UIDs, keywords
        and first unseen message a SELECT needs)."""
        return await self._read(self._snapshot_sync, user, canonical_mailbox(mailbox))

    def open_message(self, user: str, guid: str) -> BinaryIO:
        """The stored bytes: an inline body as BytesIO, else the file. Blocking (SQLite or
        the file system), in the caller's thread. The table is asked first: with the default
        threshold nearly every message is inline, and a miss in the table costs about what
        a failed open() does (see docs/architecture.md, "Inline bodies")."""
        if self._closed:
            raise StorageError("mail store is closed")
        path = self._message_file(user, guid)  # checks the user and the GUID
        data = self._bodies.body(user, guid)
        if data is None:
            try:
                return open(path, "rb")  # noqa: SIM115 - the caller closes it
            except FileNotFoundError:
                # Gone, or the cached connection reads an index replaced since.
                data = self._bodies.body(user, guid, recheck=True)
                if data is None:
                    raise NoSuchMessage(guid) from None
        return io.BytesIO(data)

    async def subscriptions(self, user: str) -> list[str]:
        return await self._read(self._subscriptions_sync, user, INBOX)

    async def changes_since(self, user: str, mailbox: str, modseq: int) -> Changes:
        """Messages whose MODSEQ is above `modseq` (their current state, ascending UID), UIDs
        expunged after it, and the status, all read in one snapshot. Answered from memory
        when only flags changed since (changefeed.py)."""
        recent = self._feeds.changes_since(user, canonical_mailbox(mailbox), modseq)
        if recent is not None:
            return recent
        return await self._read(functools.partial(self._changes_sync, modseq=modseq), user,
                                canonical_mailbox(mailbox))

    async def fetch_infos(self, user: str, mailbox: str, uids: list[int]) -> list[MessageInfo]:
        return await self._read(functools.partial(self._fetch_infos_sync, uids=list(uids)),
                                user, canonical_mailbox(mailbox))

    async def usage(self, user: str) -> int:
        # An account without an index stores nothing. Reading its usage must not create the
        # index (fsyncs, ~10 ms): the quota publisher reads every limited account's, which
        # made a store's first start with TIERMAIL_DEFAULT_QUOTA create one per account.
        if not self._index_file(user).exists():
            return 0
        return await self._read(self._usage_sync, user, INBOX)

    async def line_end_padding(self, user: str, mailbox: str = INBOX) -> dict[int, int]:
        """Waits, when the index was migrated from schema 5 and some paddings are not
        computed yet, until the user's are (POP3's sizes must be exact)."""
        name = canonical_mailbox(mailbox)
        padding = await self._read(self._padding_sync, user, name)
        if None in padding.values():
            # Shielded: a POP3 client that goes away does not stop the user's fill.
            await asyncio.shield(self._padding_task(user))
            padding = await self._read(self._padding_sync, user, name)
        if None in padding.values():
            raise StorageError(f"line end padding of {user} not computed")
        return {uid: octets for uid, octets in padding.items() if octets}

    # MailStore: writes

    async def deliver(self, deliveries: list[Delivery]) -> list[bool]:
        return [uid is not None for uid in await self.deliver_uids(deliveries)]

    async def expunge(self, user: str, mailbox: str, uids: list[int], *,
                      uidvalidity: int | None = None, deleted_only: bool = False) -> list[int]:
        """`uidvalidity` (here and in store_flags, copy and move): act only if the mailbox
        under the name is still that one (an IMAP session's selected mailbox may have been
        renamed, and a new one made under its name, since it looked). `deleted_only`: of
        `uids`, only those with \\Deleted when the change is made (IMAP's EXPUNGE and CLOSE:
        another session may have taken the flag away since this one looked)."""
        self.user_path(user)
        if not uids:
            return []
        return await self._change(self._expunge_sync, user, canonical_mailbox(mailbox),
                                  list(uids), uidvalidity, deleted_only)

    async def expunge_by_guid(self, user: str, mailbox: str, guids: list[str]) -> list[str]:
        """Expunge the messages of `mailbox` with these GUIDs, whatever their UIDs are now:
        POP3 names a message by its GUID (its UIDL), and an IMAP MOVE, even into the same
        mailbox, gives it a new UID. The GUIDs expunged."""
        self.user_path(user)
        if not guids:
            return []
        return await self._change(functools.partial(self._expunge_sync, guids=list(guids)),
                                  user, canonical_mailbox(mailbox), [])

    async def create_mailbox(self, user: str, name: str, special_use: str | None = None, *,
                             max_mailboxes: int | None = None) -> None:
        """Create `name` and its missing parents (the parents without special use).
        InvalidMailboxName also for a special-use attribute other than RFC 6154's
        \\Drafts, \\Sent, \\Junk, \\Trash and \\Archive."""
        self.user_path(user)
        name = valid_mailbox_name(name)
        if special_use is not None and special_use not in _SPECIAL_USE_VALUES:
            raise InvalidMailboxName(f"unsupported special-use attribute {special_use!r}")
        await self._change(self._create_sync, user, name, special_use, max_mailboxes)

    async def delete_mailbox(self, user: str, name: str) -> None:
        self.user_path(user)
        await self._change(self._delete_sync, user, canonical_mailbox(name))

    async def rename_mailbox(self, user: str, old: str, new: str, *,
                             max_mailboxes: int | None = None) -> None:
        """Rename `old` and its children; missing parents of `new` are created. `old` may be
        a parent that is only a name (its mailbox deleted): its children move, and `new`
        is only a name too. Subscriptions of `old` and of the renamed children follow them.
        NoSuchMailbox if `old` is neither a mailbox nor a parent of one; MailboxExists if
        `new` or a renamed child's new name exists; InvalidMailboxName for a name under
        `old` itself, or when a child's new name would break the limits of
        `valid_mailbox_name` (too long, too deep)."""
        self.user_path(user)
        await self._change(self._rename_sync, user, canonical_mailbox(old),
                           valid_mailbox_name(new), max_mailboxes)

    async def set_subscribed(self, user: str, name: str, subscribed: bool, *,
                             max_subscriptions: int | None = None) -> None:
        """Subscribe (any valid name, existing or not) or unsubscribe (any name; absent is
        no error)."""
        self.user_path(user)
        name = valid_mailbox_name(name) if subscribed else canonical_mailbox(name)
        await self._change(self._subscribe_sync, user, name, subscribed, max_subscriptions)

    async def append(self, user: str, mailbox: str, body: bytes, flags: frozenset[str],
                     internaldate: float | None = None,
                     quota: int | None = None) -> AppendResult:
        self.user_path(user)
        return await self._change(
            self._append_sync, user, canonical_mailbox(mailbox), body,
            normalise_flags(flags), time.time() if internaldate is None else internaldate,
            quota)

    async def store_flags(self, user: str, mailbox: str, uids: list[int], mode: str,
                          flags: frozenset[str], unchangedsince: int | None = None, *,
                          uidvalidity: int | None = None) -> FlagsResult:
        if mode not in ("+", "-", ""):
            raise ValueError(f"flag mode {mode!r}")
        self.user_path(user)
        return await self._change(self._store_flags_sync, user, canonical_mailbox(mailbox),
                                  list(uids), mode, normalise_flags(flags), unchangedsince,
                                  uidvalidity)

    async def copy(self, user: str, source: str, uids: list[int], dest: str,
                   quota: int | None = None, *, uidvalidity: int | None = None) -> CopyResult:
        """New GUIDs: hard links of the source files (no bytes copied), copies of inline
        bodies made inside the index; flags and internaldate kept; new UIDs in ascending
        source order; one new MODSEQ in `dest`."""
        self.user_path(user)
        return await self._change(self._copy_sync, user, canonical_mailbox(source),
                                  list(uids), canonical_mailbox(dest), quota, uidvalidity)

    async def move(self, user: str, source: str, uids: list[int], dest: str, *,
                   uidvalidity: int | None = None) -> CopyResult:
        """One transaction: the rows go to `dest` with new UIDs (GUIDs and files kept), the
        source UIDs are recorded as expunged with a new source MODSEQ. No quota: nothing
        grows."""
        self.user_path(user)
        return await self._change(self._move_sync, user, canonical_mailbox(source),
                                  list(uids), canonical_mailbox(dest), uidvalidity)

    async def claim_recent(self, user: str, mailbox: str, upto: int) -> int:
        """Return recent_uid and raise it to `upto` (at most uidnext), atomically: messages
        with a UID from the returned value up to (excluding) `upto` are \\Recent for the
        caller. `upto` is the uidnext of what the caller has read: mail that arrived since is
        left for the first session that learns of it."""
        self.user_path(user)
        return await self._in_writer(self._claim_recent_sync, user, canonical_mailbox(mailbox),
                                     upto)

    async def make_durable(self, user: str) -> None:
        """In the writer thread, so no commit of the user's is half written meanwhile: the
        WAL sync covers exactly what was committed before. Nothing to do when every commit
        since the last sync waited for the disk itself."""
        self.user_path(user)
        await self._in_writer(self._make_durable_sync, user)

    async def probe(self, room_for: int = 0) -> None:
        """Raise OSError unless the store can write and sync a small file, and the file
        system lets it have `room_for` octets more (the consumer tells a full or broken disk
        from one bad message with this: a disk with room for the probe but not for the
        message that failed is still full for that message)."""
        await asyncio.to_thread(self._probe_sync, room_for)

    def _probe_sync(self, room_for: int = 0) -> None:
        with probe_file(self.root) as fd:
            _write_all(fd, b"\0" * PROBE_SIZE)
            os.fsync(fd)
            if room_for:
                allocate(fd, PROBE_SIZE, room_for)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        fills = list(self._padding_fills.values())
        for fill in fills:
            fill.cancel()
        await asyncio.gather(*fills, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close_sync)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._filler.shutdown(wait=True)  # its batch stops at the next message (`_closed`)
        self._bodies.close()
        await asyncio.to_thread(end_run, self.root)

    # Additions beyond MailStore (used by IMAP, the consumer, main and tests)

    async def deliver_uids(self, deliveries: list[Delivery]) -> list[int | None]:
        """`deliver`, returning per delivery the new UID, or None for a redelivery.

        At most WRITER_JOB_OWNERS mailbox owners per writer job: a message for a large alias
        (one commit and fsync per owner) held every IMAP write of every user behind it, 4 s
        for 2,000 owners; between jobs they go ahead. Each owner's copy is committed on its
        own either way, and a redelivery skips the copies already stored."""
        if not deliveries:
            return []
        for delivery in deliveries:
            self.user_path(delivery.user)  # every owner checked before any is written
        results: list[int | None] = [None] * len(deliveries)
        for positions in _owner_groups(deliveries, WRITER_JOB_OWNERS):
            stored = await self._change(self._deliver_sync, [deliveries[p] for p in positions])
            for position, uid in zip(positions, stored, strict=True):
                results[position] = uid
        return results

    async def uids(self, user: str, mailbox: str = INBOX) -> list[int]:
        """The UIDs of a mailbox, ascending (a SELECT's sequence map without the rest)."""
        return await self._read(self._uids_sync, user, canonical_mailbox(mailbox))

    async def unseen(self, user: str, mailbox: str = INBOX) -> int:
        """How many messages lack \\Seen (STATUS UNSEEN)."""
        return await self._read(self._unseen_sync, user, canonical_mailbox(mailbox))

    async def first_unclaimed(self, user: str, mailbox: str = INBOX) -> int:
        """The lowest UID no read-write session has claimed as \\Recent (EXAMINE shows those
        as recent without claiming them)."""
        return await self._read(self._first_unclaimed_sync, user, canonical_mailbox(mailbox))

    async def recent(self, user: str, mailbox: str = INBOX) -> int:
        """How many messages no read-write SELECT has claimed yet (STATUS RECENT, EXAMINE's
        RECENT): read-only, unlike `claim_recent`."""
        return await self._read(self._recent_sync, user, canonical_mailbox(mailbox))

    async def first_unseen(self, user: str, mailbox: str = INBOX) -> int | None:
        """The sequence number of the first message without \\Seen (SELECT's [UNSEEN n]), or
        None when every message is seen."""
        found = await self._read(self._first_unseen_sync, user, canonical_mailbox(mailbox))
        return found or None

    def add_listener(self, callback: Listener) -> None:
        """Call `callback(event)` in the event loop after each committed change. Exceptions
        are logged and do not affect the change or the other listeners."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def version(self, user: str) -> int:
        """A number that changes (in the event loop) after each committed change of `user`'s
        mailboxes in this process, never to a value it had before; 0 before the first change
        (once versions have been dropped: the highest one dropped).

        Drawn from one counter for all users, so that the versions of users who have not
        changed lately can be dropped (a store with 100,000 accounts kept one for each
        account that ever received mail): a dropped one reads as the highest version
        dropped, never below what it was. A session holding it then sees a change that is
        none, and looks once for nothing; dropped half at a time, that happens once per
        VERSIONS_KEPT / 2 users changed, not on every change."""
        return self._versions.get(user, self._dropped_version)

    async def wait_change(self, user: str, version: int,
                          timeout: float) -> int:  # noqa: ASYNC109 - the shared contract
        """Wait until version(user) differs from `version` or `timeout` seconds pass; return
        the current version."""
        current = self.version(user)
        if current != version:
            return current
        wakeup = self._wakeups.get(user)
        if wakeup is None:
            wakeup = self._wakeups[user] = asyncio.Event()
        self._waiting[user] = self._waiting.get(user, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await wakeup.wait()
        finally:
            left = self._waiting[user] - 1
            if left:
                self._waiting[user] = left
            else:
                del self._waiting[user]
                if self._wakeups.get(user) is wakeup:
                    del self._wakeups[user]
        return self.version(user)

    async def sweep(self, full: bool = False) -> SweepResult:
        """Remove message files no index row refers to, and leftover tmp files.

        Without `full`, only the users named in the inflight journal (those a crash may have
        interrupted) are checked; with it, every user directory is.
        """
        return await self._in_writer(self._sweep_sync, full)

    async def queue_ids(self, user: str) -> set[str]:
        """Queue ids delivered to a user (for checks and tests)."""
        self.user_path(user)
        return await self._in_reader(self._queue_ids_sync, user)

    # Executors and notification

    async def _read(self, func: Callable[[str, str], T | None], user: str, mailbox: str) -> T:
        """Run a read; None from it means "no index, an outdated one, or no such mailbox".

        Then the writer creates or migrates the index (an account that never received mail
        gets its standard folders, so they have a UIDVALIDITY) and the read is tried again.
        """
        self.user_path(user)
        result = await self._in_reader(func, user, mailbox)
        if result is None:
            await self._in_writer(self._writer_conn, user, True)
            result = await self._in_reader(func, user, mailbox)
            if result is None:
                raise NoSuchMailbox(mailbox)
        return result

    async def _in_writer(self, func: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StorageError("mail store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._writer, functools.partial(
                _space_checked, func, *args))
        finally:
            self._start_padding_fills()

    async def _in_reader(self, func: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StorageError("mail store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, functools.partial(func, *args))

    async def _change(self, func: Callable[..., T], *args: object) -> T:
        """Run a write in the writer thread; `func(events, *args)` appends a ChangeEvent for
        each change once it is committed. They are published from the writer thread itself
        (scheduled into this loop, ahead of the result), so a partly committed batch and a
        cancelled caller still notify."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            events: list[ChangeEvent] = []
            try:
                return func(events, *args)
            finally:
                if events:
                    with contextlib.suppress(RuntimeError):  # the loop is gone
                        loop.call_soon_threadsafe(self._publish, events)

        return await self._in_writer(run)

    # Paddings of indexes migrated from schema 5 (event loop)

    def _start_padding_fills(self) -> None:
        """Start filling in the paddings of the indexes the writer found incomplete."""
        while not self._padding_found.empty():
            user = self._padding_found.get_nowait()
            if not self._closed:
                self._padding_task(user)

    def _padding_task(self, user: str) -> asyncio.Task[None]:
        """The task computing the user's missing paddings, started if none runs."""
        task = self._padding_fills.get(user)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill_padding(user))
            self._padding_fills[user] = task
            task.add_done_callback(functools.partial(self._padding_fill_ended, user))
        return task

    def _padding_fill_ended(self, user: str, task: asyncio.Task[None]) -> None:
        if self._padding_fills.get(user) is task:
            del self._padding_fills[user]
        if not task.cancelled() and task.exception() is not None:
            # Tried again when the index is next opened, or POP3 needs the paddings.
            log.warning("computing line end paddings failed", exc_info=task.exception(),
                        extra={"user": user, "event": "index-padding"})

    async def _fill_padding(self, user: str) -> None:
        """Compute the paddings a schema 5 -> 6 migration left NULL, a batch at a time in
        the padding thread, each batch committed by the writer in a short transaction of
        its own: the writer every user shares is never held for long, and a crash loses at
        most the batch in hand (the rest is committed, and the work resumes when the index
        is next opened)."""
        loop = asyncio.get_running_loop()
        started, filled = time.monotonic(), 0
        while True:
            if self._closed:
                raise StorageError("mail store is closed")
            batch = await loop.run_in_executor(self._filler, self._padding_batch_sync, user)
            if batch is None:
                return
            if batch:
                await self._in_writer(self._store_padding_sync, user, batch)
                filled += len(batch)
            elif await self._in_writer(self._finish_padding_sync, user):
                log.info("line end padding of %d messages computed in %.1f s", filled,
                         time.monotonic() - started,
                         extra={"user": user, "event": "index-padding"})
                return

    def _publish(self, events: list[ChangeEvent]) -> None:
        for event in events:  # before the version moves: a session then asks the feed
            if event.kind == "flags" and event.status is not None:
                self._feeds.flags_changed(event.user, event.status, event.changed)
            elif event.kind == "mailbox":  # create, delete, rename (with children)
                self._feeds.forget(event.user)
            else:
                self._feeds.forget(event.user, event.mailbox)
                if event.source is not None:
                    self._feeds.forget(event.user, event.source)
        for user in dict.fromkeys(event.user for event in events):
            self._new_version(user)
            wakeup = self._wakeups.pop(user, None)
            if wakeup is not None:
                wakeup.set()
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("mail store listener failed",
                                  extra={"user": event.user, "event": f"listener-{event.kind}"})

    def _new_version(self, user: str) -> None:
        self._last_version += 1
        self._versions.pop(user, None)
        self._versions[user] = self._last_version
        if len(self._versions) > self._versions_kept:
            for _ in range(len(self._versions) - self._versions_kept // 2):
                _, self._dropped_version = self._versions.popitem(last=False)

    # Writer thread: connections, schema, mailboxes

    def _writer_conn(self, user: str, create: bool) -> sqlite3.Connection | None:
        conn = self._open.get(user)
        if conn is not None:
            self._open.move_to_end(user)
            return conn
        path = self.user_path(user)
        index = path / "index.sqlite"
        if not index.exists():
            if not create:
                return None
            _makedirs_durable(path / "m")
            _makedirs_durable(path / "tmp")
        conn = sqlite3.connect(index, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL may lose the last commits on power loss; we ack after COMMIT.
            conn.execute("PRAGMA synchronous=FULL")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._upgrade_index(conn, user)
                fsync_dir(path)
            if _index_epoch(conn) != self._epoch:
                self._recover_modseqs(conn, user)
            self._remember_reconciled(user)
            if _padding_pending(conn):
                self._padding_found.put(user)
        except BaseException:
            conn.close()
            raise
        self._open[user] = conn
        while len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return conn

    def _recover_modseqs(self, conn: sqlite3.Connection, user: str) -> None:
        """First open in a new epoch (the store stopped uncleanly before a reboot): a
        mailbox whose reservation is above its highestmodseq may have lost flag changes,
        and with them MODSEQs up to the reservation that clients saw. Every message of it
        gets `modseq_reserved + 1`: new MODSEQs start above all of those, and a client
        resynchronising from one of them (CHANGEDSINCE, QRESYNC) is sent every message's
        flags as they are now, the lost changes included (RFC 7162 3.1: a MODSEQ is never
        reused; expunges and UIDs always waited for the disk)."""
        with transaction(conn):
            boxes = conn.execute("SELECT id, modseq_reserved + 1 FROM mailbox"
                                 " WHERE modseq_reserved > highestmodseq").fetchall()
            for box_id, modseq in boxes:
                conn.execute("UPDATE message SET modseq = ? WHERE mailbox_id = ?",
                             (modseq, box_id))
                conn.execute("UPDATE mailbox SET highestmodseq = ?, modseq_reserved = ?"
                             " WHERE id = ?", (modseq, modseq, box_id))
            conn.execute("UPDATE account SET epoch = ?", (self._epoch,))
        if boxes:
            log.warning("MODSEQs re-established in %d mailboxes after an unclean stop",
                        len(boxes), extra={"user": user, "event": "modseq-recovered"})

    def _remember_reconciled(self, user: str) -> None:
        if len(self._reconciled) >= USER_PATH_MEMO:
            self._reconciled.clear()  # a forgotten user costs one query to check again
        self._reconciled.add(user)

    def _conn(self, user: str) -> sqlite3.Connection:
        """The writer connection of a user, creating the index (an IMAP user exists)."""
        conn = self._writer_conn(user, create=True)
        assert conn is not None
        return conn

    def _upgrade_index(self, conn: sqlite3.Connection, user: str) -> None:
        """Create a new index, or bring an older one to SCHEMA_VERSION, in one transaction.

        Each step checks what is there rather than trusting user_version alone, so an index
        left half-initialised by a crash of older code is repaired too.
        """
        with transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(f"index of {user} has schema {version}, newer than this "
                                   f"code ({SCHEMA_VERSION})")
            # Creates what is missing; 3 -> 4 is the `body` table alone (bodies already
            # stored stay files: nothing is moved). A new index gets `messages` here.
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(mailbox)")}
            if "special_use" not in columns:  # 1 -> 2
                conn.execute("ALTER TABLE mailbox ADD COLUMN special_use TEXT")
            if "recent_uid" not in columns:  # 2 -> 3: what is there is no longer recent
                conn.execute("ALTER TABLE mailbox ADD COLUMN recent_uid INTEGER NOT NULL"
                             " DEFAULT 1")
                conn.execute("UPDATE mailbox SET recent_uid = uidnext")
            if "messages" not in columns:  # 4 -> 5: counted once, then kept by triggers
                conn.execute("ALTER TABLE mailbox ADD COLUMN messages INTEGER NOT NULL"
                             " DEFAULT 0")
                conn.execute("UPDATE mailbox SET messages ="
                             " (SELECT count(*) FROM message WHERE mailbox_id = mailbox.id)")
            if "padding" not in {row[1] for row in conn.execute("PRAGMA table_info(message)")}:
                _add_padding_column(conn)  # 5 -> 6
            if "modseq_reserved" not in columns:  # 6 -> 7: nothing reserved yet
                conn.execute("ALTER TABLE mailbox ADD COLUMN modseq_reserved INTEGER NOT NULL"
                             " DEFAULT 0")
            if "epoch" not in {row[1] for row in conn.execute("PRAGMA table_info(account)")}:
                conn.execute("ALTER TABLE account ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")
            for trigger in MESSAGE_COUNT_TRIGGERS:
                conn.execute(trigger)
            conn.execute("INSERT OR IGNORE INTO account (id, usage)"
                         " SELECT 1, coalesce(sum(size), 0) FROM message")
            if version < 7:  # no MODSEQ was reserved yet: none to re-establish
                conn.execute("UPDATE account SET epoch = ?", (self._epoch,))
            self._create_standard_mailboxes(conn)
            if version < 3:
                # Clients that show subscribed folders only (Thunderbird's default) must see
                # the standard folders of a new or migrated account.
                conn.execute("INSERT OR IGNORE INTO subscription (name) SELECT name FROM mailbox"
                             " WHERE name = 'INBOX' OR special_use IS NOT NULL")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if version:
            log.info("index migrated from schema %d to %d", version, SCHEMA_VERSION,
                     extra={"user": user, "event": "index-migrated"})

    def _store_padding_sync(self, user: str, computed: list[tuple[int, str]]) -> None:
        """Record (padding, GUID) pairs from `_padding_batch_sync`; rows expunged since are
        gone, rows moved since keep their GUID, and a copy made since has a GUID of its own,
        still NULL, computed by a later batch."""
        conn = self._writer_conn(user, create=False)
        if conn is None:
            return
        # Not durable: a commit a power failure loses leaves NULLs, which are computed again.
        with transaction(conn, durable=False):
            conn.executemany("UPDATE message SET padding = ? WHERE guid = ?"
                             " AND padding IS NULL", computed)

    def _finish_padding_sync(self, user: str) -> bool:
        """Drop `padding_pending` if no padding is left to compute; whether it was."""
        conn = self._writer_conn(user, create=False)
        if conn is None:
            return True
        with transaction(conn):
            if conn.execute("SELECT 1 FROM message WHERE padding IS NULL LIMIT 1").fetchone():
                return False
            conn.execute(f"DROP INDEX IF EXISTS {PADDING_PENDING}")
            conn.execute(f"DROP INDEX IF EXISTS {PADDING_DELIVERED}")
        return True

    def _create_standard_mailboxes(self, conn: sqlite3.Connection) -> None:
        """INBOX and the special-use folders, those missing; inside a write transaction.

        A special-use attribute already held by another mailbox (a renamed Junk) counts as
        present: the folder is not created twice under its default name.
        """
        existing = dict(conn.execute("SELECT name, special_use FROM mailbox").fetchall())
        for name, use in SPECIAL_USE.items():
            if name in existing and existing[name] is None:
                conn.execute("UPDATE mailbox SET special_use = ? WHERE name = ?", (use, name))
                existing[name] = use
        held = set(existing.values())
        missing = [name for name in STANDARD_MAILBOXES
                   if name not in existing and SPECIAL_USE.get(name, "") not in held]
        self._create_mailboxes(conn, [(name, SPECIAL_USE.get(name)) for name in missing])

    def _create_mailboxes(self, conn: sqlite3.Connection,
                          names: Sequence[tuple[str, str | None]]) -> None:
        """New, empty mailboxes (name, special use), each with its own UIDVALIDITY; inside a
        write transaction."""
        if not names:
            return
        if self._uidvalidity is None:
            self._uidvalidity = UidValidity(self.root / UIDVALIDITY_FILE)
        values = self._uidvalidity.take(len(names))
        conn.executemany(
            "INSERT INTO mailbox (name, uidvalidity, uidnext, highestmodseq, special_use)"
            " VALUES (?, ?, 1, 1, ?)",
            [(name, value, use) for (name, use), value in zip(names, values, strict=True)],
        )

    def _mailbox_row(self, conn: sqlite3.Connection, name: str) -> tuple[int, int, int] | None:
        """(id, uidnext, highestmodseq); must be called inside a write transaction."""
        row = conn.execute(
            "SELECT id, uidnext, highestmodseq FROM mailbox WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def _box(self, conn: sqlite3.Connection, name: str,
             uidvalidity: int | None = None) -> _Box:
        """The mailbox `name` (inside a write transaction); NoSuchMailbox if absent,
        MailboxReplaced if it is not the one with `uidvalidity` (when given)."""
        row = conn.execute(
            "SELECT id, uidvalidity, uidnext, highestmodseq, messages, modseq_reserved"
            " FROM mailbox WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NoSuchMailbox(name)
        if uidvalidity is not None and int(row[1]) != uidvalidity:
            raise MailboxReplaced(name)
        return _Box(int(row[0]), name, int(row[1]), int(row[2]), int(row[3]), int(row[4]),
                    int(row[5]))

    def _exists(self, conn: sqlite3.Connection, name: str) -> bool:
        return conn.execute("SELECT 1 FROM mailbox WHERE name = ?", (name,)).fetchone() is not None

    def _delivery_mailbox(self, conn: sqlite3.Connection, name: str) -> tuple[int, int, int]:
        """The mailbox a delivery names. A standard folder is found by its special-use
        attribute if it was renamed, and created if it is missing altogether."""
        row = self._mailbox_row(conn, name)
        if row is None and name in SPECIAL_USE:
            found = conn.execute("SELECT name FROM mailbox WHERE special_use = ? ORDER BY id",
                                 (SPECIAL_USE[name],)).fetchone()
            if found is not None:
                row = self._mailbox_row(conn, str(found[0]))
        if row is None and name in STANDARD_MAILBOXES:
            self._create_mailboxes(conn, [(name, SPECIAL_USE.get(name))])
            row = self._mailbox_row(conn, name)
        if row is None:
            raise NoSuchMailbox(name)
        return row

    def _journal(self, users: Iterable[str]) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(self.root / "inflight",
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fsync_dir(self.root)
        fd = self._journal_fd
        # The writer is single-threaded: when a new batch starts, every earlier batch has
        # finished (committed or failed and cleaned up), so a long journal can be reset.
        if os.fstat(fd).st_size > 1 << 20:
            os.ftruncate(fd, 0)
        os.write(fd, "".join(u + "\n" for u in users).encode())
        os.fsync(fd)

    def _create_sync(self, events: list[ChangeEvent], user: str, name: str,
                     special_use: str | None, limit: int | None) -> None:
        conn = self._conn(user)
        with transaction(conn):
            if self._exists(conn, name):
                raise MailboxExists(name)
            missing = [(parent, None) for parent in _parents(name)
                       if not self._exists(conn, parent)]
            _check_room(conn, "mailbox", len(missing) + 1, limit)
            self._create_mailboxes(conn, [*missing, (name, special_use)])
        events.append(ChangeEvent(user, "mailbox", name))

    def _delete_sync(self, events: list[ChangeEvent], user: str, name: str) -> None:
        if name == INBOX:
            raise CannotDelete("INBOX cannot be deleted")
        conn = self._conn(user)
        with transaction(conn):
            box = self._box(conn, name)
            rows = conn.execute(f"SELECT guid, size, {_INLINE} FROM message"
                                " WHERE mailbox_id = ?", (box.id,)).fetchall()
            files = self._forget_bodies(conn, user, [(guid, inline) for guid, _, inline in rows])
            conn.execute("DELETE FROM message WHERE mailbox_id = ?", (box.id,))
            conn.execute("DELETE FROM expunged WHERE mailbox_id = ?", (box.id,))
            conn.execute("DELETE FROM mailbox WHERE id = ?", (box.id,))
            _add_usage(conn, -sum(int(size) for _, size, _ in rows))
        events.append(ChangeEvent(user, "mailbox", name))
        self._unlink_messages(user, files)

    def _rename_sync(self, events: list[ChangeEvent], user: str, old: str, new: str,
                     limit: int | None) -> None:
        conn = self._conn(user)
        if old == INBOX:
            self._rename_inbox(events, conn, user, new, limit)
            return
        prefix = old + HIERARCHY_DELIMITER
        if new in (old, INBOX):
            raise MailboxExists(new)
        if new.startswith(prefix):
            raise InvalidMailboxName(f"cannot rename {old!r} into itself")
        with transaction(conn):
            renames = [(int(box_id), str(name), new + str(name)[len(old):])
                       for box_id, name in conn.execute(
                           "SELECT id, name FROM mailbox WHERE name = ? OR substr(name, 1, ?) = ?",
                           (old, len(prefix), prefix))]
            if not renames:  # neither a mailbox nor a parent of one
                raise NoSuchMailbox(old)
            for _, _, target in renames:
                # A child's new name is longer or deeper than its old one: the limits again.
                valid_mailbox_name(target)
            # `old` may be only a name its children keep (its mailbox deleted, RFC 3501
            # 6.3.4): they move all the same (6.3.5), and `new` is then only a name too,
            # as in Dovecot. Either way the subscription of `old` follows.
            names = {old: new, **{source: target for _, source, target in renames}}
            for target in names.values():
                # A name this rename frees is free ("w/w" to "w" moves "w/w/w" to "w/w").
                if target not in names and self._exists(conn, target):
                    raise MailboxExists(target)
            missing = [(parent, None) for parent in _parents(new)
                       if not self._exists(conn, parent)]
            _check_room(conn, "mailbox", len(missing), limit)
            self._create_mailboxes(conn, missing)
            # Through names no mailbox can have (they never hold a NUL), so no row takes a
            # name another still has: name is UNIQUE, checked row by row.
            conn.executemany("UPDATE mailbox SET name = ? WHERE id = ?",
                             [(f"\0{box_id}", box_id) for box_id, _, _ in renames])
            conn.executemany("UPDATE mailbox SET name = ? WHERE id = ?",
                             [(target, box_id) for box_id, _, target in renames])
            subscribed = {row[0] for row in conn.execute(
                "SELECT name FROM subscription WHERE name = ? OR substr(name, 1, ?) = ?",
                (old, len(prefix), prefix))}
            moved = [(source, target) for source, target in names.items()
                     if source in subscribed]
            conn.executemany("DELETE FROM subscription WHERE name = ?",
                             [(source,) for source, _ in moved])
            conn.executemany("INSERT OR IGNORE INTO subscription (name) VALUES (?)",
                             [(target,) for _, target in moved])
        events.append(ChangeEvent(user, "mailbox", new, source=old))

    def _rename_inbox(self, events: list[ChangeEvent], conn: sqlite3.Connection, user: str,
                      new: str, limit: int | None) -> None:
        """RFC 3501 6.3.5: INBOX's messages move to a new mailbox `new` (new UIDVALIDITY, new
        UIDs); INBOX stays, empty, and its children are not renamed."""
        with transaction(conn):
            if self._exists(conn, new):
                raise MailboxExists(new)
            missing = [(parent, None) for parent in _parents(new)
                       if not self._exists(conn, parent)]
            _check_room(conn, "mailbox", len(missing) + 1, limit)
            self._create_mailboxes(conn, [*missing, (new, None)])
            inbox, dest = self._box(conn, INBOX), self._box(conn, new)
            rows = conn.execute("SELECT uid, guid FROM message WHERE mailbox_id = ?"
                                " ORDER BY uid", (inbox.id,)).fetchall()
            self._move_rows(conn, inbox, dest, [(int(uid), str(guid)) for uid, guid in rows])
        events.append(ChangeEvent(user, "mailbox", new, source=INBOX,
                                  guids=tuple(str(guid) for _, guid in rows)))
        if rows:
            events.append(ChangeEvent(user, "expunge", INBOX))

    def _subscribe_sync(self, events: list[ChangeEvent], user: str, name: str,
                        subscribed: bool, limit: int | None) -> None:
        conn = self._conn(user)
        with transaction(conn):
            if subscribed:
                known = conn.execute("SELECT 1 FROM subscription WHERE name = ?",
                                     (name,)).fetchone()
                _check_room(conn, "subscription", 0 if known else 1, limit)
                cursor = conn.execute("INSERT OR IGNORE INTO subscription (name) VALUES (?)",
                                      (name,))
            else:
                cursor = conn.execute("DELETE FROM subscription WHERE name = ?", (name,))
        if cursor.rowcount:
            events.append(ChangeEvent(user, "mailbox", name))

    def _claim_recent_sync(self, user: str, mailbox: str, upto: int) -> int:
        conn = self._conn(user)
        row = conn.execute("SELECT id, recent_uid, uidnext FROM mailbox WHERE name = ?",
                           (mailbox,)).fetchone()
        if row is None:
            raise NoSuchMailbox(mailbox)
        if int(row[1]) >= min(upto, int(row[2])):  # nothing new: no write, no fsync
            return int(row[1])
        self._unsynced.add(user)
        with transaction(conn, durable=False):  # \Recent is a session hint, not data
            [(first,)] = conn.execute("SELECT recent_uid FROM mailbox WHERE id = ?",
                                      (row[0],)).fetchall()
            conn.execute("UPDATE mailbox SET recent_uid = MAX(recent_uid, MIN(uidnext, ?))"
                         " WHERE id = ?", (upto, row[0]))
        return int(first)

    def _make_durable_sync(self, user: str) -> None:
        if user in self._unsynced:
            _sync_index(self.user_path(user))
            self._unsynced.discard(user)

    # Writer thread: messages

    def _deliver_sync(self, events: list[ChangeEvent],
                      deliveries: list[Delivery]) -> list[int | None]:
        results: list[int | None] = [None] * len(deliveries)
        by_user: dict[str, list[int]] = defaultdict(list)
        for position, delivery in enumerate(deliveries):
            self.user_path(delivery.user)  # validate every owner before touching the disk
            by_user[delivery.user].append(position)
        # Only users about to get files can be left with orphans by a crash.
        with_files = [user for user, positions in by_user.items()
                      if not all(self._is_inline(deliveries[p].size) for p in positions)]
        if with_files:
            self._journal(with_files)
        for user, positions in by_user.items():
            stored = self._deliver_user(events, user, [deliveries[p] for p in positions])
            for position, new in zip(positions, stored, strict=True):
                results[position] = new
        return results

    def _deliver_user(self, events: list[ChangeEvent], user: str,
                      deliveries: list[Delivery]) -> list[int | None]:
        conn = self._conn(user)
        results: list[int | None] = [None] * len(deliveries)
        todo = _new_deliveries(conn, deliveries)
        if todo:
            written: list[Path] = []
            try:
                written = self._write_messages(self.user_path(user), [
                    (guid, (d.head, d.body)) for _, d, guid in todo
                    if not self._is_inline(d.size)])
                with transaction(conn):
                    committed = self._insert_deliveries(conn, todo, results)
            except BaseException:
                _unlink_all(written)
                raise
            kept = {guid for guids in committed.values() for guid in guids}
            # Files of deliveries that turned out to be duplicates inside the transaction.
            _unlink_all(path for path in written if path.name not in kept)
            events.extend(ChangeEvent(user, "deliver", name, guids=tuple(guids))
                          for name, guids in committed.items())
        if None in results:
            _sync_index(self.user_path(user))
        return results

    def _insert_deliveries(self, conn: sqlite3.Connection, todo: list[tuple[int, Delivery, str]],
                           results: list[int | None]) -> dict[str, list[str]]:
        """The rows (and inline bodies) of `todo`'s new deliveries, inside the transaction;
        sets results[position] to each new UID; returns mailbox name -> GUIDs stored."""
        # Keyed by id: two names may lead to one mailbox (Junk found by its attribute).
        box_ids: dict[str, int] = {}
        mailboxes: dict[int, list[int]] = {}  # id -> [id, uidnext, modseq]
        names: dict[int, str] = {}
        committed: dict[str, list[str]] = defaultdict(list)
        inline: list[tuple[str, bytes]] = []
        known = _known_queue_ids(conn, [d.queue_id for _, d, _ in todo])
        now = time.time()
        added = 0
        for i, delivery, guid in todo:
            if delivery.queue_id in known:
                continue
            box_id = box_ids.get(delivery.mailbox)
            if box_id is None:
                row = self._delivery_mailbox(conn, delivery.mailbox)
                box_id = box_ids[delivery.mailbox] = row[0]
                mailboxes.setdefault(box_id, list(row))
                names[box_id] = _mailbox_name(conn, box_id)
            box = mailboxes[box_id]
            uid, modseq = box[1], box[2] + 1
            box[1], box[2] = uid + 1, modseq
            conn.execute(
                "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags,"
                " modseq, padding) VALUES (?, ?, ?, ?, ?, '', ?, ?)",
                (box_id, uid, guid, delivery.size, delivery.received_at or now, modseq,
                 delivery.padding()),
            )
            conn.execute(
                "INSERT INTO delivered (queue_id, mailbox_id, uid, delivered_at)"
                " VALUES (?, ?, ?, ?)", (delivery.queue_id, box_id, uid, now),
            )
            if self._is_inline(delivery.size):
                inline.append((guid, delivery.data()))
            added += delivery.size
            committed[names[box_id]].append(guid)
            results[i] = uid
        conn.executemany("INSERT INTO body (guid, data) VALUES (?, ?)", inline)
        for box_id, uidnext, modseq in mailboxes.values():
            conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                         (uidnext, modseq, box_id))
        _add_usage(conn, added)
        return committed

    def _write_messages(self, base: Path,
                        bodies: list[tuple[str, tuple[bytes, ...]]]) -> list[Path]:
        """Write each (guid, parts of the message) to tmp/, fsync it and rename it into
        m/xx/."""
        def write(parts: tuple[bytes, ...]) -> Callable[[Path, Path], None]:
            def make(final: Path, tmp: Path) -> None:
                _write_file(tmp, *parts)
                os.rename(tmp, final)
            return make
        return _place_files(base, [(guid, write(parts)) for guid, parts in bodies])

    def _append_sync(self, events: list[ChangeEvent], user: str, mailbox: str, body: bytes,
                     flags: frozenset[str], internaldate: float,
                     quota: int | None) -> AppendResult:
        conn = self._conn(user)
        # Checked before any byte is written, and again inside the transaction.
        if self._mailbox_row(conn, mailbox) is None:
            raise NoSuchMailbox(mailbox)
        _check_quota(conn, len(body), quota)
        guid = uuid.uuid4().hex
        inline = self._is_inline(len(body))
        written: list[Path] = []
        if not inline:
            self._journal([user])
            written = self._write_messages(self.user_path(user), [(guid, (body,))])
        try:
            with transaction(conn):
                box = self._box(conn, mailbox)
                _check_quota(conn, len(body), quota)
                modseq = box.modseq + 1
                conn.execute(
                    "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags,"
                    " modseq, padding) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (box.id, box.uidnext, guid, len(body), internaldate, _flags_text(flags),
                     modseq, line_end_padding(body)))
                if inline:
                    conn.execute("INSERT INTO body (guid, data) VALUES (?, ?)", (guid, body))
                conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                             (box.uidnext + 1, modseq, box.id))
                _add_usage(conn, len(body))
        except BaseException:
            _unlink_all(written)
            raise
        events.append(ChangeEvent(user, "append", mailbox, guids=(guid,)))
        return AppendResult(box.uidvalidity, box.uidnext)

    def _expunge_sync(self, events: list[ChangeEvent], user: str, mailbox: str,
                      uids: list[int], uidvalidity: int | None = None,
                      deleted_only: bool = False, *,
                      guids: list[str] | None = None) -> list[Any]:
        """The UIDs expunged; with `guids` (in place of `uids`), the GUIDs."""
        conn = self._writer_conn(user, create=False)
        if conn is None:
            raise NoSuchMailbox(mailbox)
        with transaction(conn):
            box = self._box(conn, mailbox, uidvalidity)
            columns = f"guid, size, {_INLINE}"
            rows = (_rows_for_uids(conn, box.id, uids, columns,
                                   where=_HAS_DELETED if deleted_only else "")
                    if guids is None else _rows_for_guids(conn, box.id, guids, columns))
            if not rows:
                return []
            files = self._forget_bodies(conn, user, [(row[1], row[3]) for row in rows])
            modseq = box.modseq + 1
            found = [int(row[0]) for row in rows]
            conn.executemany("DELETE FROM message WHERE mailbox_id = ? AND uid = ?",
                             [(box.id, uid) for uid in found])
            conn.executemany(
                "INSERT OR REPLACE INTO expunged (mailbox_id, uid, modseq) VALUES (?, ?, ?)",
                [(box.id, uid, modseq) for uid in found],
            )
            conn.execute("UPDATE mailbox SET highestmodseq = ? WHERE id = ?", (modseq, box.id))
            _add_usage(conn, -sum(int(row[2]) for row in rows))
        events.append(ChangeEvent(user, "expunge", mailbox))
        # The index no longer names them; if we crash here the sweep removes them.
        self._unlink_messages(user, files)
        return found if guids is None else [str(row[1]) for row in rows]

    def _store_flags_sync(self, events: list[ChangeEvent], user: str, mailbox: str,
                          uids: list[int], mode: str, flags: frozenset[str],
                          unchangedsince: int | None,
                          uidvalidity: int | None = None) -> FlagsResult:
        conn = self._conn(user)
        # Only this thread writes: the reservation read here is the one in the transaction.
        durable = not _reserved_ahead(conn, mailbox)
        if not durable:
            self._unsynced.add(user)
        with transaction(conn, durable=durable):
            box = self._box(conn, mailbox, uidvalidity)
            modseq = box.modseq + 1
            span = _covered_span(conn, box.id, uids)
            if span is None:
                result = _store_flags_rows(conn, box.id, uids, modseq,
                                           _flag_change(mode, flags), unchangedsince)
            else:
                result = _store_flags_span(conn, box.id, span, modseq,
                                           _flag_change(mode, flags), unchangedsince)
            if result.changed:
                conn.execute("UPDATE mailbox SET highestmodseq = ? WHERE id = ?",
                             (modseq, box.id))
            if result.changed and modseq > box.reserved:  # this commit waits for the disk
                conn.execute("UPDATE mailbox SET modseq_reserved = ? WHERE id = ?",
                             (modseq + MODSEQ_RESERVE, box.id))
        if result.changed:
            status = MailboxStatus(mailbox, box.uidvalidity, box.uidnext, modseq, box.messages)
            events.append(ChangeEvent(user, "flags", mailbox, changed=tuple(result.changed),
                                      status=status))
        return result

    def _copy_sync(self, events: list[ChangeEvent], user: str, source: str, uids: list[int],
                   dest: str, quota: int | None, uidvalidity: int | None = None) -> CopyResult:
        conn = self._conn(user)
        linked: list[Path] = []
        try:
            with transaction(conn):
                src, dst = self._box(conn, source, uidvalidity), self._box(conn, dest)
                rows = _rows_for_uids(conn, src.id, uids,
                                      f"guid, size, internaldate, flags, {_INLINE}, padding")
                if not rows:
                    return CopyResult(dst.uidvalidity, [], [])
                _check_quota(conn, sum(int(row[2]) for row in rows), quota)
                guids = [uuid.uuid4().hex for _ in rows]
                linked = self._copy_bodies(conn, user, [
                    (str(row[1]), guid, bool(row[5]))
                    for row, guid in zip(rows, guids, strict=True)])
                modseq = dst.modseq + 1
                dest_uids = list(range(dst.uidnext, dst.uidnext + len(rows)))
                spelled = self._destination_spelling(conn, user, dst,
                                                   [str(row[4]) for row in rows])
                conn.executemany(
                    "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags,"
                    " modseq, padding) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(dst.id, uid, guid, size, internaldate, spelled[flags], modseq, padding)
                     for uid, guid, (_, _, size, internaldate, flags, _, padding)
                     in zip(dest_uids, guids, rows, strict=True)])
                conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                             (dest_uids[-1] + 1, modseq, dst.id))
                _add_usage(conn, sum(int(row[2]) for row in rows))
        except BaseException:
            _unlink_all(linked)
            raise
        events.append(ChangeEvent(user, "copy", dest, source=source, guids=tuple(guids)))
        return CopyResult(dst.uidvalidity, [int(row[0]) for row in rows], dest_uids)

    def _copy_bodies(self, conn: sqlite3.Connection, user: str,
                     copies: list[tuple[str, str, bool]]) -> list[Path]:
        """For each (source GUID, new GUID, source is inline), the copy's body: an inline
        source's bytes copied into a new body row (inside SQLite, in the transaction), a
        file source's file linked under the new name (journalled, durable before the
        commit). Returns the names linked."""
        conn.executemany("INSERT INTO body (guid, data) SELECT ?, data FROM body WHERE guid = ?",
                         [(new, source) for source, new, inline in copies if inline])
        files = [(source, new) for source, new, inline in copies if not inline]
        if not files:
            return []
        self._journal([user])
        return self._link_messages(self.user_path(user), files)

    def _forget_bodies(self, conn: sqlite3.Connection, user: str,
                       doomed: Sequence[tuple[str, object]]) -> list[str]:
        """Inside the transaction removing the messages (GUID, is inline): delete the inline
        bodies; journal the user when files are left to unlink after the commit (a crash
        before that leaves names the sweep removes). Returns the GUIDs of those files."""
        conn.executemany("DELETE FROM body WHERE guid = ?",
                         [(guid,) for guid, inline in doomed if inline])
        files = [str(guid) for guid, inline in doomed if not inline]
        if files:
            self._journal([user])
        return files

    def _link_messages(self, base: Path, pairs: list[tuple[str, str]]) -> list[Path]:
        """For each (source guid, new guid), a new name for the source's file. A file system
        refusing the link gets a durable byte copy instead."""
        def link(source: str) -> Callable[[Path, Path], None]:
            return functools.partial(_link_or_copy, base / "m" / source[:2] / source)
        return _place_files(base, [(guid, link(source)) for source, guid in pairs])

    def _destination_spelling(self, conn: sqlite3.Connection, user: str, dst: _Box,
                              texts: Iterable[str]) -> dict[str, str]:
        """Each stored flags text with its keywords spelled as the destination mailbox already
        spells them (RFC 3501 9: a keyword is one whatever its case), so COPY and MOVE add no
        second spelling. The destination is read only when a text holds a keyword."""
        wanted = set(texts)
        if not _keywords_in((text,) for text in wanted):
            return {text: text for text in wanted}
        known = self._keywords_of(conn, user, dst)
        return {text: _flags_text(in_known_spelling(text.split(), known)) for text in wanted}

    def _keywords_of(self, conn: sqlite3.Connection, user: str, box: _Box) -> set[str]:
        """Every keyword of the mailbox's messages, or a few more that were set once. From its
        cached snapshot and the rows changed since, when there is one: reading every row's
        flags costs a COPY into a mailbox of 100,000 messages about 20 ms."""
        cached = self._snapshots.get(user, box.name, box.uidvalidity)
        if cached is None:
            return _keywords_in(conn.execute(
                "SELECT DISTINCT flags FROM message WHERE mailbox_id = ?", (box.id,)))
        return set(cached.keywords) | _keywords_in(conn.execute(
            "SELECT DISTINCT flags FROM message INDEXED BY message_modseq"
            " WHERE mailbox_id = ? AND modseq > ?", (box.id, cached.modseq)))

    def _move_sync(self, events: list[ChangeEvent], user: str, source: str, uids: list[int],
                   dest: str, uidvalidity: int | None = None) -> CopyResult:
        conn = self._conn(user)
        with transaction(conn):
            src, dst = self._box(conn, source, uidvalidity), self._box(conn, dest)
            found = _rows_for_uids(conn, src.id, uids, "guid, flags")
            rows = [(int(uid), str(guid)) for uid, guid, _ in found]
            texts = [str(flags) for _, _, flags in found]
            spelled = self._destination_spelling(conn, user, dst, texts)  # rows not moved yet
            dest_uids = self._move_rows(conn, src, dst, rows)
            conn.executemany("UPDATE message SET flags = ? WHERE mailbox_id = ? AND uid = ?",
                             [(spelled[text], dst.id, uid)
                              for uid, text in zip(dest_uids, texts, strict=True)
                              if spelled[text] != text])
        if rows:
            guids = tuple(guid for _, guid in rows)
            events.append(ChangeEvent(user, "move", dest, source=source, guids=guids))
            if source != dest:
                events.append(ChangeEvent(user, "expunge", source))
        return CopyResult(dst.uidvalidity, [uid for uid, _ in rows], dest_uids)

    def _move_rows(self, conn: sqlite3.Connection, src: _Box, dst: _Box,
                   rows: list[tuple[int, str]]) -> list[int]:
        """Give the (uid, guid) rows of `src` new UIDs in `dst` and record their old UIDs as
        expunged; inside a write transaction. The files stay where they are."""
        if not rows:
            return []
        src_modseq = src.modseq + 1
        same = src.id == dst.id
        dst_modseq = src_modseq if same else dst.modseq + 1
        dest_uids = list(range(dst.uidnext, dst.uidnext + len(rows)))
        conn.executemany(
            "UPDATE message SET mailbox_id = ?, uid = ?, modseq = ?"
            " WHERE mailbox_id = ? AND uid = ?",
            [(dst.id, new, dst_modseq, src.id, old)
             for (old, _), new in zip(rows, dest_uids, strict=True)])
        conn.executemany(
            "INSERT OR REPLACE INTO expunged (mailbox_id, uid, modseq) VALUES (?, ?, ?)",
            [(src.id, old, src_modseq) for old, _ in rows])
        conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                     (dest_uids[-1] + 1, dst_modseq, dst.id))
        if not same:
            conn.execute("UPDATE mailbox SET highestmodseq = ? WHERE id = ?",
                         (src_modseq, src.id))
        return dest_uids

    def _unlink_messages(self, user: str, guids: Iterable[str]) -> None:
        """Remove files the index no longer names (after the commit that forgot them)."""
        base = self.user_path(user)
        _unlink_all(base / "m" / guid[:2] / guid for guid in guids)

    # Writer thread: sweep and close

    def _sweep_sync(self, full: bool) -> SweepResult:
        journal = self.root / "inflight"
        users: set[str] = set()
        if full:
            for shard in self.root.iterdir():
                if shard.is_dir() and len(shard.name) == 2:
                    users.update(p.name for p in shard.iterdir() if p.is_dir())
        elif journal.exists():
            users.update(line for line in journal.read_text(errors="replace").splitlines()
                         if line)
        removed = 0
        for user in sorted(users):
            try:
                removed += self._sweep_user(user)
            except NoSuchUser:
                log.warning("sweep: skipping unsafe directory name %r", user)
            except (sqlite3.DatabaseError, OSError) as exc:
                # One damaged index must not keep every other account from being served:
                # the store starts, and this user's mail waits (or is dead-lettered) until
                # the index is repaired. Its orphan files, if any, stay for a full sweep.
                log.error("sweep: the index of %s cannot be used (%s: %s): its mail is not "
                          "served until it is repaired or restored; the other accounts are",
                          user, type(exc).__name__, exc,
                          extra={"event": "sweep-index-unusable", "user": user})
        if journal.exists():
            if self._journal_fd is not None:
                os.ftruncate(self._journal_fd, 0)
            else:
                os.truncate(journal, 0)
        if removed:
            log.warning("sweep removed %d orphan message files", removed,
                        extra={"event": "sweep"})
        return SweepResult(users=len(users), files_removed=removed)

    def _sweep_user(self, user: str) -> int:
        base = self.user_path(user)
        removed = 0
        tmp = base / "tmp"
        if tmp.is_dir():
            for leftover in tmp.iterdir():
                leftover.unlink()
                removed += 1
        conn = self._writer_conn(user, create=False)
        files = base / "m"
        if conn is None or not files.is_dir():
            return removed
        indexed = {row[0] for row in conn.execute("SELECT guid FROM message")}
        for bucket in files.iterdir():
            for path in bucket.iterdir():
                if path.name not in indexed:
                    path.unlink()
                    removed += 1
        return removed

    def _close_sync(self) -> None:
        for conn in self._open.values():
            conn.close()
        self._open.clear()
        if self._uidvalidity is not None:
            self._uidvalidity.close()
        if self._journal_fd is not None:
            # Every batch has finished: nothing is in flight any more.
            os.ftruncate(self._journal_fd, 0)
            os.close(self._journal_fd)
            self._journal_fd = None

    # Reader threads. Each returns None for "no index, an outdated one or no such mailbox".

    def _read_conn(self, user: str) -> sqlite3.Connection | None:
        """This reader thread's read-only connection (kept open), or None when the index is
        missing or not yet at SCHEMA_VERSION (being created, or written by older code): the
        writer fixes that; or when the index's MODSEQs were not re-established in this epoch
        yet (`_recover_modseqs`). A read of several statements uses `read_snapshot`."""
        conn = self._bodies.connection(user)
        if conn is None or user in self._reconciled:
            return conn
        if _index_epoch(conn) != self._epoch:
            return None
        self._remember_reconciled(user)
        return conn

    def _status_sync(self, user: str, mailbox: str) -> MailboxStatus | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        with read_snapshot(conn):
            return _status(conn, mailbox)

    def _mailboxes_sync(self, user: str, _mailbox: str) -> list[MailboxInfo] | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        rows = conn.execute(
            "SELECT mailbox.name, special_use, subscription.name IS NOT NULL, uidvalidity"
            " FROM mailbox LEFT JOIN subscription ON subscription.name = mailbox.name"
            " ORDER BY mailbox.name != 'INBOX', mailbox.name").fetchall()
        return [MailboxInfo(str(name), use, bool(subscribed), int(uidvalidity))
                for name, use, subscribed, uidvalidity in rows]

    def _subscriptions_sync(self, user: str, _mailbox: str) -> list[str] | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        return [str(row[0]) for row in conn.execute(
            "SELECT name FROM subscription ORDER BY name != 'INBOX', name")]

    def _snapshot_sync(self, user: str, mailbox: str) -> Snapshot | None:
        """The mailbox's snapshot from the cache brought up to date, or read whole (then
        cached); the snapshot's state and the changes are read in one transaction."""
        conn = self._read_conn(user)
        if conn is None:
            return None
        with read_snapshot(conn):
            row = conn.execute("SELECT id, uidvalidity, highestmodseq FROM mailbox"
                               " WHERE name = ?", (mailbox,)).fetchone()
            if row is None:
                return None
            box_id, uidvalidity, modseq = int(row[0]), int(row[1]), int(row[2])
            cached = self._snapshots.get(user, mailbox, uidvalidity)
            if cached is not None and cached.modseq == modseq:
                self._snapshots.hits += 1
                return cached
            snapshot = None
            if cached is not None:
                snapshot = self._merged(conn, box_id, cached, modseq)
            if snapshot is None:
                snapshot = Snapshot.of(uidvalidity, modseq, _infos(conn.execute(
                    "SELECT uid, guid, size, internaldate, flags, modseq FROM message"
                    " WHERE mailbox_id = ? ORDER BY uid", (box_id,))))
        self._snapshots.put(user, mailbox, snapshot)
        return snapshot

    def _merged(self, conn: sqlite3.Connection, box_id: int, cached: Snapshot,
                modseq: int) -> Snapshot | None:
        """The cached snapshot with what changed since its MODSEQ, or None when so much
        changed that reading the mailbox again is cheaper."""
        changed = conn.execute(
            "SELECT uid, guid, size, internaldate, flags, modseq FROM message"
            " INDEXED BY message_modseq WHERE mailbox_id = ? AND modseq > ?"
            " ORDER BY uid LIMIT ?", (box_id, cached.modseq, MERGE_LIMIT + 1)).fetchall()
        expunged = [uid for (uid,) in conn.execute(
            "SELECT uid FROM expunged INDEXED BY expunged_modseq"
            " WHERE mailbox_id = ? AND modseq > ? ORDER BY uid LIMIT ?",
            (box_id, cached.modseq, MERGE_LIMIT + 1))]
        if len(changed) + len(expunged) > MERGE_LIMIT:
            return None
        self._snapshots.merges += 1
        return merge(cached, modseq, _infos(changed), expunged)

    def _uids_sync(self, user: str, mailbox: str) -> list[int] | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        row = conn.execute("SELECT id FROM mailbox WHERE name = ?", (mailbox,)).fetchone()
        if row is None:
            return None
        return [uid for (uid,) in conn.execute(
            "SELECT uid FROM message WHERE mailbox_id = ? ORDER BY uid", (row[0],))]

    def _changes_sync(self, user: str, mailbox: str, modseq: int) -> Changes | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        with read_snapshot(conn):
            status = _status(conn, mailbox)
            if status is None:
                return None
            box_id = conn.execute("SELECT id FROM mailbox WHERE name = ?",
                                  (mailbox,)).fetchone()[0]
            # INDEXED BY: for ORDER BY uid the planner would rather walk the whole mailbox
            # in key order; a few recent changes are cheaper found by MODSEQ and sorted.
            rows = conn.execute(
                "SELECT uid, guid, size, internaldate, flags, modseq FROM message"
                " INDEXED BY message_modseq WHERE mailbox_id = ? AND modseq > ? ORDER BY uid",
                (box_id, modseq),
            ).fetchall()
            expunged = [uid for (uid,) in conn.execute(
                "SELECT uid FROM expunged INDEXED BY expunged_modseq"
                " WHERE mailbox_id = ? AND modseq > ? ORDER BY uid", (box_id, modseq))]
        return Changes(status=status, changed=_infos(rows), expunged=expunged)

    def _fetch_infos_sync(self, user: str, mailbox: str,
                          uids: list[int]) -> list[MessageInfo] | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        with read_snapshot(conn):
            row = conn.execute("SELECT id FROM mailbox WHERE name = ?", (mailbox,)).fetchone()
            if row is None:
                return None
            rows = _rows_for_uids(conn, int(row[0]), uids,
                                  "guid, size, internaldate, flags, modseq")
        return _infos(rows)

    def _unseen_sync(self, user: str, mailbox: str) -> int | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        row = conn.execute("SELECT id FROM mailbox WHERE name = ?", (mailbox,)).fetchone()
        if row is None:
            return None
        return int(conn.execute(
            f"SELECT count(*) FROM message WHERE mailbox_id = ? AND {_UNSEEN}",
            (row[0],)).fetchone()[0])

    def _first_unclaimed_sync(self, user: str, mailbox: str) -> int | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        row = conn.execute("SELECT recent_uid FROM mailbox WHERE name = ?",
                           (mailbox,)).fetchone()
        return None if row is None else int(row[0])

    def _recent_sync(self, user: str, mailbox: str) -> int | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        with read_snapshot(conn):
            row = conn.execute("SELECT id, recent_uid FROM mailbox WHERE name = ?",
                               (mailbox,)).fetchone()
            if row is None:
                return None
            return int(conn.execute(
                "SELECT count(*) FROM message WHERE mailbox_id = ? AND uid >= ?",
                (row[0], row[1])).fetchone()[0])

    def _first_unseen_sync(self, user: str, mailbox: str) -> int | None:
        """Sequence number of the first unseen message, 0 if none (None means absent)."""
        conn = self._read_conn(user)
        if conn is None:
            return None
        with read_snapshot(conn):
            row = conn.execute("SELECT id FROM mailbox WHERE name = ?", (mailbox,)).fetchone()
            if row is None:
                return None
            first = conn.execute(
                f"SELECT min(uid) FROM message WHERE mailbox_id = ? AND {_UNSEEN}",
                (row[0],)).fetchone()[0]
            if first is None:
                return 0
            return int(conn.execute(
                "SELECT count(*) FROM message WHERE mailbox_id = ? AND uid <= ?",
                (row[0], first)).fetchone()[0])

    def _usage_sync(self, user: str, _mailbox: str) -> int | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        return _usage(conn)

    def _padding_sync(self, user: str, mailbox: str) -> dict[int, int | None] | None:
        """UID -> padding of the messages whose padding is not 0 (None: not computed yet)."""
        conn = self._read_conn(user)
        if conn is None:
            return None
        row = self._mailbox_row(conn, mailbox)
        if row is None:
            return None
        return dict(conn.execute("SELECT uid, padding FROM message WHERE mailbox_id = ?"
                                 " AND padding IS NOT 0", (row[0],)).fetchall())

    # The padding thread

    def _padding_batch_sync(self, user: str) -> list[tuple[int, str]] | None:
        """(padding, GUID) of up to PADDING_BATCH messages whose padding is not computed
        yet; no transaction is open meanwhile. None when the index has nothing left to
        compute (`padding_pending` is gone) or does not exist.

        Delivered mail has CRLF line ends only (the filter refuses bare ones), so its last
        octet tells: an inline body's read by SQLite, a file's with one pread. Any other
        message (APPENDed, or copied or moved, which gives a new UID) is read whole: APPEND
        kept bare LFs until after schema 5 (8fa5827)."""
        conn = self._bodies.connection(user)
        if conn is None or not _padding_pending(conn):
            return None
        rows = conn.execute(
            "SELECT guid, EXISTS (SELECT 1 FROM delivered d WHERE d.mailbox_id ="
            " message.mailbox_id AND d.uid = message.uid), (SELECT substr(data, -1) FROM body"
            " WHERE body.guid = message.guid) FROM message WHERE padding IS NULL LIMIT ?",
            (PADDING_BATCH,)).fetchall()
        computed = []
        for guid, delivered, last_octet in rows:
            if self._closed:
                break
            if last_octet is None:
                padding = self._file_padding(user, guid, whole=not delivered)
            elif delivered:
                padding = _padding_after(last_octet) if last_octet else 0
            else:
                padding = line_end_padding(self._bodies.body(user, guid) or b"")
            computed.append((padding, str(guid)))
        return computed

    def _file_padding(self, user: str, guid: str, whole: bool) -> int:
        """The padding of a message kept in a file, read whole or from its last octet; 0 for
        a file that is gone (expunged since, or lost: POP3 cannot send it either)."""
        try:
            fd = os.open(self._message_file(user, guid), os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:  # os calls, not open(): a buffered file object cost a third more here
            if whole:
                with open(fd, "rb", buffering=0, closefd=False) as file:
                    return line_end_padding(file.readall())
            size = os.fstat(fd).st_size
            return _padding_after(os.pread(fd, 1, size - 1)) if size else 0
        finally:
            os.close(fd)

    def _queue_ids_sync(self, user: str) -> set[str]:
        conn = self._read_conn(user)
        if conn is None:
            return set()
        return {row[0] for row in conn.execute("SELECT queue_id FROM delivered")}


def _index_epoch(conn: sqlite3.Connection) -> int:
    """The store epoch in which the index's MODSEQs were last re-established."""
    return int(conn.execute("SELECT epoch FROM account").fetchone()[0])


def _reserved_ahead(conn: sqlite3.Connection, mailbox: str) -> bool:
    """Whether the mailbox's next MODSEQ is reserved, so a flag change may use it without
    waiting for the disk."""
    row = conn.execute("SELECT highestmodseq < modseq_reserved FROM mailbox WHERE name = ?",
                       (mailbox,)).fetchone()
    return bool(row and row[0])


def _add_padding_column(conn: sqlite3.Connection) -> None:
    """Schema 5 -> 6, inside the migration's transaction: message.padding, NULL in the rows
    already there, the partial index of the NULL rows and the lookup of delivered messages
    by UID (both dropped once every padding is computed). No body is read here: reading
    the last octets of 100,000 message files in this transaction took seconds (minutes on
    a slow disk) while the writer, shared by every user, waited; `MailDB._fill_padding`
    does it afterwards, in batches."""
    conn.execute("ALTER TABLE message ADD COLUMN padding INTEGER")
    conn.execute(f"CREATE INDEX IF NOT EXISTS {PADDING_PENDING} ON message(guid)"
                 " WHERE padding IS NULL")
    conn.execute(f"CREATE INDEX IF NOT EXISTS {PADDING_DELIVERED} ON delivered(mailbox_id, uid)")


def _padding_pending(conn: sqlite3.Connection) -> bool:
    """Whether the index still has paddings to compute (a migration from schema 5 left
    them NULL)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?",
                        (PADDING_PENDING,)).fetchone() is not None


# A column for `SELECT ... FROM message`: 1 when the message's body is inline.
_INLINE = "EXISTS (SELECT 1 FROM body WHERE body.guid = message.guid)"

# Flags are stored sorted and space-separated, system flags in canonical case: \Seen is a
# whole word. (LIKE is case-insensitive for ASCII, which is harmless here.)
_UNSEEN = "' ' || flags || ' ' NOT LIKE '% \\Seen %'"


def _status(conn: sqlite3.Connection, mailbox: str) -> MailboxStatus | None:
    row = conn.execute(
        "SELECT uidvalidity, uidnext, highestmodseq, messages FROM mailbox WHERE name = ?",
        (mailbox,),
    ).fetchone()
    if row is None:
        return None
    return MailboxStatus(name=mailbox, uidvalidity=int(row[0]), uidnext=int(row[1]),
                         highestmodseq=int(row[2]), messages=int(row[3]))


def _infos(rows: Iterable[Sequence[Any]]) -> list[MessageInfo]:
    """MessageInfo per (uid, guid, size, internaldate, flags, modseq) row. Inlined parsing:
    this loop is most of a 100,000-message SELECT."""
    flag_sets: dict[str, frozenset[str]] = {"": _EMPTY_FLAGS}
    # tuple.__new__ directly: MessageInfo(...) adds a Python-level __new__ call per row.
    new, info_type = tuple.__new__, MessageInfo
    result = []
    for uid, guid, size, internaldate, flags, modseq in rows:
        parsed = flag_sets.get(flags)
        if parsed is None:
            parsed = flag_sets[flags] = frozenset(flags.split())
        result.append(new(info_type, (uid, guid, size, internaldate, parsed, modseq)))
    return result


# `flags` holds the flags space-separated; system flags are matched case-insensitively, as
# LIKE does (RFC 3501 2.3.2).
_HAS_DELETED = " AND ' ' || flags || ' ' LIKE '% \\Deleted %'"


def _keywords_in(rows: Iterable[tuple[Any, ...]]) -> set[str]:
    return {flag for (text,) in rows for flag in str(text).split() if not flag.startswith("\\")}


def _rows_for_uids(conn: sqlite3.Connection, box_id: int, uids: Iterable[int],
                   columns: str, *, where: str = "") -> list[tuple[Any, ...]]:
    """(uid, *columns) of the given UIDs that exist in the mailbox (and meet the `where`
    condition, " AND ..."), ascending by UID."""
    wanted = sorted({uid for uid in uids if 0 < uid < 1 << 63})
    if not wanted:
        return []
    query = f"SELECT uid, {columns} FROM message WHERE mailbox_id = ?{where}"
    if len(wanted) > _RANGE_SCAN_THRESHOLD:
        # Many UIDs (1:* on a big mailbox): one range scan beats thousands of lookups.
        keep = set(wanted)
        return [row for row in conn.execute(
            f"{query} AND uid BETWEEN ? AND ? ORDER BY uid", (box_id, wanted[0], wanted[-1]))
            if row[0] in keep]
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start:start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows.extend(conn.execute(f"{query} AND uid IN ({marks}) ORDER BY uid",
                                 (box_id, *chunk)))
    return rows


def _rows_for_guids(conn: sqlite3.Connection, box_id: int, guids: Iterable[str],
                    columns: str) -> list[tuple[Any, ...]]:
    """(uid, *columns) of the messages with these GUIDs that are in the mailbox, by UID."""
    wanted = sorted(set(guids))
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start:start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows.extend(conn.execute(
            f"SELECT uid, {columns} FROM message WHERE mailbox_id = ? AND guid IN ({marks})",
            (box_id, *chunk)))
    return sorted(rows)


def _flag_change(mode: str, flags: frozenset[str]) -> Callable[[frozenset[str]],
                                                              frozenset[str]]:
    if mode == "+":
        return lambda current: current | flags
    if mode == "-":
        return lambda current: current - flags
    return lambda current: flags


def _store_flags_rows(conn: sqlite3.Connection, box_id: int, uids: list[int], modseq: int,
                      change: Callable[[frozenset[str]], frozenset[str]],
                      unchangedsince: int | None) -> FlagsResult:
    """STORE message by message (a scattered UID set)."""
    parse = _FlagSets()
    changed: list[MessageInfo] = []
    modified: list[int] = []
    updates: list[tuple[str, int, int, int]] = []
    for uid, guid, size, internaldate, text, old_modseq in _rows_for_uids(
            conn, box_id, uids, "guid, size, internaldate, flags, modseq"):
        if unchangedsince is not None and old_modseq > unchangedsince:
            modified.append(uid)  # RFC 7162 3.1.3: changed since the client looked
            continue
        current = parse(text)
        new = change(current)
        if new != current:
            updates.append((_flags_text(new), modseq, box_id, uid))
            changed.append(MessageInfo(uid, guid, size, internaldate, new, modseq))
    conn.executemany("UPDATE message SET flags = ?, modseq = ? WHERE mailbox_id = ? AND uid = ?",
                     updates)
    return FlagsResult(changed, modified)


def _store_flags_span(conn: sqlite3.Connection, box_id: int, span: tuple[int, int],
                      modseq: int, change: Callable[[frozenset[str]], frozenset[str]],
                      unchangedsince: int | None) -> FlagsResult:
    """STORE on every message of a UID span (1:* and the like): one UPDATE per distinct
    flag set instead of one per message. Only this call's rows get `modseq`, so they are
    read back by it."""
    where = "mailbox_id = ? AND uid BETWEEN ? AND ?"
    params: tuple[int, ...] = (box_id, *span)
    modified: list[int] = []
    if unchangedsince is not None:
        modified = [uid for (uid,) in conn.execute(
            f"SELECT uid FROM message WHERE {where} AND modseq > ? ORDER BY uid",
            (*params, unchangedsince))]
        where += " AND modseq <= ?"
        params += (unchangedsince,)
    texts = [text for (text,) in conn.execute(
        f"SELECT DISTINCT flags FROM message WHERE {where}", params)]
    for text in texts:
        current = frozenset(text.split())
        new = change(current)
        if new != current:
            conn.execute(f"UPDATE message SET flags = ?, modseq = ? WHERE {where} AND flags = ?",
                         (_flags_text(new), modseq, *params, text))
    rows = conn.execute(
        "SELECT uid, guid, size, internaldate, flags, modseq FROM message INDEXED BY"
        " message_modseq WHERE mailbox_id = ? AND modseq = ? ORDER BY uid", (box_id, modseq))
    return FlagsResult(_infos(rows), modified)


def _covered_span(conn: sqlite3.Connection, box_id: int,
                  uids: list[int]) -> tuple[int, int] | None:
    """(lowest, highest) of a large UID set that names every message between them, else
    None (then the messages are handled one by one)."""
    if len(uids) <= _RANGE_SCAN_THRESHOLD:
        return None
    ordered = sorted(set(uids))
    low, high = ordered[0], ordered[-1]
    gaps = [(before + 1, after - 1) for before, after in itertools.pairwise(ordered)
            if after - before > 1]
    if len(gaps) <= _SPAN_GAPS_PROBED:
        # Only a message inside a gap can be one the set does not name: one indexed probe
        # per gap instead of reading every UID of the span (none at all for a gapless 1:*).
        for first, last in gaps:
            if conn.execute("SELECT 1 FROM message WHERE mailbox_id = ? AND uid BETWEEN ?"
                            " AND ? LIMIT 1", (box_id, first, last)).fetchone():
                return None
        return low, high
    wanted = set(ordered)
    existing = conn.execute("SELECT uid FROM message WHERE mailbox_id = ? AND uid BETWEEN ?"
                            " AND ?", (box_id, low, high))
    if all(uid in wanted for (uid,) in existing):
        return low, high
    return None


def _mailbox_name(conn: sqlite3.Connection, box_id: int) -> str:
    return str(conn.execute("SELECT name FROM mailbox WHERE id = ?", (box_id,)).fetchone()[0])


def stored_usage(store_dir: Path, user: str) -> int:
    """The octets a user's mail takes, read from the index by another process (the CLI):
    the authority, where Redis holds the store's last report (only for accounts with a
    limit). 0 for an account that has no mail yet. StorageError naming the index when it
    cannot be read (damaged, unreadable)."""
    index = store_user_path(store_dir, user) / "index.sqlite"
    if not index.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)
        try:
            return _usage(conn)
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise StorageError(f"the mail index of {user} cannot be read ({exc}): {index}") \
            from None


def _usage(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT usage FROM account WHERE id = 1").fetchone()
    return 0 if row is None else int(row[0])


def _add_usage(conn: sqlite3.Connection, octets: int) -> None:
    """Inside the write transaction that adds or removes the message rows."""
    if octets:
        conn.execute("UPDATE account SET usage = usage + ? WHERE id = 1", (octets,))


def _check_quota(conn: sqlite3.Connection, adding: int, quota: int | None) -> None:
    if quota is not None and _usage(conn) + adding > quota:
        raise OverQuota(f"{adding} more octets would exceed the quota of {quota}")


def _place_files(base: Path, makers: list[tuple[str, Callable[[Path, Path], None]]]
                 ) -> list[Path]:
    """Create m/xx/<guid> for each (guid, make) by calling make(final path, tmp path), then
    fsync every directory touched, so the files are durable before the index names them. On
    failure nothing created stays."""
    created: list[Path] = []
    try:
        dirs: set[Path] = set()
        if not (base / "tmp").is_dir():
            # A restored backup holds only the files with data (docs/operations.md): no tmp/.
            _makedirs_durable(base / "tmp")
        for guid, make in makers:
            final_dir = base / "m" / guid[:2]
            if not final_dir.is_dir():
                _makedirs_durable(final_dir)
            final = final_dir / guid
            make(final, base / "tmp" / guid)
            created.append(final)
            dirs.add(final_dir)
        for directory in dirs:
            fsync_dir(directory)
    except BaseException:
        _unlink_all(created)
        raise
    return created


def _sync_index(user_dir: Path) -> None:
    """Make what a user's index holds durable: the commits that did not wait for the disk
    (make_durable, IMAP CHECK), and before a redelivery found in the index is acked: a
    store that died after writing a commit to the WAL but before its fsync returned left
    it in the page cache, where the next store reads it (a power loss would still lose it).
    The WAL, and not the database file: a checkpoint records its progress only after
    syncing that. Another descriptor of the WAL may be closed freely (SQLite's POSIX locks
    are on the database and -shm files, which a close() of ours would release). The
    directory too: that store may have died while creating the index."""
    with contextlib.suppress(FileNotFoundError):
        fsync_path(user_dir / "index.sqlite-wal")
    fsync_dir(user_dir)


def _write_file(path: Path, *parts: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for data in parts:
            _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _owner_groups(deliveries: Sequence[Delivery], owners: int) -> list[list[int]]:
    """Positions of `deliveries`, in groups of at most `owners` mailbox owners each."""
    by_owner: dict[str, list[int]] = {}
    for position, delivery in enumerate(deliveries):
        by_owner.setdefault(delivery.user, []).append(position)
    groups = list(by_owner.values())
    return [sorted(p for group in groups[i:i + owners] for p in group)
            for i in range(0, len(groups), owners)]


def _space_checked(func: Callable[..., T], *args: object) -> T:
    """`func(*args)`, with a full file system reported as OutOfSpace whichever layer met it
    (a file write's ENOSPC or EDQUOT, SQLite's SQLITE_FULL)."""
    try:
        return func(*args)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(str(exc)) from exc
        raise
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise OutOfSpace(str(exc)) from exc
        raise


# Link failures that mean "this file system or this file cannot take another link".
_NO_LINK = frozenset({errno.EMLINK, errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP})


def _link_or_copy(source: Path, target: Path, tmp: Path) -> None:
    """`target` becomes another name of `source`'s file; where the file system refuses
    (link count limit, no hard links), a copy written and fsynced through `tmp`."""
    try:
        os.link(source, target)
        return
    except OSError as error:
        if error.errno not in _NO_LINK:
            raise
    with open(source, "rb") as src, open(tmp, "xb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    os.rename(tmp, target)


def _padding_after(last_octet: bytes) -> int:
    """A message's padding from its last octet alone, as the 5 -> 6 migration's SQL for
    inline bodies: a final LF ends the last line (line_end_padding would count a bare LF
    in the one octet it is given)."""
    return {b"\n": 0, b"\r": 1}.get(last_octet, 2)


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _known_queue_ids(conn: sqlite3.Connection, queue_ids: list[str]) -> set[str]:
    known: set[str] = set()
    for start in range(0, len(queue_ids), _IN_CHUNK):
        chunk = queue_ids[start:start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        known.update(row[0] for row in conn.execute(
            f"SELECT queue_id FROM delivered WHERE queue_id IN ({marks})", chunk))
    return known


def _new_deliveries(conn: sqlite3.Connection,
                    deliveries: list[Delivery]) -> list[tuple[int, Delivery, str]]:
    """(position, delivery, new GUID) of each queue id not yet delivered, once. A cheap read
    before any byte is written, so a redelivered batch writes nothing at all."""
    known = _known_queue_ids(conn, list({d.queue_id for d in deliveries}))
    todo: list[tuple[int, Delivery, str]] = []
    seen: set[str] = set()
    for i, delivery in enumerate(deliveries):
        if delivery.queue_id in known or delivery.queue_id in seen:
            continue
        seen.add(delivery.queue_id)
        todo.append((i, delivery, uuid.uuid4().hex))
    return todo
