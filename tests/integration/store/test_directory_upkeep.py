"""The store keeps the Redis directory equal to its account database (services/store/main.py,
_keep_directory_published), with the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.directory import Directory, DirectoryUnavailable, Resolution
from common.redisconn import open_redis
from common.settings import Settings
from services.store import main as store_main
from services.store.backends.accounts import AccountDB
from tests.support import eventually, free_port

CHECK = 0.05  # seconds between the store's checks, instead of 5


@pytest.fixture
async def upkeep(settings: Settings, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[Directory, AccountDB]]:
    monkeypatch.setattr(store_main, "DIRECTORY_CHECK_INTERVAL", CHECK)
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.add_domain("example.test")
    for user in ("alice", "bob"):
        accounts.add_user(f"{user}@example.test", "not-a-real-hash")
    accounts.add_alias("team@example.test", "alice@example.test", "bob@example.test")
    client = open_redis(settings)
    directory = Directory(client, settings.redis_prefix)
    try:
        async with _publishing(directory, accounts) as attempted:
            await _first_attempt(attempted)
            yield directory, accounts
    finally:
        await client.aclose()
        accounts.close()


async def test_a_part_of_the_directory_lost_on_its_own_is_published_again(
        upkeep: tuple[Directory, AccountDB]) -> None:
    """A shared Redis evicting one key (maxmemory-policy allkeys-lru), or a DEL by hand, left
    the generation as it was: the store saw nothing to do, and every user got 550 5.1.1
    until the store restarted, while `tiermail status` said healthy."""
    directory, _ = upkeep
    for key in ("users", "aliases", "domains"):
        await directory._redis.delete(directory.key(key))
        await eventually(lambda: _resolves(directory, "team@example.test"), within=10,
                         what=f"dir:{key} to be published again")
        assert (await directory.resolve("alice@example.test")).resolution is Resolution.LOCAL


async def test_a_directory_as_it_should_be_is_left_alone(
        upkeep: tuple[Directory, AccountDB]) -> None:
    directory, _ = upkeep
    version = await directory._redis.get(directory.key("version"))
    await asyncio.sleep(20 * CHECK)  # pacing: twenty of the store's checks
    assert await directory._redis.get(directory.key("version")) == version


async def test_a_target_taken_off_or_added_to_an_alias_is_published(
        upkeep: tuple[Directory, AccountDB]) -> None:
    """The CLI mirrors each alias change into Redis itself; when that failed, the store's
    upkeep is what publishes it. Taking one target off an alias, or adding one, changes none
    of the counts the upkeep compares, only the account generation: without it, a target
    taken off kept getting the alias's mail."""
    directory, accounts = upkeep
    accounts.remove_alias("team@example.test", "bob@example.test")
    await eventually(lambda: _delivers_to(directory, "team@example.test",
                                          {"alice@example.test"}),
                     within=10, what="bob taken off team in Redis")
    accounts.add_alias("team@example.test", "bob@example.test")
    await eventually(lambda: _delivers_to(directory, "team@example.test",
                                          {"alice@example.test", "bob@example.test"}),
                     within=10, what="bob back in team in Redis")


async def test_the_start_goes_on_when_redis_cannot_be_reached(settings: Settings) -> None:
    """The listeners open once the first publish is done or has failed: a Redis that is
    down must not hold the store's start until it is back."""
    accounts = AccountDB.for_store(settings.store_dir)
    away = open_redis(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/1"))
    async with _publishing(Directory(away, settings.redis_prefix), accounts) as attempted:
        await eventually(attempted.is_set, within=30, what="the failed first publish")
    await away.aclose()
    accounts.close()


async def test_retries_while_redis_is_down_back_off_to_at_most_the_check_interval(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """0.5 s doubling, capped: after a long outage the directory is published again within
    about 5 s of Redis being back, as status and docs/operations.md say."""
    delays: list[float] = []
    enough = asyncio.Event()

    async def recorded(seconds: float, wake: asyncio.Event | None = None) -> bool:
        delays.append(seconds)
        if len(delays) == 8:
            enough.set()
        await asyncio.sleep(0 if len(delays) < 8 else 3600)
        return False

    monkeypatch.setattr(store_main, "pause", recorded)
    accounts = AccountDB.for_store(settings.store_dir)
    away = open_redis(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/1"))
    async with _publishing(Directory(away, settings.redis_prefix), accounts):
        await enough.wait()
    assert delays == [0.5, 1.0, 2.0, 4.0] + [store_main.DIRECTORY_RETRY_MAX] * 4
    await away.aclose()
    accounts.close()


async def test_a_start_publishes_its_own_database_over_one_that_looks_the_same(
        settings: Settings, tmp_path: Path) -> None:
    """Redis holding the directory of another account database at the same generation and
    with as many domains, users and aliases (`var/` made again, a restored backup) is no
    reason not to publish at start: the filters would take mail for the other's domains."""
    client = open_redis(settings)
    directory = Directory(client, settings.redis_prefix)
    databases = []
    for name in ("other.test", "ours.test"):
        accounts = AccountDB.for_store(tmp_path / name)
        accounts.add_domain(name)
        accounts.add_user(f"alice@{name}", "not-a-real-hash")
        databases.append(accounts)
    other, ours = databases
    assert other.directory_counts() == ours.directory_counts()
    for accounts in (other, ours):
        async with _publishing(directory, accounts) as attempted:
            await _first_attempt(attempted)
    assert (await directory.resolve("alice@ours.test")).resolution is Resolution.LOCAL
    assert (await directory.resolve("alice@other.test")).resolution is not Resolution.LOCAL
    for accounts in databases:
        accounts.close()
    await client.aclose()


@contextlib.asynccontextmanager
async def _publishing(directory: Directory, accounts: AccountDB
                      ) -> AsyncIterator[asyncio.Event]:
    """The store's directory upkeep running; yields the event it sets at its first attempt."""
    attempted = asyncio.Event()
    task = asyncio.create_task(
        store_main._keep_directory_published(directory, accounts, attempted))
    try:
        yield attempted
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _first_attempt(attempted: asyncio.Event) -> None:
    """Wait for the upkeep's first publish, tried (a store's start waits for it too)."""
    async with asyncio.timeout(30):
        await attempted.wait()


async def _delivers_to(directory: Directory, address: str, mailboxes: set[str]) -> bool:
    try:
        lookup = await directory.resolve(address)
    except DirectoryUnavailable:  # being published
        return False
    return set(lookup.mailboxes) == mailboxes and len(lookup.mailboxes) == len(mailboxes)


async def _resolves(directory: Directory, address: str) -> bool:
    try:
        lookup = await directory.resolve(address)
    except DirectoryUnavailable:  # part of it missing: 451 until the store republishes
        return False
    return lookup.resolution is Resolution.LOCAL and len(lookup.mailboxes) == 2
