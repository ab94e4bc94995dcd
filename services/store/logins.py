"""The accounts logged in to the store's IMAP and POP3 sessions, and the end of the sessions
of an account that is deleted (`tiermail user del`), as Dovecot's `doveadm kick` ends them.

The CLI changes the account database and the Redis directory itself, not through the store,
so the store has to notice. It looks at the account database (the authority, on its own
disk), and it looks:
- at once on every directory change notice (`<prefix>dir:changed`): the CLI publishes one
  when it mirrors the change into Redis (common/directory_notices.py);
- and every CHECK_INTERVAL seconds whatever Redis does: while Redis is down, or when the CLI
  could not mirror a change (it warns), a deletion is noticed this much later.
A look reads the database's change counter (`AccountDB.generation`); only when it moved are
the logged-in accounts looked up (500 to a query), and the sessions of those that no longer
exist are ended, and those logged in to an earlier account of the same address (deleted and
added again between two looks: its creation time differs).

The sessions end the next time they wait for their client (`listening.ClientWait`): what a
command is writing is finished first. IMAP then says `* BYE Account deleted`; POP3 says
`-ERR account deleted` and leaves without UPDATE, so the session's DELEs are not committed.

A changed password (`tiermail user passwd`) ends no session, as in Dovecot: the next login
needs the new one.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

from redis.asyncio import Redis

from common.directory import Directory
from common.directory_notices import follow_notices
from common.tasks import pause, stop_task
from services.store.backends.accounts import AccountDB

log = logging.getLogger(__name__)

CHECK_INTERVAL = 5.0  # seconds between looks without a change notice

End = Callable[[], None]


class Logins:
    """Who is logged in, by account. `accounts` should be a connection of its own: one
    that another task holds in a read transaction (a directory snapshot) would show the
    database as it was when that began, and a deletion could be missed."""

    def __init__(self, accounts: AccountDB) -> None:
        self._accounts = accounts
        self._sessions: dict[str, dict[End, float | None]] = {}
        self._generation: int | None = None

    def __len__(self) -> int:
        return sum(len(ends) for ends in self._sessions.values())

    async def admit(self, user: str, end: End) -> End | None:
        """Count a session of `user`, whose password was just found right; `end()` ends it
        when the account is deleted. Returns what takes the session out again (call it once,
        when the session ends), or None, counting nothing, when the account is gone by now
        (deleted while the password was checked): the login then fails."""
        ends = self._sessions.setdefault(user, {})
        ends[end] = None  # the account's creation time, once looked up

        def leave() -> None:
            ends.pop(end, None)
            if not ends and self._sessions.get(user) is ends:
                del self._sessions[user]

        # Counted first: a deletion committed from now on is found by `end_deleted`, one
        # committed before by this look.
        created = await asyncio.to_thread(self._accounts.user_created, user)
        if created is None:
            leave()
            return None
        if end in ends:
            ends[end] = created
        return leave

    async def end_deleted(self) -> int:
        """End the sessions of accounts that no longer exist, when the account database
        changed since the last look; how many were ended."""
        generation = await asyncio.to_thread(self._accounts.generation)
        if generation == self._generation:
            return 0
        self._generation = generation  # first: a change during the lookup moves it again
        if not self._sessions:
            return 0
        current = await asyncio.to_thread(self._accounts.users_created, list(self._sessions))
        ended = 0
        undecided = False
        for user, ends in sorted(self._sessions.items()):
            # Another creation time: the account was deleted and added again meanwhile.
            stale = [end for end, created in ends.items()
                     if created is not None and created != current.get(user)]
            undecided |= None in ends.values()
            if stale:
                log.info("account deleted: ending its %d session(s)", len(stale),
                         extra={"user": user, "event": "sessions-ended"})
            for end in stale:
                end()
            ended += len(stale)
        if undecided:
            self._generation = None  # a login's own look was under way: look again next time
        return ended


async def end_sessions_of_deleted_accounts(logins: Logins, redis: Redis, directory: Directory,
                                           interval: float = CHECK_INTERVAL) -> None:
    """Look for deleted accounts on every directory change notice and every `interval`
    seconds; until cancelled."""
    notice = asyncio.Event()
    # Any message: a notice, or a (new) subscription's confirmation, before which notices
    # may have been missed.
    following = asyncio.create_task(
        follow_notices(redis, directory, lambda _message: notice.set(), lambda: None,
                       name="account change notices"),
        name="account-change-notices")
    try:
        while True:
            await pause(interval, notice)
            notice.clear()
            try:
                await logins.end_deleted()
            except sqlite3.Error as exc:
                log.warning("accounts not checked (%s: %s); trying again",
                            type(exc).__name__, exc, extra={"event": "sessions-ended"})
    finally:
        await stop_task(following)
