"""What a process lets its clients hold at once, shared by all their sessions.

`MemoryBudget`: octets of data clients send, the filter's message data (SMTP DATA) and the
store's IMAP literals. `OpenCounts`: sessions open per key, the filter's per client address
and the store's per account and address.

A client that uploads slowly holds what it has sent for as long as it likes; without a
shared bound, enough of them at once (each within its per-message limit) run the process out
of memory and every session in it is lost. With one, the next upload is refused with a
temporary error instead, and the uploads in progress carry on.
"""

from __future__ import annotations

import collections


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, octets: int, *, alone_ok: bool = False) -> bool:
        """Whether `octets` more fit; with `alone_ok`, more than the limit fit when nothing
        else is held (a limit set below one item must not make that item impossible)."""
        if self.held + octets > self.limit and not (alone_ok and self.held == 0):
            return False
        self.held += octets
        return True

    def give_back(self, octets: int) -> None:
        self.held -= octets

    def fits(self, octets: int) -> bool:
        """Whether `octets` more would fit now (nothing taken)."""
        return self.held + octets <= self.limit


class Hold:
    """What one upload holds of a budget (none: unbounded), given back all at once."""

    def __init__(self, budget: MemoryBudget | None) -> None:
        self._budget = budget
        self.octets = 0

    def take(self, octets: int, *, alone_ok: bool = False) -> bool:
        if self._budget is None:
            return True
        if not self._budget.take(octets, alone_ok=alone_ok):
            return False
        self.octets += octets
        return True

    def fits(self, octets: int) -> bool:
        return self._budget is None or self._budget.fits(octets)

    def release(self) -> None:
        if self._budget is not None and self.octets:
            self._budget.give_back(self.octets)
        self.octets = 0


class OpenCounts:
    """How many sessions are open per key, each key bounded by `limit`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: collections.Counter[object] = collections.Counter()

    def take(self, key: object) -> bool:
        if self._open[key] >= self._limit:
            return False
        self._open[key] += 1
        return True

    def give_back(self, key: object) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]

    def count(self, key: object) -> int:
        return self._open[key]
