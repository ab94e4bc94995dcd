"""The store's heartbeat follows its consumer's connection (services/store/main.py), with the
real RabbitMQ and Redis, the store run in this process."""

from __future__ import annotations

import asyncio
import json

import pytest

from common import health
from common.redisconn import open_redis
from common.settings import Settings
from services.store import main as store_main
from tests.support import eventually


async def test_a_consumer_that_connects_is_reported_at_once_not_at_the_next_beat(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first beat goes out before the consumer has connected; the store beats again as
    soon as it has, so `tiermail status` does not show a store without a consumer for up to
    a heartbeat interval after each start or reconnect. With the interval at an hour, only
    that beat can say so."""
    monkeypatch.setattr(health, "INTERVAL", 3600.0)
    monkeypatch.setattr(store_main, "freeze_startup_objects", lambda: None)  # not pytest's
    client = open_redis(settings)
    key = health.heartbeat_key(settings.redis_prefix, "store")

    async def reported_connected() -> bool:
        beat = await client.get(key)
        return beat is not None and json.loads(beat).get("consumer_connected") is True

    stop = asyncio.Event()
    store = asyncio.create_task(store_main.run(settings, stop))
    try:
        await eventually(lambda: client.exists(key), within=60, what="the store's first beat")
        await eventually(reported_connected, within=60, what="a beat saying the consumer is on")
    finally:
        stop.set()
        await asyncio.wait_for(store, 60)
        await client.aclose()
