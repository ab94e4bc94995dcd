"""`tiermail up` stops the stack when a tier exits with a code that restarting cannot cure
(services/stack.py FATAL_EXITS: 2, a bad setting; 3, it cannot start), instead of
restarting it every RESTART_DELAY for ever. The tiers are stand-in processes that exit at
once with the code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.settings import Settings
from services import stack


@pytest.mark.parametrize("code", [2, 3])
def test_a_tier_exiting_with_a_fatal_code_stops_up_with_it(
        code: int, monkeypatch: pytest.MonkeyPatch, handlers_restored: None) -> None:
    spawned: list[str] = []

    def spawn(tier: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        if tier in spawned:
            raise AssertionError(f"{tier} restarted after exit {code}")
        spawned.append(tier)
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])

    monkeypatch.setattr(stack, "_spawn", spawn)
    monkeypatch.setattr(stack, "_client_ports", lambda settings: [])
    monkeypatch.setattr(stack, "RESTART_DELAY", 0.0)
    assert stack._run_tiers(Settings.from_env({"TIERMAIL_SPAM": "off"})) == code
    assert spawned == list(stack.TIERS)
