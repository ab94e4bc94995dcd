#!/usr/bin/env python3
"""Mailbox benchmark: one mailbox of 100,000 messages in the store's index.

Measures, on a MailDB in a temporary directory:
  * delivering a batch of 500 messages through the real path (4 KB bodies: inline under the
    default TIERMAIL_STORE_INLINE_MAX, one commit; files and fsyncs with --inline-max 0);
  * list_messages over the whole mailbox (what POP3 does at login, and IMAP will at SELECT);
  * status of that mailbox;
  * one more delivery into it (the index must not slow down as it grows).

The 100,000 index rows are bulk-loaded with SQL (files are not needed to list a mailbox):
100,000 real deliveries would measure the disk's fsync rate, which the 500-message batch
already shows.

    .venv/bin/python bench/mailbox_bench.py                 # 100,000 messages
    .venv/bin/python bench/mailbox_bench.py --messages 20000
    .venv/bin/python bench/mailbox_bench.py --inline-max 0    # every body a file
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.settings import Settings  # noqa: E402
from services.store.backends.maildb import MailDB  # noqa: E402
from services.store.mailbox import Delivery  # noqa: E402

USER = "bench@mailbox.test"
BODY = b"From: a@example.net\r\nSubject: bench\r\n\r\n" + b"x" * 4000 + b"\r\n"


def bulk_load(index: Path, count: int, first_uid: int) -> None:
    conn = sqlite3.connect(index, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags, modseq)"
            " VALUES (1, ?, ?, ?, ?, ?, ?)",
            ((uid, f"{uid:032x}", len(BODY), time.time(), "\\Seen" if uid % 3 else "", uid)
             for uid in range(first_uid, first_uid + count)))
        last = first_uid + count
        conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ?", (last, last))
        conn.execute("COMMIT")
    finally:
        conn.close()


async def timed(run: Callable[[], Awaitable[object]], runs: int = 3) -> float:
    """Best wall time of `runs` runs, in seconds."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        await run()
        best = min(best, time.perf_counter() - started)
    return best


async def main(messages: int, inline_max: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tiermail-mailbox-bench-") as root:
        db = MailDB(Path(root) / "mail", inline_max=inline_max)
        try:
            batch = [Delivery(f"warm{i}", USER, BODY, time.time()) for i in range(500)]
            started = time.perf_counter()
            await db.deliver(batch)
            batch_rate = len(batch) / (time.perf_counter() - started)
            bulk_load(db.user_path(USER) / "index.sqlite", messages, first_uid=1000)
            listing = await timed(lambda: db.list_messages(USER))
            status = await timed(lambda: db.status(USER))
            counted = (await db.status(USER)).messages
            one_more = await timed(
                lambda: db.deliver([Delivery(f"late{time.monotonic_ns()}", USER, BODY,
                                             time.time())]))
        finally:
            await db.close()
    # The columns of docs/benchmarks.md's table (the inline threshold was missing: review).
    print(f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {inline_max:,} | {counted:,} "
          f"| {batch_rate:.0f}/s | {listing * 1000:.0f} ms | {status * 1000:.1f} ms "
          f"| {one_more * 1000:.1f} ms |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--inline-max", type=int,
                        default=Settings.from_env().store_inline_max)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.inline_max))
