"""The store's account database: the authority for domains, users, aliases and password hashes.

One SQLite file (WAL, synchronous=FULL) under the store's data directory. The `tiermail` CLI and
the store process may use it at the same time; SQLite's locking serialises writers. Redis only
ever holds a copy without hashes (common.directory), rebuilt from here.

Quotas (RFC 9208 STORAGE, in octets) are per user: NULL means "not set, settings.default_quota
applies", 0 means unlimited whatever the default, N > 0 is the limit. The default is applied
when a quota is read (`quota(address, default)`), never stored, so changing
TIERMAIL_DEFAULT_QUOTA changes every account that has no quota of its own.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import idna

from common.directory import DirectorySnapshot, normalize_address, normalize_domain
from services.store.backends.durable import free_octets

SCHEMA = """
CREATE TABLE IF NOT EXISTS domain (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user (
    address TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL,
    quota INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', 0);
CREATE TABLE IF NOT EXISTS alias (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (source, target)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_deleted (
    address TEXT PRIMARY KEY,
    deleted_at REAL NOT NULL
) WITHOUT ROWID;
"""

# A conservative address grammar: what we create mailboxes for. RFC 5321 allows more (quoted
# local parts), which we accept as alias sources only through the directory, never as users.
_LOCAL = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_DOMAIN = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}"
_ADDRESS_RE = re.compile(rf"^{_LOCAL}@{_DOMAIN}$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")

# PRAGMA user_version. 1: user.quota nullable (before: NOT NULL DEFAULT 0, never set by anyone,
# so every 0 there meant "not set"). 2: catch-all alias sources in the form normalize_address
# gives them (before 2026-12-06 `alias add @example.org.` stored the final dot, and the alias
# never matched nor could be deleted by its name).
SCHEMA_VERSION = 2
_USER_TABLE_V1 = """
CREATE TABLE user_v1 (
    address TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL,
    quota INTEGER
) WITHOUT ROWID;
INSERT INTO user_v1(address, password_hash, created, quota)
    SELECT address, password_hash, created, NULLIF(quota, 0) FROM user;
DROP TABLE user;
ALTER TABLE user_v1 RENAME TO user;
"""


_LOOKUP_BATCH = 500  # addresses per query: well under SQLite's limit of bound parameters


class AccountError(ValueError):
    """A request the account database refuses, with a message fit for an operator."""


def valid_address(address: str) -> bool:
    # "/" is atext (RFC 5322) but names no directory: the store could never hold the
    # account's mail (maildb.user_dir_name refuses it), so it is refused here first.
    # RFC 5321 4.5.3.1.1: a local part of at most 64 octets; mail for a longer one could
    # not be addressed to the account by a conforming sender.
    return len(address) <= 254 and "/" not in address \
        and len(address.rpartition("@")[0].encode()) <= 64 \
        and _ADDRESS_RE.match(address) is not None


def valid_domain(domain: str) -> bool:
    """A host name (RFC 1123 2.1) whose top-level label is not all digits (RFC 3696 2) and
    whose A-labels ("xn--") are IDNA (RFC 5890 2.3.2.1: one must decode to a valid U-label;
    normalize_domain checks only names given with non-ASCII characters)."""
    return (len(domain) <= 253 and _DOMAIN_RE.match(domain) is not None
            and not domain.rpartition(".")[2].isdigit()
            and all(_valid_a_label(label) for label in domain.split(".")
                    if label.startswith("xn--")))


def _valid_a_label(label: str) -> bool:
    try:
        idna.decode(label)
    except (idna.IDNAError, UnicodeError):
        return False
    return True


def effective_quota(stored: int | None, default: int) -> int | None:
    """The limit in octets for a stored quota (NULL: the default applies); None = unlimited."""
    value = default if stored is None else stored
    return value if value > 0 else None


FULL_BELOW = 1 << 20  # octets free below which an unusable database is put down to a full disk


class AccountDBUnusable(Exception):
    """The account database cannot be opened: not an SQLite file (damaged, or something
    else at its path), a directory there, no permission. Said in one line, with the path.
    `lasting`: not because its file system is full or its directory not writable, which
    an operator mends while the store waits to be started again."""

    def __init__(self, message: str, *, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


def _unusable(path: Path, exc: sqlite3.Error) -> AccountDBUnusable:
    why = _why(path.parent)
    return AccountDBUnusable(f"the account database {path} cannot be used: {exc}{why}",
                             lasting=not why)


def _why(directory: Path) -> str:
    """What SQLite does not say: "unable to open database file" or "disk I/O error" when it
    cannot create or grow the files it keeps beside the database (the -wal and -shm of WAL
    mode), even to read. A clean stop removes them."""
    if not os.access(directory, os.W_OK):
        return f" ({directory} is not writable, and SQLite writes files beside the database)"
    free = free_octets(directory)
    if free < FULL_BELOW:
        return (f" (its file system is full, {free} octets free: SQLite needs room for the "
                "files it keeps beside the database, even to read; free a few MB)")
    return ""


class AccountDB:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30,
                                       check_same_thread=False)
        except sqlite3.Error as exc:
            raise _unusable(path, exc) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise _unusable(path, exc) from None
        self.written_generation = 0  # the generation this object's last write made

    @classmethod
    def for_store(cls, store_dir: Path) -> AccountDB:
        return cls(cls.for_store_path(store_dir))

    @staticmethod
    def for_store_path(store_dir: Path) -> Path:
        return store_dir / "accounts.sqlite"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AccountDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self, directory_change: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction; one that changes what the directory holds bumps the
        generation the directory is compared by (a password is not in it: bumping for one
        made the next change publish the whole directory, and the store republish it)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            if directory_change:
                self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            written = self.generation()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self.written_generation = written

    def _migrate(self) -> None:
        if self._schema_version() >= SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")  # the CLI and the store may both be starting
        try:
            if self._schema_version() < 1 and self._quota_not_null():
                # SQLite cannot drop a NOT NULL constraint: the table is rebuilt.
                for statement in _USER_TABLE_V1.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            if self._schema_version() < 2:
                self._normalize_catch_alls()
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _normalize_catch_alls(self) -> None:
        rows = self._db.execute("SELECT source, target FROM alias WHERE source LIKE '@%'")
        renamed = [(source, normal, target) for source, target in rows
                   if (normal := normalize_address(source)) != source]
        for source, normal, target in renamed:
            self._db.execute("DELETE FROM alias WHERE source = ? AND target = ?",
                             (source, target))
            self._db.execute("INSERT OR IGNORE INTO alias(source, target) VALUES (?, ?)",
                             (normal, target))
        if renamed:  # the directory in Redis is published again
            self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    def _schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _quota_not_null(self) -> bool:
        columns = {row[1]: row for row in self._db.execute("PRAGMA table_info(user)")}
        return bool(columns["quota"][3])

    def generation(self) -> int:
        """Counts committed changes; the Redis directory is current when it shows the same."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    # Domains

    def add_domain(self, domain: str) -> str:
        domain = normalize_domain(domain)
        if not valid_domain(domain):
            raise AccountError(f"not a valid domain name: {domain!r}")
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO domain(name) VALUES (?)", (domain,))
        return domain

    def remove_domain(self, domain: str) -> None:
        domain = normalize_domain(domain)
        with self._write() as db:
            in_use = db.execute(
                "SELECT 1 FROM user WHERE address LIKE ? LIMIT 1", ("%@" + domain,)
            ).fetchone()
            if in_use:
                raise AccountError(f"domain {domain} still has users")
            aliased = db.execute(
                "SELECT 1 FROM alias WHERE source LIKE ? LIMIT 1", ("%@" + domain,)
            ).fetchone()
            if aliased:
                raise AccountError(f"domain {domain} still has aliases (tiermail alias list)")
            if not db.execute("DELETE FROM domain WHERE name = ?", (domain,)).rowcount:
                raise AccountError(f"no such domain: {domain}")

    def domains(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM domain ORDER BY name")]

    def has_domain(self, domain: str) -> bool:
        row = self._db.execute("SELECT 1 FROM domain WHERE name = ?", (normalize_domain(domain),))
        return row.fetchone() is not None

    # Users

    def add_user(self, address: str, password_hash: str, *, inherits: bool = False) -> str:
        """A new account. `inherits`: it takes over what an earlier account of the address
        left, mail still queued for that one included (`user add --reuse-mail`)."""
        address = self._checked_new_address(address)
        with self._write() as db:
            exists = db.execute("SELECT 1 FROM user WHERE address = ?", (address,)).fetchone()
            if exists:
                raise AccountError(f"user {address} already exists")
            db.execute(
                "INSERT INTO user(address, password_hash, created) VALUES (?, ?, ?)",
                (address, password_hash, time.time()),
            )
            if inherits:
                db.execute("DELETE FROM user_deleted WHERE address = ?", (address,))
        return address

    def add_users_bulk(self, rows: Iterable[tuple[str, str]]) -> int:
        """Insert many (address, password_hash) rows in one transaction; for imports."""
        now = time.time()
        with self._write() as db:
            cursor = db.executemany(
                "INSERT OR IGNORE INTO user(address, password_hash, created) VALUES (?, ?, ?)",
                ((normalize_address(a), h, now) for a, h in rows),
            )
        return cursor.rowcount

    def set_password(self, address: str, password_hash: str) -> None:
        address = normalize_address(address)
        with self._write(directory_change=False) as db:
            cursor = db.execute(
                "UPDATE user SET password_hash = ? WHERE address = ?", (password_hash, address)
            )
            if cursor.rowcount == 0:
                raise AccountError(f"no such user: {address}")

    def delete_user(self, address: str) -> list[str]:
        """Delete the user and take it out of every alias (a new account that later gets
        the same address must not receive the old one's alias mail); returns the sources
        of the aliases it was taken out of."""
        address = normalize_address(address)
        with self._write() as db:
            cursor = db.execute("DELETE FROM user WHERE address = ?", (address,))
            if cursor.rowcount == 0:
                raise AccountError(f"no such user: {address}")
            # Mail accepted until now, still queued, is this account's: not a later one's.
            db.execute("INSERT OR REPLACE INTO user_deleted(address, deleted_at) VALUES (?, ?)",
                       (address, time.time()))
            sources = [row[0] for row in db.execute(
                "SELECT source FROM alias WHERE target = ? ORDER BY source", (address,))]
            db.execute("DELETE FROM alias WHERE target = ?", (address,))
        return sources

    def set_quota(self, address: str, octets: int | None) -> None:
        """The user's own quota: N octets, 0 for unlimited, None to follow the default."""
        address = normalize_address(address)
        if octets is not None and octets < 0:
            raise AccountError(f"a quota cannot be negative: {octets}")
        with self._write() as db:
            cursor = db.execute("UPDATE user SET quota = ? WHERE address = ?", (octets, address))
            if cursor.rowcount == 0:
                raise AccountError(f"no such user: {address}")

    def quota(self, address: str, default: int = 0) -> int | None:
        """The user's limit in octets with `default` (settings.default_quota) applied where
        no quota of its own is set; None = unlimited (also for an unknown user)."""
        row = self._db.execute(
            "SELECT quota FROM user WHERE address = ?", (normalize_address(address),)
        ).fetchone()
        return None if row is None else effective_quota(row[0], default)

    def stored_quotas(self) -> dict[str, int | None]:
        """Every user's own quota as stored (None: not set), by address."""
        return {address: quota for address, quota in self._db.execute(
            "SELECT address, quota FROM user ORDER BY address")}

    def users(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT address FROM user ORDER BY address")]

    def user_exists(self, address: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM user WHERE address = ?", (normalize_address(address),)
        )
        return row.fetchone() is not None

    def mail_cutoffs(self, addresses: Iterable[str]) -> dict[str, float]:
        """Of those of `addresses` (normalized) that are users: the time before which mail
        accepted for the address was not this account's, 0.0 when any was. With an earlier
        account (deleted since, and not inherited with `user add --reuse-mail`) that is when
        this one was made: mail a filter accepted after the deletion but before it, from a
        directory that still had the earlier account (found in review: a `user del` that
        could not update Redis), was meant for the earlier one too."""
        return self._times_by_address(
            "SELECT u.address, CASE WHEN d.deleted_at IS NULL THEN 0 "
            "ELSE MAX(d.deleted_at, u.created) END FROM user u LEFT JOIN user_deleted d "
            "ON d.address = u.address WHERE u.address IN ({marks})", addresses)

    def user_created(self, address: str) -> float | None:
        """When the account of `address` was created, None when there is none: an account
        deleted and added again is another one."""
        address = normalize_address(address)
        return self.users_created([address]).get(address)

    def users_created(self, addresses: Iterable[str]) -> dict[str, float]:
        """`user_created` of those of `addresses` (as stored: normalized) that are users."""
        return self._times_by_address(
            "SELECT address, created FROM user WHERE address IN ({marks})", addresses)

    def _times_by_address(self, query: str, addresses: Iterable[str]) -> dict[str, float]:
        """The (address, time) rows of `query` for `addresses`, a batch at a time: its
        `{marks}` takes a batch's parameter marks."""
        wanted = list(addresses)
        found: dict[str, float] = {}
        for start in range(0, len(wanted), _LOOKUP_BATCH):
            batch = wanted[start:start + _LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))
            found.update((address, float(at)) for address, at in self._db.execute(
                query.format(marks=marks), batch))
        return found

    def password_hash(self, address: str) -> str | None:
        row = self._db.execute(
            "SELECT password_hash FROM user WHERE address = ?", (normalize_address(address),)
        ).fetchone()
        return None if row is None else str(row[0])

    # Aliases

    def add_alias(self, source: str, target: str, *more: str) -> tuple[str, str]:
        """Add `target` (and each of `more`) to the alias `source`: all of them, or none
        when one is refused."""
        source = normalize_address(source)
        targets = [normalize_address(address) for address in (target, *more)]
        local, _, domain = source.rpartition("@")
        if not self.has_domain(domain):
            raise AccountError(f"alias source {source} is not in a local domain")
        if local and not valid_address(source):
            raise AccountError(f"not a valid alias address: {source!r}")
        for address in targets:
            self._check_alias_target(address)
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO alias(source, target) VALUES (?, ?)",
                           [(source, address) for address in targets])
        return source, targets[0]

    def _check_alias_target(self, target: str) -> None:
        if not valid_address(target):
            raise AccountError(f"not a valid target address: {target!r}")
        if not self.has_domain(target.rpartition("@")[2]):
            raise AccountError(f"alias target {target} is not in a local domain: tiermail "
                               "delivers only to its own mailboxes, it does not forward")

    def remove_alias(self, source: str, target: str | None = None) -> None:
        source = normalize_address(source)
        with self._write() as db:
            if target is None:
                cursor = db.execute("DELETE FROM alias WHERE source = ?", (source,))
            else:
                target = normalize_address(target)
                cursor = db.execute("DELETE FROM alias WHERE source = ? AND target = ?",
                                    (source, target))
            if cursor.rowcount == 0:
                raise AccountError(f"no such alias: {source}" if target is None
                                   else f"alias {source} does not deliver to {target}")

    def alias_targets(self, source: str) -> tuple[str, ...]:
        rows = self._db.execute(
            "SELECT target FROM alias WHERE source = ? ORDER BY target",
            (normalize_address(source),))
        return tuple(r[0] for r in rows)

    def aliases(self) -> dict[str, tuple[str, ...]]:
        result: dict[str, list[str]] = {}
        for source, target in self._db.execute(
            "SELECT source, target FROM alias ORDER BY source, target"
        ):
            result.setdefault(source, []).append(target)
        return {k: tuple(v) for k, v in result.items()}

    # Directory

    def snapshot(self) -> DirectorySnapshot:
        """Everything the directory holds, read in one transaction with its generation."""
        self._db.execute("BEGIN")
        try:
            return DirectorySnapshot(domains=set(self.domains()), users=set(self.users()),
                                     aliases=self.aliases(), generation=self.generation())
        finally:
            self._db.execute("COMMIT")

    def directory_counts(self) -> tuple[int, dict[str, int]]:
        """The generation and how many domains, users and alias sources the directory
        holds at it, read in one transaction (cheap: what the store checks Redis against)."""
        self._db.execute("BEGIN")
        try:
            counts = self._db.execute(
                "SELECT (SELECT COUNT(*) FROM domain), (SELECT COUNT(*) FROM user), "
                "(SELECT COUNT(DISTINCT source) FROM alias)").fetchone()
            return self.generation(), dict(zip(("domains", "users", "aliases"), counts,
                                               strict=True))
        finally:
            self._db.execute("COMMIT")

    def _checked_new_address(self, address: str) -> str:
        address = normalize_address(address)
        if not valid_address(address):
            raise AccountError(f"not a valid mailbox address: {address!r}")
        domain = address.rpartition("@")[2]
        if not self.has_domain(domain):
            raise AccountError(f"{domain} is not a local domain; add it with `tiermail domain add`")
        return address
