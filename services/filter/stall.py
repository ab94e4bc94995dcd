"""Refusing new mail at once while the broker has stopped confirming.

A broker that takes publishes but does not confirm them (a resource alarm blocks publishers
until disk or memory is freed; a node that hangs) would have every new transaction upload its
message and then wait out the publish deadline (TIERMAIL_PUBLISH_TIMEOUT, 30 s) for the same
451. While one of this worker's publishes has waited longer than STALLED_AFTER for its
confirm, new transactions get the 451 at MAIL FROM instead, at once. Nothing is kept for
later: once the broker confirms again, or the waiting publish gives up, mail is taken again.
A broker that cannot be reached at all needs none of this: connecting fails at once.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator

STALLED_AFTER = 2.0  # seconds; a healthy broker confirms within milliseconds


class PublishWatch:
    def __init__(self, stalled_after: float = STALLED_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stalled_after = stalled_after
        self._clock = clock
        self._tokens = itertools.count()
        self._waiting: dict[int, float] = {}  # publish -> when it started, oldest first

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        token = next(self._tokens)
        self._waiting[token] = self._clock()
        try:
            yield
        finally:
            del self._waiting[token]

    @property
    def stalled(self) -> bool:
        """Whether the oldest publish still waiting has waited longer than stalled_after."""
        oldest = next(iter(self._waiting.values()), None)
        return oldest is not None and self._clock() - oldest > self._stalled_after
