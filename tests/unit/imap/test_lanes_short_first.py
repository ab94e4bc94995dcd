"""Long commands let the short commands in progress finish first, but only for a while; a
long command that has held the lane for a while lets the other long ones go first."""

from __future__ import annotations

import asyncio

import pytest

from services.store.imap import lanes
from services.store.imap.lanes import LONG_SLICE, CommandLanes


async def short_until(commands: CommandLanes, release: asyncio.Event, order: list[str]) -> None:
    """A short command in progress until `release` is set."""
    with commands.short():
        await release.wait()
        order.append("short")


async def test_a_long_step_waits_for_the_short_commands_in_progress() -> None:
    commands = CommandLanes()
    order: list[str] = []
    release = asyncio.Event()

    async def long() -> None:
        async with commands.long() as turn:
            await turn.step()
            order.append("long step")

    task = asyncio.create_task(short_until(commands, release, order))
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


async def test_a_long_command_that_held_the_lane_long_enough_lets_waiting_ones_go_first(
        ) -> None:
    now = [0.0]
    commands = CommandLanes(clock=lambda: now[0])
    order: list[str] = []
    started = asyncio.Event()

    async def slow_search() -> None:
        async with commands.long() as turn:
            started.set()
            for step in range(3):
                await turn.step()
                order.append(f"search step {step}")
                now[0] += LONG_SLICE / 2
                await asyncio.sleep(0)  # its work awaits (reads in threads): others run

    async def select() -> None:
        await started.wait()
        async with commands.long():
            order.append("select")

    async with asyncio.timeout(30):
        await asyncio.gather(slow_search(), select())
    # Steps 0 and 1 within the slice; at the next step the SELECT waiting for the lane goes
    # first, and the search then carries on.
    assert order == ["search step 0", "search step 1", "select", "search step 2"]


async def test_a_long_command_alone_keeps_the_lane_whatever_its_time() -> None:
    now = [0.0]
    commands = CommandLanes(clock=lambda: now[0])
    async with commands.long() as turn:
        turns = commands.turns
        for _ in range(3):
            now[0] += 10 * LONG_SLICE
            await turn.step()
    assert commands.turns == turns  # nobody waiting: never given back and taken again


async def test_a_short_command_waiting_outside_its_turn_is_not_in_progress() -> None:
    """IDLE waiting for DONE, AUTHENTICATE for its response: long steps do not wait for it."""
    commands = CommandLanes()
    release = asyncio.Event()
    seen: list[int] = []

    async def idle() -> None:
        with commands.short() as turn:
            seen.append(commands.short_running)
            await turn.outside(release.wait())
            seen.append(commands.short_running)

    task = asyncio.create_task(idle())
    await asyncio.sleep(0)
    assert commands.short_running == 0
    async with asyncio.timeout(30), commands.long() as long_turn:
        await long_turn.step()  # not held up: nothing in progress
    release.set()
    await task
    assert seen == [1, 1] and commands.short_running == 0


async def test_a_short_command_begun_during_a_long_one_finishes_before_its_next_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only the short commands in progress when a long one takes the lane: one that
    began while the long command was running (a NOOP during a large FETCH) also finishes
    before the long command's next step. SHORT_FIRST_WAIT is long here, so the order does
    not depend on how quickly the short command ends."""
    monkeypatch.setattr(lanes, "SHORT_FIRST_WAIT", 30.0)
    commands = CommandLanes()
    order: list[str] = []
    release = asyncio.Event()

    async with asyncio.timeout(30):  # fails the test instead of hanging it
        async with commands.long() as turn:
            task = asyncio.create_task(short_until(commands, release, order))
            await asyncio.sleep(0)  # the short command is in progress now
            asyncio.get_running_loop().call_soon(release.set)
            await turn.step()
            order.append("long step")
        await task
    assert order == ["short", "long step"]
