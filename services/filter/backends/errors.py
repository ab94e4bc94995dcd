"""The one error every scanner client raises when it cannot give a verdict."""

from __future__ import annotations


class ScannerUnavailable(Exception):
    """The scanner could not be reached, timed out, or answered garbage.

    The rules turn this into the configured scan-failure policy (tempfail, accept, defer).
    """

    def __init__(self, scanner: str, reason: str) -> None:
        super().__init__(f"{scanner}: {reason}")
        self.scanner = scanner
        self.reason = reason


class StreamTooLarge(Exception):
    """The message is larger than the virus scanner accepts (clamd StreamMaxLength).

    Not a scanner failure: the outcome is the `virus_oversize` policy, never a silent pass.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes exceed the scanner's stream limit of {limit}")
        self.size = size
        self.limit = limit
