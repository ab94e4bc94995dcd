"""The store's space reserve (services/store/backends/spacereserve.py) on real, small file
systems (tmpfs) filled to the last block: a store stopped cleanly while the disk was full
starts by giving it up and serves its mail; the reserve comes back once there is room."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import os
import poplib
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from common.passwords import hash_password
from common.settings import Settings
from services.store.backends import spacereserve
from services.store.backends.accounts import AccountDB
from tests.integration.store.helpers import add_users, make_message, publish_all, stored_count
from tests.integration.store.syscall_trace import (
    durability_violations,
    file_system,
    trace_python,
)
from tests.support import (
    TierProcess,
    eventually,
    fill,
    quota_disk,
    run_cli,
    tmpfs,
    wait_until,
)

MiB = 1 << 20
ALICE = "alice@example.test"
PASSWORD = "secret pw"


def status_text(settings: Settings) -> str:
    return run_cli(settings, "status").stdout


def allocated(path: Path) -> int:
    """Octets the file system gave `path` (0: no such file)."""
    return path.stat().st_blocks * 512 if path.exists() else 0


def test_a_store_stopped_cleanly_on_a_full_disk_starts_on_its_reserve(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    """Without the reserve this start fails (test_store_process.py: `its file system is
    full`): a clean stop removed the files SQLite must create again."""
    with tmpfs(tmp_path / "disk", "96m") as disk:
        settings = settings.replace(data_dir=disk / "var", store_space_reserve=16 * MiB)
        reserve = spacereserve.reserve_path(settings.store_dir)
        add_users(settings, [ALICE])
        accounts = AccountDB.for_store(settings.store_dir)
        accounts.set_password(ALICE, hash_password(PASSWORD))
        accounts.close()
        envelope, body = make_message(ALICE)
        asyncio.run(publish_all(settings, [(envelope, body)]))
        store = run_tier(settings, "store")
        wait_until(lambda: stored_count(settings.store_dir, [ALICE]) == 1,
                   what="the message stored")
        wait_until(lambda: allocated(reserve) >= 16 * MiB, what="the reserve made")
        store.stop()
        ballast = fill(disk)

        store = run_tier(settings, "store")
        wait_until(lambda: "store running" in store.output(), what="a start on the full disk")
        assert "released the space reserve" in store.output()
        assert not reserve.exists()
        wait_until(lambda: "has had no space reserve" in status_text(settings),
                   what="tiermail status saying so")
        pop3 = poplib.POP3("127.0.0.1", settings.pop3_port, timeout=30)
        try:
            pop3.user(ALICE)
            pop3.pass_(PASSWORD)
            assert pop3.stat()[0] == 1
            assert (b"\r\n".join(pop3.retr(1)[1]) + b"\r\n").endswith(body)
        finally:
            pop3.quit()  # nothing deleted: the UPDATE state writes nothing
        with imaplib.IMAP4("127.0.0.1", settings.imap_port, timeout=30) as imap:
            imap.login(ALICE, PASSWORD)
            assert imap.select("INBOX", readonly=True) == ("OK", [b"1"])
            status, data = imap.fetch("1", "(BODY.PEEK[])")
            assert status == "OK" and data[0][1].endswith(body)  # type: ignore[index]

        ballast.unlink()
        wait_until(lambda: allocated(reserve) >= 16 * MiB, timeout=60,
                   what="the reserve made again once there is room")
        # The line follows the allocation, and reaches the output a moment later (CI saw it
        # missing when looked at straight away).
        wait_until(lambda: "space reserve made" in store.output(), what="the line saying so")
        wait_until(lambda: "space reserve" not in status_text(settings),
                   what="tiermail status no longer saying so")
        store.stop()

        store = run_tier(settings.replace(store_space_reserve=0), "store")
        wait_until(lambda: "space reserve removed" in store.output(), what="0: no reserve")
        assert not reserve.exists()
        store.stop()


def test_a_store_killed_on_a_full_disk_keeps_its_reserve(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    """A store killed in this boot left its run marker and SQLite's files: its start needs
    no room, so the reserve stays for the clean stop that may come next."""
    with tmpfs(tmp_path / "disk", "96m") as disk:
        settings = settings.replace(data_dir=disk / "var", store_space_reserve=16 * MiB)
        reserve = spacereserve.reserve_path(settings.store_dir)
        add_users(settings, [ALICE])
        store = run_tier(settings, "store")
        wait_until(lambda: allocated(reserve) >= 16 * MiB, what="the reserve made")
        store.kill(signal.SIGKILL)
        fill(disk)
        store = run_tier(settings, "store")
        wait_until(lambda: "store running" in store.output(), what="a start on the full disk")
        assert allocated(reserve) >= 16 * MiB
        assert "released the space reserve" not in store.output()
        store.stop()


def test_the_reserve_is_made_only_with_room_to_spare_and_given_up_only_when_full(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "16m") as disk:
        reserve = spacereserve.reserve_path(disk)
        assert not spacereserve.make(disk, 8 * MiB)  # it would need 32 MiB free
        assert not reserve.exists()
        assert spacereserve.make(disk, MiB)
        assert allocated(reserve) >= MiB
        assert spacereserve.release_if_full(disk) == 0  # room enough: kept
        assert reserve.exists()

        ballast = fill(disk)
        assert not spacereserve.has_room(disk, spacereserve.ROOM_TO_START)
        assert spacereserve.release_if_full(disk) >= MiB
        assert not reserve.exists()
        assert spacereserve.has_room(disk, spacereserve.ROOM_TO_START)
        assert not spacereserve.make(disk, MiB)  # not on the last free megabyte
        assert [path.name for path in disk.iterdir()] == [ballast.name]
        ballast.unlink()
        assert spacereserve.make(disk, MiB)


def test_what_a_killed_or_restored_store_left_is_given_up_or_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reserve a killed store was still allocating is freed at a start on a full disk; a
    sparse one (a copy that kept holes) is no reserve and is made again; something else at
    the reserve's name is left alone, with a WARNING, and the start goes on."""
    with tmpfs(tmp_path / "disk", "16m") as disk:
        making = disk / spacereserve.MAKING_NAME
        with open(making, "wb") as file:
            os.posix_fallocate(file.fileno(), 0, MiB)
        ballast = fill(disk)
        assert spacereserve.release_if_full(disk) >= MiB
        assert not making.exists()
        ballast.unlink()

        reserve = spacereserve.reserve_path(disk)
        with open(reserve, "wb") as file:
            file.truncate(MiB)
        assert allocated(reserve) == 0
        assert spacereserve.make(disk, MiB)
        assert allocated(reserve) >= MiB
        reserve.unlink()

        reserve.mkdir()
        ballast = fill(disk)
        with caplog.at_level(logging.WARNING):
            assert spacereserve.release_if_full(disk) == 0
        assert "space reserve not given up" in caplog.text
        assert reserve.is_dir()


def test_a_reserve_made_is_on_disk_before_make_returns(tmp_path: Path) -> None:
    """The allocation is fsynced, and once renamed to its name, the directory is: a power
    loss after the store made its reserve must not leave a start on a full disk without it
    (or with a file whose blocks were never allocated)."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    calls, returned = trace_python(
        "from pathlib import Path\n"
        "from services.store.backends import spacereserve\n"
        f"assert spacereserve.make(Path({str(store_dir)!r}), {MiB})",
        tmp_path / "make.strace", "openat,fallocate,rename,fsync,fdatasync,write")
    fs = file_system(calls, set(), str(store_dir))
    reserve = str(spacereserve.reserve_path(store_dir))
    assert any(name.path == reserve and name.made_in_trace for name in fs.names)
    assert durability_violations(fs, returned, lambda path: path.startswith(reserve)) == []


def test_a_changed_setting_resizes_or_removes_the_reserve(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "16m") as disk:
        reserve = spacereserve.reserve_path(disk)
        assert spacereserve.make(disk, MiB)
        assert spacereserve.make(disk, 2 * MiB)
        assert reserve.stat().st_size == 2 * MiB and allocated(reserve) >= 2 * MiB
        assert [path.name for path in disk.iterdir()] == [reserve.name]
        spacereserve.remove(disk)
        assert not reserve.exists()
        spacereserve.remove(disk)  # none: nothing to do


async def test_a_reserve_that_cannot_be_made_is_said_and_a_smaller_one_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reserve larger than the disk allows (TIERMAIL_STORE_SPACE_RESERVE raised) left no
    line in the log, and status called the store without a reserve while the one made
    before was still there."""
    caplog.set_level(logging.INFO, logger="services.store")
    with tmpfs(tmp_path / "disk", "16m") as disk:
        for before, missing in ((None, True), (MiB, False)):
            if before:
                assert spacereserve.make(disk, before)
            state = spacereserve.ReserveState()
            keeping = asyncio.create_task(spacereserve.keep(disk, 8 * MiB, state))
            try:
                await eventually(lambda: any("not made" in r.getMessage()
                                             for r in caplog.records),
                                 within=10, what="the reserve's line")
            finally:
                keeping.cancel()
                await asyncio.gather(keeping, return_exceptions=True)
            [said] = [r.getMessage() for r in caplog.records if "not made" in r.getMessage()]
            assert said.startswith("space reserve of 8 MiB not made: it needs 32 MiB free")
            assert said.endswith("the one of 1 MiB made before is kept") is not missing
            assert (state.missing_since is not None) is missing
            caplog.clear()


def test_a_store_over_its_disk_quota_gives_up_the_reserve_too(tmp_path: Path) -> None:
    """Over a quota (btrfs qgroup: EDQUOT, statvfs shows room) the look for room sees it and
    the room the reserve held is back at once, before the start opens anything."""
    with quota_disk(tmp_path / "disk") as quota:
        reserve = spacereserve.reserve_path(quota.path)
        assert spacereserve.make(quota.path, 4 * MiB)
        quota.limit(quota.used() + 64 * 1024)
        assert not spacereserve.has_room(quota.path, spacereserve.ROOM_TO_START)
        assert spacereserve.release_if_full(quota.path) >= 4 * MiB
        assert not reserve.exists()
        assert spacereserve.has_room(quota.path, spacereserve.ROOM_TO_START)
