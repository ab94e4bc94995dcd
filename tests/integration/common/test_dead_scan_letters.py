"""A message the scan queue dead-letters was never scanned: `tiermail deadletters` says so, and
`retry` sends it back to the scan queue, never straight to the store (under
TIERMAIL_SCAN_FAILURE=defer no unscanned message may reach a mailbox)."""

from __future__ import annotations

import asyncio
import json

from pamqp.commands import Basic

from common.broker import close_connection, open_channel
from common.settings import Settings
from common.topology import SCAN_DELIVERY_LIMIT, SCAN_ROUTING_KEY, message_properties
from tests.integration.store.helpers import make_message, queue_counts
from tests.support import delivery_queues, eventually, run_cli

ALICE = "alice@example.test"


async def _dead_lettered_by_the_scan_queue(settings: Settings) -> str:
    """A deferred message that a drainer gives back every time (a scanner that fails on it,
    a worker that crashes on it), until the scan queue's delivery limit dead-letters it."""
    topology = settings.topology
    connection, channel = await open_channel(settings.amqp_url, topology, 5.0, confirms=True)
    try:
        envelope, body = make_message(ALICE)
        await channel.basic_publish(body, exchange=topology.inbound_exchange,
                                    routing_key=SCAN_ROUTING_KEY, mandatory=True,
                                    properties=message_properties(envelope))

        async def given_back_until_dead() -> bool:
            got = await channel.basic_get(topology.scan_queue, no_ack=False)
            if isinstance(got.delivery, Basic.GetOk):
                await channel.basic_nack(got.delivery_tag or 0, requeue=True)
                return False
            return await queue_counts(settings, topology.dead_queue) == 1

        await eventually(given_back_until_dead, within=60 + SCAN_DELIVERY_LIMIT / 10,
                         what="the scan queue's delivery limit to dead-letter the message")
    finally:
        await close_connection(connection)
    return envelope.queue_id


async def test_a_dead_letter_of_the_scan_queue_is_retried_into_the_scan_queue(
        settings: Settings) -> None:
    topology = settings.topology
    queue_id = await _dead_lettered_by_the_scan_queue(settings)

    listing = await asyncio.to_thread(run_cli, settings, "deadletters", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    (held,) = json.loads(listing.stdout)["messages"]
    assert held["queue_id"] == queue_id
    assert held["reason"].startswith("not scanned"), held

    retried = await asyncio.to_thread(run_cli, settings, "deadletters", "retry", queue_id)
    assert retried.returncode == 0, retried.stderr
    assert await queue_counts(settings, topology.dead_queue) == 0
    assert [await queue_counts(settings, queue) for queue in delivery_queues(settings)] == [0, 0]
    assert await queue_counts(settings, topology.scan_queue) == 1


async def test_a_dead_letter_of_the_scan_queue_that_is_dropped_is_said_dropped(
        settings: Settings) -> None:
    """Only a retry sends one back to be scanned: a drop says it dropped it."""
    queue_id = await _dead_lettered_by_the_scan_queue(settings)
    dropped = await asyncio.to_thread(run_cli, settings, "deadletters", "drop", queue_id)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout == f"{queue_id} dropped\n1 message dropped\n"
    assert await queue_counts(settings, settings.topology.dead_queue) == 0
    assert await queue_counts(settings, settings.topology.scan_queue) == 0
