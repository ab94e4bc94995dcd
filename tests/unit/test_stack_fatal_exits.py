"""`tiermail up` stops the stack when a tier exits with a code that restarting cannot cure
(services/stack.py FATAL_EXITS: 2, a bad setting; 3, it cannot start), instead of
restarting it every RESTART_DELAY for ever; which tiers it runs, and that it starts none
once asked to stop. The tiers are stand-in processes that exit at once with a given code."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
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


class StopDuringThePause(logging.Handler):
    """A clock for `stack` on which sleeping moves time on at once (a real sleep of at most
    10 ms lets the stand-ins run), and which raises SIGTERM `after` seconds into the pause
    before a restart: the moment the tier's exit is logged starts it. Records when each of
    stack's log lines came, on this clock."""

    def __init__(self, after: float) -> None:
        super().__init__()
        self.now = 0.0
        self.after = after
        self.exit_logged: float | None = None
        self.signalled = False
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((self.now, record.getMessage()))
        if "restarting in" in record.getMessage():
            self.exit_logged = self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.01))
        self.now += seconds
        if (self.exit_logged is not None and not self.signalled
                and self.now - self.exit_logged >= self.after):
            self.signalled = True
            signal.raise_signal(signal.SIGTERM)


def test_a_stop_during_the_pause_before_a_restart_ends_the_pause_and_restarts_nothing(
        stand_ins: StandIns, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM half a second into the pause before a restart: the stack stops then, not at
    the pause's end (a Ctrl-C reaches the whole process group, so a tier can die just
    before `up` sees the signal), says it is not restarting the tier, and starts nothing new
    (a store started then would be stopped mid-start)."""
    spawned = stand_ins({"store": [1]})
    clock = StopDuringThePause(after=0.5)
    monkeypatch.setattr(stack, "RESTART_DELAY", 30.0)
    monkeypatch.setattr(stack, "time", clock)
    caplog.set_level(logging.INFO, logger=stack.log.name)
    stack.log.addHandler(clock)
    try:
        assert stack._run_tiers(Settings.from_env({"TIERMAIL_SPAM": "off"})) == 0
    finally:
        stack.log.removeHandler(clock)
    assert spawned == list(stack.TIERS)
    assert clock.exit_logged is not None
    [stopped_at] = [at for at, line in clock.lines
                    if line == "not restarting store: the stack is stopping"]
    assert stopped_at - clock.exit_logged <= 0.5 + stack.PAUSE_STEP
