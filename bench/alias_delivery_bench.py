#!/usr/bin/env python3
"""A message for a large alias beside another user's IMAP writes: how long does a STORE wait?

A fresh MailDB in a temporary directory on the data disk gets one message for each of
`--owners` mailbox owners (creating their indexes), then a second one for all of them in one
`deliver_uids` call, as the consumer hands over a message for a large alias. Meanwhile
another user's STORE +FLAGS runs every 20 ms; the longest and the median wait of those are
printed, with the delivery's own time, for each `--owners-per-job` value (the store's
WRITER_JOB_OWNERS; a value above `--owners` is one writer job, as before 2026-12-06).

    .venv/bin/python bench/alias_delivery_bench.py                 # 2000 owners; 32, one job
    .venv/bin/python bench/alias_delivery_bench.py --owners 500 --owners-per-job 8 32 128
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.store.backends import maildb  # noqa: E402
from services.store.mailbox import INBOX, Delivery  # noqa: E402

READER = "reader@alias.test"
BODY = b"From: a@example.net\r\nSubject: to the alias\r\n\r\n" + b"x" * 2000 + b"\r\n"


async def run(owners: int, per_job: int, where: Path) -> None:
    maildb.WRITER_JOB_OWNERS = per_job
    with tempfile.TemporaryDirectory(prefix="tiermail-alias-bench-", dir=where) as root:
        db = maildb.MailDB(Path(root) / "mail", inline_max=64 * 1024)
        try:
            await db.deliver([Delivery("r0", READER, BODY, time.time())])
            [message] = await db.list_messages(READER)
            names = [f"member{i}@alias.test" for i in range(owners)]
            await db.deliver_uids([Delivery(f"a{i}", n, BODY, time.time())
                                   for i, n in enumerate(names)])
            started = time.perf_counter()
            delivering = asyncio.create_task(db.deliver_uids(
                [Delivery(f"b{i}", n, BODY, time.time()) for i, n in enumerate(names)]))
            waits: list[float] = []
            while not delivering.done():
                asked = time.perf_counter()
                await db.store_flags(READER, INBOX, [message.uid], "+", frozenset({"\\Seen"}))
                waits.append(time.perf_counter() - asked)
                await asyncio.sleep(0.02)
            await delivering
            took = time.perf_counter() - started
        finally:
            await db.close()
    waits.sort()
    print(f"owners per job {per_job:>6}: delivery to {owners} owners {took:.2f} s; "
          f"{len(waits)} STOREs meanwhile, longest wait {waits[-1] * 1000:.0f} ms, "
          f"median {waits[len(waits) // 2] * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--owners", type=int, default=2000)
    parser.add_argument("--owners-per-job", type=int, nargs="+",
                        default=[maildb.WRITER_JOB_OWNERS, 1_000_000])
    parser.add_argument("--dir", type=Path, default=ROOT,
                        help="where the temporary store goes (a real disk, not tmpfs)")
    args = parser.parse_args()
    for per_job in args.owners_per_job:
        asyncio.run(run(args.owners, per_job, args.dir))


if __name__ == "__main__":
    main()
