"""The store's password check (services/store/auth.py) against a real account database:
only the account's own password opens it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.passwords import hash_password, verify_password
from services.store import auth
from services.store.auth import check_password
from services.store.backends.accounts import AccountDB

ADDRESS = "carol@example.org"


@pytest.fixture
def accounts(tmp_path: Path) -> Iterator[AccountDB]:
    with AccountDB(tmp_path / "accounts.sqlite") as db:
        db.add_domain("example.org")
        db.add_user(ADDRESS, hash_password("right one"))
        yield db


@pytest.mark.parametrize("given", ["", " ", "right", "right one ", "Right one", "right one\0"])
def test_only_the_password_itself_opens_the_account(accounts: AccountDB, given: str) -> None:
    assert check_password(accounts, ADDRESS, "right one")
    assert not check_password(accounts, ADDRESS, given)
    assert not check_password(accounts, "nobody@example.org", "right one")


@pytest.mark.parametrize("stored", ["", "x", "$argon2id$v=19$m=65536,t=3,p=4$broken",
                                    "$2b$12$" + "a" * 53, "plain text password"])
def test_a_stored_hash_that_is_not_argon2_opens_nothing(tmp_path: Path, stored: str) -> None:
    """A damaged or foreign hash (a restore gone wrong, a hand edit) refuses every
    password, the empty one and the hash's own text included: no exception, no login."""
    assert not verify_password(stored, stored)
    assert not verify_password(stored, "")
    db = AccountDB(tmp_path / "accounts.sqlite")
    db.add_domain("example.org")
    db.add_user(ADDRESS, hash_password("right one"))
    db.close()
    with sqlite3.connect(tmp_path / "accounts.sqlite") as raw:
        raw.execute("UPDATE user SET password_hash = ? WHERE address = ?", (stored, ADDRESS))
    db = AccountDB(tmp_path / "accounts.sqlite")
    assert not check_password(db, ADDRESS, "right one")
    assert not check_password(db, ADDRESS, stored)
    db.close()


def test_an_unknown_user_costs_one_password_check_as_a_known_one_does(
        accounts: AccountDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing must not tell which accounts exist: an unknown user's login runs argon2 on a
    dummy hash, as a known user's runs it on the stored one (counted, not timed)."""
    checked: list[str] = []

    def counting(stored: str, password: str) -> bool:
        checked.append(stored)
        return verify_password(stored, password)

    monkeypatch.setattr(auth, "verify_password", counting)
    for user in (ADDRESS, "nobody@example.org"):
        assert not check_password(accounts, user, "wrong")
    assert len(checked) == 2 and all(stored.startswith("$argon2") for stored in checked)
