"""`tiermail up` starts the scanners its settings name and stops them with the stack."""

from __future__ import annotations

import contextlib
from pathlib import Path

from common.settings import Settings
from services.devscanners.runner import clamd_ping, rspamd_ping, spamd_ping
from services.stack import start_scanners
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
