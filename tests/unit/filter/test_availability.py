"""A scanner's availability: down while calls fail, and failing scans kept apart from pings."""

from __future__ import annotations

import pytest

from services.filter.backends.availability import Availability
from services.filter.backends.errors import ScannerUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def failed_scan(availability: Availability, cause: BaseException | None = None,
                reached: bool | None = None) -> None:
    with pytest.raises(ScannerUnavailable), availability.watch():
        raise ScannerUnavailable("clamd", "x", reached=reached) from cause


def test_a_ping_clears_down_but_not_scans_that_reached_the_scanner_and_failed() -> None:
    clock = Clock()
    availability = Availability("clamd", clock=clock)
    failed_scan(availability, EOFError("closed without a reply"))
    assert (availability.down_since, availability.scans_failing_since) == (100.0, 100.0)
    clock.now = 105.0
    failed_scan(availability, EOFError("again"))
    availability.record(answered=True)  # a ping
    assert (availability.down_since, availability.scans_failing_since) == (None, 100.0)
    with availability.watch():
        pass  # a scan that passes
    assert availability.scans_failing_since is None


@pytest.mark.parametrize(("cause", "reached"), [
    (ConnectionRefusedError(), None), (FileNotFoundError(), None),
    (OSError("anything"), False), (TimeoutError(), False),
])
def test_scans_that_never_reached_the_scanner_are_cleared_by_a_ping(
        cause: BaseException, reached: bool | None) -> None:
    availability = Availability("clamd", clock=Clock())
    failed_scan(availability, cause, reached)
    assert availability.down_since == 100.0 and availability.scans_failing_since is None
    availability.record(answered=True)
    assert availability.down_since is None


@pytest.mark.parametrize("reached", [None, True])
def test_scans_that_time_out_while_pings_answer_are_failing_scans(
        reached: bool | None) -> None:
    """A scanner too loaded (or stuck) to finish a scan in time answers its cheap pings: a
    timed-out scan counted as never reaching it, each ping cleared the mark, and status
    said healthy while every message got 451 (found in review). A timeout once connected,
    or at a step the client cannot tell, is a failing scan."""
    availability = Availability("rspamd", clock=Clock())
    failed_scan(availability, TimeoutError(), reached)
    availability.record(answered=True)  # a ping
    assert (availability.down_since, availability.scans_failing_since) == (None, 100.0)
