"""Background loops of the tiers stop when cancelled, whatever else happens in that pass of
the event loop. Python 3.11's asyncio.wait_for returns the awaited result when its task is
cancelled in the same pass as the result arrives, dropping the cancellation: a quota
publisher cancelled just as a change came in ran on, and the store's shutdown (and a CI
run's teardown, for 600 s) waited for it forever. asyncio.timeout keeps the cancellation."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import redis.asyncio

from services.store.quota import USAGE_KINDS, QuotaPublisher

REPO = Path(__file__).resolve().parents[3]


async def _nothing() -> None:
    return None


async def test_the_quota_publisher_stops_when_cancelled_as_a_change_arrives() -> None:
    client = redis.asyncio.Redis()  # never connected: the publisher is stopped first
    publisher = QuotaPublisher(cast(Any, None), cast(Any, None), client, "t:", 0,
                               check_interval=60)
    publisher.reconcile = _nothing  # type: ignore[method-assign]
    task = asyncio.create_task(publisher.run())
    for _ in range(20):  # into its wait for changes
        await asyncio.sleep(0)
    try:
        publisher.on_change(cast(Any, SimpleNamespace(kind=min(USAGE_KINDS), user="u")))
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done and task.cancelled()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


def test_no_tier_code_uses_asyncio_wait_for() -> None:
    used = []
    for path in sorted([*REPO.glob("services/**/*.py"), *REPO.glob("common/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "wait_for"
                    and isinstance(node.value, ast.Name) and node.value.id == "asyncio"):
                used.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert used == [], "use asyncio.timeout (see this module's docstring)"
