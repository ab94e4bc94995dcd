"""Sessions per account and client address (services/store/imap/userlimit.py)."""

from __future__ import annotations

from common.ratelimit import parse_networks
from services.store.imap.userlimit import UserConnections

ALICE, BOB = "alice@example.test", "bob@example.test"
IP, OTHER_IP = "192.0.2.7", "192.0.2.8"


def test_the_limit_counts_per_account_and_address_and_frees_on_release() -> None:
    limits = UserConnections(2)
    first, second = limits.admit(ALICE, IP), limits.admit(ALICE, IP)
    assert first is not None and second is not None
    assert limits.admit(ALICE, IP) is None
    assert limits.admit("ALICE@Example.TEST", IP) is None  # the same account
    assert limits.admit(BOB, IP) is not None
    assert limits.admit(ALICE, OTHER_IP) is not None
    first()
    assert limits.count(ALICE, IP) == 1
    assert limits.admit(ALICE, IP) is not None


def test_ipv6_clients_count_per_64() -> None:
    limits = UserConnections(1)
    assert limits.admit(ALICE, "2001:db8:1:2::5") is not None
    assert limits.admit(ALICE, "2001:db8:1:2:ffff::9") is None
    assert limits.admit(ALICE, "2001:db8:1:3::5") is not None


def test_exempt_networks_and_a_limit_of_zero_count_nothing() -> None:
    exempt = UserConnections(1, parse_networks("127.0.0.0/8"))
    assert all(exempt.admit(ALICE, "127.0.0.1") is not None for _ in range(5))
    off = UserConnections(0)
    assert all(off.admit(ALICE, IP) is not None for _ in range(5))
