"""The runner reports a scanner that will not start with its own words, and cleans up."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.devscanners.runner import ScannerError, start_clamd
from tests.support import free_port


def test_clamd_without_signatures_fails_with_its_log(clamd: str, tmp_path: Path) -> None:
    empty = tmp_path / "no-signatures"
    empty.mkdir()
    with pytest.raises(ScannerError) as failure:
        start_clamd(tmp_path / "clamd", address=f"127.0.0.1:{free_port()}",
                    database_dir=empty, timeout=30)
    text = str(failure.value)
    assert "clamd exited" in text
    assert "clamd.log" in text or "clamd.out" in text
