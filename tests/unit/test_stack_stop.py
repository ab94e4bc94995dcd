"""`tiermail up` stopping its tiers: SIGTERM to each, then each waited for up to its own
grace (services/stack.py stop_grace), and killed with a line saying so once it runs out."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading

import pytest

from services.stack import _stop_children

IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
                  "print('ready', flush=True); time.sleep(60)"
# Takes a second to stop, as a filter answering a publish in flight does.
STOPS_SLOWLY = "import signal, sys, time\n" \
               "def stop(*_):\n    time.sleep(1.0)\n    sys.exit(0)\n" \
               "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)"


def child(code: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.stdout.close()
    return proc


def test_each_tier_gets_its_own_grace_and_is_killed_after_it(
        caplog: pytest.LogCaptureFixture) -> None:
    stuck, slow = child(IGNORES_SIGTERM), child(STOPS_SLOWLY)
    with caplog.at_level(logging.ERROR):
        _stop_children({"filter": stuck, "learner": slow}, {"filter": 0.2, "learner": 10.0},
                       threading.Event())
    assert stuck.returncode == -signal.SIGKILL
    assert slow.returncode == 0, "killed before its own grace ran out"
    assert [r.getMessage() for r in caplog.records] == [
        "filter did not stop within 0.2s of SIGTERM; killed"]


def test_asked_twice_everything_still_stopping_is_killed(
        caplog: pytest.LogCaptureFixture) -> None:
    stuck, also_stuck = child(IGNORES_SIGTERM), child(IGNORES_SIGTERM)
    hurry = threading.Event()
    threading.Timer(0.3, hurry.set).start()
    with caplog.at_level(logging.ERROR):
        _stop_children({"filter": stuck, "learner": also_stuck},
                       {"filter": 60.0, "learner": 60.0}, hurry)
    assert stuck.returncode == also_stuck.returncode == -signal.SIGKILL
    assert sorted(r.getMessage() for r in caplog.records) == [
        "filter killed: asked twice to stop", "learner killed: asked twice to stop"]


def test_children_already_gone_are_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with caplog.at_level(logging.DEBUG):
        _stop_children({"store": gone}, {"store": 0.0}, threading.Event())
    assert gone.returncode == 0
    assert not caplog.records
