"""An idle filter's broker upkeep (services/filter/main.py _stay_connected): it reconnects
by itself and says once per outage that mail is being refused."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest

from common.broker import Publisher
from services.filter import main as filter_main


class FakePublisher:
    """The broker's state round by round: True connected, False down (ready() fails)."""

    def __init__(self, rounds: list[bool]) -> None:
        self.rounds = rounds
        self.connected = rounds[0]
        self.unreachable_because = "Connection refused"

    async def ready(self) -> bool:
        return False


async def _warnings_over(rounds: list[bool], monkeypatch: pytest.MonkeyPatch,
                         caplog: pytest.LogCaptureFixture) -> int:
    """How many `broker unreachable` warnings the upkeep logs over these rounds."""
    publisher = FakePublisher(rounds)
    left = list(rounds)
    done = asyncio.Event()

    async def next_round(seconds: float, wake: Any = None) -> bool:
        if not left:
            done.set()
            await asyncio.Event().wait()  # until cancelled
        publisher.connected = left.pop(0)
        return False

    monkeypatch.setattr(filter_main, "pause", next_round)
    with caplog.at_level(logging.WARNING, logger="services.filter.main"):
        task = asyncio.create_task(filter_main._stay_connected(cast(Publisher, publisher)))
        await done.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return sum(getattr(record, "event", "") == "amqp-unreachable" for record in caplog.records)


async def test_an_outage_is_said_once_however_long_it_lasts(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert await _warnings_over([False] * 5, monkeypatch, caplog) == 1


async def test_each_outage_after_the_broker_was_back_is_said_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert await _warnings_over([False, False, True, False, False], monkeypatch,
                                caplog) == 2
