"""Per-user quotas in the account database: unset / unlimited / a limit, and the migration of
databases made when the column was NOT NULL DEFAULT 0."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.store.backends.accounts import AccountDB, AccountError, effective_quota

ALICE, BOB = "alice@example.test", "bob@example.test"


@pytest.fixture
def accounts(tmp_path: Path) -> AccountDB:
    db = AccountDB(tmp_path / "accounts.sqlite")
    db.add_domain("example.test")
    db.add_user(ALICE, "hash")
    db.add_user(BOB, "hash")
    return db


def test_effective_quota() -> None:
    assert effective_quota(None, 0) is None
    assert effective_quota(None, 1000) == 1000
    assert effective_quota(0, 1000) is None  # explicitly unlimited beats the default
    assert effective_quota(500, 1000) == 500
    assert effective_quota(500, 0) == 500


def test_set_and_read_quotas(accounts: AccountDB) -> None:
    generation = accounts.generation()
    accounts.set_quota("Alice@Example.test", 5000)
    assert accounts.generation() == generation + 1  # the store reconciles on this
    accounts.set_quota(BOB, 0)
    assert accounts.quota(ALICE) == 5000
    assert accounts.quota(BOB, default=100) is None
    assert accounts.stored_quotas() == {ALICE: 5000, BOB: 0}
    accounts.set_quota(ALICE, None)
    assert accounts.quota(ALICE, default=100) == 100
    assert accounts.quota(ALICE) is None
    assert accounts.quota("nobody@example.test", default=100) is None


def test_refusals(accounts: AccountDB) -> None:
    with pytest.raises(AccountError, match="no such user"):
        accounts.set_quota("nobody@example.test", 10)
    with pytest.raises(AccountError, match="negative"):
        accounts.set_quota(ALICE, -1)


def test_an_old_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE user (address TEXT PRIMARY KEY, password_hash TEXT NOT NULL,
                           created REAL NOT NULL, quota INTEGER NOT NULL DEFAULT 0)
            WITHOUT ROWID;
        INSERT INTO user VALUES ('alice@example.test', 'h1', 1.0, 0);
    """)
    old.close()
    accounts = AccountDB(path)
    assert accounts.stored_quotas() == {ALICE: None}  # 0 there was never set by anyone
    assert accounts.password_hash(ALICE) == "h1"
    accounts.set_quota(ALICE, None)  # NULL is allowed now
    accounts.close()
    again = AccountDB(path)  # opening a migrated database changes nothing
    assert again.stored_quotas() == {ALICE: None}
    again.close()
