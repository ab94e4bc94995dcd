#!/usr/bin/env python3
"""Accounts benchmark: 100,000 mailboxes in the store's account database.

Measures
  * bulk insert of N users into the account DB (AccountDB.add_users_bulk, one transaction);
  * building the directory snapshot from the DB and publishing it to Redis (Directory.publish,
    the atomic swap the store does at start), and the Redis memory it takes;
  * `tiermail store` start-up with N accounts: time until it is ready and until it logs that
    it published the directory, and its resident memory (RSS) afterwards;
  * one message through a `tiermail filter` to the last user, to show the directory answers.

One password is hashed once (argon2id, common/passwords.py) and that hash is stored for every
user: hashing 100,000 passwords would take hours and is not what is measured here.

    .venv/bin/python bench/accounts_bench.py                # 100,000 accounts
    .venv/bin/python bench/accounts_bench.py --accounts 10000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import smtplib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import BenchError, TiermailStack, log, temp_root, terminate_on_sigterm, wait_for

from common.directory import Directory, DirectorySnapshot
from common.passwords import hash_password
from common.settings import Settings
from services.store.backends.accounts import AccountDB

DOMAIN = "accounts.test"


@dataclass
class Result:
    accounts: int
    insert_s: float
    snapshot_s: float
    publish_s: float
    redis_bytes: int
    store_ready_s: float
    store_directory_s: float
    store_rss_kib: int
    delivered: bool


def address(i: int) -> str:
    return f"user{i:06d}@{DOMAIN}"


def fill_accounts(settings: Settings, count: int) -> tuple[float, float, DirectorySnapshot]:
    accounts = AccountDB.for_store(settings.store_dir)
    try:
        accounts.add_domain(DOMAIN)
        password_hash = hash_password("bench-password")
        started = time.monotonic()
        accounts.add_users_bulk((address(i), password_hash) for i in range(count))
        insert_s = time.monotonic() - started
        started = time.monotonic()
        snapshot = accounts.snapshot()
        snapshot_s = time.monotonic() - started
    finally:
        accounts.close()
    if len(snapshot.users) != count:
        raise BenchError(f"{len(snapshot.users)} users in the snapshot, expected {count}")
    return insert_s, snapshot_s, snapshot


async def publish(settings: Settings, snapshot: DirectorySnapshot) -> tuple[float, int]:
    from redis.asyncio import from_url

    redis = from_url(settings.redis_url, socket_timeout=30)
    try:
        before = int((await redis.info("memory"))["used_memory"])
        directory = Directory(redis, settings.redis_prefix)
        started = time.monotonic()
        await directory.publish(snapshot)
        elapsed = time.monotonic() - started
        after = int((await redis.info("memory"))["used_memory"])
        counts = await directory.counts()
    finally:
        await redis.aclose()
    if counts["users"] != len(snapshot.users):
        raise BenchError(f"Redis holds {counts['users']} users after publish")
    return elapsed, after - before


def logged_at(text: str, marker: str) -> float:
    """The time (epoch seconds) of the first log line with `marker` (common/logs.py's text
    format: `2026-12-07T03:30:57.726Z LEVEL ...`)."""
    line = next(line for line in text.splitlines() if marker in line)
    stamp = datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def run(root: Path, args: argparse.Namespace) -> Result:
    stack = TiermailStack(root, args.redis_db)
    try:
        stack.create_vhost()
        settings = Settings.from_env(stack.env)
        log(f"accounts: inserting {args.accounts} users into {settings.store_dir}")
        insert_s, snapshot_s, snapshot = fill_accounts(settings, args.accounts)
        log(f"accounts: insert {insert_s:.2f} s, snapshot {snapshot_s:.2f} s; publishing")
        publish_s, redis_bytes = asyncio.run(publish(settings, snapshot))
        log(f"accounts: publish {publish_s:.2f} s, Redis +{redis_bytes / 2**20:.1f} MiB")

        # Both from the store's log times (ms), not from when this script looked: the
        # directory is published before the store says it runs, and polling only after
        # start_store() made the two figures one (found in review).
        started = time.time()
        stack.start_store()
        store_log = stack.logs / "store-1.log"
        wait_for(lambda: "directory published" in store_log.read_text(errors="replace"),
                 args.timeout, "the store to publish the directory", interval=0.05)
        text = store_log.read_text(errors="replace")
        store_ready_s = logged_at(text, "event=started") - started
        store_directory_s = logged_at(text, "directory published") - started
        time.sleep(1)  # let start-up garbage settle before reading RSS
        rss = stack.rss_kib("store")
        log(f"accounts: store ready {store_ready_s:.2f} s, directory published "
            f"{store_directory_s:.2f} s, RSS {rss / 1024:.0f} MiB")

        stack.start_filter()
        last = address(args.accounts - 1)
        with smtplib.SMTP("127.0.0.1", stack.smtp_port, timeout=30) as smtp:
            smtp.sendmail("sender@client.test", [last],
                          f"From: sender@client.test\r\nTo: {last}\r\nSubject: hi\r\n\r\nhi\r\n")
        delivered = True
        stack.check_alive()
        return Result(args.accounts, insert_s, snapshot_s, publish_s, redis_bytes,
                      store_ready_s, store_directory_s, rss, delivered)
    except BenchError:
        stack.log_tails()
        raise
    finally:
        stack.close()


def markdown(r: Result) -> str:
    return "\n".join([
        f"Run {time.strftime('%Y-%m-%d %H:%M %Z')}: {r.accounts} accounts in one domain.",
        "",
        "| step | result |",
        "| --- | ---: |",
        f"| bulk insert into the account DB | {r.insert_s:.3f} s |",
        f"| directory snapshot from the DB | {r.snapshot_s:.3f} s |",
        f"| publish to Redis (atomic swap) | {r.publish_s:.3f} s |",
        f"| Redis memory for the directory | {r.redis_bytes / 2**20:.1f} MiB |",
        f"| `tiermail store` start until ready | {r.store_ready_s:.2f} s |",
        f"| `tiermail store` start until directory published | {r.store_directory_s:.2f} s |",
        f"| store RSS after start-up | {r.store_rss_kib / 1024:.0f} MiB |",
        f"| a message to the last user accepted | {'yes' if r.delivered else 'no'} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 accounts")
    args = parser.parse_args(argv)
    if args.quick:
        args.accounts = 2000
    try:
        with terminate_on_sigterm(), temp_root("tiermail-accounts-", args.keep) as root:
            result = run(root, args)
    except (BenchError, smtplib.SMTPException, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
