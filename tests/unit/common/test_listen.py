"""Filters sharing an SMTP port must be of one stack (common/listen.py join_port)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.listen import CannotStart, join_port


def test_workers_of_one_stack_share_a_port_and_another_stack_is_refused(
        tmp_path: Path) -> None:
    first = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    second = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    assert first is not None and second is not None
    with pytest.raises(CannotStart, match=r"filters of another stack serve it \(stack A; "
                                          r"this one: stack B\)"):
        join_port("127.0.0.1", 2525, "stack B", "smtp_port", tmp_path)
    assert join_port("127.0.0.1", 2526, "stack B", "smtp_port", tmp_path) is not None
    first.close()
    second.close()
    third = join_port("127.0.0.1", 2525, "stack B", "smtp_port", tmp_path)  # A has gone
    assert third is not None
    third.close()


def test_a_lock_file_that_cannot_be_opened_skips_the_check(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another user's file (or no such folder): the worker starts, with a warning."""
    caplog.set_level(logging.WARNING)
    assert join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path / "missing") is None
    assert "cannot check which stack serves 127.0.0.1:2525" in caplog.text
