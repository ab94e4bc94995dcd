"""`tiermail up` stopping its tiers: SIGTERM to each, then each waited for up to its own
grace (services/stack.py stop_grace), and killed with a line saying so once it runs out."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.settings import Settings
from services import stack
from services.stack import _stop_children
from tests.support import wait_until

IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
                  "print('ready', flush=True); time.sleep(60)"
# Takes a second to stop, as a filter answering a publish in flight does.
STOPS_SLOWLY = "import signal, sys, time\n" \
               "def stop(*_):\n    time.sleep(1.0)\n    sys.exit(0)\n" \
               "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)"


# Notes SIGTERM in the file named by its argument, and goes on.
NOTES_SIGTERM = "import pathlib, signal, sys, time\n" \
                "note = pathlib.Path(sys.argv[1])\n" \
                "signal.signal(signal.SIGTERM, lambda *_: note.write_text('asked'))\n" \
                "print('ready', flush=True)\ntime.sleep(60)"


def child(code: str, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
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


def test_a_second_ctrl_c_to_up_kills_the_tiers_still_stopping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_restored: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """The signal handlers of `_run_tiers` itself: SIGTERM, then Ctrl-C once every tier has
    been asked to stop. Tiers that ignore SIGTERM are killed at the second signal, not at
    the end of their grace."""
    tiers: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(tier: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        tiers[tier] = child(NOTES_SIGTERM, str(tmp_path / tier))
        return tiers[tier]

    monkeypatch.setattr(stack, "_spawn", spawn)
    monkeypatch.setattr(stack, "_client_ports", lambda settings: [])
    monkeypatch.setattr(stack, "stop_grace", lambda tier, settings: 600.0)
    default_handler = signal.getsignal(signal.SIGTERM)
    asker = threading.Thread(target=_ask_twice, args=(tmp_path, default_handler, tiers))
    asker.start()
    with caplog.at_level(logging.ERROR):
        assert stack._run_tiers(Settings.from_env({"TIERMAIL_SPAM": "off"})) == 0
    asker.join()
    assert {tier: proc.returncode for tier, proc in tiers.items()} == {
        tier: -signal.SIGKILL for tier in stack.TIERS}
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"{tier} killed: asked twice to stop" for tier in stack.TIERS)


def _ask_twice(notes: Path, default_handler: object,
               tiers: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM to this process once `_run_tiers` handles it, Ctrl-C once every tier has got
    its SIGTERM. Tiers still running 10 s later are killed here, so that a second signal
    that hurries nothing fails the test (no "asked twice" line) instead of waiting out
    the grace."""
    wait_until(lambda: signal.getsignal(signal.SIGTERM) is not default_handler,
               what="_run_tiers's signal handlers")
    os.kill(os.getpid(), signal.SIGTERM)
    wait_until(lambda: all((notes / tier).exists() for tier in stack.TIERS),
               what="every tier to get SIGTERM")
    os.kill(os.getpid(), signal.SIGINT)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: all(proc.poll() is not None for proc in tiers.values()),
                   timeout=10.0)
    for proc in tiers.values():
        if proc.poll() is None:
            proc.kill()


def test_a_tier_is_killed_once_its_grace_has_run_out_not_later() -> None:
    assert stack._kill_reason("filter", False, 10.0, 10.0) is None
    assert stack._kill_reason("filter", False, 10.1, 10.0) == (
        "filter did not stop within 10s of SIGTERM; killed")
