"""Mailbox storage: immutable per-message files plus one SQLite index per user (WAL).

Layout under `root` (normally `<store_dir>/mail`), documented in docs/architecture.md:

    uidvalidity.sqlite              store-wide monotonic UIDVALIDITY counter
    inflight                        journal of users whose files may be ahead of their index
    <sha256(user)[:2]>/<user>/
        index.sqlite                mailbox, message, expunged, delivered (WAL, synchronous=FULL);
                                    created with INBOX, Drafts, Sent, Junk, Trash and Archive
        m/<guid[:2]>/<guid>         message bytes, written once, never modified
        tmp/<guid>                  a message file being written (removed by the sweep)

Delivery order (the ack is only sent after `deliver` returns):
    1. write each body to tmp/, fsync it, rename it into m/xx/, fsync every directory touched
       (including parents that were just created);
    2. BEGIN IMMEDIATE; skip queue ids already in `delivered`; allocate uid = uidnext++ and
       modseq = highestmodseq + 1; insert message and delivered rows; COMMIT (synchronous=FULL).

A crash between 1 and 2 leaves files no index row points at. Before step 1 the user is
appended (fsynced) to the `inflight` journal; `sweep()` at startup cleans exactly the users
named there, so a restart never has to walk 100,000 accounts. `sweep(full=True)` walks all.

Threads: every index write and every cached writer connection belongs to one dedicated thread
(SQLite serialises writers per database anyway, and one thread keeps the LRU of open
connections simple). Reads open a short-lived connection in a small reader pool, so a POP3
listing never waits behind a delivery batch; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import sqlite3
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from services.store.mailbox import (
    INBOX,
    SPECIAL_USE,
    STANDARD_MAILBOXES,
    Delivery,
    MailboxInfo,
    MailboxStatus,
    MessageInfo,
    NoSuchMailbox,
    NoSuchMessage,
    NoSuchUser,
    StorageError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# 1: mailbox, message, expunged, delivered. 2: mailbox.special_use (RFC 6154) and the
# standard folders (Drafts, Sent, Junk, Trash, Archive) in every index.
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    special_use TEXT
);
CREATE TABLE IF NOT EXISTS message (
    mailbox_id INTEGER NOT NULL REFERENCES mailbox(id),
    uid INTEGER NOT NULL,
    guid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    internaldate REAL NOT NULL,
    flags TEXT NOT NULL DEFAULT '',
    modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_modseq ON message(mailbox_id, modseq);
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
"""

_GUID_RE = re.compile(r"^[0-9a-f]{32}$")
_EMPTY_FLAGS: frozenset[str] = frozenset()
MAX_ADDRESS = 254  # RFC 5321 4.5.3.1.3 path limit minus the angle brackets


@dataclass(frozen=True)
class SweepResult:
    users: int
    files_removed: int


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        _fsync_dir(directory.parent)


def _flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


class _UidValidity:
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

    def take(self, count: int) -> list[int]:
        """`count` new values in one transaction (a new account's mailboxes: one fsync)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM counter WHERE id = 1").fetchone()
            last = int(row[0]) if row else 0
            # RFC 3501 2.3.1.1: a 32-bit non-zero value that never goes backwards.
            first = max(last + 1, int(time.time()))
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
    """The `MailStore` implementation. Construct with the mail root (or `for_store`)."""

    def __init__(self, root: Path, *, max_open: int = 256, readers: int = 4) -> None:
        # Absolute: readers open the index by file: URI, and TIERMAIL_DATA_DIR is relative
        # by default (./var).
        self.root = root.absolute()
        self._max_open = max_open
        _makedirs_durable(root)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maildb-writer")
        self._reader = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="maildb-read")
        # Touched only in the writer thread.
        self._open: OrderedDict[str, sqlite3.Connection] = OrderedDict()
        self._uidvalidity: _UidValidity | None = None
        self._journal_fd: int | None = None
        self._closed = False

    @classmethod
    def for_store(cls, store_dir: Path, **kwargs: int) -> MailDB:
        return cls(store_dir / "mail", **kwargs)

    # Paths

    def user_path(self, user: str) -> Path:
        return user_path(self.root, user)

    def message_path(self, user: str, guid: str) -> Path:
        if not _GUID_RE.match(guid):
            raise NoSuchMessage(f"not a message id: {guid!r}")
        return self.user_path(user) / "m" / guid[:2] / guid

    # MailStore

    async def deliver(self, deliveries: list[Delivery]) -> list[bool]:
        return [uid is not None for uid in await self.deliver_uids(deliveries)]

    async def status(self, user: str, mailbox: str = INBOX) -> MailboxStatus:
        return await self._read(self._status_sync, user, mailbox)

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        return await self._read(self._mailboxes_sync, user, INBOX)

    async def list_messages(self, user: str, mailbox: str = INBOX) -> list[MessageInfo]:
        return await self._read(self._list_sync, user, mailbox)

    def open_message(self, user: str, guid: str) -> BinaryIO:
        path = self.message_path(user, guid)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise NoSuchMessage(guid) from None

    async def expunge(self, user: str, mailbox: str, uids: list[int]) -> None:
        self.user_path(user)
        if uids:
            await self._in_writer(self._expunge_sync, user, mailbox, list(uids))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close_sync)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    # Additions beyond MailStore (used by the consumer, main and tests)

    async def deliver_uids(self, deliveries: list[Delivery]) -> list[int | None]:
        """`deliver`, returning per delivery the new UID, or None for a redelivery."""
        if not deliveries:
            return []
        return await self._in_writer(self._deliver_sync, list(deliveries))

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

    # Executors

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
        return await loop.run_in_executor(self._writer, functools.partial(func, *args))

    async def _in_reader(self, func: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StorageError("mail store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, functools.partial(func, *args))

    # Writer thread

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
                _fsync_dir(path)
        except BaseException:
            conn.close()
            raise
        self._open[user] = conn
        while len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return conn

    def _upgrade_index(self, conn: sqlite3.Connection, user: str) -> None:
        """Create a new index, or bring an older one to SCHEMA_VERSION, in one transaction.

        Each step checks what is there rather than trusting user_version alone, so an index
        left half-initialised by a crash of older code is repaired too.
        """
        with _transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(f"index of {user} has schema {version}, newer than this "
                                   f"code ({SCHEMA_VERSION})")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(mailbox)")}
            if "special_use" not in columns:  # 1 -> 2
                conn.execute("ALTER TABLE mailbox ADD COLUMN special_use TEXT")
            self._create_standard_mailboxes(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if version:
            log.info("index migrated from schema %d to %d", version, SCHEMA_VERSION,
                     extra={"user": user, "event": "index-migrated"})

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
        self._create_mailboxes(conn, missing)

    def _create_mailboxes(self, conn: sqlite3.Connection, names: list[str]) -> None:
        """New, empty mailboxes, each with its own UIDVALIDITY (inside a write transaction)."""
        if not names:
            return
        if self._uidvalidity is None:
            self._uidvalidity = _UidValidity(self.root / "uidvalidity.sqlite")
        values = self._uidvalidity.take(len(names))
        conn.executemany(
            "INSERT INTO mailbox (name, uidvalidity, uidnext, highestmodseq, special_use)"
            " VALUES (?, ?, 1, 1, ?)",
            [(name, value, SPECIAL_USE.get(name)) for name, value in zip(names, values,
                                                                           strict=True)],
        )

    def _mailbox_row(self, conn: sqlite3.Connection, name: str) -> tuple[int, int, int] | None:
        """(id, uidnext, highestmodseq); must be called inside a write transaction."""
        row = conn.execute(
            "SELECT id, uidnext, highestmodseq FROM mailbox WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

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
            self._create_mailboxes(conn, [name])
            row = self._mailbox_row(conn, name)
        if row is None:
            raise NoSuchMailbox(name)
        return row

    def _journal(self, users: Iterable[str]) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(self.root / "inflight",
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            _fsync_dir(self.root)
        fd = self._journal_fd
        # The writer is single-threaded: when a new batch starts, every earlier batch has
        # finished (committed or failed and cleaned up), so a long journal can be reset.
        if os.fstat(fd).st_size > 1 << 20:
            os.ftruncate(fd, 0)
        os.write(fd, "".join(u + "\n" for u in users).encode())
        os.fsync(fd)

    def _deliver_sync(self, deliveries: list[Delivery]) -> list[int | None]:
        results: list[int | None] = [None] * len(deliveries)
        by_user: dict[str, list[int]] = defaultdict(list)
        for position, delivery in enumerate(deliveries):
            self.user_path(delivery.user)  # validate every owner before touching the disk
            by_user[delivery.user].append(position)
        self._journal(by_user)
        for user, positions in by_user.items():
            stored = self._deliver_user(user, [deliveries[p] for p in positions])
            for position, new in zip(positions, stored, strict=True):
                results[position] = new
        return results

    def _deliver_user(self, user: str, deliveries: list[Delivery]) -> list[int | None]:
        conn = self._writer_conn(user, create=True)
        assert conn is not None
        base = self.user_path(user)
        results: list[int | None] = [None] * len(deliveries)

        # Cheap pre-check so a redelivered batch writes no files at all.
        wanted = list({d.queue_id for d in deliveries})
        known = _known_queue_ids(conn, wanted)
        todo: list[tuple[int, Delivery, str]] = []
        seen: set[str] = set()
        for i, delivery in enumerate(deliveries):
            if delivery.queue_id in known or delivery.queue_id in seen:
                continue
            seen.add(delivery.queue_id)
            todo.append((i, delivery, uuid.uuid4().hex))
        if not todo:
            return results

        written: list[Path] = []
        try:
            dirs: set[Path] = set()
            for _, delivery, guid in todo:
                final_dir = base / "m" / guid[:2]
                if not final_dir.is_dir():
                    _makedirs_durable(final_dir)
                tmp = base / "tmp" / guid
                _write_file(tmp, delivery.body)
                final = final_dir / guid
                os.rename(tmp, final)
                written.append(final)
                dirs.add(final_dir)
            for directory in dirs:
                _fsync_dir(directory)

            committed: set[str] = set()
            with _transaction(conn):
                # Keyed by id: two names may lead to one mailbox (Junk found by its attribute).
                box_ids: dict[str, int] = {}
                mailboxes: dict[int, list[int]] = {}  # id -> [id, uidnext, modseq]
                known = _known_queue_ids(conn, [d.queue_id for _, d, _ in todo])
                now = time.time()
                for i, delivery, guid in todo:
                    if delivery.queue_id in known:
                        continue
                    box_id = box_ids.get(delivery.mailbox)
                    if box_id is None:
                        row = self._delivery_mailbox(conn, delivery.mailbox)
                        box_id = box_ids[delivery.mailbox] = row[0]
                        mailboxes.setdefault(box_id, list(row))
                    box = mailboxes[box_id]
                    uid, modseq = box[1], box[2] + 1
                    box[1], box[2] = uid + 1, modseq
                    conn.execute(
                        "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags,"
                        " modseq) VALUES (?, ?, ?, ?, ?, '', ?)",
                        (box_id, uid, guid, len(delivery.body),
                         delivery.received_at or now, modseq),
                    )
                    conn.execute(
                        "INSERT INTO delivered (queue_id, mailbox_id, uid, delivered_at)"
                        " VALUES (?, ?, ?, ?)", (delivery.queue_id, box_id, uid, now),
                    )
                    committed.add(guid)
                    results[i] = uid
                for box_id, uidnext, modseq in mailboxes.values():
                    conn.execute(
                        "UPDATE mailbox SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                        (uidnext, modseq, box_id),
                    )
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        # Files of deliveries that turned out to be duplicates inside the transaction.
        for path in written:
            if path.name not in committed:
                with contextlib.suppress(OSError):
                    path.unlink()
        return results

    def _expunge_sync(self, user: str, mailbox: str, uids: list[int]) -> None:
        conn = self._writer_conn(user, create=False)
        if conn is None:
            raise NoSuchMailbox(mailbox)
        self._journal([user])
        with _transaction(conn):
            row = self._mailbox_row(conn, mailbox)
            if row is None:
                raise NoSuchMailbox(mailbox)
            box_id, _, modseq = row
            guids: list[str] = []
            found: list[int] = []
            for start in range(0, len(uids), 500):
                chunk = uids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for uid, guid in conn.execute(
                    f"SELECT uid, guid FROM message WHERE mailbox_id = ? AND uid IN ({marks})",
                    (box_id, *chunk),
                ):
                    found.append(int(uid))
                    guids.append(str(guid))
            if not found:
                return
            modseq += 1
            conn.executemany("DELETE FROM message WHERE mailbox_id = ? AND uid = ?",
                             [(box_id, uid) for uid in found])
            conn.executemany(
                "INSERT OR REPLACE INTO expunged (mailbox_id, uid, modseq) VALUES (?, ?, ?)",
                [(box_id, uid, modseq) for uid in found],
            )
            conn.execute("UPDATE mailbox SET highestmodseq = ? WHERE id = ?", (modseq, box_id))
        # The index no longer names them; if we crash here the sweep removes them.
        base = self.user_path(user)
        for guid in guids:
            with contextlib.suppress(FileNotFoundError):
                (base / "m" / guid[:2] / guid).unlink()

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

    # Reader threads

    def _read_conn(self, user: str) -> sqlite3.Connection | None:
        """A read-only connection, or None when the index is missing or not yet at
        SCHEMA_VERSION (being created, or written by older code): the writer fixes that."""
        index = self.user_path(user) / "index.sqlite"
        try:
            conn = sqlite3.connect(f"{index.as_uri()}?mode=rw", uri=True,
                                   isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.OperationalError:
            if not index.exists():
                return None
            raise
        try:
            conn.execute("PRAGMA query_only=1")
            current = conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        except BaseException:
            conn.close()
            raise
        if not current:
            conn.close()
            return None
        return conn

    def _status_sync(self, user: str, mailbox: str) -> MailboxStatus | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        with contextlib.closing(conn), _read_snapshot(conn):
            row = conn.execute(
                "SELECT id, uidvalidity, uidnext, highestmodseq FROM mailbox WHERE name = ?",
                (mailbox,),
            ).fetchone()
            if row is None:
                return None
            count = conn.execute("SELECT count(*) FROM message WHERE mailbox_id = ?",
                                 (row[0],)).fetchone()[0]
        return MailboxStatus(name=mailbox, uidvalidity=int(row[1]), uidnext=int(row[2]),
                             highestmodseq=int(row[3]), messages=int(count))

    def _mailboxes_sync(self, user: str, _mailbox: str) -> list[MailboxInfo] | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        with contextlib.closing(conn):
            rows = conn.execute("SELECT name, special_use FROM mailbox"
                                " ORDER BY name != 'INBOX', name").fetchall()
        return [MailboxInfo(str(name), use) for name, use in rows]

    def _list_sync(self, user: str, mailbox: str) -> list[MessageInfo] | None:
        conn = self._read_conn(user)
        if conn is None:
            return None
        with contextlib.closing(conn):
            row = conn.execute("SELECT id FROM mailbox WHERE name = ?", (mailbox,)).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT uid, guid, size, internaldate, flags, modseq FROM message"
                " WHERE mailbox_id = ? ORDER BY uid", (row[0],),
            ).fetchall()
        flag_sets: dict[str, frozenset[str]] = {"": _EMPTY_FLAGS}
        result = []
        for uid, guid, size, internaldate, flags, modseq in rows:
            fs = flag_sets.get(flags)
            if fs is None:
                fs = flag_sets[flags] = frozenset(flags.split())
            result.append(MessageInfo(uid, guid, size, internaldate, fs, modseq))
        return result

    def _queue_ids_sync(self, user: str) -> set[str]:
        conn = self._read_conn(user)
        if conn is None:
            return set()
        with contextlib.closing(conn):
            return {row[0] for row in conn.execute("SELECT queue_id FROM delivered")}


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _known_queue_ids(conn: sqlite3.Connection, queue_ids: list[str]) -> set[str]:
    known: set[str] = set()
    for start in range(0, len(queue_ids), 500):
        chunk = queue_ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        known.update(row[0] for row in conn.execute(
            f"SELECT queue_id FROM delivered WHERE queue_id IN ({marks})", chunk))
    return known


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def _read_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction, so a status's counters and its message count agree."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("COMMIT")
