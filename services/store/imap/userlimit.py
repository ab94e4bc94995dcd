"""Sessions logged in at once per account and client address (IMAP).

A mail client opens a few connections per account (Thunderbird five at most by default);
one that opens more and more, misconfigured or stuck in a reconnect loop, would otherwise
take the store's connection slots from everyone else. Past `limit` sessions of one account
from one address (IPv6: one /64) the next login gets NO [LIMIT]. Addresses in the exempt
networks (loopback by default: webmail and local tools log many people in from one address)
are not counted. The count lives in the store process, which serves every IMAP session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.directory import normalize_address
from common.ratelimit import Network
from services.store.listening import ClientConnections


class UserConnections:
    def __init__(self, limit: int, exempt: Sequence[Network] = ()) -> None:
        self._open = ClientConnections(limit, exempt)

    def admit(self, user: str, ip: str) -> Callable[[], None] | None:
        """None when `user` already has `limit` sessions from `ip`; otherwise a function
        that ends this session's count (call it once, when the session ends)."""
        return self._open.admit(ip, normalize_address(user))

    def count(self, user: str, ip: str) -> int:
        return self._open.count(ip, normalize_address(user))
