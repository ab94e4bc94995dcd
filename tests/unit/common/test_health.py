"""The heartbeat's recent window (common/health.py): what `tiermail status` turns into rates."""

from __future__ import annotations

import socket

import pytest

from common import health
from common.health import RecentCounts, ended_here


def test_a_young_process_counts_from_its_start() -> None:
    recent = RecentCounts(started=1000.0, window=60.0)
    assert recent.record(1005.0, {"accepted": 10, "active": 2, "connected": True}) == {
        "seconds": 5.0, "counts": {"accepted": 10, "active": 2}}
    assert recent.record(1010.0, {"accepted": 25, "active": 0, "connected": True}) == {
        "seconds": 10.0, "counts": {"accepted": 25, "active": 0}}


def test_an_old_process_counts_about_the_last_window_only() -> None:
    recent = RecentCounts(started=0.0, window=60.0)
    accepted = 0
    for at in range(5, 3605, 5):  # an hour of heartbeats, 100 messages each
        accepted += 100
        window = recent.record(float(at), {"accepted": accepted})
    assert 60.0 <= window["seconds"] < 65.0
    assert window["counts"]["accepted"] == 100 * window["seconds"] / 5
    # Then mail stops: within a window the rate falls to nothing, whatever the total.
    for at in range(3605, 3670, 5):
        window = recent.record(float(at), {"accepted": accepted})
    assert window["counts"] == {"accepted": 0}


def test_a_counter_new_in_the_stats_counts_from_zero() -> None:
    recent = RecentCounts(started=0.0, window=60.0)
    recent.record(5.0, {"accepted": 1})
    assert recent.record(10.0, {"accepted": 2, "rejected": 4})["counts"] == {
        "accepted": 2, "rejected": 4}


def test_a_process_of_another_user_that_runs_has_not_ended(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Signal 0 to another user's process is refused (EPERM): it runs, so status must not
    say it went without stopping. (The fake stands in for such a process: tests run as any
    user, root included, whom the kernel never refuses.)"""
    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(health.os, "kill", refused)
    assert not ended_here({"pid": 4242, "host": socket.gethostname()})
