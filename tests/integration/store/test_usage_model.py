"""The quota usage MailDB keeps (one counter, moved in the same transaction as the rows) must
equal the sizes of the messages that exist, after any mix of delivery (with the trace fields
the consumer adds above the body; also redelivery of the same queue id), APPEND, COPY,
MOVE, EXPUNGE, DELETE and RENAME (INBOX too), and COPY or APPEND refused over quota: a
drift would refuse mail below the quota or let it past it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from common.ids import new_queue_id
from services.store.backends.maildb import MailDB
from services.store.mailbox import (
    INBOX,
    CannotDelete,
    Delivery,
    InvalidMailboxName,
    MailboxExists,
    NoSuchMailbox,
    OverQuota,
)

ALICE = "alice@example.test"
NAMES = [INBOX, "Archive", "a", "a/b", "b"]


def body(rng: random.Random) -> bytes:
    return b"Subject: x\r\n\r\n" + b"y" * rng.randint(0, 3000) + b"\r\n"


def trace(rng: random.Random) -> bytes:
    """The trace fields the consumer puts above every delivered message (Delivery.head)."""
    return (f"Return-Path: <s{rng.randint(0, 10**rng.randint(0, 9))}@remote.test>\r\n"
            f"Delivered-To: {ALICE}\r\n").encode()


async def stored_octets(db: MailDB) -> int:
    total = 0
    for mailbox in await db.list_mailboxes(ALICE):
        total += sum(info.size for info in await db.list_messages(ALICE, mailbox.name))
    return total


async def step(db: MailDB, rng: random.Random, queue_ids: list[str]) -> None:
    source, dest = rng.choice(NAMES), rng.choice(NAMES)
    uids = [m.uid for m in await db.list_messages(ALICE, source)] if source in {
        m.name for m in await db.list_mailboxes(ALICE)} else []
    some = rng.sample(uids, min(len(uids), rng.randint(1, 4))) if uids else []
    kind = rng.choice(["deliver", "redeliver", "append", "copy", "move", "expunge",
                       "delete", "rename", "create"])
    quota = rng.choice([None, None, await db.usage(ALICE) + rng.randint(0, 4000)])
    if kind == "deliver" or (kind == "redeliver" and not queue_ids):
        queue_ids.append(new_queue_id())
        await db.deliver([Delivery(queue_ids[-1], ALICE, body(rng), time.time(),
                                   head=trace(rng))])
    elif kind == "redeliver":  # the broker redelivers: stored once
        await db.deliver([Delivery(rng.choice(queue_ids), ALICE, body(rng), time.time(),
                                   head=trace(rng))])
    elif kind == "append":
        await db.append(ALICE, dest, body(rng), frozenset(), quota=quota)
    elif kind == "copy":
        await db.copy(ALICE, source, some, dest, quota)
    elif kind == "move":
        await db.move(ALICE, source, some, dest)
    elif kind == "expunge":
        await db.expunge(ALICE, source, some)
    elif kind == "delete":
        await db.delete_mailbox(ALICE, source)
    elif kind == "rename":
        await db.rename_mailbox(ALICE, source, dest)
    else:
        await db.create_mailbox(ALICE, dest)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_usage_is_the_size_of_what_is_stored(tmp_path: Path, seed: int) -> None:
    db = MailDB(tmp_path / "mail", inline_max=1024)  # inline bodies and files side by side
    rng = random.Random(seed)
    queue_ids: list[str] = []
    try:
        await db.deliver([Delivery(new_queue_id(), ALICE, body(rng), time.time(),
                                   head=trace(rng))])
        for _ in range(250):
            try:
                await step(db, rng, queue_ids)
            except (NoSuchMailbox, MailboxExists, OverQuota, CannotDelete, InvalidMailboxName):
                pass  # refused (INBOX, a rename into itself, ...): the usage must not move
            assert await db.usage(ALICE) == await stored_octets(db)
    finally:
        await db.close()
