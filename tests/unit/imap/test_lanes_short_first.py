"""Long commands let the short commands in progress finish first, but only for a while."""

from __future__ import annotations

import asyncio

from services.store.imap.lanes import CommandLanes


async def test_a_long_step_waits_for_the_short_commands_in_progress() -> None:
    commands = CommandLanes()
    order: list[str] = []
    release = asyncio.Event()

    async def short() -> None:
        with commands.short():
            await release.wait()
            order.append("short")

    async def long() -> None:
        async with commands.long() as turn:
            await turn.step()
            order.append("long step")

    task = asyncio.create_task(short())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(long())
    await asyncio.sleep(0.001)
    assert order == [], "the long command waits while the short one is in progress"
    release.set()
    await asyncio.gather(task, waiting)
    assert order == ["short", "long step"]


async def test_a_short_command_that_never_ends_does_not_stop_long_ones() -> None:
    commands = CommandLanes()
    steps = 0
    with commands.short():  # in progress for the whole test
        async with asyncio.timeout(30):  # fails the test instead of hanging it
            async with commands.long() as turn:
                for _ in range(3):
                    await turn.step()
                    steps += 1
    assert steps == 3
