"""The store's background loops that talk to Redis end on the first cancellation, with the
real Redis. Python 3.11's asyncio.wait_for, which redis-py sends each command through, can
return from a command as if a cancellation that arrived meanwhile had not (common/tasks.py):
a loop that then went on waiting with asyncio.sleep ran until cancelled again."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio

from common.directory import Directory
from common.redisconn import open_redis
from common.settings import Settings
from services.store import main as store_main
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MailDB
from services.store.quota import QuotaPublisher

CANCELS = 150
ROUND = 0.002  # seconds between a loop's rounds: many rounds, each with Redis calls
ENDS_WITHIN = 0.5  # seconds; the loops answer at once, a second request takes minutes here


@dataclass
class Parts:
    settings: Settings
    accounts: AccountDB
    maildb: MailDB
    client: redis.asyncio.Redis
    directory: Directory


@pytest.fixture
async def parts(settings: Settings) -> AsyncIterator[Parts]:
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.add_domain("example.test")
    accounts.add_user("alice@example.test", "not-a-real-hash")
    maildb = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
    client = open_redis(settings)
    directory = Directory(client, settings.redis_prefix)
    await directory.publish(accounts.snapshot())
    yield Parts(settings, accounts, maildb, client, directory)
    await maildb.close()
    await client.aclose()
    accounts.close()


def directory_publisher(parts: Parts) -> Coroutine[Any, Any, None]:
    return store_main._keep_directory_published(parts.directory, parts.accounts,
                                                asyncio.Event())


def quota_publisher(parts: Parts) -> Coroutine[Any, Any, None]:
    publisher = QuotaPublisher(parts.maildb, parts.accounts, parts.client,
                               parts.settings.redis_prefix, 1000, debounce=ROUND,
                               check_interval=ROUND)
    return publisher.run()


@pytest.mark.parametrize("loop", [directory_publisher, quota_publisher])
async def test_a_loop_cancelled_at_any_moment_ends_at_once(
        parts: Parts, loop: Callable[[Parts], Coroutine[Any, Any, None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_main, "DIRECTORY_CHECK_INTERVAL", ROUND)
    rng = random.Random(7)
    went_on = 0
    for _ in range(CANCELS):
        task = asyncio.create_task(loop(parts))
        await asyncio.sleep(rng.random() * 10 * ROUND)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=ENDS_WITHIN)
        if not done:
            went_on += 1
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=ENDS_WITHIN)
    assert went_on == 0, f"{went_on} of {CANCELS} cancelled loops went on"
