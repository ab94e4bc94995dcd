"""The one error every scanner client raises when it cannot give a verdict."""

from __future__ import annotations


class ScannerUnavailable(Exception):
    """The scanner could not be reached, timed out, or answered garbage.

    The rules turn this into the configured scan-failure policy (tempfail, accept, defer).
    """

    def __init__(self, scanner: str, reason: str, *, reached: bool | None = None) -> None:
        super().__init__(f"{scanner}: {reason}")
        self.scanner = scanner
        self.reason = reason
        # Whether the call got to the scanner (None: as the cause says; see availability.py)
        self.reached = reached


def failure_reason(exc: BaseException, timeout: float) -> str:
    """What went wrong, for the log line: a timeout says how long it waited (it says
    nothing itself), anything else its type and text."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class StreamTooLarge(Exception):
    """The message is larger than the virus scanner accepts (clamd StreamMaxLength).

    Not a scanner failure: the outcome is the `virus_oversize` policy, never a silent pass.
    """

    def __init__(self, size: int, limit: int, *, by_scanner: bool = False,
                 beyond_limits: str = "") -> None:
        if beyond_limits:  # clamd's scan limits, inside the message (AlertExceedsMax)
            super().__init__(f"clamd stopped at one of its scan limits ({beyond_limits}): "
                             "an archive too large or nested too deep to scan whole")
        elif by_scanner:  # clamd's own StreamMaxLength, below TIERMAIL_CLAMD_STREAM_MAX
            super().__init__(f"{size} bytes exceed clamd's StreamMaxLength (less than "
                             f"TIERMAIL_CLAMD_STREAM_MAX={limit}: set them equal)")
        else:
            super().__init__(f"{size} bytes exceed the scanner's stream limit of {limit}")
        self.size = size
        self.limit = limit
        self.beyond_limits = beyond_limits
