"""common/tasks.py: stopping a background task that does not stop when first asked."""

from __future__ import annotations

import asyncio

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
