"""`tiermail up` stops the stack when a tier exits with a code that restarting cannot cure
(services/stack.py FATAL_EXITS: 2, a bad setting; 3, it cannot start), instead of
restarting it every RESTART_DELAY for ever; which tiers it runs, and that it starts none
once asked to stop. The tiers are stand-in processes that exit at once with a given code."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator

import pytest

from common.settings import Settings
from services import stack

StandIns = Callable[[dict[str, list[int]]], list[str]]


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch, handlers_restored: None) -> Iterator[StandIns]:
    """Make `_run_tiers` spawn stand-ins, given `codes`: each spawn of a tier in `codes`
    exits at once with the next of its codes (a spawn past the last fails the test); a
    tier not in `codes` runs until stopped. The list returned fills with the tiers
    spawned. Stand-ins still running at the end (a test failed) are killed."""
    processes: list[subprocess.Popen[bytes]] = []

    def make(codes: dict[str, list[int]]) -> list[str]:
        spawned: list[str] = []

        def spawn(tier: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
            spawned.append(tier)
            if tier in codes and not codes[tier]:
                raise AssertionError(f"{tier} spawned again after exiting with its last code")
            code = (f"raise SystemExit({codes[tier].pop(0)})" if tier in codes
                    else "import time; time.sleep(600)")
            processes.append(subprocess.Popen([sys.executable, "-c", code]))
            return processes[-1]

        monkeypatch.setattr(stack, "_spawn", spawn)
        return spawned

    monkeypatch.setattr(stack, "_client_ports", lambda settings: [])
    monkeypatch.setattr(stack, "RESTART_DELAY", 0.0)
    yield make
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("code", [2, 3])
def test_a_tier_exiting_with_a_fatal_code_stops_up_with_it(code: int,
                                                           stand_ins: StandIns) -> None:
    spawned = stand_ins({tier: [code] for tier in stack.TIERS})
    assert stack._run_tiers(Settings.from_env({"TIERMAIL_SPAM": "off"})) == code
    assert spawned == list(stack.TIERS)


def test_up_runs_the_spam_learner_when_spam_learning_is_on(stand_ins: StandIns) -> None:
    """With rspamd (learning on by default) the stack has a learner too: without it, the
    learn jobs of moves into Junk only pile up."""
    spawned = stand_ins({"store": [2]})
    assert stack._run_tiers(Settings.from_env({"TIERMAIL_SPAM": "rspamd"})) == 2
    assert spawned == [*stack.TIERS, stack.LEARNER]


def test_a_tier_that_died_is_not_restarted_once_up_is_asked_to_stop(
        stand_ins: StandIns, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the pause before a restart: the stack stops, and starts nothing new
    (a store started then would be stopped mid-start)."""
    spawned = stand_ins({"store": [1]})

    def sleep(seconds: float) -> None:
        if seconds == stack.RESTART_DELAY:
            signal.raise_signal(signal.SIGTERM)
        time.sleep(seconds)

    monkeypatch.setattr(stack, "RESTART_DELAY", 0.01)
    monkeypatch.setattr(stack, "time", types.SimpleNamespace(
        sleep=sleep, monotonic=time.monotonic))
    assert stack._run_tiers(Settings.from_env({"TIERMAIL_SPAM": "off"})) == 0
    assert spawned == list(stack.TIERS)
