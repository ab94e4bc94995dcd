"""A filter worker's counters (services/filter/stats.py), as `tiermail status` shows them."""

from __future__ import annotations

import pytest

from services.filter.protocol import replies
from services.filter.stats import WorkerStats


@pytest.mark.parametrize(("reply", "rejected", "tempfailed"), [
    (replies.UNKNOWN_USER, 1, 0),  # refused for good: the sender gives up
    (replies.LARGER_THAN_QUOTA, 1, 0),
    (replies.QUEUE_UNAVAILABLE, 0, 1),  # the sender keeps the message and retries
    (replies.TOO_MANY_CONNECTIONS, 0, 1),
    (replies.QUEUED.format(queue_id="Q1"), 0, 0),
    (replies.OK, 0, 0),
])
def test_permanent_and_temporary_refusals_are_counted_apart(
        reply: str, rejected: int, tempfailed: int) -> None:
    """An operator reading 5xx refusals where the senders were only told to retry (or the
    other way round) would look for the wrong fault."""
    stats = WorkerStats()
    stats.count_reply(reply)
    assert (stats.rejected, stats.tempfailed) == (rejected, tempfailed)
