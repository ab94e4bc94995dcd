"""Filters sharing an SMTP port must be of one stack (common/listen.py join_port)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from common import listen
from common.listen import CannotStart, join_port, leave_port


def test_workers_of_one_stack_share_a_port_and_another_stack_is_refused(
        tmp_path: Path) -> None:
    first = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    second = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    assert first is not None and second is not None
    with pytest.raises(CannotStart, match=r"filters of another stack serve port 2525 "
                                          r"\(stack A; this one: stack B\)"):
        join_port("127.0.0.1", 2525, "stack B", "smtp_port", tmp_path)
    other_port = join_port("127.0.0.1", 2526, "stack B", "smtp_port", tmp_path)
    assert other_port is not None
    leave_port(first)
    leave_port(second)
    third = join_port("127.0.0.1", 2525, "stack B", "smtp_port", tmp_path)  # A has gone
    assert third is not None
    leave_port(third)
    leave_port(other_port)


@pytest.mark.parametrize("theirs", ["localhost", "0.0.0.0", "::", "::1", "192.0.2.1"])
def test_another_stack_is_refused_the_port_under_any_address(tmp_path: Path,
                                                              theirs: str) -> None:
    """The check went by the bind text: another stack's filter on `localhost` or the
    wildcard served beside ours on 127.0.0.1 (the kernel prefers the more specific
    listener, so it took every loopback connection, or half with the same address)."""
    ours = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    assert ours is not None
    with pytest.raises(CannotStart, match="filters of another stack serve port 2525"):
        join_port(theirs, 2525, "stack B", "smtp_port", tmp_path)
    same_stack = join_port(theirs, 2525, "stack A", "smtp_port", tmp_path)
    assert same_stack is not None
    leave_port(same_stack)
    leave_port(ours)


def test_an_older_worker_of_another_stack_still_on_the_port_is_seen(tmp_path: Path) -> None:
    """Workers before 2026-12-07 named their file after the bind text too; during an
    upgrade a new worker of another stack went past an older one still serving the port."""
    older = open(tmp_path / "tiermail-smtp-127.0.0.1-2525.lock", "a+")  # noqa: SIM115
    older.write("stack A\n")
    older.flush()
    listen.fcntl.flock(older, listen.fcntl.LOCK_SH)  # as an older worker holds it
    with pytest.raises(CannotStart, match=r"serve port 2525 \(stack A; this one: stack B\)"):
        join_port("localhost", 2525, "stack B", "smtp_port", tmp_path)
    same_stack = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    assert same_stack is not None
    other_port = join_port("127.0.0.1", 12525, "stack B", "smtp_port", tmp_path)
    assert other_port is not None
    leave_port(same_stack)
    leave_port(other_port)
    older.close()  # the older worker stopped (or was killed): its file holds no one
    joined = join_port("127.0.0.1", 2525, "stack B", "smtp_port", tmp_path)
    assert joined is not None
    leave_port(joined)


def test_the_last_worker_to_leave_removes_the_file(tmp_path: Path) -> None:
    """One file per port ever used piled up in /tmp (hundreds per test run)."""
    first = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    second = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    assert first is not None and second is not None
    leave_port(first)
    assert [p.name for p in tmp_path.iterdir()] == ["tiermail-smtp-2525.lock"]
    leave_port(second)
    assert list(tmp_path.iterdir()) == []


def test_a_worker_removes_the_files_of_killed_workers_and_no_other(tmp_path: Path) -> None:
    """A killed worker never leaves its port: its file stayed in /tmp for good."""
    killed = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    just_killed = join_port("127.0.0.1", 2526, "stack A", "smtp_port", tmp_path)
    serving = join_port("127.0.0.1", 2527, "stack A", "smtp_port", tmp_path)
    assert killed is not None and just_killed is not None and serving is not None
    killed.close()  # as the kernel closes a killed process's files: the lock goes, not the file
    just_killed.close()
    long_ago = time.time() - 2 * listen.ABANDONED_AFTER
    for port in (2525, 2527):
        os.utime(tmp_path / f"tiermail-smtp-{port}.lock", (long_ago, long_ago))
    joining = join_port("127.0.0.1", 2528, "stack A", "smtp_port", tmp_path)
    assert joining is not None
    # 2526 is recent: a first worker changing its lock lets go of it for a moment
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"tiermail-smtp-{port}.lock" for port in (2526, 2527, 2528)]
    leave_port(serving)
    leave_port(joining)


def test_a_worker_that_opened_the_file_as_the_last_one_removed_it_opens_the_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race `leave_port` leaves: a joiner opened the file, then the last worker removed
    it. The joiner must not take the removed file for the port's (a worker of another stack
    opening the path afterwards would find no one there and serve beside it)."""
    last = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    assert last is not None
    real_flock = listen.fcntl.flock
    left = False

    def flock_after_the_last_left(handle: Any, operation: int) -> None:
        nonlocal left
        if not left and handle is not last:
            left = True
            leave_port(last)  # between the joiner's open and its lock
        real_flock(handle, operation)

    monkeypatch.setattr(listen.fcntl, "flock", flock_after_the_last_left)
    joiner = join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path)
    monkeypatch.setattr(listen.fcntl, "flock", real_flock)
    assert joiner is not None and left
    with pytest.raises(CannotStart):  # the new file says whose the port is
        join_port("127.0.0.1", 2525, "stack B", "smtp_port", tmp_path)
    leave_port(joiner)


def test_a_lock_file_that_cannot_be_opened_skips_the_check(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another user's file (or no such folder): the worker starts, with a warning."""
    caplog.set_level(logging.WARNING)
    assert join_port("127.0.0.1", 2525, "stack A", "smtp_port", tmp_path / "missing") is None
    assert "cannot check which stack serves 127.0.0.1:2525" in caplog.text
