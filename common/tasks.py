"""Stopping a background task without trusting it to stop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

ATTEMPTS = 3
WAIT = 2.0  # seconds for the task to end after each cancellation


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it, asking again when it goes on (redis-py can swallow a
    cancellation that lands mid-connect; asyncio.wait_for in 3.11 can lose one that lands as
    its inner await finishes), and give up with an error logged rather than hang: a process
    shutting down must stop."""
    for _ in range(ATTEMPTS):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=WAIT)
        if done:
            return
    log.error("task %s did not stop", task.get_name())
