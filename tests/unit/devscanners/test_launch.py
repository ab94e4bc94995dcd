"""Starting a development scanner (services/devscanners/runner.py `_launch`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.devscanners import runner


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
