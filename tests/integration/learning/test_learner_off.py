"""`tiermail learner` with spam learning off: an error by hand, an idle wait under a service
manager (compose restarted a learner that exited, for ever)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from common.settings import Settings
from tests.support import TierProcess, run_cli, wait_until


@pytest.mark.parametrize("off", [{"spam": "off"}, {"spam": "rspamd", "learn": "off"}])
def test_a_learner_with_learning_off_is_an_error_by_hand(settings: Settings,
                                                         off: dict[str, str]) -> None:
    done = run_cli(settings.replace(**off), "learner")
    assert done.returncode != 0
    assert "spam learning is off" in done.stderr


@pytest.mark.parametrize("off", [{"spam": "off"}, {"spam": "rspamd", "learn": "off"}])
def test_a_learner_told_to_wait_when_off_says_so_and_waits_until_stopped(
        settings: Settings, run_tier: Callable[..., TierProcess], off: dict[str, str]) -> None:
    learner = run_tier(settings.replace(**off), "learner", "--wait-when-off")
    wait_until(lambda: "spam learning is off" in learner.output() or not learner.alive,
               what="the learner's word")
    assert learner.alive, learner.output()
    assert "waiting until stopped" in learner.output()
    learner.proc.send_signal(signal.SIGTERM)
    assert learner.proc.wait(timeout=30) == 0, learner.output()
