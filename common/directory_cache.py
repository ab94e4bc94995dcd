"""Recipient lookups remembered in a filter worker, forgotten whenever the directory changes.

Every RCPT TO otherwise costs a Redis round trip of several commands (common/directory.py,
`Directory.resolve`): with one message per connection that is about a fifth of the filter's
CPU. Every writer of the directory publishes on `<prefix>dir:changed` in the same MULTI as
its change (`Directory._changed`), and the cache forgets everything on each notice.

Trust comes only from a live subscription (common/directory_notices.py):
- entries are kept and served only while the subscription is confirmed and answering (a
  PING every `PING_INTERVAL` seconds of silence; no answer within `DEAD_AFTER` ends it);
- when the subscription ends (Redis gone, restarted, cut off), everything is forgotten and
  nothing is kept until a new one is confirmed, so each RCPT goes to Redis and answers 451
  while Redis is away, as without the cache;
- a lookup that fails forgets everything too;
- a lookup that started before a change notice arrived is not kept (the generation check),
  so a change that races with a lookup cannot leave a stale entry behind;
- entries expire after `ttl` seconds regardless, which bounds what a change made behind the
  notices' back (a FLUSHALL, a hand edit) can leave standing.

Negative answers (unknown user, not a local domain) are kept too; the cache is emptied when
it reaches `max_entries`, so random-address spam cannot grow it without bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.directory import Directory, Lookup, normalize_address
from common.directory_notices import Message, follow_notices

log = logging.getLogger(__name__)


class DirectoryCache:
    def __init__(self, directory: Directory, redis: Redis, *, ttl: float = 60.0,
                 max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._directory = directory
        self._redis = redis
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Lookup]] = {}
        self._generation = 0
        self._live = False

    @property
    def live(self) -> bool:
        return self._live

    async def resolve(self, address: str) -> Lookup:
        key = normalize_address(address)
        if self._live:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > self._clock():
                return entry[1]
        generation = self._generation
        try:
            lookup = await self._directory.resolve(address)
        except RedisError:
            self.forget_all()
            raise
        if self._live and generation == self._generation:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = (self._clock() + self._ttl, lookup)
        return lookup

    async def usages(self, mailboxes: Sequence[str]) -> list[int]:
        """Never cached: usage moves with every delivery, with no notice."""
        return await self._directory.usages(mailboxes)

    def forget_all(self) -> None:
        self._entries.clear()
        self._generation += 1

    async def run(self) -> None:
        """Keep a subscription to the change notices, reconnecting forever; until cancelled."""
        await follow_notices(self._redis, self._directory, self._on_message,
                             lambda: self._set_live(False), name="directory cache",
                             clock=self._clock)

    def _on_message(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._set_live(True)
        elif kind == "message":
            self.forget_all()

    def _set_live(self, live: bool) -> None:
        self.forget_all()
        if live and not self._live:
            log.info("directory cache on", extra={"event": "directory-cache-on"})
        self._live = live
