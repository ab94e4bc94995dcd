"""A session's wait for its client, cut short from outside when its account is deleted
(services/store/listening.py, ClientWait): at once while it waits, at the next wait
otherwise, and never losing what the client had sent."""

from __future__ import annotations

import asyncio

import pytest

from services.store.listening import ClientWait, SessionEnded

LONG = 60.0  # a wait no test lets run out


async def test_an_end_while_waiting_ends_the_wait_and_keeps_what_arrives() -> None:
    wait, reader = ClientWait(), asyncio.StreamReader()

    async def read() -> bytes:
        async with wait.within(LONG):
            return await reader.readuntil(b"\n")

    task = asyncio.create_task(read())
    reader.feed_data(b"half a li")
    await asyncio.sleep(0)  # the task waits for the rest of the line
    wait.end()
    with pytest.raises(SessionEnded):
        async with asyncio.timeout(10):  # at once: not when the LONG wait runs out
            await task
    reader.feed_data(b"ne\n")
    assert await reader.readuntil(b"\n") == b"half a line\n"


async def test_an_end_between_waits_ends_the_next_one_before_it_waits() -> None:
    wait, reader = ClientWait(), asyncio.StreamReader()
    reader.feed_data(b"NOOP\n")
    async with wait.within(LONG):
        assert await reader.readuntil(b"\n") == b"NOOP\n"
    wait.end()  # the session is answering: nothing to cut short
    wait.end()
    with pytest.raises(SessionEnded):
        async with wait.within(LONG):
            pytest.fail("a wait began after the end")


async def test_without_an_end_a_wait_still_times_out() -> None:
    wait, reader = ClientWait(), asyncio.StreamReader()
    with pytest.raises(TimeoutError):
        async with wait.within(0.01):
            await reader.read(1)
    assert not wait.ended
