"""Telling a message that breaks a scanner from a scanner that fails on everything.

The deferred scanner returns a message to the scan queue when a scanner fails on it. When
the scanner then answers a ping, the failure may be the message's own doing (it makes rspamd
time out or answer HTTP 500 every time). Such a message used to go round until the scan
queue's delivery limit (100), a scan timeout each time, while the drainer paused for it. Now
each such failure is a strike against the message, and a message with POISON_STRIKES is
dead-lettered, where `tiermail deadletters` shows it and can send it back to be scanned.

A failure is no strike when another message, too, failed since the last scan that came to a
verdict: a scanner that answers pings but fails on every scan (overloaded, misconfigured) is
no message's fault, and the drainer pauses instead of dead-lettering the queue. Nor is it
unless another message came to a verdict since the message's own last strike: a failure
that comes before any such evidence is UNDECIDED, and the drainer waits (holding the
message) for the next outcome of another message it holds: a verdict makes it a strike,
another failure or none at all makes it no strike, and the drainer pauses. (Until
2026-12-06 a message alone in the queue, or beside one still being scanned, collected its
five strikes within milliseconds from a clamd that failed every scan, and was dead-lettered:
found in review, twice.)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import OrderedDict

POISON_STRIKES = 5
REMEMBERED = 1024  # messages with strikes kept, the oldest forgotten first


class Undecided(enum.Enum):
    """No evidence yet either way (see the module's docstring)."""

    UNDECIDED = "undecided"


UNDECIDED = Undecided.UNDECIDED


class Strikes:
    def __init__(self, limit: int = POISON_STRIKES, remembered: int = REMEMBERED) -> None:
        self.limit = limit
        self.verdicts = 0  # scans that came to a verdict, ever
        self._failing: str | None = None  # the message that failed since the last verdict
        self._several_failing = False  # ... and there was more than one
        self._remembered = remembered
        # queue id -> (strikes, `verdicts` at the last one)
        self._struck: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._news = asyncio.Event()  # a verdict, or another message failing

    def scanned(self, queue_id: str) -> None:
        """A scan of this message came to a verdict."""
        self.verdicts += 1
        self._failing, self._several_failing = None, False
        self._struck.pop(queue_id, None)
        self._news.set()

    def failed(self, queue_id: str) -> int | None | Undecided:
        """A scanner failed on this message and answers pings: the message's strikes now;
        None when the scanner fails on more than this message; UNDECIDED when nothing has
        shown since its last strike that the scanner works on other mail (`decided`)."""
        if self._failing is None:
            self._failing = queue_id
        elif self._failing != queue_id:
            self._several_failing = True
            self._news.set()
        if self._several_failing:
            return None
        _, verdicts = self._struck.get(queue_id, (0, -1))
        if verdicts == self.verdicts:
            return UNDECIDED
        return self._strike(queue_id)

    async def decided(self, queue_id: str, within: float) -> int | None:
        """After an UNDECIDED failure: wait up to `within` seconds for another message's
        outcome. A verdict makes the failure a strike (the message's strikes now); another
        failure, or nothing, makes it none (None)."""
        verdicts = self.verdicts
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.verdicts == verdicts and not self._several_failing:
                    self._news.clear()
                    await self._news.wait()
        if self._several_failing or self.verdicts == verdicts:
            return None
        return self._strike(queue_id)

    def _strike(self, queue_id: str) -> int:
        strikes = self._struck.pop(queue_id, (0, -1))[0] + 1
        self._struck[queue_id] = (strikes, self.verdicts)
        while len(self._struck) > self._remembered:
            self._struck.popitem(last=False)
        return strikes

    def poisoned(self, strikes: int) -> bool:
        return strikes >= self.limit
