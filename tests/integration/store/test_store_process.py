"""The real `tiermail store` process: backlog after an outage, SIGKILL mid-delivery."""

from __future__ import annotations

import asyncio
import os
import poplib
import random
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from common.passwords import hash_password
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from tests.integration.store.helpers import (
    add_users,
    check_mailboxes,
    make_message,
    publish_all,
    stored_count,
)
from tests.support import (
    TierProcess,
    dead_letter_depth,
    fill,
    low_open_file_limit,
    queue_depth,
    tmpfs,
    wait_until,
)

USERS = [f"user{i}@example.test" for i in range(4)]
# Every LARGE_EVERY-th message is larger than the default TIERMAIL_STORE_INLINE_MAX, so one
# run stores (and is killed among) inline bodies and files alike.
LARGE_EVERY, LARGE = 4, 70_000


def _publish(settings: Settings, count: int) -> set[str]:
    messages = [make_message(USERS[i % len(USERS)], padding=LARGE if i % LARGE_EVERY == 0 else 0)
                for i in range(count)]
    asyncio.run(publish_all(settings, messages))
    return {envelope.queue_id for envelope, _ in messages}


@pytest.mark.slow
def test_backlog_is_delivered_once_the_store_returns(
        settings: Settings, run_tier: Callable[..., TierProcess],
        redis_client: redis.Redis) -> None:
    add_users(settings, USERS)
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.set_password(USERS[0], hash_password("secret pw"))
    accounts.close()
    queue_ids = _publish(settings, 1000)  # the store is not running: mail waits in the queue
    assert queue_depth(settings) == 1000

    started = time.monotonic()
    store = run_tier(settings, "store")
    wait_until(lambda: stored_count(settings.store_dir, USERS) == 1000, timeout=60,
               what="1000 messages stored")
    elapsed = time.monotonic() - started
    wait_until(lambda: queue_depth(settings) == 0, what="queue drained")
    print(f"\nstore process: 1000 queued messages delivered in {elapsed:.2f}s "
          "(including process start)")
    # The directory and a heartbeat are in Redis.
    assert redis_client.exists(f"{settings.redis_prefix}dir:version")
    wait_until(lambda: any(redis_client.scan_iter(
        match=f"{settings.redis_prefix}health:store:*")), what="heartbeat")

    # POP3 is served by the same process, from the same mailboxes.
    pop = poplib.POP3("127.0.0.1", settings.pop3_port, timeout=10)
    try:
        pop.user(USERS[0])
        pop.pass_("secret pw")
        assert pop.stat()[0] == 250
    finally:
        pop.quit()

    store.kill(signal.SIGTERM)
    assert store.proc.returncode == 0, store.output()
    assert "store stopped" in store.output()
    seen = check_mailboxes(settings.store_dir, USERS)
    assert set(seen) == queue_ids
    assert all(count == 1 for count in seen.values())
    assert dead_letter_depth(settings) == 0


@pytest.mark.slow
def test_sigkill_during_delivery_loses_and_duplicates_nothing(
        settings: Settings, run_tier: Callable[..., TierProcess], inline_max: int) -> None:
    # Every kill returns the prefetched messages to the queue and counts as a delivery
    # attempt; keep the limit far above the number of kills so nothing is dead-lettered.
    settings = settings.replace(delivery_attempts=1000, store_inline_max=inline_max)
    add_users(settings, USERS)
    queue_ids = _publish(settings, 2000)
    rng = random.Random(20261122)
    kills_mid_delivery = 0
    for _ in range(6):
        before = stored_count(settings.store_dir, USERS)
        if before == 2000:
            break
        store = run_tier(settings, "store")

        # Killed after a random number of further deliveries, not after a random time: a
        # fast store would otherwise finish all 2000 between two kills.
        target = before + rng.randint(1, 150)

        def progressed(store: TierProcess = store, target: int = target) -> bool:
            return stored_count(settings.store_dir, USERS) >= target or not store.alive

        wait_until(progressed, timeout=30, interval=0.005, what="store making progress")
        at_kill = stored_count(settings.store_dir, USERS)
        store.kill(signal.SIGKILL)
        if at_kill < 2000:
            kills_mid_delivery += 1
    assert kills_mid_delivery >= 3, "the store finished too fast to be killed mid-delivery"

    store = run_tier(settings, "store")
    # The last kill may have come after the last delivery: then there is nothing left to
    # wait for, and a SIGTERM before the signal handlers are installed would kill it.
    wait_until(lambda: "store running" in store.output(), what="start")
    wait_until(lambda: stored_count(settings.store_dir, USERS) >= 2000, timeout=60,
               what="all 2000 messages stored")
    wait_until(lambda: queue_depth(settings) == 0, what="queue drained")
    store.kill(signal.SIGTERM)
    assert store.proc.returncode == 0, store.output()
    # A clean restart's sweep finds nothing left to remove.
    store = run_tier(settings, "store")
    wait_until(lambda: "store running" in store.output(), what="restart")
    store.kill(signal.SIGTERM)
    assert "removed 0 files" in store.output()

    # integrity, bodies inline or in files as the threshold says, no orphans
    seen = check_mailboxes(settings.store_dir, USERS, inline_max=inline_max)
    assert sum(seen.values()) == 2000
    assert set(seen) == queue_ids
    duplicates = {qid: n for qid, n in seen.items() if n > 1}
    assert not duplicates
    assert dead_letter_depth(settings) == 0
    print(f"\nstore process: 2000 messages, {kills_mid_delivery} SIGKILLs mid-delivery, "
          "each stored exactly once")


def test_a_store_killed_on_a_full_disk_starts_again_and_serves_its_mail(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    """The disk filled up and the store was killed (OOM, a supervisor's restart): started
    again on the still full disk, it serves the mail it holds, as a store that kept running
    does (docs/operations.md). The run marker the killed store left (epoch.py) already says
    this boot, so the start has nothing to write."""
    with tmpfs(tmp_path / "disk") as disk:
        settings = settings.replace(data_dir=disk / "var")
        add_users(settings, USERS[:1])
        accounts = AccountDB.for_store(settings.store_dir)
        accounts.set_password(USERS[0], hash_password("secret pw"))
        accounts.close()
        envelope, body = make_message(USERS[0])
        asyncio.run(publish_all(settings, [(envelope, body)]))
        store = run_tier(settings, "store")
        wait_until(lambda: stored_count(settings.store_dir, USERS[:1]) == 1,
                   what="the message stored")
        store.kill(signal.SIGKILL)
        ballast = fill(disk)

        store = run_tier(settings, "store")
        store.wait_for_port(settings.pop3_port)
        client = poplib.POP3("127.0.0.1", settings.pop3_port, timeout=30)
        try:
            client.user(USERS[0])
            client.pass_("secret pw")
            assert client.stat()[0] == 1
            assert (b"\r\n".join(client.retr(1)[1]) + b"\r\n").endswith(body)
        finally:
            client.close()
        ballast.unlink()
        store.stop()


def test_a_store_stopped_cleanly_on_a_full_disk_says_so_and_starts_once_there_is_room(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    """A clean stop removes SQLite's -wal and -shm files, which it must make again to open
    the account database, even to read: on a disk filled meanwhile a store with no space
    reserve to give up (the fixture's settings: none; test_space_reserve.py has one) cannot
    start (docs/operations.md). It says why in one line, naming the full file system
    (SQLite's own words are "disk I/O error"), and starts with the mail once some room is
    free."""
    with tmpfs(tmp_path / "disk") as disk:
        settings = settings.replace(data_dir=disk / "var")
        add_users(settings, USERS[:1])
        envelope, body = make_message(USERS[0])
        asyncio.run(publish_all(settings, [(envelope, body)]))
        store = run_tier(settings, "store")
        wait_until(lambda: stored_count(settings.store_dir, USERS[:1]) == 1,
                   what="the message stored")
        store.stop()
        ballast = fill(disk)

        refused = run_tier(settings, "store")
        assert refused.proc.wait(timeout=30) == 1
        [line] = refused.output().strip().splitlines()
        assert line.startswith("tiermail: the account database ") and \
            "its file system is full" in line and "free a few MB" in line, line

        ballast.unlink()
        store = run_tier(settings, "store")
        wait_until(lambda: "store running" in store.output(), what="the start with room")
        assert stored_count(settings.store_dir, USERS[:1]) == 1
        store.stop()


def test_clients_past_a_low_open_file_limit_are_all_served(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Started with a soft limit of 128 descriptors (Debian starts shells and services at
    1024, below the store's own connection limits), the store raises it to the hard limit:
    300 IMAP and 200 POP3 clients at once are all greeted, and delivery goes on meanwhile."""
    add_users(settings, USERS)
    with low_open_file_limit(2048):
        store = run_tier(settings, "store")  # inherits the low soft limit
    store.wait_for_port(settings.pop3_port)
    store.wait_for_port(settings.imap_port)  # IMAP starts listening after POP3
    clients: list[socket.socket] = []
    try:
        for port, count, greeting in ((settings.imap_port, 300, b"* OK"),
                                      (settings.pop3_port, 200, b"+OK")):
            opened = [socket.create_connection(("127.0.0.1", port), timeout=30)
                      for _ in range(count)]
            clients += opened
            assert all(client.recv(200).startswith(greeting) for client in opened)
        _publish(settings, 40)
        wait_until(lambda: stored_count(settings.store_dir, USERS) == 40, timeout=60,
                   what="40 messages stored while 500 clients are connected")
    finally:
        for client in clients:
            client.close()


def _pipeline_then_reset(port: int, login: bytes, pipelined: bytes) -> None:
    """Log in, pipeline many commands with large answers, and reset the connection while
    the store still has answers to send (a phone dropping off the network)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.recv(4096)
    client.sendall(login)
    time.sleep(0.3)
    client.recv(65536)
    client.sendall(pipelined)
    time.sleep(0.3)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_clients_that_reset_mid_answer_end_quietly(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Under the store's own event loop (uvloop), a write to a connection the client has
    reset fails differently from asyncio's; it must end the session as a lost connection,
    not as an ERROR with a traceback (one per phone that drops off)."""
    add_users(settings, USERS[:1])
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.set_password(USERS[0], hash_password("secret pw"))
    accounts.close()
    messages = [make_message(USERS[0], padding=LARGE * (i % 2)) for i in range(8)]
    asyncio.run(publish_all(settings, messages))  # half of them larger than a socket buffer
    store = run_tier(settings, "store")
    wait_until(lambda: stored_count(settings.store_dir, USERS[:1]) == 8, what="8 stored")
    login = f"{USERS[0]} secret pw".encode()
    for _ in range(3):
        _pipeline_then_reset(settings.imap_port, b"a LOGIN " + login + b"\r\nb SELECT INBOX\r\n",
                             b"".join(b"f%d FETCH 1:* (BODY.PEEK[])\r\n" % i for i in range(500)))
        _pipeline_then_reset(settings.pop3_port,
                             b"USER " + USERS[0].encode() + b"\r\nPASS secret pw\r\n",
                             b"RETR 1\r\n" * 2000)
    wait_until(lambda: store.output().count("disconnected") >= 6, what="the sessions ended")
    store.kill(signal.SIGTERM)
    assert store.proc.returncode == 0, store.output()
    assert "connection failed" not in store.output(), store.output()
    assert "Traceback" not in store.output(), store.output()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_says_bye_to_imap_sessions_and_exits_cleanly(
        settings: Settings, run_tier: Callable[..., TierProcess], signum: int) -> None:
    """SIGTERM (a service manager) and SIGINT (Ctrl-C) alike: the consumer stops at once
    rather than at the end of its 20 s stop wait (an ERROR line), the listeners close and
    then an IMAP session is told `* BYE [UNAVAILABLE]` instead of being cut off, and the
    exit code is 0."""
    store = run_tier(settings, "store")
    wait_until(lambda: "store running" in store.output(), what="the start")
    with socket.create_connection(("127.0.0.1", settings.imap_port), timeout=30) as imap:
        reader = imap.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        store.proc.send_signal(signum)
        assert reader.readline() == b"* BYE [UNAVAILABLE] Server shutting down\r\n"
        with pytest.raises(ConnectionRefusedError):  # closed before the sessions were ended
            socket.create_connection(("127.0.0.1", settings.imap_port), timeout=30).close()
    assert store.proc.wait(timeout=30) == 0, store.output()
    assert "store stopped" in store.output()
    assert [line for line in store.output().splitlines() if " ERROR " in line] == [], \
        store.output()


# Loaded by the store process below at its start (Python imports sitecustomize from
# PYTHONPATH): its storage never finishes a delivery, and its stop waits 1 s for one.
_HUNG_STORAGE = '''
import asyncio
import sys

from services.store import main
from services.store.backends import maildb

main.CONSUMER_STOP_WAIT = 1.0


async def hung(self, deliveries):
    print("test: storage hung", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


maildb.MailDB.deliver_uids = hung
'''


def test_a_stop_while_storage_hangs_exits_without_acking_the_batch(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    """A stop waits CONSUMER_STOP_WAIT for the batch in flight and no longer (the store's
    stop grace in `up` and compose is counted from it): storage that never answers (a hung
    NFS mount, a dying disk) must not hold the stop for ever. The batch is not acked, so
    the broker has the message again for the next store."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HUNG_STORAGE)
    add_users(settings, USERS[:1])
    asyncio.run(publish_all(settings, [make_message(USERS[0])]))
    store = run_tier(settings, "store", extra_env={
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))})
    wait_until(lambda: "test: storage hung" in store.output(), what="a delivery begun")
    store.proc.send_signal(signal.SIGTERM)
    assert store.proc.wait(timeout=30) == 0, store.output()
    assert ("the batch in flight was not stored within 1 s: stopping without its ack"
            in store.output()), store.output()
    assert stored_count(settings.store_dir, USERS[:1]) == 0
    wait_until(lambda: queue_depth(settings) == 1, what="the message back in the queue")
