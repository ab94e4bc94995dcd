"""Whether a scanner answered its last call: kept by each client, shown by `tiermail status`.

A scan or ping that raised ScannerUnavailable marks the scanner down (from that moment on,
until a later call gets an answer); the filter's heartbeat carries it, so an operator sees
that mail is being refused (or accepted unscanned, or deferred) because of it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from services.filter.backends.errors import ScannerUnavailable

log = logging.getLogger(__name__)


class Availability:
    def __init__(self, scanner: str, clock: Callable[[], float] = time.time) -> None:
        self._scanner = scanner
        self._clock = clock
        self.down_since: float | None = None

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around one call: down if it raises ScannerUnavailable, up if it returns."""
        try:
            yield
        except ScannerUnavailable:
            self.record(answered=False)
            raise
        self.record(answered=True)

    def record(self, *, answered: bool) -> None:
        if not answered:
            if self.down_since is None:
                self.down_since = self._clock()
            return
        if self.down_since is not None:
            log.info("%s answers again after %.0f s", self._scanner,
                     self._clock() - self.down_since,
                     extra={"event": "scanner-up", "scanner": self._scanner})
            self.down_since = None
