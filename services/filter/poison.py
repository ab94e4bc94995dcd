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
when the message is the only one the drainer holds and no other came to a verdict since
the message's own last strike: nothing then shows that the scanner works on other mail.
(Until 2026-12-06 a message alone in the queue collected its five strikes within 35 ms from
a clamd that failed every scan, and was dead-lettered: found in review.)
"""

from __future__ import annotations

from collections import OrderedDict

POISON_STRIKES = 5
REMEMBERED = 1024  # messages with strikes kept, the oldest forgotten first


class Strikes:
    def __init__(self, limit: int = POISON_STRIKES, remembered: int = REMEMBERED) -> None:
        self.limit = limit
        self.verdicts = 0  # scans that came to a verdict, ever
        self._failing: str | None = None  # the message that failed since the last verdict
        self._several_failing = False  # ... and there was more than one
        self._remembered = remembered
        # queue id -> (strikes, `verdicts` at the last one)
        self._struck: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def scanned(self, queue_id: str) -> None:
        """A scan of this message came to a verdict."""
        self.verdicts += 1
        self._failing, self._several_failing = None, False
        self._struck.pop(queue_id, None)

    def failed(self, queue_id: str, *, others_pending: bool = False) -> int | None:
        """A scanner failed on this message and answers pings: the message's strikes now,
        or None when the scanner may be failing on everything (see the module's docstring).
        `others_pending`: other messages are being scanned, or wait to be."""
        if self._failing is None:
            self._failing = queue_id
        elif self._failing != queue_id:
            self._several_failing = True
        if self._several_failing:
            return None
        strikes, verdicts = self._struck.pop(queue_id, (0, -1))
        if verdicts == self.verdicts and not others_pending:
            self._struck[queue_id] = (strikes, verdicts)
            return None
        self._struck[queue_id] = (strikes + 1, self.verdicts)
        while len(self._struck) > self._remembered:
            self._struck.popitem(last=False)
        return strikes + 1

    def poisoned(self, strikes: int) -> bool:
        return strikes >= self.limit
