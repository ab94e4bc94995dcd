"""Publishing which mailboxes are over quota, so the filter tier can answer 452 4.2.2 at RCPT.

The store is the only one that knows usage (MailDB.usage) and the authority on quotas
(AccountDB); the filter reads the result from Redis in the same round trip as the recipient's
directory entry (common/directory.py: dir:overquota, dir:usage).

- After every committed change that can move usage (MailDB listener, in the event loop) the
  user is marked dirty; a background task recomputes the dirty users' usage a moment later
  (DEBOUNCE: one burst of deliveries or an IMAP session's flurry is one recomputation), off
  the command's path.
- A full reconcile (every user that has a limit) runs at start (always: the previous store
  may have stopped before publishing its last changes) and when Redis lost the state, at
  most as often as keeps it to RECONCILE_SHARE of the time (a Redis short of memory under
  an evicting policy could lose a key again after each one).
- When the account database's generation differs from the one Redis's quota state is at
  (every account change bumps it: a quota set with `tiermail user quota`, a user added or
  deleted, a password), only the users whose limit differs from the one Redis holds are
  recomputed (and those whose limit was lifted or who were deleted are cleared): a password
  change on a site of 100,000 limited accounts must not read 100,000 indexes. Usage of the
  others is kept current by the change events above. (The CLI also updates a user's flag at
  once when it sets a quota.)
- Redis down: retried with backoff; the store keeps working (the filter answers 451 without
  Redis anyway).

"Over quota" means usage >= limit: a full mailbox takes no more mail at RCPT. Delivery itself
does not enforce quotas (a message accepted just before the mailbox filled is delivered);
APPEND and COPY do (IMAP, OverQuota; MOVE adds nothing).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterable

import redis.asyncio

from common.directory import Directory, QuotaState
from common.tasks import pause
from services.store.backends.accounts import AccountDB, effective_quota
from services.store.mailbox import ChangeEvent, MailStore, StorageError

log = logging.getLogger(__name__)

DEBOUNCE = 0.5  # seconds between the first change and the recomputation
CHECK_INTERVAL = 5.0  # seconds between checks of the account generation and Redis's state
RETRY_MAX = 30.0
# The most of its time the store spends on reconciles that a loss in Redis asked for: after
# one that took T seconds the next waits until T / RECONCILE_SHARE have passed since it began
# (some 23 s each at 100,000 limited accounts: one every four minutes at most).
RECONCILE_SHARE = 0.1
USAGE_KINDS = frozenset({"deliver", "append", "expunge", "copy", "move", "mailbox"})


# What reading an account's usage can fail with when its index cannot be used (damaged,
# written by a newer store, a migration out of space): the account is left as it was.
UNREADABLE = (sqlite3.Error, OSError, StorageError)


class QuotaPublisher:
    def __init__(self, maildb: MailStore, accounts: AccountDB, redis: redis.asyncio.Redis,
                 prefix: str, default_quota: int, *, debounce: float = DEBOUNCE,
                 check_interval: float = CHECK_INTERVAL,
                 reconcile_share: float = RECONCILE_SHARE) -> None:
        self._maildb = maildb
        self._accounts = accounts
        self._directory = Directory(redis, prefix)
        self._default = default_quota
        self._debounce = debounce
        self._check_interval = check_interval
        self._reconcile_share = reconcile_share
        self._last_reconcile = (0.0, 0.0)  # (monotonic start, seconds it took)
        self._dirty: set[str] = set()
        self._changed = asyncio.Event()
        self._unusable: set[str] = set()  # users whose index could not be read, logged

    def on_change(self, event: ChangeEvent) -> None:
        """MailDB listener: cheap, never blocks (the work happens in `run`)."""
        if event.kind in USAGE_KINDS:
            self._dirty.add(event.user)
            self._changed.set()

    async def run(self) -> None:
        """Keep Redis's quota state current until cancelled. The first pass reconciles
        whatever generation Redis holds: a store that stopped (or was killed) between a
        change and its debounced flush left usage in Redis that no generation reveals."""
        delay = 0.5
        check = self.reconcile
        while True:
            try:
                await check()
                check = self._reconcile_if_stale
                await self._wait_for_changes()
                await self.flush()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("quota state not published (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay, extra={"event": "quota"})
                await pause(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def reconcile(self) -> None:
        """Recompute every user that has a limit and replace the over-quota set."""
        started = time.monotonic()
        generation = await asyncio.to_thread(self._accounts.generation)
        states = await self._states(await self._current_limits())
        await self._directory.replace_quota_states(states, generation)
        self._last_reconcile = (started, time.monotonic() - started)
        log.info("quota state reconciled: %d limited mailboxes, %d over quota",
                 len(states), sum(state.over for state in states.values()),
                 extra={"event": "quota"})

    async def flush(self) -> None:
        """Publish the state of the users changed since the last flush."""
        self._changed.clear()
        users, self._dirty = self._dirty, set()
        if not users:
            return
        try:
            limits = await asyncio.to_thread(self._limits, users)
            states = await self._states({u: limit for u, limit in limits.items() if limit})
            # A user without a limit is never over it (reconcile removes one whose limit was
            # just lifted, as that changes the account generation).
            await self._directory.set_quota_states(states)
        except BaseException:
            self._dirty |= users
            raise

    async def _reconcile_if_stale(self) -> None:
        current = await asyncio.to_thread(self._accounts.generation)
        published, lost = await self._directory.quota_state()
        if lost:
            # An eviction (maxmemory-policy: tiermail status says so) or a DEL: every limited
            # account's usage is read again, at most RECONCILE_SHARE of the time.
            if self._reconcile_due():
                log.warning("quota state lost in Redis (%s): reconciling every account",
                            ", ".join(lost), extra={"event": "quota-lost"})
                await self.reconcile()
        elif published != current:
            await self._apply_limit_changes(current)

    def _reconcile_due(self) -> bool:
        started, took = self._last_reconcile
        return time.monotonic() - started >= took / self._reconcile_share

    async def _apply_limit_changes(self, generation: int) -> None:
        """Bring Redis's limits to the account database's at `generation`, reading the usage
        of the users whose limit changed only."""
        limits = await self._current_limits()
        published = await self._directory.quota_limits()
        states = await self._states({user: limit for user, limit in limits.items()
                                     if published.get(user) != limit})
        for user in published.keys() - limits.keys():  # lifted, or the user deleted
            states[user] = QuotaState(await self._usage_if_readable(user), False, None)
        await self._directory.set_quota_states(states, generation=generation)
        if states:
            log.info("quota state updated after account changes: %d mailboxes, %d over quota",
                     len(states), sum(state.over for state in states.values()),
                     extra={"event": "quota"})

    async def _current_limits(self) -> dict[str, int]:
        """Every user that has a limit, with it (the default applied)."""
        stored = await asyncio.to_thread(self._accounts.stored_quotas)
        return {user: limit for user, quota in stored.items()
                if (limit := effective_quota(quota, self._default))}

    async def _wait_for_changes(self) -> None:
        if await pause(self._check_interval, self._changed):
            await asyncio.sleep(self._debounce)

    def _limits(self, users: Iterable[str]) -> dict[str, int | None]:
        return {user: self._accounts.quota(user, self._default) for user in users}

    async def _states(self, limits: dict[str, int]) -> dict[str, QuotaState]:
        """The state of each user whose usage can be read. One whose index is damaged is
        left out (logged once): it must not keep every other account's state unpublished."""
        states = {}
        for user, limit in limits.items():
            try:
                usage = await self._maildb.usage(user)
            except UNREADABLE as exc:
                self._unreadable(user, exc)
                continue
            self._unusable.discard(user)
            states[user] = QuotaState(usage, usage >= limit, limit)
        return states

    def _unreadable(self, user: str, exc: Exception) -> None:
        if user not in self._unusable:
            self._unusable.add(user)
            log.error("quota of %s not computed: its index cannot be read (%s: %s); the "
                      "other accounts' are published", user, type(exc).__name__, exc,
                      extra={"event": "quota-index-unusable", "user": user})

    async def _usage_if_readable(self, user: str) -> int:
        """The usage of a user without a limit (only shown, never compared): 0 when the
        index cannot be read."""
        try:
            return await self._maildb.usage(user)
        except UNREADABLE:
            return 0
