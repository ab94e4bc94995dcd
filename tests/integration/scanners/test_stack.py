"""`tiermail up` starts the scanners its settings name and stops them with the stack."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import httpx
import pytest

from common.settings import Settings
from services.devscanners.runner import Scanner, clamd_ping, rspamd_ping, spamd_ping
from services.stack import controller_password, start_scanners
from tests.support import free_port


def test_starts_rspamd_and_clamd_and_stops_them(rspamd: str, clamd: str,
                                                tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", spam="rspamd", virus="clamd",
                        rspamd_url=f"http://127.0.0.1:{free_port()}",
                        clamd_address=str(tmp_path / "run" / "clamd.ctl"))
    with contextlib.ExitStack() as stack:
        start_scanners(settings, stack)
        assert rspamd_ping(settings.rspamd_url)
        assert clamd_ping(settings.clamd_address)
        assert (tmp_path / "var" / "scanners" / "rspamd" / "rspamd.log").exists()
    assert not rspamd_ping(settings.rspamd_url)
    assert not clamd_ping(settings.clamd_address)


def test_uses_scanners_that_already_answer(rspamd: str, clamd: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", rspamd_url=rspamd, clamd_address=clamd)
    with contextlib.ExitStack() as stack:
        start_scanners(settings, stack)
        assert not (tmp_path / "var" / "scanners").exists()
    assert rspamd_ping(rspamd) and clamd_ping(clamd)  # the session's scanners keep running


def test_spamassassin_setting_starts_spamd(spamd: str, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path / "var", spam="spamassassin", virus="off",
                        spamd_address=address)
    with contextlib.ExitStack() as stack:
        start_scanners(settings, stack)
        assert spamd_ping(address)
    assert not spamd_ping(address)


def _controller_accepts(controller_url: str, password: str) -> bool:
    reply = httpx.get(f"{controller_url}/stat", headers={"Password": password}, timeout=10)
    return reply.status_code == 200


def test_a_restarted_up_learns_with_the_rspamd_its_killed_run_left(tmp_path: Path) -> None:
    """`tiermail up` SIGKILLed leaves rspamd running and the next `up` uses it, but made up a
    new controller password for its learner: every move into Junk was refused (HTTP 401)."""
    port, controller_port = free_port(), free_port()
    settings = Settings(data_dir=tmp_path / "var", virus="off",
                        rspamd_url=f"http://127.0.0.1:{port}",
                        rspamd_controller_url=f"http://127.0.0.1:{controller_port}")
    first_run = settings.replace(rspamd_controller_password=controller_password(settings))
    with contextlib.ExitStack() as killed_up:
        start_scanners(first_run, killed_up)
        second_run_password = controller_password(settings)
        assert _controller_accepts(settings.rspamd_controller_url, second_run_password)


def test_an_rspamd_of_another_stack_is_named_in_a_warning(
        rspamd_scanner: Scanner, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path / "var", rspamd_url=rspamd_scanner.address)
    with caplog.at_level(logging.WARNING, logger="services.stack"):
        password = controller_password(settings)
    assert password != rspamd_scanner.controller_password
    assert f"rspamd on {rspamd_scanner.address} was not started by a stack on this data " \
        "directory" in caplog.text
