#!/usr/bin/env python3
"""Index migration benchmark: a schema 5 index of 100,000 messages brought to the current
schema (5 -> 6 computes `message.padding` from the last octets of every stored message).

`build` writes, in a directory on the data disk, a schema 5 index for one user: the index as
the current code creates it with `message.padding` dropped and `user_version = 5`, then
`--messages` rows bulk-loaded with their bodies (4 KB; files under m/xx/ with
`--inline-max 0`, what every message stored before schema 4 is; else `body` rows), each
with its `delivered` row (delivered mail: the migration reads its last octet only). One
message in 50 lacks its final CRLF and one in 97 ends with a lone CR (POP3 pads those).
A second user, with a current index, receives mail during the migration.

`migrate` (a process of its own, so its memory is the migration's) opens a MailDB on it and
delivers one message to the migrated user, which makes the writer open and migrate the
index. Meanwhile it measures: the event loop's worst lateness (a 5 ms ticker); deliveries of
one message each to the other user, back to back (each waits for the single writer thread
every user shares); a STATUS and a listing of the migrated user (reads: IMAP SELECT and
POP3); the time until no row lacks its padding; peak RSS (VmHWM). At the end every
message's padding is compared with what its body says. `--cold` first evicts the files and
the index from the page cache (posix_fadvise DONTNEED), as after a restart.

`kill` runs `migrate` in a child process, SIGKILLs it `--after` seconds into the migration,
checks the index (integrity_check, schema, paddings computed so far right), then runs
`migrate` again and reports whether it finished.

    .venv/bin/python bench/migration_bench.py build DIR --messages 100000 --inline-max 0
    .venv/bin/python bench/migration_bench.py migrate DIR [--cold]
    .venv/bin/python bench/migration_bench.py kill DIR --after 2 [--cold]
    (the directory is consumed: build again for each run; remove it afterwards)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.store.backends.maildb import SCHEMA_VERSION, MailDB  # noqa: E402
from services.store.mailbox import Delivery, line_end_padding  # noqa: E402

USER = "old@migration.test"
OTHER = "other@migration.test"
HEAD = b"From: a@example.net\r\nSubject: migration bench\r\n\r\n"
BODY = HEAD + b"x" * 4000 + b"\r\n"
PADDING_SCHEMA = 6  # the schema that added message.padding: checked from there on


def body(uid: int) -> bytes:
    if uid % 50 == 0:
        return BODY[:-2]  # no final line end: padding 2
    if uid % 97 == 0:
        return BODY[:-1]  # a lone CR at the end: padding 1
    return BODY


def build(root: Path, messages: int, inline_max: int) -> None:
    asyncio.run(_create_indexes(root))
    db = MailDB(root / "mail", inline_max=inline_max)
    base = db.user_path(USER)
    conn = sqlite3.connect(base / "index.sqlite", isolation_level=None)
    try:
        conn.execute("DELETE FROM message")
        conn.execute("DELETE FROM body")
        conn.execute("DELETE FROM delivered")
        conn.execute("ALTER TABLE message DROP COLUMN padding")
        conn.execute("PRAGMA user_version=5")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO message (mailbox_id, uid, guid, size, internaldate, flags, modseq)"
            " VALUES (1, ?, ?, ?, ?, ?, ?)",
            ((uid, guid(uid), len(body(uid)), 1.7e9 + uid, "\\Seen" if uid % 3 else "", uid)
             for uid in range(1, messages + 1)))
        conn.executemany(
            "INSERT INTO delivered (queue_id, mailbox_id, uid, delivered_at) VALUES (?, 1, ?, 0)",
            ((f"bulk{uid}", uid) for uid in range(1, messages + 1)))
        if inline_max:
            conn.executemany("INSERT INTO body (guid, data) VALUES (?, ?)",
                             ((guid(uid), body(uid)) for uid in range(1, messages + 1)))
        else:
            for uid in range(1, messages + 1):
                path = base / "m" / guid(uid)[:2] / guid(uid)
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(body(uid))
        conn.execute("UPDATE mailbox SET uidnext = ?, highestmodseq = ? WHERE name = 'INBOX'",
                     (messages + 1, messages))
        conn.execute("UPDATE account SET usage = (SELECT sum(size) FROM message)")
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    os.sync()
    print(f"built {messages:,} messages ({'inline' if inline_max else 'files'}) in {root}")


async def _create_indexes(root: Path) -> None:
    db = MailDB(root / "mail", inline_max=0)
    try:
        await db.deliver([Delivery("seed-old", USER, BODY, 1.7e9),
                          Delivery("seed-other", OTHER, BODY, 1.7e9)])
    finally:
        await db.close()


def guid(uid: int) -> str:
    return f"{uid:032x}"


def evict(root: Path) -> None:
    """Drop the data directory's files from the page cache (only ours, not the machine's;
    dirty pages are not dropped, so everything is written back first)."""
    os.sync()
    for path in _files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in names:
            yield Path(directory) / name


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def index_state(index: Path) -> tuple[int, int]:
    """(user_version, rows still without their padding: -1 while there is no column)."""
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        columns = {row[1] for row in conn.execute("PRAGMA table_info(message)")}
        if version < 6 or "padding" not in columns:
            return version, -1
        return version, conn.execute(
            "SELECT count(*) FROM message WHERE padding IS NULL").fetchone()[0]
    finally:
        conn.close()


async def migrate(root: Path, cold: bool, alone: bool) -> int:
    if cold:
        evict(root)
    db = MailDB(root / "mail", inline_max=65536)
    index = db.user_path(USER) / "index.sqlite"
    baseline_kib = vm_kib("VmRSS")
    stop = asyncio.Event()
    lag = asyncio.create_task(_loop_lag(stop))
    others = asyncio.create_task(_deliveries(db, stop, alone))
    started = time.perf_counter()
    print(f"migration started pid={os.getpid()}", flush=True)
    first = asyncio.create_task(db.deliver([Delivery("trigger", USER, BODY, time.time())]))
    await asyncio.sleep(0.05)  # the trigger reaches the writer first
    status = asyncio.create_task(_timed(db.status(USER)))
    # A listing of 100,000 messages takes ~40 MiB itself: not when measuring memory.
    listing = asyncio.create_task(_timed(asyncio.sleep(0) if alone else
                                         db.list_messages(USER)))
    await first
    delivered_after = time.perf_counter() - started
    while True:
        version, pending = await asyncio.to_thread(index_state, index)
        # The current schema (a later one than 6 too): with 6 written in, migrate waited for
        # ever once the schema went to 7 (found in review).
        if version == SCHEMA_VERSION and pending == 0:
            break
        await asyncio.sleep(0.05)
    done_after = time.perf_counter() - started
    padding = await _timed(db.line_end_padding(USER))
    stop.set()
    latencies, worst_lag = await others, await lag
    peak_kib = vm_kib("VmHWM")
    await db.close()
    wrong = check_padding(index)
    print(f"first delivery to the migrated user returned after {delivered_after:.2f} s; "
          f"every padding stored after {done_after:.2f} s")
    print(f"reads of the migrated user during it: status {await status:.2f} s, "
          f"list_messages {await listing:.2f} s; line_end_padding after it {padding:.3f} s")
    print(f"event loop: worst lateness {worst_lag * 1000:.0f} ms")
    if latencies:
        print(f"deliveries to another user meanwhile: {len(latencies)}, worst "
              f"{max(latencies):.2f} s, median {sorted(latencies)[len(latencies) // 2]:.3f} s")
    print(f"memory: RSS {baseline_kib // 1024} MiB before, peak {peak_kib // 1024} MiB")
    print(f"paddings wrong: {wrong}")
    return 1 if wrong else 0


async def _timed(call: Awaitable[object]) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


async def _loop_lag(stop: asyncio.Event) -> float:
    worst = 0.0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.005)
        worst = max(worst, loop.time() - before - 0.005)
    return worst


async def _deliveries(db: MailDB, stop: asyncio.Event, alone: bool) -> list[float]:
    """Back to back; with `alone`, one only (its wait is the writer's longest hold-up)."""
    latencies: list[float] = []
    if alone:
        await asyncio.sleep(0.05)  # behind the trigger
    n = 0
    while not stop.is_set():
        n += 1
        started = time.perf_counter()
        await db.deliver([Delivery(f"other-{os.getpid()}-{n}", OTHER, BODY, time.time())])
        latencies.append(time.perf_counter() - started)
        if alone:
            break
    return latencies


def check_padding(index: Path) -> int:
    """Rows whose stored padding is not what their body gives (NULL: not yet computed, not
    counted)."""
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT uid, guid, padding FROM message WHERE mailbox_id = 1"
                            " AND padding IS NOT NULL").fetchall()
    finally:
        conn.close()
    return sum(1 for uid, stored, padding in rows
               if stored == guid(uid) and padding != line_end_padding(body(uid)))


def kill(root: Path, after: float, cold: bool) -> int:
    command = [sys.executable, __file__, "migrate", str(root), "--alone"]
    command += ["--cold"] if cold else []
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    print(child.stdout.readline().strip())
    time.sleep(after)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    index = MailDB(root / "mail", inline_max=0).user_path(USER) / "index.sqlite"
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    version, pending = index_state(index)
    print(f"SIGKILLed after {after} s: integrity {integrity}, schema {version}, rows without "
          f"padding {pending if pending >= 0 else 'all (no column)'}, "
          f"wrong paddings "
          f"{check_padding(index) if version >= PADDING_SCHEMA else 'not checked'}")
    started = time.perf_counter()
    rerun = subprocess.run(command, timeout=1800, check=False)
    print(f"rerun: exit {rerun.returncode} after {time.perf_counter() - started:.1f} s")
    return rerun.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "migrate", "kill"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--inline-max", type=int, default=0)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--after", type=float, default=2.0)
    parser.add_argument("--alone", action="store_true",
                        help="no deliveries to the other user but one, sent with the trigger")
    args = parser.parse_args()
    if args.action == "build":
        build(args.root, args.messages, args.inline_max)
        return 0
    if args.action == "migrate":
        return asyncio.run(migrate(args.root, args.cold, args.alone))
    return kill(args.root, args.after, args.cold)


if __name__ == "__main__":
    sys.exit(main())
