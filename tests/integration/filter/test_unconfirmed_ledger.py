"""The ledger of unconfirmed publishes shared through the real Redis
(services/filter/unconfirmed.py): a worker that starts, or follows again after Redis went
away, knows what the other workers remembered meanwhile, and the entries last as long as
senders retry. Without that, a client's retry of an unconfirmed message reaching that worker
would get a new queue id, and the recipient a second copy."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from common.redisconn import REDIS_TIMEOUT, open_redis
from common.settings import Settings
from common.tasks import stop_task
from services.filter import unconfirmed
from services.filter.unconfirmed import RETRY_WINDOW, UnconfirmedLedger
from tests.support import TcpProxy, eventually, redis_at

FIRST, SECOND = "a" * 64, "b" * 64  # transaction digests


@contextlib.asynccontextmanager
async def writer(settings: Settings, socket_timeout: float = REDIS_TIMEOUT
                 ) -> AsyncIterator[UnconfirmedLedger]:
    """Another worker's ledger, which only remembers and forgets."""
    client = open_redis(settings, socket_timeout)
    try:
        yield UnconfirmedLedger(client, settings.redis_prefix)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def following(settings: Settings) -> AsyncIterator[UnconfirmedLedger]:
    """A worker's ledger, following the others' entries as a running worker does."""
    async with writer(settings) as ledger:
        task = asyncio.create_task(ledger.run())
        try:
            yield ledger
        finally:
            await stop_task(task)


async def test_a_worker_that_starts_later_knows_what_the_others_remembered(
        settings: Settings) -> None:
    """A worker started (a restart, a scale-up) after another was left unsure of a publish
    reuses that publish's queue id for the client's retry; what is remembered or forgotten
    later reaches it too. The entry lasts in Redis for the whole retry window (MTAs retry
    for days), not merely minutes."""
    key = f"{settings.redis_prefix}unconfirmed:{FIRST}"
    inspect = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        async with writer(settings) as first:
            await first.remember(FIRST, "QUEUEONE")
            assert RETRY_WINDOW - 60 < await inspect.ttl(key) <= RETRY_WINDOW + 1
            async with following(settings) as started:
                await eventually(lambda: started.queue_id_for(FIRST) == "QUEUEONE",
                                 within=20, what="the entry loaded at the start")
                await first.remember(SECOND, "QUEUETWO")
                await eventually(lambda: started.queue_id_for(SECOND) == "QUEUETWO",
                                 within=20, what="an entry announced later")
                first.forget(FIRST, "QUEUEONE")  # its retry was confirmed
                await eventually(lambda: started.queue_id_for(FIRST) is None,
                                 within=20, what="the entry forgotten")
                assert started.queue_id_for(SECOND) == "QUEUETWO"
                assert not await inspect.exists(key)
    finally:
        await inspect.aclose()


async def test_after_redis_went_away_a_worker_learns_what_it_missed(
        settings: Settings) -> None:
    """Entries announced while a worker's subscription was down are never heard: the worker
    reads them when it subscribes again."""
    proxy = TcpProxy(6379)
    try:
        async with writer(settings) as first, following(redis_at(settings, proxy.port)) as cut_off:
            await first.remember(FIRST, "QUEUEONE")
            await eventually(lambda: cut_off.queue_id_for(FIRST) == "QUEUEONE",
                             within=20, what="the entry announced")
            proxy.cut()
            await first.remember(SECOND, "QUEUETWO")  # announced to nobody on that side
            assert cut_off.queue_id_for(SECOND) is None
            proxy.start()
            await eventually(lambda: cut_off.queue_id_for(SECOND) == "QUEUETWO",
                             within=30, what="the missed entry loaded on subscribing again")
    finally:
        proxy.cut()


@pytest.mark.parametrize(("write_timeout", "socket_timeout"), [
    pytest.param(0.2, REDIS_TIMEOUT, id="asyncio-timeout"),  # WRITE_TIMEOUT runs out first
    pytest.param(30.0, 0.2, id="redis-timeout"),  # redis-py's TimeoutError comes first
])
async def test_a_hung_redis_leaves_the_entry_here_and_nothing_raising(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, write_timeout: float,
        socket_timeout: float) -> None:
    """Redis stops answering (a frozen process) while a worker remembers an unconfirmed
    publish: the write to Redis is given up, whichever timeout comes first, and the worker
    still knows the entry itself (its sender's retry, reaching it, reuses the queue id).
    Nothing is raised to the SMTP session (its reply stays the 451 4.3.0 of a publish not
    confirmed, not the internal error's) nor left unretrieved in a task, for this write
    or one made in the background (a client gone during its publish)."""
    monkeypatch.setattr(unconfirmed, "WRITE_TIMEOUT", write_timeout)
    loop = asyncio.get_running_loop()
    unhandled: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context["message"]))
    proxy = TcpProxy(6379)
    try:
        async with writer(redis_at(settings, proxy.port), socket_timeout) as ledger:
            proxy.hang()
            await ledger.remember(FIRST, "QUEUEONE")
            ledger.remember_soon(SECOND, "QUEUETWO")
            await eventually(lambda: not ledger._tasks, within=30,
                             what="the background write to end")
            assert ledger.queue_id_for(FIRST) == "QUEUEONE"
            assert ledger.queue_id_for(SECOND) == "QUEUETWO"
        gc.collect()  # an exception nobody retrieved is reported when its task is freed
    finally:
        loop.set_exception_handler(previous)
        proxy.cut()
    assert unhandled == []
