"""Following the directory's change notices (`<prefix>dir:changed`, common/directory.py).

Every writer of the directory publishes a notice in the same MULTI as its change. A follower
keeps a subscription to them for as long as it runs, and trusts it only while Redis answers
it: after PING_INTERVAL seconds of silence it sends a PING, and when nothing at all has come
for DEAD_AFTER seconds (a Redis that froze, a network that drops packets) the subscription is
over and a new one is made, as when Redis goes away or restarts.

Used by the filter's lookup cache (common/directory_cache.py) and by the store, which ends
the sessions of deleted accounts (services/store/logins.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.directory import Directory
from common.tasks import pause

log = logging.getLogger(__name__)

PING_INTERVAL = 2.0
DEAD_AFTER = 3 * PING_INTERVAL
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0

Message = dict[str, Any]


async def follow_notices(redis: Redis, directory: Directory,
                         on_message: Callable[[Message], None], on_lost: Callable[[], None],
                         *, name: str, clock: Callable[[], float] = time.monotonic) -> None:
    """Hand `on_message` every message of the subscription: its confirmation (type
    "subscribe": from then on no change goes unheard) and each notice (type "message").
    When a subscription ends, `on_lost()`, a pause, and a new one; until cancelled. `name`
    says who follows, in the log line of a lost subscription."""
    await follow_channel(redis, directory.key(Directory.CHANGED), on_message, on_lost,
                         name=name, clock=clock)


async def follow_channel(redis: Redis, channel: str, on_message: Callable[[Message], None],
                         on_lost: Callable[[], None], *, name: str,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """`follow_notices` for any channel (the filter's ledger of unconfirmed publishes,
    services/filter/unconfirmed.py, follows its own the same way)."""
    delay = RECONNECT_MIN
    while True:
        started = clock()
        try:
            await _subscription(redis, channel, on_message, clock)
        except (RedisError, OSError) as exc:
            if clock() - started > DEAD_AFTER:
                delay = RECONNECT_MIN
            log.info("%s off: %s: %s", name, type(exc).__name__, exc,
                     extra={"event": f"{name.replace(' ', '-')}-off"})
        finally:
            on_lost()
        await pause(delay)
        delay = min(delay * 2, RECONNECT_MAX)


async def _subscription(redis: Redis, channel: str, on_message: Callable[[Message], None],
                        clock: Callable[[], float]) -> None:
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(channel)
        heard = clock()
        while True:
            message = await pubsub.get_message(timeout=PING_INTERVAL)
            if message is None:
                if clock() - heard > DEAD_AFTER:
                    raise ConnectionError(f"channel {channel} stopped answering")
                await pubsub.ping()
                continue
            heard = clock()
            on_message(message)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()
