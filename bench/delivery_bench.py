#!/usr/bin/env python3
"""Delivery micro-benchmark: MailDB.deliver of small batches, bodies inline vs files.

For each `--inline-max` value, a fresh MailDB in a temporary directory on the data disk
(not /tmp, which may be tmpfs and make fsync free) gets `--batches` batches of `--batch`
messages of `--size` octets for one user, one `deliver` call per batch, as the consumer
hands them over. Reported per threshold: deliveries per second (wall clock), and the
process's CPU per message (user and system, from os.times: every thread, SQLite's and the
writer's included). Then `open_message` reads every delivered message back in one thread
(what a FETCH reader thread does) and the mean time per call is shown.

    .venv/bin/python bench/delivery_bench.py                       # 0 and 65536
    .venv/bin/python bench/delivery_bench.py --inline-max 0 65536 --batches 400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.store.backends.maildb import MailDB  # noqa: E402
from services.store.mailbox import Delivery  # noqa: E402

USER = "bench@delivery.test"


def body(size: int, n: int) -> bytes:
    head = f"From: a@example.net\r\nSubject: bench {n}\r\n\r\n".encode()
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


async def run(inline_max: int, batches: int, batch: int, size: int, where: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tiermail-delivery-bench-", dir=where) as root:
        db = MailDB(Path(root) / "mail", inline_max=inline_max)
        try:
            await db.deliver([Delivery("warm", USER, body(size, 0), time.time())])
            cpu, wall = os.times(), time.perf_counter()
            for b in range(batches):
                await db.deliver([Delivery(f"q{b}-{i}", USER, body(size, i), time.time())
                                  for i in range(batch)])
            wall, after = time.perf_counter() - wall, os.times()
            count = batches * batch
            user_ms = (after.user - cpu.user) * 1000 / count
            sys_ms = (after.system - cpu.system) * 1000 / count
            guids = [m.guid for m in await db.list_messages(USER)]
            read_us = await asyncio.to_thread(read_all, db, guids)
        finally:
            await db.close()
    print(f"| {inline_max} | {batch} x {size} B | {count / wall:,.0f}/s | {user_ms:.3f} "
          f"| {sys_ms:.3f} | {user_ms + sys_ms:.3f} | {read_us:.1f} µs |")


def read_all(db: MailDB, guids: list[str], rounds: int = 3) -> float:
    """Mean µs per open_message + read + close, best of `rounds` passes over `guids`."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for guid in guids:
            with db.open_message(USER, guid) as f:
                f.read()
        best = min(best, time.perf_counter() - started)
    return best * 1e6 / len(guids)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inline-max", type=int, nargs="+", default=[0, 65536])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=ROOT, help="where the temporary store "
                        "goes (default: the repository, on the data disk)")
    args = parser.parse_args()
    print("| inline max | batch | deliveries | user ms/msg | system ms/msg | CPU ms/msg "
          "| open_message |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for inline_max in args.inline_max:
        await run(inline_max, args.batches, args.batch, args.size, args.dir)


if __name__ == "__main__":
    asyncio.run(main())
