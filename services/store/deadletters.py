"""The store's dead-letter queue, for `tiermail status` and operators.

Messages land there when they cannot be decoded, when a mailbox owner no longer exists (a copy
with an `x-tiermail-reason` header), or after `delivery_attempts` failed deliveries.
"""

from __future__ import annotations

import asyncio

import aiormq

from common.settings import Settings


async def dead_letter_count(settings: Settings, connect_timeout: float = 5.0) -> int:
    """Messages waiting in the dead-letter queue (0 if the topology was never declared).

    Raises the connection error when the broker is unreachable; the caller reports it.
    """
    connection = await asyncio.wait_for(aiormq.connect(settings.amqp_url), connect_timeout)
    try:
        channel = await connection.channel()
        try:
            ok = await channel.queue_declare(settings.topology.dead_queue, passive=True)
        except aiormq.ChannelNotFoundEntity:
            return 0
        return int(ok.message_count or 0)
    finally:
        await connection.close()
