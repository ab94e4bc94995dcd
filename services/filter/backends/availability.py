"""Whether a scanner answered its last call: kept by each client, shown by `tiermail status`.

A scan or ping that raised ScannerUnavailable marks the scanner down (from that moment on,
until a later call gets an answer); the filter's heartbeat carries it, so an operator sees
that mail is being refused (or accepted unscanned, or deferred) because of it.

A scanner can answer its pings and fail every scan (clamd without its temporary directory,
rspamd answering garbage, a scanner too loaded to finish a scan in time though a ping is
cheap): a ping then clears `down_since`, so a scan that reached the scanner and failed (a
timeout once connected included) also sets `scans_failing_since`, which only a scan that
passes clears. One that did not reach it (nothing listening, a name that does not resolve,
no connection in time) does not: a ping finds the same, and its answer says the scanner is
back. (A timeout whose phase the client cannot tell counts as reached: until 2026-12-06 a
scanner whose scans all timed out while its pings answered showed as healthy.)
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator

from services.filter.backends.errors import ScannerUnavailable

log = logging.getLogger(__name__)

# Causes that mean the scan never reached the scanner (a ping would fail the same way).
_UNREACHED = (ConnectionRefusedError, FileNotFoundError, socket.gaierror)


class Availability:
    def __init__(self, scanner: str, clock: Callable[[], float] = time.time) -> None:
        self._scanner = scanner
        self._clock = clock
        self.down_since: float | None = None
        self.scans_failing_since: float | None = None

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around one scan: down if it raises ScannerUnavailable, up if it returns."""
        try:
            yield
        except ScannerUnavailable as exc:
            self.record(answered=False)
            if self.scans_failing_since is None and not never_reached(exc):
                self.scans_failing_since = self._clock()
            raise
        self.record(answered=True)
        self.scans_failing_since = None

    def record(self, *, answered: bool) -> None:
        if not answered:
            if self.down_since is None:
                self.down_since = self._clock()
            return
        if self.down_since is not None:
            log.info("%s answers again after %.0f s%s", self._scanner,
                     self._clock() - self.down_since,
                     "" if self.scans_failing_since is None else
                     " (a ping; no scan has passed since one failed)",
                     extra={"event": "scanner-up", "scanner": self._scanner})
            self.down_since = None


def never_reached(exc: ScannerUnavailable) -> bool:
    """Whether a failed scan never reached the scanner: as the client says, else a cause in
    the chain (the clients raise `from` the socket's error) is one of those."""
    if exc.reached is not None:
        return not exc.reached
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, _UNREACHED):
            return True
        cause = cause.__cause__
    return False
