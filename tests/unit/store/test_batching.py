"""When the delivery consumer waits for a fuller batch (services/store/batching.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from common.settings import Settings
from services.store.batching import ArrivalPace
from services.store.consumer import BATCH_TARGET, Consumer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def arrivals(pace: ArrivalPace, clock: Clock, count: int, every: float) -> None:
    for _ in range(count):
        clock.now += every
        pace.arrived()


def test_a_batch_worth_of_arrivals_within_the_window_is_worth_waiting_for() -> None:
    clock = Clock()
    pace = ArrivalPace(16, 0.02, clock)
    arrivals(pace, clock, 16, 0.001)
    assert pace.fills_batch()


def test_fewer_arrivals_than_a_batch_are_not() -> None:
    clock = Clock()
    pace = ArrivalPace(16, 0.02, clock)
    assert not pace.fills_batch()
    arrivals(pace, clock, 15, 0.0001)
    assert not pace.fills_batch()


def test_a_steady_stream_too_slow_to_fill_a_batch_within_the_window_is_not() -> None:
    # 400 messages a second: 16 take 40 ms, twice the window. Waiting would only delay each.
    clock = Clock()
    pace = ArrivalPace(16, 0.02, clock)
    arrivals(pace, clock, 1000, 0.0025)
    assert not pace.fills_batch()


def test_the_pace_is_of_the_recent_arrivals_and_ages() -> None:
    clock = Clock()
    pace = ArrivalPace(16, 0.02, clock)
    arrivals(pace, clock, 100, 0.01)  # slow
    arrivals(pace, clock, 16, 0.0005)  # then a burst
    assert pace.fills_batch()
    clock.now += 0.05  # and then nothing: the burst is over
    assert not pace.fills_batch()


def consumer_with_waiting(count: int, window: float) -> tuple[Consumer, asyncio.Queue[Any]]:
    """A consumer (no broker: only its batch gathering is used) with `count` messages
    waiting in its inbox besides the one its batch starts with."""
    consumer = Consumer(Settings(store_batch_wait=window), cast(Any, None), cast(Any, None))
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(count):
        inbox.put_nowait(object())
    return consumer, inbox


async def test_a_consumer_at_a_slow_pace_stores_what_is_waiting_at_once() -> None:
    consumer, inbox = consumer_with_waiting(2, window=30.0)
    clock = Clock()
    consumer._pace = ArrivalPace(BATCH_TARGET, 30.0, clock)
    arrivals(consumer._pace, clock, 100, 3.0)  # 16 take 45 s: more than the 30 s wait
    async with asyncio.timeout(5):  # would be the 30 s wait if the pace were ignored
        await consumer._gather(inbox)
    assert inbox.qsize() == 2


async def test_a_consumer_at_a_fast_pace_waits_for_a_fuller_batch() -> None:
    consumer, inbox = consumer_with_waiting(2, window=30.0)
    for _ in range(BATCH_TARGET):
        consumer._pace.arrived()

    async def more_arrive() -> None:
        await asyncio.sleep(0.05)
        for _ in range(BATCH_TARGET):
            inbox.put_nowait(object())
            consumer._more.set()

    async with asyncio.timeout(5):
        gathering = asyncio.create_task(consumer._gather(inbox))
        await more_arrive()
        await gathering
    assert inbox.qsize() >= BATCH_TARGET - 1  # it waited for them, and not the whole 30 s


async def test_a_consumer_with_a_whole_batch_waiting_does_not_wait_for_more() -> None:
    """BATCH_TARGET messages in hand (the first and those waiting) make a whole batch: it
    is stored at once, not after the wait for one more."""
    consumer, inbox = consumer_with_waiting(BATCH_TARGET - 1, window=3600.0)
    for _ in range(BATCH_TARGET):
        consumer._pace.arrived()
    async with asyncio.timeout(60):  # a bound on the hour-long wait, not a measurement
        await consumer._gather(inbox)
    assert inbox.qsize() == BATCH_TARGET - 1
