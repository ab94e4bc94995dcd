"""common/tasks.py: a loop's pause delivers a cancellation a library swallowed; stopping a
background task that does not stop when first asked."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from common import tasks


async def test_a_task_that_swallows_a_cancellation_is_asked_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "WAIT", 0.05)
    asked = 0

    async def stubborn() -> None:
        nonlocal asked
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                asked += 1
                if asked >= 2:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await tasks.stop_task(task)
    assert task.cancelled() and asked == 2


async def test_a_task_that_never_stops_is_given_up_on_not_waited_for_for_ever(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tasks, "WAIT", 0.05)
    stop = asyncio.Event()

    async def deaf() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf(), name="deaf")
    await asyncio.sleep(0)
    await tasks.stop_task(task)
    assert "task deaf did not stop" in caplog.text and not task.done()
    stop.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)


async def swallowing_call() -> None:
    """What redis-py's send does under 3.11's wait_for when a cancellation arrives as the
    write finishes: it returns, and the request stays counted."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)


async def test_a_cancellation_swallowed_during_a_round_ends_the_loop_at_its_pause() -> None:
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await swallowing_call()
            await tasks.pause(3600)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.cancelled() and rounds == 1


async def test_a_pause_with_an_event_ends_when_the_event_is_set_or_the_time_is_up() -> None:
    wake = asyncio.Event()
    assert await tasks.pause(0.01, wake) is False
    asyncio.get_running_loop().call_later(0.01, wake.set)
    assert await tasks.pause(3600, wake) is True


async def test_a_timeout_whose_cancellation_was_swallowed_ends_as_a_timeout() -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await swallowing_call()
            tasks.raise_if_cancelled()
    tasks.raise_if_cancelled()  # the timeout took back its own request: nothing pending
