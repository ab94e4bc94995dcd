"""Heartbeats in the real Redis: which processes went without stopping (common/health.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest
import redis.asyncio

from common import health
from common.health import (
    SILENT_SHOWN,
    TTL,
    Heartbeat,
    read_heartbeats,
    seen_key,
    silent_processes,
)
from common.settings import Settings
from tests.support import TcpProxy, eventually, redis_at


def seen(tier: str, host: str, pid: int, at: float) -> str:
    return json.dumps({"tier": tier, "host": host, "pid": pid, "started": at - 100, "at": at})


@pytest.fixture
async def client(settings: Settings) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(settings.redis_url)


async def test_a_process_that_went_without_stopping_is_named_until_replaced(
        settings: Settings, client: redis.asyncio.Redis) -> None:
    now = time.time()
    prefix = settings.redis_prefix
    await client.hset(seen_key(prefix), mapping={
        "filter:a:1": seen("filter", "a", 1, now - 40),   # killed: nobody replaced it
        "store:a:2": seen("store", "a", 2, now - 40),     # killed, and a new store since
        "filter:b:3": seen("filter", "b", 3, now - 5),    # within the heartbeat's TTL
        "filter:c:4": seen("filter", "c", 4, now - SILENT_SHOWN - 1),  # long ago
        "junk": "not json",
    })
    beats = [{"tier": "store", "host": "a", "pid": 9, "started": now - 20},
             {"tier": "filter", "host": "a", "pid": 5, "started": now - 3600}]
    silent = await silent_processes(client, prefix, beats, now)
    assert [(e["tier"], e["host"], e["pid"]) for e in silent] == [("filter", "a", 1)]
    assert set(await client.hkeys(seen_key(prefix))) == {b"filter:a:1", b"store:a:2",
                                                         b"filter:b:3"}
    await client.aclose()


async def test_a_clean_stop_takes_the_process_off(settings: Settings,
                                                  client: redis.asyncio.Redis) -> None:
    """Both its heartbeat and its `health-seen` field go: a heartbeat left to expire would
    have status on another host count the stopped process as reporting for its TTL."""
    async with Heartbeat(client, settings.redis_prefix, "filter", dict):
        await eventually(lambda: _one_seen(client, settings.redis_prefix),
                         what="the heartbeat's first write")
    assert await client.hlen(seen_key(settings.redis_prefix)) == 0
    assert not await client.exists(health.heartbeat_key(settings.redis_prefix, "filter"))
    assert not await silent_processes(client, settings.redis_prefix, [], time.time() + TTL + 1)
    await client.aclose()


async def test_a_heartbeat_expires_when_its_process_stops_writing_it(
        settings: Settings, client: redis.asyncio.Redis) -> None:
    """A process killed on another host, or with its host, takes nothing out of Redis: its
    heartbeat must go by itself, or `tiermail status` shows the tier reporting for ever."""
    key = health.heartbeat_key(settings.redis_prefix, "filter")
    async with Heartbeat(client, settings.redis_prefix, "filter", dict):
        await eventually(lambda: client.exists(key), what="the heartbeat's first write")
        assert 0 < await client.ttl(key) <= TTL
    await client.aclose()


async def test_a_change_is_reported_at_once_not_at_the_next_interval(
        settings: Settings, client: redis.asyncio.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """status showed a store that had been consuming for seconds as consumer_connected=False
    until its next heartbeat (found in review); the store calls beat_now when that changes."""
    monkeypatch.setattr(health, "INTERVAL", 3600.0)  # no beat but the first without it
    state = {"consumer_connected": False}
    async with Heartbeat(client, settings.redis_prefix, "store", lambda: dict(state)) as beat:
        await eventually(lambda: _reported(client, settings, False), what="the first beat")
        state["consumer_connected"] = True
        beat.beat_now()
        await eventually(lambda: _reported(client, settings, True), within=30,
                         what="the change reported")
    await client.aclose()


async def test_a_stop_between_beats_does_not_wait_for_the_next_one(
        settings: Settings, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stop wakes the loop that waits for the next beat: it would otherwise hold the
    tier's stop for up to the interval, and past the heartbeat's own wait for it (its TTL)
    end with `heartbeat did not stop cleanly`."""
    monkeypatch.setattr(health, "INTERVAL", 3600.0)
    async with Heartbeat(client, settings.redis_prefix, "store", dict):
        await eventually(lambda: _one_seen(client, settings.redis_prefix), what="the first beat")
    assert "did not stop cleanly" not in caplog.text
    assert await client.hlen(seen_key(settings.redis_prefix)) == 0
    await client.aclose()


async def test_a_beat_asked_for_now_is_one_beat_then_the_interval_again(
        settings: Settings, client: redis.asyncio.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """beat_now brings one beat forward; it does not leave the loop writing without pause."""
    monkeypatch.setattr(health, "INTERVAL", 3600.0)
    beats = [0]

    def stats() -> dict[str, int]:
        beats[0] += 1
        return {}

    async with Heartbeat(client, settings.redis_prefix, "store", stats) as beat:
        await eventually(lambda: _one_seen(client, settings.redis_prefix), what="the first beat")
        beat.beat_now()
        await eventually(lambda: beats[0] >= 2, what="the beat asked for")
        for _ in range(50):  # as many round trips as a loop without pause would make beats
            await client.ping()
        assert beats[0] == 2
    await client.aclose()


async def test_a_heartbeat_goes_on_through_a_redis_outage(
        settings: Settings, client: redis.asyncio.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis away must not take a tier's heartbeat down: the beats that fail are logged,
    and the first one after Redis is back is written."""
    monkeypatch.setattr(health, "INTERVAL", 0.05)
    proxy = TcpProxy(6379)
    via_proxy = redis.asyncio.Redis.from_url(redis_at(settings, proxy.port).redis_url)
    key = health.heartbeat_key(settings.redis_prefix, "store")
    attempts = [0]

    def stats() -> dict[str, int]:
        attempts[0] += 1
        return {}

    try:
        async with Heartbeat(via_proxy, settings.redis_prefix, "store", stats):
            await eventually(lambda: client.exists(key), what="the first beat")
            proxy.cut()
            await client.delete(key)
            tried = attempts[0]
            await eventually(lambda: attempts[0] >= tried + 2, what="beats while Redis is away")
            proxy.start()
            await eventually(lambda: client.exists(key), what="a beat once Redis is back")
    finally:
        proxy.cut()
        await via_proxy.aclose()
        await client.aclose()


async def test_a_stop_with_redis_hung_does_not_wait_for_it(
        settings: Settings, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The stop's last write (taking the heartbeat off) gets no answer from a Redis that
    stopped answering: the stop gives up on it after 2 s whatever the client's own
    timeouts (here none: open_redis's 5 s are a setting of the caller's), and the key
    expires after its TTL."""
    monkeypatch.setattr(health, "INTERVAL", 3600.0)
    proxy = TcpProxy(6379)
    via_proxy = redis.asyncio.Redis.from_url(redis_at(settings, proxy.port).redis_url,
                                             socket_timeout=None)
    key = health.heartbeat_key(settings.redis_prefix, "store")
    try:
        async with asyncio.timeout(60):  # not how fast: that it ends at all
            async with Heartbeat(via_proxy, settings.redis_prefix, "store", dict):
                await eventually(lambda: client.exists(key), what="the first beat")
                proxy.hang()
        assert "did not stop cleanly" not in caplog.text  # the beat loop itself ended
        assert await client.exists(key)  # left to expire
    finally:
        proxy.cut()
        await via_proxy.aclose()
        await client.aclose()


async def test_a_process_of_its_tier_that_goes_after_it_started_stays_named(
        settings: Settings, client: redis.asyncio.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forgetting the processes a start replaces is done at the start only: a sibling
    filter killed later (it shares the port; nothing restarted it) is not replaced by this
    one, and status must go on naming it."""
    monkeypatch.setattr(health, "INTERVAL", 3600.0)
    here, prefix = socket.gethostname(), settings.redis_prefix
    ended = await asyncio.create_subprocess_exec("true")
    await ended.wait()
    own = f"filter:{here}:{os.getpid()}"
    sibling = f"filter:{here}:{ended.pid}"
    async with Heartbeat(client, prefix, "filter", dict) as beat:
        await eventually(lambda: _has_field(client, prefix, own), what="the first beat")
        first = json.loads(await client.hget(seen_key(prefix), own))["at"]
        await client.hset(seen_key(prefix), sibling, seen("filter", here, ended.pid, time.time()))
        beat.beat_now()
        await eventually(lambda: _seen_at(client, prefix, own, first), what="the next beat")
        assert await client.hexists(seen_key(prefix), sibling)
    await client.aclose()


async def _seen_at(client: redis.asyncio.Redis, prefix: str, field: str, before: float) -> bool:
    raw = await client.hget(seen_key(prefix), field)
    return raw is not None and json.loads(raw)["at"] != before


async def _reported(client: redis.asyncio.Redis, settings: Settings, connected: bool) -> bool:
    beats = await read_heartbeats(client, settings.redis_prefix)
    return [beat.get("consumer_connected") for beat in beats] == [connected]


async def test_a_process_that_starts_forgets_the_ones_of_its_tier_here_that_are_gone(
        settings: Settings, client: redis.asyncio.Redis) -> None:
    """`tiermail up` restarts a killed filter; the killed one was hidden only while its
    replacement reported, so after a clean stop of the stack status named it again for an
    hour. A start takes the gone ones of its tier on its host out for good."""
    here, now, prefix = socket.gethostname(), time.time(), settings.redis_prefix
    ended = await asyncio.create_subprocess_exec("true")
    await ended.wait()
    alive = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        await client.hset(seen_key(prefix), mapping={
            f"filter:{here}:{ended.pid}": seen("filter", here, ended.pid, now - 3),  # killed
            f"filter:{here}:{alive.pid}": seen("filter", here, alive.pid, now - 3),  # cut off
            f"store:{here}:{ended.pid}": seen("store", here, ended.pid, now - 3),  # other tier
            f"filter:elsewhere:{ended.pid}": seen("filter", "elsewhere", ended.pid, now - 3),
        })
        own = f"filter:{here}:{os.getpid()}"
        async with Heartbeat(client, prefix, "filter", dict):
            await eventually(lambda: _has_field(client, prefix, own), what="the first write")
            fields = {field.decode() for field in await client.hkeys(seen_key(prefix))}
        assert fields == {own, f"filter:{here}:{alive.pid}", f"store:{here}:{ended.pid}",
                          f"filter:elsewhere:{ended.pid}"}
    finally:
        alive.kill()
        await alive.wait()
        await client.aclose()


async def test_a_process_of_this_host_that_was_killed_is_named_at_once(
        settings: Settings, client: redis.asyncio.Redis) -> None:
    """A killed process's heartbeat lives on for its TTL (15 s), and status said it was
    reporting; on the host status runs on, whether the process still runs can be asked."""
    here, now, prefix = socket.gethostname(), time.time(), settings.redis_prefix
    ended = await asyncio.create_subprocess_exec("true")
    await ended.wait()
    alive = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        for pid in (ended.pid, alive.pid):
            beat = {"tier": "filter", "host": here, "pid": pid, "started": now - 100}
            await client.set(f"{prefix}health:filter:{here}:{pid}", json.dumps(beat), ex=TTL)
            await client.hset(seen_key(prefix), f"filter:{here}:{pid}",
                              seen("filter", here, pid, now - 1))
        beats = await read_heartbeats(client, prefix)
        assert [beat["pid"] for beat in beats] == [alive.pid]
        silent = await silent_processes(client, prefix, beats, now)
        assert [entry["pid"] for entry in silent] == [ended.pid]
    finally:
        alive.kill()
        await alive.wait()
        await client.aclose()


async def test_a_process_still_reporting_is_not_named_whatever_its_clock_says(
        settings: Settings, client: redis.asyncio.Redis) -> None:
    """Another host's `at` comes from its own clock: one 40 s behind status's host is still
    reporting, and is not said to have gone without stopping."""
    now, prefix = time.time(), settings.redis_prefix
    await client.hset(seen_key(prefix), "filter:slow-clock:6", seen("filter", "slow-clock", 6,
                                                                   now - 40))
    beats = [{"tier": "filter", "host": "slow-clock", "pid": 6, "started": now - 3600}]
    assert await silent_processes(client, prefix, beats, now) == []
    await client.aclose()


async def _has_field(client: redis.asyncio.Redis, prefix: str, field: str) -> bool:
    return bool(await client.hexists(seen_key(prefix), field))


async def _one_seen(client: redis.asyncio.Redis, prefix: str) -> bool:
    return await client.hlen(seen_key(prefix)) == 1
