"""How every tier opens Redis: with a bound on each wait.

A Redis that stops answering (a frozen process, a network that drops packets without a reset)
must cost each call a bounded wait, never hang a tier: the filter then answers 451 at RCPT,
the store's logins and background publishers carry on without it (ARCHITECTURE.md, failure
contract). redis-py happens to default to 5 s in the version we use; it is set here so that a
new default cannot quietly take the bound away.
"""

from __future__ import annotations

import redis.asyncio

from common.settings import Settings

REDIS_TIMEOUT = 5.0  # seconds for connecting and for each reply


def open_redis(settings: Settings, timeout: float = REDIS_TIMEOUT) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(settings.redis_url, socket_connect_timeout=timeout,
                                        socket_timeout=timeout)
