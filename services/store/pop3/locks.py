"""Maildrop locks: one POP3 session per mailbox at a time (RFC 1939 section 8).

The store is a single process, so an in-process registry is enough. One registry is shared by
every POP3 listener of a store (plain and implicit TLS); it is passed in, never global.
"""

from __future__ import annotations


class MailboxLocks:
    def __init__(self) -> None:
        self._held: set[str] = set()

    def acquire(self, user: str) -> bool:
        """Take the lock for `user`; False when another session holds it."""
        if user in self._held:
            return False
        self._held.add(user)
        return True

    def release(self, user: str) -> None:
        self._held.discard(user)

    def held(self, user: str) -> bool:
        return user in self._held
