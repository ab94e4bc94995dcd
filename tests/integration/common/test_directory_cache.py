"""The filter's lookup cache against the real Redis: kept only while the change channel is
live, forgotten on every directory change, on a failed lookup and when Redis goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis, from_url
from redis.exceptions import RedisError

from common.directory import Directory, DirectorySnapshot, Lookup, QuotaState, Resolution
from common.directory_cache import DirectoryCache
from common.settings import Settings
from tests.support import TcpProxy, eventually

SNAPSHOT = DirectorySnapshot(domains={"example.org"}, users={"alice@example.org"},
                             aliases={"team@example.org": ("alice@example.org",)})


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client: Redis = from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def directory(redis: Redis, settings: Settings) -> Directory:
    directory = Directory(redis, settings.redis_prefix)
    await directory.publish(SNAPSHOT)
    return directory


@contextlib.asynccontextmanager
async def running(cache: DirectoryCache) -> AsyncIterator[DirectoryCache]:
    task = asyncio.create_task(cache.run())
    try:
        await eventually(lambda: cache.live, within=10, what="the subscription")
        yield cache
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def add_user_behind_its_back(redis: Redis, directory: Directory, address: str) -> None:
    """A change that publishes no notice: what the cache answers then shows what it kept."""
    await redis.sadd(directory.key("users"), address)


async def test_lookups_are_kept_while_live_and_forgotten_on_a_change(
        redis: Redis, directory: Directory) -> None:
    async with running(DirectoryCache(directory, redis)) as cache:
        assert (await cache.resolve("bob@example.org")).resolution is Resolution.UNKNOWN_USER
        await add_user_behind_its_back(redis, directory, "bob@example.org")
        # Still the remembered answer: it comes from the cache, not from Redis.
        assert (await cache.resolve("<Bob@Example.org>")).resolution is Resolution.UNKNOWN_USER
        await directory.add_user("carol@example.org")  # any change: a notice
        await eventually(lambda: _resolves_local(cache, "bob@example.org"), within=5,
                         what="the change notice")


async def test_each_kind_of_change_sends_a_notice(redis: Redis, directory: Directory) -> None:
    async with running(DirectoryCache(directory, redis)) as cache:
        changes: list[Callable[[str], Awaitable[None]]] = [
            lambda _: directory.add_domain("example.net"),
            lambda _: directory.remove_user("nobody@example.org"),
            lambda _: directory.set_alias("x@example.org", ["alice@example.org"]),
            lambda _: directory.remove_alias("x@example.org"),
            lambda _: directory.set_quota_states({"alice@example.org": QuotaState(5, True)}),
            lambda _: directory.replace_quota_states({}, generation=3),
            lambda address: directory.publish(DirectorySnapshot(
                domains={"example.org"}, users={"alice@example.org", address})),
        ]
        for number, change in enumerate(changes):
            address = f"new{number}@example.org"
            await cache.resolve(address)
            await add_user_behind_its_back(redis, directory, address)
            await change(address)
            await eventually(lambda a=address: _resolves_local(cache, a),  # type: ignore[misc]
                             within=5, what=f"a notice from change {number}")


async def test_over_quota_reaches_the_filter_through_the_cache(
        redis: Redis, directory: Directory) -> None:
    async with running(DirectoryCache(directory, redis)) as cache:
        assert (await cache.resolve("alice@example.org")).over_quota == ()
        await directory.set_quota_states({"alice@example.org": QuotaState(10, True)})

        async def full() -> bool:
            return (await cache.resolve("team@example.org")).over_quota == ("alice@example.org",)

        await eventually(full, within=5, what="the over-quota state")


async def test_nothing_is_kept_without_a_subscription(redis: Redis, directory: Directory) -> None:
    cache = DirectoryCache(directory, redis)  # run() never started
    assert (await cache.resolve("bob@example.org")).resolution is Resolution.UNKNOWN_USER
    await add_user_behind_its_back(redis, directory, "bob@example.org")
    assert (await cache.resolve("bob@example.org")).resolution is Resolution.LOCAL


async def test_an_entry_expires_after_its_ttl_notice_or_not(redis: Redis,
                                                             directory: Directory) -> None:
    """What a change behind the notices' back (a hand edit, a FLUSHALL) leaves standing in
    the cache lasts `ttl` seconds at most. The subscription is taken as confirmed (no
    run(): its pings would read the test's clock too)."""
    now = [1000.0]
    cache = DirectoryCache(directory, redis, ttl=60.0, clock=lambda: now[0])
    cache._on_message({"type": "subscribe"})  # noqa: SLF001 - as a confirmed subscription
    assert (await cache.resolve("bob@example.org")).resolution is Resolution.UNKNOWN_USER
    await add_user_behind_its_back(redis, directory, "bob@example.org")
    now[0] += 59.9
    assert (await cache.resolve("bob@example.org")).resolution is Resolution.UNKNOWN_USER
    now[0] += 0.2
    assert (await cache.resolve("bob@example.org")).resolution is Resolution.LOCAL


async def test_random_addresses_cannot_grow_the_cache_past_its_bound(
        redis: Redis, directory: Directory) -> None:
    """Spam to made-up addresses: every unknown user is an entry. At `max_entries` the cache
    starts again from empty (the entries are only a shortcut), so what it holds stays
    bounded, and what it had kept is asked of Redis again."""
    cache = DirectoryCache(directory, redis, max_entries=3)
    cache._on_message({"type": "subscribe"})  # noqa: SLF001 - as a confirmed subscription
    for n in range(3):
        await cache.resolve(f"random{n}@example.org")
    await add_user_behind_its_back(redis, directory, "random0@example.org")
    assert (await cache.resolve("random0@example.org")).resolution is Resolution.UNKNOWN_USER
    await cache.resolve("random3@example.org")  # a fourth: the three are let go
    assert (await cache.resolve("random0@example.org")).resolution is Resolution.LOCAL
    assert len(cache._entries) == 2  # noqa: SLF001 - random3 and random0


async def test_redis_going_away_ends_the_cache_and_lookups_fail(
        settings: Settings, directory: Directory) -> None:
    proxy = TcpProxy(6379)
    through_proxy: Redis = from_url(f"redis://127.0.0.1:{proxy.port}/{_db(settings)}",
                                    socket_connect_timeout=2, socket_timeout=2)
    proxied = Directory(through_proxy, settings.redis_prefix)
    try:
        async with running(DirectoryCache(proxied, through_proxy)) as cache:
            assert (await cache.resolve("alice@example.org")).resolution is Resolution.LOCAL
            proxy.cut()
            await eventually(lambda: not cache.live, within=10, what="the cache to go off")
            with pytest.raises((RedisError, OSError)):
                await cache.resolve("alice@example.org")  # never the remembered answer
            proxy.start()
            await eventually(lambda: cache.live, within=15, what="the cache to come back")
            # The pool's first command may still meet a connection the cut closed.
            await eventually(lambda: _resolves_local_or_fails(cache, "alice@example.org"),
                             within=5, what="lookups to work again")
    finally:
        proxy.cut()
        await through_proxy.aclose()


class _SlowDirectory(Directory):
    """A real Directory whose lookups wait until released: a change notice can arrive
    while one is in flight."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        super().__init__(redis, prefix)
        self.read = asyncio.Event()  # a lookup has its answer from Redis
        self.release = asyncio.Event()

    async def resolve(self, address: str) -> Lookup:
        found = await super().resolve(address)
        self.read.set()
        await self.release.wait()
        return found


async def test_a_lookup_overtaken_by_a_change_is_not_kept(
        redis: Redis, settings: Settings, directory: Directory) -> None:
    slow = _SlowDirectory(redis, settings.redis_prefix)
    async with running(DirectoryCache(slow, redis)) as cache:
        lookup = asyncio.create_task(cache.resolve("bob@example.org"))
        await asyncio.wait_for(slow.read.wait(), 10)  # it has read Redis: bob is unknown
        await add_user_behind_its_back(redis, directory, "bob@example.org")
        generation = cache._generation
        await directory.add_user("dave@example.org")
        await eventually(lambda: cache._generation > generation, within=5, what="the notice")
        slow.release.set()
        assert (await lookup).resolution is Resolution.UNKNOWN_USER
        assert (await cache.resolve("bob@example.org")).resolution is Resolution.LOCAL


async def _resolves_local(cache: DirectoryCache, address: str) -> bool:
    return (await cache.resolve(address)).resolution is Resolution.LOCAL


async def _resolves_local_or_fails(cache: DirectoryCache, address: str) -> bool:
    try:
        return await _resolves_local(cache, address)
    except (RedisError, OSError):
        return False


def _db(settings: Settings) -> str:
    return settings.redis_url.rsplit("/", 1)[1]


async def test_usage_updates_without_an_over_quota_change_send_no_notice(
        redis: Redis, directory: Directory) -> None:
    """Notices empty every filter's cache, so a usage update (every delivery, debounced)
    must not send one unless a mailbox crossed its quota."""
    changed, marker = directory.key(Directory.CHANGED), directory.key("test-marker")
    pubsub = redis.pubsub()
    await pubsub.subscribe(changed, marker)

    async def notices_before_marker() -> int:
        await redis.publish(marker, "1")  # the server delivers in publish order
        count = 0
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            message = await pubsub.get_message(timeout=1)
            if message is None or message["type"] != "message":
                continue  # subscription confirmations
            if message["channel"].decode() == marker:
                return count
            count += 1
        raise AssertionError("the marker never arrived")

    try:
        await directory.set_quota_states({"alice@example.org": QuotaState(5, False)})
        assert await notices_before_marker() == 0  # alice was not over before either
        await directory.set_quota_states({"alice@example.org": QuotaState(9, True)})
        assert await notices_before_marker() == 1
        await directory.set_quota_states({"alice@example.org": QuotaState(10, True)})
        assert await notices_before_marker() == 0
        await directory.set_quota_states({"alice@example.org": QuotaState(2, False)})
        assert await notices_before_marker() == 1
    finally:
        await pubsub.aclose()
