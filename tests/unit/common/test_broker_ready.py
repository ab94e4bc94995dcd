"""Publisher.ready: how often an unreachable broker is tried (the filter asks at every MAIL
FROM, so a dead broker must not be dialled once per sender)."""

from __future__ import annotations

from typing import Any

import pytest

from common import broker
from common.broker import Publisher, PublishFailed, connect_failure
from common.topology import Topology


class OpenChannel:
    """Stands in for broker.open_channel: refuses until `up`, counts every attempt."""

    def __init__(self) -> None:
        self.up = False
        self.attempts = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.attempts += 1
        if not self.up:
            raise ConnectionRefusedError("Connect call failed ('127.0.0.1', 1)")
        channel = type("Channel", (), {"is_closed": False})()
        return object(), channel


@pytest.fixture
def dial(monkeypatch: pytest.MonkeyPatch) -> OpenChannel:
    fake = OpenChannel()
    monkeypatch.setattr(broker, "open_channel", fake)
    return fake


async def test_an_unreachable_broker_is_tried_once_per_interval(dial: OpenChannel) -> None:
    now = [100.0]
    publisher = Publisher("amqp://unused/", Topology("t"), retry_interval=1.0,
                          clock=lambda: now[0])
    assert await publisher.ready() is False
    assert await publisher.ready() is False
    with pytest.raises(PublishFailed, match="Connect call failed"):
        await publisher.ensure_connected()
    assert dial.attempts == 1  # the later two answered from the last failure

    now[0] += 1.0
    dial.up = True
    assert await publisher.ready() is True
    assert dial.attempts == 2
    assert await publisher.ready() is True  # connected: no new attempt
    assert dial.attempts == 2


def test_a_failure_without_words_still_reads_as_a_reason() -> None:
    """The store logged `broker session ended: StopAsyncIteration: ` when the broker
    connection closed under its consumer (found in review)."""
    assert connect_failure(StopAsyncIteration()) == "the broker connection closed"
    assert connect_failure(RuntimeError()) == "RuntimeError"
    assert connect_failure(RuntimeError("gone")) == "RuntimeError: gone"
