"""MODSEQs after a power loss (RFC 7162 3.1: a mod-sequence is never reused in a mailbox).

Flag changes commit without waiting for the disk, so a power loss may take the last ones back.
SIGKILL cannot show that (the page cache survives it), so the loss is simulated: the index
files are copied at a point the disk has, more flags are changed, the store stops, and the
copies are put back, with the run marker a store that never stopped leaves behind, written
under another boot of the kernel. A CONDSTORE client that saw the lost MODSEQs must then see
a higher HIGHESTMODSEQ, and CHANGEDSINCE must tell it every change since, the lost ones
undone included.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from common.auththrottle import AuthThrottle
from common.ids import new_queue_id
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.backends.epoch import EPOCH, RUNNING, current_boot
from services.store.backends.maildb import MailDB, user_path
from services.store.imap.server import ImapDeps, start_imap_servers
from services.store.mailbox import INBOX, Delivery
from tests.integration.imap.clients import Raw, Server, in_thread
from tests.integration.imap.conftest import ALICE, TEST_AUTH_DELAY, USERS

INDEX_FILES = ("index.sqlite", "index.sqlite-wal")


@contextlib.asynccontextmanager
async def store_running(root: Path, settings: Settings, accounts: AccountDB
                        ) -> AsyncIterator[tuple[MailDB, Server]]:
    """A MailDB on `root` and IMAP in front of it, stopped cleanly at the end."""
    maildb = MailDB(root, inline_max=settings.store_inline_max)
    client = aioredis.from_url(settings.redis_url)
    throttle = AuthThrottle(client, settings.redis_prefix, settings.auth_failures_per_ip,
                            settings.auth_failures_per_user)
    servers = await start_imap_servers(settings, ImapDeps(
        store=maildb, accounts=accounts, throttle=throttle, auth_failure_delay=TEST_AUTH_DELAY))
    try:
        yield maildb, Server(settings.imap_port, settings.imaps_port, dict(USERS))
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        await client.aclose()
        await maildb.close()


def fetched(raw: Raw, command: str) -> dict[int, dict[bytes, Any]]:
    """Sequence number -> FETCH attributes."""
    found = {}
    for entry in raw.ok(command).parsed(b"FETCH"):
        items = entry[2]
        found[int(entry[0])] = dict(zip(items[::2], items[1::2], strict=True))
    return found


def highestmodseq(untagged: list[bytes]) -> int:
    for line in untagged:
        if b"[HIGHESTMODSEQ " in line:
            return int(line.split(b"[HIGHESTMODSEQ ")[1].split(b"]")[0])
    raise AssertionError(untagged)


async def test_power_loss_never_reuses_a_modseq(tmp_path: Path, settings: Settings,
                                                imap_users: AccountDB) -> None:
    root = tmp_path / "mail"
    saved = tmp_path / "disk"
    saved.mkdir()
    async with store_running(root, settings, imap_users) as (maildb, server):
        for n in range(3):
            body = f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()
            assert await maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time(),
                                                  INBOX)]) == [True]
        index_dir = user_path(root, ALICE)

        def before_loss() -> int:
            raw = server.raw(ALICE)
            raw.ok("SELECT INBOX (CONDSTORE)")
            raw.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
            # What the disk holds: every commit so far waited for it, or made it durable.
            for name in INDEX_FILES:
                if (index_dir / name).exists():
                    shutil.copy2(index_dir / name, saved / name)
            # Then changes that did not wait for the disk, and that the power loss takes back.
            raw.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")
            raw.ok("STORE 3 +FLAGS.SILENT (\\Flagged)")
            seen = max(attrs[b"MODSEQ"][0] for attrs in fetched(raw, "FETCH 1:* (MODSEQ)")
                       .values())
            raw.ok("LOGOUT")
            return int(seen)

        seen = await in_thread(before_loss)

    # The power loss: the index as the disk had it, the run marker of a store that never
    # stopped, written under the boot before this one.
    for name in (*INDEX_FILES, "index.sqlite-shm"):
        (index_dir / name).unlink(missing_ok=True)
    for name in INDEX_FILES:
        if (saved / name).exists():
            shutil.copy2(saved / name, index_dir / name)
    assert current_boot() != "an earlier boot"
    (root / RUNNING).write_text("an earlier boot\n")

    async with store_running(root, settings, imap_users) as (maildb, server):
        def after_restart() -> None:
            raw = server.raw(ALICE)
            highest = highestmodseq(raw.ok("SELECT INBOX (CONDSTORE)").untagged)
            assert highest > seen, "a MODSEQ the client saw will be handed out again"
            raw.ok("STORE 1 +FLAGS.SILENT (\\Answered)")  # a change after the restart
            changed = fetched(raw, f"FETCH 1:* (FLAGS) (CHANGEDSINCE {seen})")
            # The new change, and the messages whose lost changes the client still shows.
            assert sorted(changed) == [1, 2, 3], changed
            assert all(attrs[b"MODSEQ"][0] > seen for attrs in changed.values())
            assert set(changed[1][b"FLAGS"]) == {b"\\Seen", b"\\Answered"}
            assert changed[2][b"FLAGS"] == () and changed[3][b"FLAGS"] == ()  # really lost
            raw.ok("LOGOUT")

        await in_thread(after_restart)
    assert (root / EPOCH).read_text().strip() == "1"
    assert not (root / RUNNING).exists()  # a clean stop


async def test_a_process_crash_keeps_modseqs(tmp_path: Path, settings: Settings,
                                             imap_users: AccountDB) -> None:
    """A store that died without a reboot (SIGKILL, OOM) lost nothing: the page cache
    survives it, so no MODSEQ is moved and no client has to resynchronise."""
    root = tmp_path / "mail"
    async with store_running(root, settings, imap_users) as (maildb, _):
        assert await maildb.deliver([Delivery(new_queue_id(), ALICE, b"Subject: x\r\n\r\nx\r\n",
                                              time.time(), INBOX)]) == [True]
        uid = (await maildb.uids(ALICE))[0]
        await maildb.store_flags(ALICE, INBOX, [uid], "+", frozenset({"\\Seen"}))
        before = await maildb.status(ALICE)
    (root / RUNNING).write_text(current_boot() + "\n")  # what SIGKILL leaves

    async with store_running(root, settings, imap_users) as (maildb, _):
        assert await maildb.status(ALICE) == before
        assert [m.modseq for m in await maildb.list_messages(ALICE)] == [before.highestmodseq]
    assert not (root / EPOCH).exists()
