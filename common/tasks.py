"""Background tasks that stop when asked: waiting between rounds without missing a
cancellation, and stopping a task without trusting it to stop.

Python 3.11's `asyncio.wait_for` loses a cancellation that arrives as the work it waits for
finishes (fixed in 3.12). redis-py sends each command through it when a socket timeout is
set, as common/redisconn.py sets one, and aiormq waits through it too: a task cancelled
during such a call can come back from it as if nothing had happened. The request is still
counted (`Task.cancelling()`), but nothing will deliver it: a loop that goes on would run
until cancelled again. Measured against the local Redis: of 2,000 `GET`s cancelled a few loop
turns after they started, about 650 returned normally.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

ATTEMPTS = 3
WAIT = 2.0  # seconds for the task to end after each cancellation


def raise_if_cancelled() -> None:
    """Deliver a cancellation of this task that a library swallowed (see above). Inside an
    `asyncio.timeout` whose own cancellation was swallowed, the timeout then ends as
    TimeoutError, as it should."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (a stop, a deadline), not merely
    hit by a CancelledError from a future it awaited (aiormq cancels those when its
    connection closes)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def pause(seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Where a background loop waits between rounds: `seconds`, or until `wake` is set (True
    then). A cancellation swallowed during the round ends the task here."""
    raise_if_cancelled()
    if wake is None:
        await asyncio.sleep(seconds)
        return False
    try:
        async with asyncio.timeout(seconds):
            await wake.wait()
    except TimeoutError:
        return False
    return True


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it, asking again when it goes on (a task that does not
    wait through `pause` may never see a swallowed cancellation), and give up with an error
    logged rather than hang: a process shutting down must stop."""
    for _ in range(ATTEMPTS):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=WAIT)
        if done:
            return
    log.error("task %s did not stop", task.get_name())
