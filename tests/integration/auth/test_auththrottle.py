"""Failed-login counting in the real Redis (common/auththrottle.py), and POP3 refusing logins
once a client IP or an account has used up its failures."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio

from common.auththrottle import RECHECK_AFTER, AuthThrottle
from common.passwords import hash_password
from common.ratelimit import parse_networks
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MailDB
from services.store.imap.server import ImapDeps, start_imap_servers
from services.store.mailbox import MailStore
from services.store.pop3 import protocol as p
from services.store.pop3.server import start_pop3_servers
from services.store.pop3.session import ERR_AUTH_THROTTLED
from tests.support import eventually
from tests.unit.pop3.fakes import FakeMailStore

ALICE, BOB = "alice@example.test", "bob@example.test"
PASSWORD = "correct horse"
REMOTE = "192.0.2.7"
# A failure window or a known address that expires within a test. The calls before its first
# check (a few Redis round trips) must fit in it on a loaded CI machine, which 0.3 s did not
# promise.
SHORT_LIFETIME = 2.0


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis.from_url(settings.redis_url)
    yield connection
    await connection.aclose()


def throttle(client: redis.asyncio.Redis, settings: Settings, per_ip: int = 3,
             per_user: int = 2, window: float = 600, exempt: str = "") -> AuthThrottle:
    return AuthThrottle(client, settings.redis_prefix, per_ip, per_user, window,
                        exempt=parse_networks(exempt))


async def test_an_account_is_locked_after_its_failures_from_any_address(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    limiter = throttle(client, settings, per_ip=100, per_user=2)
    await limiter.failed("192.0.2.1", "Alice@Example.test")
    assert await limiter.allowed("192.0.2.2", ALICE)
    await limiter.failed("192.0.2.3", ALICE)
    assert not await limiter.allowed("192.0.2.4", ALICE)
    assert not await limiter.allowed("192.0.2.4", "ALICE@example.test")
    assert await limiter.allowed("192.0.2.4", BOB)


async def test_the_failure_window_runs_from_the_first_failure_not_the_last(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """A window that every failure pushed back would keep an account a guesser keeps
    trying locked for good, and its owner's new addresses with it: the counts expire the
    window's length after the first failure."""
    limiter = throttle(client, settings, per_ip=100, per_user=5, window=600)
    await limiter.failed(REMOTE, ALICE)
    keys = [limiter.ip_key(REMOTE), limiter.user_key(ALICE)]
    for key in keys:
        assert key is not None and 0 < await client.pttl(key) <= 600_000
        await client.pexpire(key, 5_000)  # as if most of the window had passed
    await limiter.failed(REMOTE, ALICE)
    for key in keys:
        assert key is not None and 0 < await client.pttl(key) <= 5_000


async def test_an_address_is_locked_after_its_failures_whatever_the_account(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    limiter = throttle(client, settings, per_ip=3, per_user=100)
    for user in ("a@example.test", "b@example.test", None):
        assert await limiter.allowed(REMOTE, user)
        await limiter.failed(REMOTE, user)
    assert not await limiter.allowed(REMOTE, "c@example.test")
    assert not await limiter.allowed(REMOTE, None)
    assert await limiter.allowed("192.0.2.8", "c@example.test")
    # IPv6 is counted per /64.
    for suffix in ("1", "2", "3"):
        await limiter.failed(f"2001:db8:1:2::{suffix}", None)
    assert not await limiter.allowed("2001:db8:1:2:ffff::9", None)
    assert await limiter.allowed("2001:db8:1:3::1", None)


async def test_exempt_networks_count_per_account_only(client: redis.asyncio.Redis,
                                                      settings: Settings) -> None:
    limiter = throttle(client, settings, per_ip=1, per_user=2, exempt="127.0.0.0/8")
    await limiter.failed("127.0.0.1", ALICE)
    assert await limiter.allowed("127.0.0.1", BOB)  # the IP limit (1) does not apply
    await limiter.failed("127.0.0.1", ALICE)
    assert not await limiter.allowed("127.0.0.1", ALICE)


async def test_the_owners_logins_do_not_forgive_guesses_from_elsewhere(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """A success forgot the account's failures: guessers on many addresses got the whole
    limit again each time the owner's client logged in. The counts now only expire."""
    limiter = throttle(client, settings, per_ip=3, per_user=2)
    owner = "192.0.2.20"
    await limiter.succeeded(owner, ALICE)
    await limiter.failed("198.51.100.1", ALICE)
    await limiter.succeeded(owner, ALICE)  # the owner's client polls meanwhile
    await limiter.failed("198.51.100.2", ALICE)
    assert not await limiter.allowed("198.51.100.3", ALICE)  # two guesses: the limit
    assert await limiter.allowed(owner, ALICE)
    await limiter.failed(REMOTE, BOB)
    await limiter.failed(REMOTE, None)
    await limiter.succeeded(REMOTE, BOB)
    await limiter.failed(REMOTE, None)
    assert not await limiter.allowed(REMOTE, BOB)  # nor the address's: 3


async def test_an_address_the_owner_logged_in_from_is_not_locked_with_the_account(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """Guessing at a known address from elsewhere locks the others out, not its owner."""
    limiter = throttle(client, settings, per_ip=3, per_user=2)
    owner, attacker = "192.0.2.20", "198.51.100.1"
    await limiter.succeeded(owner, ALICE)
    for _ in range(2):
        await limiter.failed(attacker, ALICE)
    assert not await limiter.allowed(attacker, ALICE)
    assert not await limiter.allowed("198.51.100.2", ALICE)  # any other address
    assert await limiter.allowed(owner, ALICE)
    assert await limiter.allowed(owner, "ALICE@example.test")
    # Known to Alice only: Bob's account, locked the same way, stays locked from there.
    for _ in range(2):
        await limiter.failed(attacker, BOB)
    assert not await limiter.allowed(owner, BOB)
    # The known address is still held to its own per-IP limit.
    for _ in range(3):
        await limiter.failed(owner, ALICE)
    assert not await limiter.allowed(owner, ALICE)


async def test_an_address_becomes_known_only_where_it_is_counted(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """An exempt address is shared (webmail), and with no per-IP limit a known address would
    give whoever is on it unlimited guesses: neither bypasses the account's limit."""
    for limiter, owner in ((throttle(client, settings, per_ip=3, per_user=2,
                                     exempt="127.0.0.0/8"), "127.0.0.1"),
                           (throttle(client, settings, per_ip=0, per_user=2), "192.0.2.21")):
        await limiter.succeeded(owner, ALICE)
        for _ in range(2):
            await limiter.failed("198.51.100.1", ALICE)
        assert not await limiter.allowed(owner, ALICE)
        await client.delete(*await client.keys(settings.redis_prefix + "*"))


async def test_a_known_address_is_forgotten_after_a_while(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    limiter = AuthThrottle(client, settings.redis_prefix, 3, 1, known_for=SHORT_LIFETIME)
    await limiter.succeeded("192.0.2.22", ALICE)
    await limiter.failed("198.51.100.1", ALICE)
    assert await limiter.allowed("192.0.2.22", ALICE)
    await eventually(lambda: _refused(limiter, "192.0.2.22", ALICE), within=30,
                     what="the known address to be forgotten")


async def _refused(limiter: AuthThrottle, ip: str, user: str) -> bool:
    return not await limiter.allowed(ip, user)


async def test_the_window_expires(client: redis.asyncio.Redis, settings: Settings) -> None:
    limiter = throttle(client, settings, per_ip=100, per_user=1, window=SHORT_LIFETIME)
    await limiter.failed(REMOTE, ALICE)
    assert not await limiter.allowed(REMOTE, ALICE)
    await eventually(lambda: limiter.allowed(REMOTE, ALICE), within=30,
                     what="the failure window to expire")


async def test_zero_turns_a_limit_off(client: redis.asyncio.Redis, settings: Settings) -> None:
    limiter = throttle(client, settings, per_ip=0, per_user=0)
    for _ in range(5):
        await limiter.failed(REMOTE, ALICE)
    assert await limiter.allowed(REMOTE, ALICE)
    assert await client.keys(settings.redis_prefix + "*") == []


async def test_logins_are_allowed_while_redis_is_down(settings: Settings) -> None:
    unreachable = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    limiter = throttle(unreachable, settings, per_ip=1, per_user=1)
    await limiter.failed(REMOTE, ALICE)
    assert await limiter.allowed(REMOTE, ALICE)
    await limiter.succeeded(REMOTE, ALICE)
    await unreachable.aclose()



async def test_guesses_sent_at_the_same_time_are_checked_no_more_than_the_limit(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """One account's logins take turns: 30 wrong guesses under way at once (30 connections)
    get 2 password checks, not 30; another account does not wait for them."""
    limiter = throttle(client, settings, per_ip=100, per_user=2)
    checked = 0

    async def guess(spelling: str) -> None:
        nonlocal checked
        async with limiter.one_check_at_a_time(spelling):
            if await limiter.allowed(REMOTE, spelling):
                checked += 1
                await asyncio.sleep(0.01)  # the argon2 check
                await limiter.failed(REMOTE, spelling)

    # One account however its name is written: the turns are the account's.
    spellings = [ALICE, ALICE.upper(), "Alice@Example.Test"]
    await asyncio.gather(*(guess(spellings[n % 3]) for n in range(30)))
    assert checked == 2
    async with limiter.one_check_at_a_time(BOB):
        assert await limiter.allowed(REMOTE, BOB)
    assert limiter._turns == {}  # noqa: SLF001 - nothing kept once the logins are done


async def test_many_logins_at_once_with_the_right_password_all_get_in(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """Clients that open many connections at once (Thunderbird opens five) are not refused:
    turns are taken, nothing is counted for a right password."""
    limiter = throttle(client, settings, per_ip=2, per_user=2)

    async def login() -> bool:
        async with limiter.one_check_at_a_time(ALICE):
            allowed = await limiter.allowed(REMOTE, ALICE)
            await limiter.succeeded(REMOTE, ALICE)
            return allowed

    assert all(await asyncio.gather(*(login() for _ in range(20))))


async def test_wrong_passwords_for_many_accounts_at_once_are_checked_no_more_than_the_ip_limit(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """Password spraying: one guess each at 30 accounts, all sent at once from one address.
    The accounts' turns do not serialise them; the address's checks under way count against
    its limit, so 5 passwords are checked, not 30."""
    limiter = throttle(client, settings, per_ip=5, per_user=100)
    checked = 0

    async def wrong() -> bool:
        nonlocal checked
        checked += 1
        await asyncio.sleep(0.01)  # the argon2 check
        return False

    results = await asyncio.gather(*(limiter.check(REMOTE, f"user{i}@example.test", wrong)
                                      for i in range(30)))
    assert checked == 5
    assert sorted(set(results)) == ["throttled", "wrong"] and results.count("wrong") == 5
    assert limiter._ip_checks == {}  # noqa: SLF001 - nothing kept once the logins are done


class LateCounts(redis.asyncio.Redis):
    """The real Redis, whose MGET answers reach the caller `late` seconds after Redis gave
    them: what a busy event loop does to a reply (the CI failure of 2026-12-05)."""

    late = 0.03

    async def mget(self, *args: Any, **kwargs: Any) -> Any:
        counts = await super().mget(*args, **kwargs)
        await asyncio.sleep(self.late)
        return counts


@pytest.mark.parametrize("lateness", [0.0, 0.03])
async def test_guesses_counted_while_the_counts_were_read_are_not_checked_past_the_limit(
        settings: Settings, lateness: float) -> None:
    """Guesses that end one after another (10-50 ms each) while others wait: a waiter reads
    the counts, a guess still under way is counted in Redis and leaves before the reply is
    used. Counted neither as under way nor in the stale reply, it let three more guesses be
    checked (9 of a limit of 5 in CI)."""
    client = LateCounts.from_url(settings.redis_url)
    client.late = lateness
    try:
        limiter = throttle(client, settings, per_ip=5, per_user=100)
        checked = 0

        async def wrong() -> bool:
            nonlocal checked
            checked += 1
            await asyncio.sleep(0.01 * checked)  # ends staggered: 10, 20, ... 50 ms
            return False

        results = await asyncio.gather(*(limiter.check(REMOTE, f"user{i}@example.test", wrong)
                                          for i in range(30)))
    finally:
        await client.aclose()
    assert checked == 5
    assert results.count("wrong") == 5 and results.count("throttled") == 25


async def test_right_passwords_for_many_accounts_at_once_wait_their_turn_not_refused(
        client: redis.asyncio.Redis, settings: Settings) -> None:
    """A client with more connections than the address's limit (a webmail host off the
    exempt list, an office behind NAT) gets them all, a few at a time."""
    limiter = throttle(client, settings, per_ip=3, per_user=2)
    under_way = most = 0

    async def right() -> bool:
        nonlocal under_way, most
        under_way += 1
        most = max(most, under_way)
        await asyncio.sleep(0.01)
        under_way -= 1
        return True

    results = await asyncio.gather(*(limiter.check(REMOTE, f"user{i}@example.test", right)
                                      for i in range(20)))
    assert results == ["right"] * 20
    assert most == 3
    assert limiter._ip_checks == {}  # noqa: SLF001


class SilentServer:
    """A TCP peer that takes whatever it is sent and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.received = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._swallow, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += len(data)
        writer.close()


async def test_a_hung_redis_is_left_alone_for_a_while_after_it_timed_out(
        settings: Settings) -> None:
    now = [1000.0]
    async with SilentServer() as hung:
        silent = redis.asyncio.Redis(host="127.0.0.1", port=hung.port)
        limiter = AuthThrottle(silent, settings.redis_prefix, per_ip=3, per_user=2,
                               timeout=0.2, clock=lambda: now[0])
        assert await limiter.allowed(REMOTE, ALICE)  # after the timeout
        await eventually(lambda: hung.received > 0)
        await asyncio.sleep(0.1)  # let the server take in everything that was sent
        asked = hung.received
        for _ in range(5):  # no more waits: Redis is not asked at all
            await limiter.failed(REMOTE, ALICE)
            assert await limiter.allowed(REMOTE, ALICE)
            await limiter.succeeded(REMOTE, ALICE)
        assert hung.received == asked
        now[0] += RECHECK_AFTER
        assert await limiter.allowed(REMOTE, ALICE)  # asked again, timed out again
        await eventually(lambda: hung.received > asked)
        await silent.aclose()


# POP3 (USER/PASS and AUTH PLAIN) through the real server.

async def pop3_exchange(port: int, *lines: str) -> str:
    """Send lines after the greeting; the reply to the last one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        reply = b""
        for line in lines:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()
            reply = await reader.readline()
        return reply.decode().strip()
    finally:
        writer.close()


async def pop3_login(port: int, user: str, password: str) -> str:
    return await pop3_exchange(port, f"USER {user}", f"PASS {password}")


async def pop3_auth_plain(port: int, user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return await pop3_exchange(port, f"AUTH PLAIN {token}")


async def test_pop3_refuses_a_locked_account_even_with_the_right_password(
        client: redis.asyncio.Redis, settings: Settings, tmp_path: Path) -> None:
    accounts = AccountDB(tmp_path / "accounts.sqlite")
    accounts.add_domain("example.test")
    accounts.add_user(ALICE, hash_password(PASSWORD))
    accounts.add_user(BOB, hash_password(PASSWORD))
    limiter = throttle(client, settings, per_ip=100, per_user=2)
    store = cast(MailStore, FakeMailStore())  # POP3 logins need no mail
    servers = await start_pop3_servers(settings, store, accounts,
                                       auth_failure_delay=0.01, throttle=limiter)
    port = settings.pop3_port
    try:
        wrong = p.ERR_AUTH_FAILED.encode().decode().strip()
        throttled = ERR_AUTH_THROTTLED.encode().decode().strip()
        assert await pop3_login(port, ALICE, "guess 1") == wrong
        assert await pop3_auth_plain(port, ALICE, "guess 2") == wrong
        assert throttled.startswith("-ERR [SYS/TEMP]")
        assert await pop3_login(port, ALICE, PASSWORD) == throttled
        assert await pop3_auth_plain(port, ALICE, PASSWORD) == throttled
        # Another account is not affected, and its success resets only its own counter.
        assert (await pop3_login(port, BOB, PASSWORD)).startswith("+OK")
        await client.delete(limiter.user_key(ALICE) or "")
        assert (await pop3_login(port, ALICE, PASSWORD)).startswith("+OK")
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        accounts.close()


# IMAP and POP3 together: one throttle, one account database.

def imap_login(port: int, user: str, password: str) -> tuple[str, str]:
    """(status, response code) of an IMAP LOGIN on a new connection."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        client.login(user, password)
        return "OK", ""
    except imaplib.IMAP4.error as exc:
        code = re.search(r"\[([A-Z-]+)\]", str(exc))
        return "NO", code.group(1) if code else str(exc)
    finally:
        with contextlib.suppress(OSError, imaplib.IMAP4.error):
            client.logout()


async def test_imap_and_pop3_count_into_the_same_limits_and_take_the_same_names(
        client: redis.asyncio.Redis, settings: Settings, tmp_path: Path) -> None:
    """Failed POP3 logins lock the account for IMAP too (one throttle, the same keys), and
    both take an account's own address in any case, never an alias of it."""
    accounts = AccountDB(tmp_path / "accounts.sqlite")
    accounts.add_domain("example.test")
    accounts.add_user(ALICE, hash_password(PASSWORD))
    accounts.add_user(BOB, hash_password(PASSWORD))
    accounts.add_alias("postmaster@example.test", BOB)
    limiter = throttle(client, settings, per_ip=100, per_user=2)
    maildb = MailDB(tmp_path / "mail", inline_max=settings.store_inline_max)
    servers = [
        *await start_pop3_servers(settings, cast(MailStore, FakeMailStore()), accounts,
                                  auth_failure_delay=0.01, throttle=limiter),
        *await start_imap_servers(settings, ImapDeps(store=maildb, accounts=accounts,
                                                     throttle=limiter,
                                                     auth_failure_delay=0.01))]
    try:
        ok = await asyncio.to_thread(imap_login, settings.imap_port, BOB.upper(), PASSWORD)
        assert ok == ("OK", "")
        assert (await pop3_login(settings.pop3_port, BOB.upper(), PASSWORD)).startswith("+OK")
        alias = "postmaster@example.test"
        assert await asyncio.to_thread(imap_login, settings.imap_port, alias, PASSWORD) == (
            "NO", "AUTHENTICATIONFAILED")
        assert await pop3_login(settings.pop3_port, alias, PASSWORD) == \
            p.ERR_AUTH_FAILED.encode().decode().strip()
        for guess in ("guess 1", "guess 2"):
            await pop3_login(settings.pop3_port, ALICE, guess)
        assert await asyncio.to_thread(imap_login, settings.imap_port, ALICE, PASSWORD) == (
            "NO", "UNAVAILABLE")
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        await maildb.close()
        accounts.close()
