"""Full-text index for IMAP SEARCH TEXT/BODY: one SQLite FTS5 trigram table per user.

Layout: `text.sqlite` beside the user's `index.sqlite` (see maildb.py):

    doc(id INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE)   which messages are indexed
    text(head, body)                                  FTS5, contentless, trigram, rowid = doc.id
    meta(key, value)                                  "garbage": rows of forgotten messages

Why trigrams: IMAP SEARCH is a case-insensitive *substring* match (RFC 3501 6.4.4), not a word
match. A phrase query over the trigram tokenizer is exactly that for needles of three or more
characters; shorter needles are answered by scanning. The table is contentless so the text is
not stored twice; SQLite 3.40 cannot delete from such a table, so a forgotten (expunged)
message only loses its `doc` row: its FTS postings stay as garbage, never reach a result
(AUTOINCREMENT: a doc id is never used again, or the postings would belong to the message that
got it), and once garbage outweighs live rows the file is deleted and rebuilt by the indexer's
catch-up.

The index is derived data (synchronous=OFF): a lost or corrupt file is deleted and rebuilt,
and searches stay correct meanwhile because messages not in `doc` are scanned.

Indexing runs off the delivery path: `TextIndexer` listens to MailDB change events and indexes
in its own thread, in batches.

Text extraction (`message_text`) is shared by indexing and scanning so both agree: RFC 2047
decoded header lines "Name: value", and as the body what mime.decoded_text reads in it: the
text/* parts (transfer and charset decoded, HTML as a reader sees it), attachment file names
and the headers of attached messages. A change to what is extracted bumps SCHEMA_VERSION,
which makes the indexer rebuild every user's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from common.tasks import pause
from services.store.backends.durable import free_octets
from services.store.backends.maildb import MailDB, storage_pauses, user_path
from services.store.backends.sqlite import read_snapshot, transaction
from services.store.daemonthread import DaemonThread
from services.store.imap.protocol.mime import (
    decoded_text,
    header_lines,
    parse_header_only,
    parse_message,
)
from services.store.mailbox import ChangeEvent, NoSuchMessage, NoSuchUser, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

FILE_NAME = "text.sqlite"
STOP_WAIT = 1.0  # seconds a stop waits for the index files to close
# Schema versions: 2: attachment names, attached messages' headers, HTML as text;
# 3: NUL read as a space (FTS5 ended the text there), no lone surrogates;
# 4: message/* parts other than rfc822 (delivery-status, global) as text;
# 5: doc ids never reused (in 4 the next message after an expunge of the newest took its id,
#    and matched the expunged message's words).
SCHEMA_VERSION = 5
# Case-insensitive trigrams; `fold` reads its folding from this same tokenizer.
TOKENIZER = "trigram case_sensitive 0"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS doc (id INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS text USING fts5(
    head, body, content='', columnsize=0, detail=full, tokenize='{TOKENIZER}');
"""
MIN_NEEDLE = 3  # the trigram tokenizer cannot answer shorter substrings
FIELDS = {"TEXT": "{head body}", "BODY": "body", "HEADER": "head"}
# The index is derived data: it must never take the room deliveries need. It pauses while its
# file system has less than LEFT_FOR_MAIL free plus room for the batch it would write; a
# transaction indexes BATCH_OCTETS of mail at most (a batch of 50 large bodies was one
# transaction of hundreds of MB, whose WAL, kept at that size after the checkpoint, took the
# room freed for a full disk back), and the WAL is cut back to WAL_KEPT after each checkpoint.
LEFT_FOR_MAIL = 64 * 1024 * 1024
BATCH_OCTETS = 8 * 1024 * 1024
INDEX_GROWTH = 4  # octets of index and WAL a batch may take per octet of mail (a bound)
KEEP_FREE = LEFT_FOR_MAIL + INDEX_GROWTH * BATCH_OCTETS
WAL_KEPT = 4 * 1024 * 1024
GARBAGE_FLOOR = 1000  # rebuild only once at least this many forgotten rows pile up
CACHED_USERS = 4  # indexed-GUID sets kept in memory (a 100k set is ~10 MB)



# Text extraction (shared by indexing and scanning)


@dataclass(frozen=True)
class MessageText:
    header: str  # "Name: decoded value" lines
    body: str


def message_text(raw: bytes, *, with_body: bool = True) -> MessageText:
    """What TEXT/BODY search: decoded header lines, and the body's decoded text/* parts
    (mime.decoded_text). `with_body=False` parses only the header section."""
    if not with_body:
        return MessageText(_without_nul(header_lines(parse_header_only(raw))), "")
    root = parse_message(raw)
    return MessageText(_without_nul(header_lines(root)), _without_nul(decoded_text(raw, root)))


def _without_nul(text: str) -> str:
    # FTS5 stops reading a value at a NUL (what followed was never found), and no one
    # searches for one: a space, in the index and in a scan alike.
    return text.replace("\x00", " ")


def fold(text: str) -> str:
    """Case folding for scans, exactly the FTS5 trigram tokenizer's, so that a scan and the
    index find the same messages: one code point to one, by SQLite's own Unicode tables.
    Not `str.lower()`, which differs for about 400 code points: it makes a word's last
    capital sigma a final sigma (ς, which the index folds to σ, so `ΟΔΟΣ` did not find
    `ΟΔΟΣΜΟΥ` until the indexer had reached the message), leaves the micro sign and Greek
    symbol forms as they are, and lowers scripts newer than SQLite's tables."""
    return text.translate(_fts5_folding())


# Code points above this have no case in Unicode 15 (the last cased ones are Adlam's).
_LAST_CASED = 0x1FFFF
# FTS5 reads these as invalid UTF-8 and indexes U+FFFD for them.
_READ_AS_REPLACEMENT = (0xFFFE, 0xFFFF)


@functools.cache
def _fts5_folding() -> dict[int, int]:
    """What the index's tokenizer (TOKENIZER) turns each code point into, for the
    code points it changes; asked of SQLite once per process (about 30 ms). Every code point
    it folds is one that Python lowers or case-folds, or one of _READ_AS_REPLACEMENT
    (checked over all of Unicode with SQLite 3.40)."""
    cased = [code for code in range(_LAST_CASED + 1)
             if not 0xD800 <= code <= 0xDFFF
             and (chr(code).lower() != chr(code) or chr(code).casefold() != chr(code))]
    db = sqlite3.connect(":memory:")
    try:
        db.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{TOKENIZER}')")
        db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        # One trigram a row: "q", the code point as the tokenizer reads it, "z".
        db.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)",
                       ((code, f"q{chr(code)}z") for code in (*cased, *_READ_AS_REPLACEMENT)))
        return {code: ord(term[1]) for code, term in db.execute("SELECT doc, term FROM v")
                if term[1] != chr(code)}
    finally:
        db.close()


def text_contains(text: MessageText, needle: str, field: str) -> bool:
    """IMAP substring semantics on extracted text; `needle` must already be folded."""
    if field in ("TEXT", "HEADER") and needle in fold(text.header):
        return True
    return field in ("TEXT", "BODY") and needle in fold(text.body)


# The index


class TextIndex:
    """Per-user FTS5 files under the mail root. Every method is blocking: call it from a
    thread. Writes must come from one thread at a time (the indexer's); reads from any."""

    def __init__(self, root: Path, *, max_open: int = 16) -> None:
        self.root = root.absolute()
        self._max_open = max_open
        self._writers: OrderedDict[str, sqlite3.Connection] = OrderedDict()
        # user -> (generation, indexed GUIDs): a search of a 100,000-message mailbox would
        # otherwise read every GUID each time (~45 ms) just to find the unindexed ones.
        self._indexed_cache: OrderedDict[str, tuple[int, frozenset[str]]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._stopping = False

    def path(self, user: str) -> Path:
        return user_path(self.root, user) / FILE_NAME

    def add(self, user: str, docs: Sequence[tuple[str, MessageText]]) -> int:
        """Index messages (guid, text); ones already indexed are skipped. Returns how many
        were added."""
        conn = self._writer(user)
        if conn is None or not docs:
            return 0
        with transaction(conn):
            added = sum(self._add_one(conn, guid, text) for guid, text in docs)
            self._unless_stopping()
            _bump_generation(conn)
        return added

    def _add_one(self, conn: sqlite3.Connection, guid: str, text: MessageText) -> bool:
        self._unless_stopping()
        cursor = conn.execute("INSERT OR IGNORE INTO doc (guid) VALUES (?)", (guid,))
        if not cursor.rowcount:
            return False
        conn.execute("INSERT INTO text (rowid, head, body) VALUES (?, ?, ?)",
                     (cursor.lastrowid, text.header, text.body))
        return True

    def _unless_stopping(self) -> None:
        """Roll the write back, as SQLite's interrupt does, also when stop_writing came while
        no statement ran (then SQLite's interrupt does nothing): a stop that overlaps a write
        always undoes it, no message is begun after it, and the next start's catch-up indexes
        those messages."""
        if self._stopping:
            raise sqlite3.OperationalError("interrupted")

    def forget(self, user: str, guids: Iterable[str]) -> bool:
        """Drop messages from results (expunged). When the file is mostly garbage it is
        deleted instead, and True returned: everything must be indexed again."""
        conn = self._writer(user)
        wanted = list(guids)
        if conn is None or not wanted:
            return False
        with transaction(conn):
            removed = 0
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                marks = ",".join("?" * len(chunk))
                removed += conn.execute(f"DELETE FROM doc WHERE guid IN ({marks})",
                                        chunk).rowcount
            conn.execute("INSERT INTO meta (key, value) VALUES ('garbage', ?) ON CONFLICT(key)"
                         " DO UPDATE SET value = value + excluded.value", (removed,))
            _bump_generation(conn)
            garbage = conn.execute("SELECT value FROM meta WHERE key = 'garbage'").fetchone()[0]
            live = conn.execute("SELECT count(*) FROM doc").fetchone()[0]
        if garbage >= GARBAGE_FLOOR and garbage > live:
            log.info("text index mostly garbage (%d of %d rows); rebuilding", garbage,
                     garbage + live, extra={"user": user, "event": "textindex-rebuild"})
            self.drop(user)
            return True
        return False

    def drop(self, user: str) -> None:
        """Delete the user's index; the indexer's catch-up builds it again."""
        conn = self._writers.pop(user, None)
        if conn is not None:
            conn.close()
        with self._cache_lock:
            self._indexed_cache.pop(user, None)
        path = self.path(user)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                path.with_name(path.name + suffix).unlink()

    def indexed(self, user: str) -> frozenset[str]:
        """GUIDs of the messages in the user's index."""
        return self.lookup(user, "", "TEXT")[1]

    def lookup(self, user: str, needle: str, field: str,
               ) -> tuple[set[str] | None, frozenset[str]]:
        """(hits, indexed) from one snapshot, so that a message indexed in between cannot
        be taken as indexed without being looked for. hits: GUIDs of indexed messages whose
        `field` ("TEXT", "BODY" or "HEADER") contains `needle` case-insensitively, None when
        the needle is too short for the index (or empty: no query)."""
        conn = self._reader(user)
        if conn is None:
            return (set() if len(needle) >= MIN_NEEDLE else None), frozenset()
        with contextlib.closing(conn), read_snapshot(conn):
            hits = _match(conn, needle, field) if len(needle) >= MIN_NEEDLE else None
            return hits, self._indexed(conn, user)

    def _indexed(self, conn: sqlite3.Connection, user: str) -> frozenset[str]:
        generation = _generation(conn)
        with self._cache_lock:
            cached = self._indexed_cache.get(user)
            if cached is not None and cached[0] == generation:
                self._indexed_cache.move_to_end(user)
                return cached[1]
        guids = frozenset(row[0] for row in conn.execute("SELECT guid FROM doc"))
        with self._cache_lock:
            self._indexed_cache[user] = (generation, guids)
            while len(self._indexed_cache) > CACHED_USERS:
                self._indexed_cache.popitem(last=False)
        return guids

    def stop_writing(self) -> None:
        """From any thread, at a stop: no write begins any more, and the one under way is
        interrupted (rolled back) where SQLite can; FTS5 does not look while it tokenizes a
        body, which takes up to about 1 s per MB here. What is left unindexed is scanned by
        a search meanwhile, and indexed by the next start's catch-up."""
        self._stopping = True
        for user, conn in list(self._writers.items()):
            conn.interrupt()  # SQLite allows it from another thread
            self._mark_behind(user)  # in case the process ends before the write does

    def _mark_behind(self, user: str) -> None:
        """Older than any mail index: _may_be_behind picks the user at the next start."""
        for path in (self.path(user), self.path(user).with_name(FILE_NAME + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, (0, 0))

    def close(self) -> None:
        users = list(self._writers)
        for conn in self._writers.values():
            conn.close()
        self._writers.clear()
        if self._stopping:
            for user in users:
                self._mark_behind(user)  # again: closing checkpoints the WAL into the file

    def _writer(self, user: str) -> sqlite3.Connection | None:
        conn = self._writers.get(user)
        if conn is not None:
            self._writers.move_to_end(user)
            return conn
        path = self.path(user)
        if not path.parent.is_dir():
            return None  # no such mailbox owner (any more)
        try:
            conn = _open_writer(path)
        except sqlite3.OperationalError:
            raise  # a full or failing disk, not a broken file: the index is kept
        except sqlite3.DatabaseError:
            log.warning("text index unreadable; rebuilding", exc_info=True,
                        extra={"user": user, "event": "textindex-rebuild"})
            self.drop(user)
            conn = _open_writer(path)
        self._writers[user] = conn
        while len(self._writers) > self._max_open:
            _, old = self._writers.popitem(last=False)
            old.close()
        return conn

    def _reader(self, user: str) -> sqlite3.Connection | None:
        path = self.path(user)
        try:
            conn = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, isolation_level=None,
                                   check_same_thread=False, timeout=30)
        except sqlite3.OperationalError:
            return None
        try:
            conn.execute("PRAGMA query_only=1")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                conn.close()
                return None
        except sqlite3.DatabaseError:
            conn.close()
            return None
        return conn


def _open_writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")  # derived data, rebuilt if lost
        conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT}")
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            with transaction(conn):
                for statement in ("DROP TABLE IF EXISTS text", "DROP TABLE IF EXISTS doc",
                                  "DROP TABLE IF EXISTS meta"):
                    conn.execute(statement)
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


def _match(conn: sqlite3.Connection, needle: str, field: str) -> set[str]:
    # A phrase of the needle's trigrams in a row: exactly "contains the needle".
    phrase = '"' + needle.replace('"', '""') + '"'
    rows = conn.execute("SELECT doc.guid FROM text JOIN doc ON doc.id = text.rowid"
                        " WHERE text MATCH ?", (f"{FIELDS[field]} : {phrase}",))
    return {row[0] for row in rows}


def _generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    return int(row[0]) if row else 0


def _bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES ('generation', 1) ON CONFLICT(key)"
                 " DO UPDATE SET value = value + 1")


# The background indexer


INDEXED_KINDS = frozenset({"deliver", "append", "copy", "move"})


MAX_YIELD = 10.0  # seconds a step waits at most for delivery to pause


@dataclass(frozen=True)
class _Work:
    """One step of the indexer: look for users behind ("walk"), reconcile a user with the
    mail index ("catch-up"), or index some of a user's messages ("index")."""

    kind: str
    user: str = ""
    guids: tuple[str, ...] = ()


class TextIndexer:
    """Keeps every user's TextIndex up to date, off the delivery path.

    Fed by `notify` (a MailDB change listener) and `request` (a search that met unindexed
    messages); `run` indexes in one worker thread, `batch` messages per transaction. An event
    without GUIDs, an expunge, or a request without GUIDs schedules a catch-up of the user:
    compare every mailbox's messages with the index, add what is missing, forget what is gone.
    """

    def __init__(self, maildb: MailDB, index: TextIndex, *, batch: int = 50,
                 quiet_in: Callable[[], float] = lambda: 0.0,
                 max_yield: float = MAX_YIELD, keep_free: int | None = None) -> None:
        """`keep_free`: octets of free space below which indexing pauses (KEEP_FREE)."""
        self._maildb = maildb
        self._index = index
        self._batch = batch
        self._keep_free = KEEP_FREE if keep_free is None else keep_free  # octets
        self._quiet_in = quiet_in
        self._max_yield = max_yield
        self._guids: dict[str, set[str]] = {}  # user -> GUIDs to index
        self._catch_up: set[str] = set()  # users to reconcile
        self._walk = False  # look for users behind (request_all)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = DaemonThread("textindex")
        self.indexed = 0  # messages added since start (for stats and tests)

    def notify(self, event: ChangeEvent) -> None:
        if event.kind in INDEXED_KINDS and event.guids:
            self.request(event.user, event.guids)
        elif event.kind in INDEXED_KINDS or event.kind == "expunge":
            self.request(event.user)

    def request(self, user: str, guids: Iterable[str] = ()) -> None:
        wanted = set(guids)
        if wanted:
            self._guids.setdefault(user, set()).update(wanted)
        else:
            self._catch_up.add(user)
        self._idle.clear()
        self._wake.set()

    def request_all(self) -> None:
        """Schedule a catch-up of every user whose text index may be behind: no text.sqlite,
        or one older than the mail index (startup after downtime or a crash). The directory
        walk itself runs in the indexer's thread once `run` is going."""
        self._walk = True
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Until nothing is pending (tests; a graceful stop)."""
        await self._idle.wait()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._walk or self._guids or self._catch_up:
                    await self._step()
                self._idle.set()
        finally:
            await self._close()

    async def _step(self) -> None:
        """One piece of work. When it fails and the disk cannot be written either (full,
        read-only, failing), the work is kept and indexing waits until the disk can be
        written again. Any other failure is logged and its messages are left to a search
        (which scans what is not indexed) and the user's next catch-up: a message that
        breaks the indexer must not stop it."""
        await self._yield_to_delivery()
        work = self._take()
        if work.kind != "walk" and not await self._has_room():
            self._give_back(work)
            await self._paused_until(self._has_room, "the disk is nearly full, and what room "
                                     "is left is kept for mail")
            return
        try:
            await self._do(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if await self._storage_works():
                log.exception("text indexing failed", extra={"event": "textindex",
                                                             "user": work.user or None})
                return
            self._give_back(work)
            await self._paused_until(self._storage_works, "the disk cannot be written "
                                     f"({type(exc).__name__}: {exc})")

    def _room_to_write(self) -> bool:
        """Whether the index's file system keeps the room mail needs after a batch."""
        return free_octets(self._index.root) >= self._keep_free

    async def _has_room(self) -> bool:
        return await self._in_thread(self._room_to_write)

    async def _storage_works(self) -> bool:
        try:
            await self._maildb.probe()
        except OSError:
            return False
        return True

    async def _paused_until(self, ready: Callable[[], Awaitable[bool]], why: str) -> None:
        """Wait, the pause growing as storage_pauses() has it, until `ready()`."""
        log.warning("text indexing paused: %s; the search scans what is not indexed "
                    "meanwhile", why, extra={"event": "textindex-paused"})
        down_since = time.monotonic()
        for wait in storage_pauses():
            await pause(wait)
            if await ready():
                break
        log.info("text indexing resumes after %.1f s", time.monotonic() - down_since,
                 extra={"event": "textindex-resumed"})

    def _take(self) -> _Work:
        if self._walk:
            self._walk = False
            return _Work("walk")
        if self._catch_up:
            return _Work("catch-up", self._catch_up.pop())
        user, guids = next(iter(self._guids.items()))
        chunk = tuple(guids.pop() for _ in range(min(self._batch, len(guids))))
        if not guids:
            del self._guids[user]
        return _Work("index", user, chunk)

    def _give_back(self, work: _Work) -> None:
        if work.kind == "walk":
            self._walk = True
        elif work.kind == "catch-up":
            self._catch_up.add(work.user)
        else:
            self._guids.setdefault(work.user, set()).update(work.guids)

    async def _do(self, work: _Work) -> None:
        if work.kind == "walk":
            behind = await self._in_thread(_users_behind, self._index.root)
            log.info("text index: %d users to catch up", len(behind),
                     extra={"event": "textindex-catch-up"})
            self._catch_up.update(behind)
        elif work.kind == "catch-up":
            await self._reconcile(work.user)
        else:
            left = await self._in_thread(self._index_sync, work.user, list(work.guids))
            if left:  # over BATCH_OCTETS: the next step takes them
                self._guids.setdefault(work.user, set()).update(left)

    async def _close(self) -> None:
        """Stop the write under way and close the files, waiting STOP_WAIT at most: a large
        body's write cannot be interrupted while FTS5 tokenizes it, and the thread is a
        daemon, so the process exits without it (SQLite rolls an unfinished write back at
        the next open; derived data, caught up after the next start)."""
        self._index.stop_writing()
        loop = asyncio.get_running_loop()
        closing = loop.run_in_executor(self._thread, self._index.close)
        self._thread.shutdown(wait=False)
        try:
            async with asyncio.timeout(STOP_WAIT):
                await asyncio.shield(closing)
        except TimeoutError:
            log.info("text index: a write under way at stop is left to end with the process; "
                     "the next start indexes those messages", extra={"event": "textindex"})

    async def _yield_to_delivery(self) -> None:
        """Wait until delivery pauses (`quiet_in()`: seconds until it has been quiet long
        enough), for at most `max_yield` seconds per step: indexing is an optimisation (a
        search scans what is not indexed), delivery is not, and both compete for the same
        CPU. Under sustained load the index still advances a batch per `max_yield`; it
        catches up once the load drops."""
        deadline = time.monotonic() + self._max_yield
        while True:
            wait = min(self._quiet_in(), deadline - time.monotonic())
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _reconcile(self, user: str) -> None:
        try:
            live: set[str] = set()
            for mailbox in await self._maildb.list_mailboxes(user):
                live.update(info.guid for info in
                            await self._maildb.list_messages(user, mailbox.name))
        except (NoSuchUser, StorageError):
            return
        indexed = await self._in_thread(self._index.indexed, user)
        gone = indexed - live
        dropped: bool = bool(gone) and await self._in_thread(self._index.forget, user, gone)
        if dropped:
            indexed = frozenset()
        missing = live - indexed
        if missing:
            self._guids.setdefault(user, set()).update(missing)

    def _index_sync(self, user: str, guids: list[str]) -> list[str]:
        """Index `guids` up to BATCH_OCTETS of mail (at least one); returns the rest."""
        docs: list[tuple[str, MessageText]] = []
        octets = 0
        for position, guid in enumerate(guids):
            if octets >= BATCH_OCTETS:
                self.indexed += self._index.add(user, docs)
                return guids[position:]
            try:
                with self._maildb.open_message(user, guid) as file:
                    raw = file.read()
            except (NoSuchMessage, NoSuchUser):
                continue  # expunged before we got to it
            octets += len(raw)
            docs.append((guid, message_text(raw)))
        self.indexed += self._index.add(user, docs)
        return []

    async def _in_thread(self, func: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(func, *args))


def _users_behind(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [folder.name
            for shard in root.iterdir() if shard.is_dir() and len(shard.name) == 2
            for folder in shard.iterdir() if _may_be_behind(folder)]


def _may_be_behind(folder: Path) -> bool:
    index = folder / "index.sqlite"
    if not index.exists():
        return False
    text = folder / FILE_NAME
    if not text.exists() or _file_version(text) != SCHEMA_VERSION:
        return True
    if (folder / (FILE_NAME + "-wal")).exists():
        # Left open by a store that stopped (or is stopping) in the middle of a write: that
        # write is rolled back, but its WAL is newer than the mail, and by the times alone
        # the messages it was indexing were never indexed.
        return True
    newest_mail = max(_mtime(index), _mtime(folder / "index.sqlite-wal"))
    newest_text = max(_mtime(text), _mtime(folder / (FILE_NAME + "-wal")))
    return newest_mail > newest_text


def _file_version(path: Path) -> int | None:
    """PRAGMA user_version as the database header holds it (offset 60), read without opening
    SQLite: cheap for 100,000 users. A version set but still in the WAL reads as the old one,
    which only costs that user a reconcile that finds nothing to do."""
    try:
        with path.open("rb") as file:
            header = file.read(64)
    except OSError:
        return None
    return int.from_bytes(header[60:64], "big") if len(header) == 64 else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
