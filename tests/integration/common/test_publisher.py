"""The filter's publisher against the real broker: one message that cannot be published does
not cost the other sessions their shared connection."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from common.broker import Publisher
from common.settings import Settings
from tests.integration.store.helpers import make_message
from tests.support import queue_depth


async def test_an_envelope_that_cannot_be_encoded_fails_alone(settings: Settings) -> None:
    publisher = Publisher(settings.amqp_url, settings.topology)
    try:
        await publisher.ensure_connected()
        connection = publisher._connection  # noqa: SLF001 - the one the sessions share
        envelope, body = make_message("alice@example.test")
        # What a sender's non-UTF-8 octets look like once decoded with surrogateescape.
        broken = dataclasses.replace(envelope, client_helo="x\udcff.example")
        with pytest.raises(UnicodeEncodeError):
            await publisher.publish(broken, body)
        assert publisher.connected and publisher._connection is connection  # noqa: SLF001
        await publisher.publish(*make_message("alice@example.test"))
    finally:
        await publisher.close()
    assert await asyncio.to_thread(queue_depth, settings) == 1
