"""The scanners of `tiermail up` (services/stack.py): which it starts itself (one that does
not answer on this machine, never one configured on another host), and with what password
rspamd's controller runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.settings import Settings
from services import stack
from services.devscanners import runner


def test_a_scanner_on_another_host_is_not_started_here(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert not stack._needs_start("clamd", "10.0.0.5:3310", "10.0.0.5", False)
    assert "is not answering and is not on this machine" in caplog.text
    assert stack._needs_start("clamd", "127.0.0.1:3310", "127.0.0.1", False)
    assert stack._needs_start("spamd", "[::1]:783", "[::1]", False)
    assert not stack._needs_start("clamd", "127.0.0.1:3310", "127.0.0.1", True)


def test_a_configured_controller_password_is_the_one_the_stack_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIERMAIL_RSPAMD_CONTROLLER_PASSWORD set: rspamd and the learner get it, not one made
    up for the run (an rspamd already running with it would refuse the learner)."""
    used: list[Settings] = []

    def run_tiers(settings: Settings) -> int:
        used.append(settings)
        return 0

    async def redis_checked(settings: Settings) -> None:
        return None

    monkeypatch.setattr(stack, "ensure_dev_certificate", lambda *args: False)
    monkeypatch.setattr(stack, "server_context", lambda settings: None)
    monkeypatch.setattr(stack, "check_redis_url", redis_checked)
    monkeypatch.setattr(runner, "rspamd_ping", lambda url, timeout=0.0: False)
    monkeypatch.setattr(stack, "start_scanners", lambda settings, scanners: used.append(settings))
    monkeypatch.setattr(stack, "_run_tiers", run_tiers)
    settings = Settings(data_dir=tmp_path / "var", spam="rspamd", virus="off",
                        rspamd_controller_password="configured")
    assert stack._run_stack(settings) == 0
    assert [s.rspamd_controller_password for s in used] == ["configured", "configured"]
