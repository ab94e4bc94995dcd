"""Which domain names `domain add` takes (services/store/backends/accounts.py valid_domain)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.store.backends.accounts import AccountDB, AccountError


@pytest.mark.parametrize("given, stored", [
    ("Example.ORG", "example.org"),
    ("example.org.", "example.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("mail.a1.example", "mail.a1.example"),
    ("example.xn--p1ai", "example.xn--p1ai"),  # .рф, a top-level A-label
])
def test_a_valid_name_is_stored_in_its_ascii_form(tmp_path: Path, given: str,
                                                  stored: str) -> None:
    accounts = AccountDB(tmp_path / "accounts.sqlite")
    try:
        assert accounts.add_domain(given) == stored
    finally:
        accounts.close()


@pytest.mark.parametrize("name", [
    "xn--a.example",  # decodes to U+0080: no valid U-label (RFC 5890 2.3.2.1)
    "xn--ss-test.example",  # no Punycode at all
    "mail.xn--.example",
    "example.123",  # an all-numeric top-level label (RFC 3696 2)
    "192.168.0.1",
    "-x.example",
    "example",
])
def test_an_invalid_name_is_refused(tmp_path: Path, name: str) -> None:
    accounts = AccountDB(tmp_path / "accounts.sqlite")
    try:
        with pytest.raises(AccountError, match="not a valid domain name"):
            accounts.add_domain(name)
        assert accounts.domains() == []
    finally:
        accounts.close()


def test_catch_alls_an_earlier_version_stored_as_written_are_normalized(tmp_path: Path) -> None:
    """Before 2026-12-06 `alias add @example.org.` stored the final dot: the alias never
    matched, and `alias del @example.org` could not find it. Opening the database now
    stores it as it is looked up, and the directory is published again."""
    with AccountDB(tmp_path / "accounts.sqlite") as accounts:
        accounts.add_domain("example.org")
        accounts.add_user("kate@example.org", "hash")
        accounts.add_alias("@example.org", "kate@example.org")
        accounts._db.executemany("INSERT INTO alias(source, target) VALUES (?, ?)",
                                 [("@example.org.", "kate@example.org"),
                                  ("@Example.ORG.", "bob@example.org")])
        accounts._db.execute("PRAGMA user_version = 1")
        before = accounts.generation()
    with AccountDB(tmp_path / "accounts.sqlite") as accounts:
        rows = set(accounts._db.execute("SELECT source, target FROM alias"))
        assert rows == {("@example.org", "kate@example.org"), ("@example.org", "bob@example.org")}
        assert accounts.generation() > before
        accounts.remove_alias("@example.org")
        assert not list(accounts._db.execute("SELECT * FROM alias"))


def test_a_domain_that_still_has_users_is_not_removed(tmp_path: Path) -> None:
    """Removing it would leave accounts in a domain the directory no longer knows: their
    mail refused as not local, and the accounts unreachable by `domain` commands."""
    with AccountDB(tmp_path / "accounts.sqlite") as accounts:
        accounts.add_domain("example.org")
        accounts.add_user("kate@example.org", "hash")
        with pytest.raises(AccountError, match="still has users"):
            accounts.remove_domain("example.org")
        assert accounts.has_domain("example.org")
        assert accounts.users() == ["kate@example.org"]
