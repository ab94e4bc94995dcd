"""Starting a development scanner (services/devscanners/runner.py `_launch`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.devscanners import runner
from tests.support import wait_until


def test_a_stop_while_a_scanner_starts_stops_the_scanner(tmp_path: Path) -> None:
    """SIGTERM or Ctrl-C (KeyboardInterrupt in `tiermail up`) while a scanner is not yet
    answering: the scanner, in a session of its own, was left running for good."""
    launched: list[runner.Scanner] = []
    real_scanner = runner.Scanner

    def recorded(*args: object, **kwargs: object) -> runner.Scanner:
        scanner = real_scanner(*args, **kwargs)  # type: ignore[arg-type]
        launched.append(scanner)
        return scanner

    asked = 0

    def ready() -> bool:
        nonlocal asked
        asked += 1
        if asked == 3:
            raise KeyboardInterrupt  # what the stack's signal handler raises
        return False

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "Scanner", recorded)
        with pytest.raises(KeyboardInterrupt):
            runner._launch("sleeper", ["sleep", "60"], tmp_path, "nowhere", ready, [], 30.0)
    [scanner] = launched
    assert not scanner.alive


def test_a_scanner_an_earlier_up_left_running_is_found_and_stopped(tmp_path: Path) -> None:
    """`up` killed with SIGKILL never stops its scanners; the next `up` of the data directory
    found them answering and used them, and left them running for good when it stopped."""
    scanner = runner._launch("sleeper", ["sleep", "60"], tmp_path, "nowhere", lambda: True,
                             [], 30.0)
    try:
        # Popen returns as exec begins; the new program's arguments come a moment later.
        command_line = Path(f"/proc/{scanner.process.pid}/cmdline")
        wait_until(command_line.read_bytes, timeout=5, what="sleep's command line")
        left = runner.LeftRunning.find("sleeper", tmp_path)  # as the next `up` sees it
        assert left is not None and left.group == scanner.process.pid
        left.stop(timeout=10.0)
        assert not runner._runs(scanner.process.pid)
        assert not (tmp_path / "sleeper.group").exists()
    finally:
        scanner.stop()


def test_a_process_that_took_the_scanner_s_id_is_not_taken_for_it(tmp_path: Path) -> None:
    (tmp_path / "rspamd.group").write_text(f"{os.getpid()} rspamd\n")  # pytest, not rspamd
    assert runner.LeftRunning.find("rspamd", tmp_path) is None
    assert runner.LeftRunning.find("clamd", tmp_path) is None  # no record at all


def test_a_scanner_stopped_as_usual_leaves_no_record(tmp_path: Path) -> None:
    with runner._launch("sleeper", ["sleep", "60"], tmp_path, "nowhere", lambda: True, [],
                        30.0):
        assert (tmp_path / "sleeper.group").exists()
    assert not (tmp_path / "sleeper.group").exists()
