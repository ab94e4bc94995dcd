"""The real `tiermail store` process migrating a schema 5 index: `message.padding` (POP3's
line end padding) is computed in batches, each committed on its own, so a SIGKILL midway
leaves a consistent index with the finished batches kept, and the restarted store completes
the rest; POP3's sizes are exact once it answers.

The computation is stopped at a known point without timing: the message file it reaches
last is a FIFO, whose open() waits for a writer that never comes (as a read from a hung
disk would). Before the restart the FIFO becomes the message's real file again."""

from __future__ import annotations

import asyncio
import os
import poplib
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

from common.passwords import hash_password
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import (
    PADDING_BATCH,
    PADDING_DELIVERED,
    PADDING_PENDING,
    MailDB,
)
from services.store.mailbox import line_end_padding
from tests.integration.store.helpers import add_users, make_message, publish_all
from tests.support import TierProcess, check_bodies, wait_until

USER = "old@example.test"
PASSWORD = "migrated pw"
# Three batches: two are committed, the third stops at its last message, the FIFO.
MESSAGES = 2 * PADDING_BATCH + 500


def delivered(uid: int) -> bool:
    """Whether message `uid` came by delivery; the others were APPENDed."""
    return uid % 4 != 3


def body(uid: int) -> bytes:
    text = f"From: a@remote.test\r\nSubject: old {uid}\r\n\r\nstored before schema 6\r\n"
    if not delivered(uid):  # APPEND kept bare LFs until after schema 5
        text = text.replace("\r\n\r\n", "\n\n")
    ending = uid % 5
    if ending == 0:
        return text.encode()[:-2]  # no final line end: POP3 adds 2 octets
    if ending == 1:
        return text.encode()[:-1]  # a lone CR at the end: 1
    return text.encode()


def guid(uid: int) -> str:
    return f"{uid:032x}"  # in UID order, which is the order the migration takes them in


def make_schema_5_index(settings: Settings) -> Path:
    """USER's index as schema 5 code left it: MESSAGES messages, a third of them inline and
    the rest files, most delivered, some APPENDed with bare LFs, no `message.padding`.
    Returns the user's directory."""
    async def create() -> Path:
        db = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
        try:
            await db.status(USER)  # creates the index with the standard folders
            return db.user_path(USER)
        finally:
            await db.close()

    base = asyncio.run(create())
    conn = sqlite3.connect(base / "index.sqlite", isolation_level=None)
    try:
        conn.execute("ALTER TABLE message DROP COLUMN padding")
        conn.execute("PRAGMA user_version=5")
        conn.execute("BEGIN")
        inbox = conn.execute("SELECT id FROM mailbox WHERE name = 'INBOX'").fetchone()[0]
        conn.executemany(
            "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags, modseq)"
            " VALUES (?, ?, ?, ?, ?, '', ?)",
            [(inbox, uid, guid(uid), len(body(uid)), 1.7e9 + uid, uid)
             for uid in range(1, MESSAGES + 1)])
        conn.executemany(
            "INSERT INTO delivered (queue_id, mailbox_id, uid, delivered_at) VALUES (?, ?, ?, 0)",
            [(f"q{uid}", inbox, uid) for uid in range(1, MESSAGES + 1) if delivered(uid)])
        conn.executemany("INSERT INTO body (guid, data) VALUES (?, ?)",
                         [(guid(uid), body(uid)) for uid in range(1, MESSAGES + 1)
                          if uid % 3 == 0])
        conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                     (MESSAGES + 1, MESSAGES, inbox))
        conn.execute("UPDATE account SET usage = (SELECT sum(size) FROM message)")
        conn.execute("COMMIT")
    finally:
        conn.close()
    for uid in range(1, MESSAGES + 1):
        if uid % 3:
            path = message_file(base, uid)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(body(uid))
    return base


def message_file(base: Path, uid: int) -> Path:
    return base / "m" / guid(uid)[:2] / guid(uid)


def paddings(base: Path) -> dict[str, int | None]:
    """GUID -> stored padding of every message (None: not computed yet); {} before the
    migration added the column."""
    conn = sqlite3.connect(f"{(base / 'index.sqlite').as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 6:
            return {}
        return dict(conn.execute("SELECT guid, padding FROM message"))
    finally:
        conn.close()


def wrong_paddings(found: dict[str, int | None]) -> list[int]:
    """UIDs of the old messages whose computed padding is not what their body needs."""
    return [uid for uid in range(1, MESSAGES + 1)
            if found.get(guid(uid)) not in (None, line_end_padding(body(uid)))]


def test_sigkill_midway_through_the_padding_migration_keeps_and_resumes_it(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    add_users(settings, [USER])
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.set_password(USER, hash_password(PASSWORD))
    accounts.close()
    base = make_schema_5_index(settings)
    last = message_file(base, MESSAGES)  # a file (its UID is no multiple of 3), delivered
    assert MESSAGES % 3 and delivered(MESSAGES)
    last.unlink()
    os.mkfifo(last)

    # A delivery for the user makes the store open the index, which migrates it.
    asyncio.run(publish_all(settings, [make_message(USER)]))
    store = run_tier(settings, "store")

    def stuck_in_the_third_batch() -> bool:
        found = paddings(base)
        return (len(found) == MESSAGES + 1
                and sum(p is None for p in found.values()) == MESSAGES - 2 * PADDING_BATCH)

    wait_until(stuck_in_the_third_batch, timeout=60,
               what="two batches of paddings committed and the delivery stored")
    store.kill(signal.SIGKILL)

    found = paddings(base)
    assert sum(p is None for p in found.values()) == MESSAGES - 2 * PADDING_BATCH
    assert not wrong_paddings(found)
    last.unlink()  # the disk is back: the FIFO becomes the message's file again
    last.write_bytes(body(MESSAGES))
    check_bodies(base)  # integrity_check, counts, one body per message

    store = run_tier(settings, "store")
    store.wait_for_port(settings.pop3_port)
    pop = poplib.POP3("127.0.0.1", settings.pop3_port, timeout=60)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)  # waits for the paddings still to compute
        listed = [int(line.split()[1]) for line in pop.list()[1]]
        expected = [len(body(uid)) + line_end_padding(body(uid))
                    for uid in range(1, MESSAGES + 1)]
        assert listed[:MESSAGES] == expected
        assert pop.stat() == (MESSAGES + 1, sum(listed))
        _, lines, _ = pop.retr(MESSAGES)  # the message the FIFO stood for
        assert sum(len(line) + 2 for line in lines) == expected[-1]
    finally:
        pop.quit()

    found = paddings(base)
    assert None not in found.values()
    assert not wrong_paddings(found)
    conn = sqlite3.connect(base / "index.sqlite")
    try:  # the migration's helper indexes are gone
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name IN (?, ?)",
                            (PADDING_PENDING, PADDING_DELIVERED)).fetchone() == (0,)
    finally:
        conn.close()
    store.kill(signal.SIGTERM)
    assert store.proc.returncode == 0, store.output()
    check_bodies(base)
