"""SIGKILL of the real `tiermail store` process while an IMAP client APPENDs, MOVEs and
EXPUNGEs in a loop. Only tagged OKs count as promises: after a restart every APPEND answered
OK is there exactly once, every MOVE answered OK is in the destination only, every EXPUNGE
answered OK is gone, nothing is in two places, and the mailboxes can be read. Run with every
body a file, and with the default inline threshold and one APPEND in four larger than it.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from common.settings import Settings
from services.store.backends.maildb import user_path
from tests.conftest import TEST_REDIS_DB
from tests.integration.imap.clients import Raw, Reply
from tests.integration.imap.conftest import ALICE, USERS
from tests.support import (
    TierProcess,
    check_bodies,
    delete_queues,
    free_port,
    port_open,
    run_cli,
)

INBOX, ARCHIVE = "INBOX", "Archive"
GONE, ABSENT = "gone", "absent"
# Kills aimed at a command in flight (sent, answer not read yet), each kind twice with a
# different delay, plus kills at random moments.
AIMED = [("APPEND", 0.0), ("MOVE", 0.0), ("EXPUNGE", 0.0),
         ("APPEND", 0.002), ("MOVE", 0.002), ("EXPUNGE", 0.002)]
RANDOM_KILLS = 2
MESSAGE_ID = re.compile(rb"Message-ID: (<[^>]+>)", re.IGNORECASE)
LINE = "line of text\r\n"
SMALL, LARGE = 20, 6000  # lines: about 300 octets, and 84,000 (a file under the default)


@pytest.fixture
def store_settings(amqp_vhost: str, tmp_path: Path, tls_files: tuple[Path, Path],
                   redis_client: redis.Redis, inline_max: int) -> Iterator[Settings]:
    """A whole store's settings: its own vhost queues (the store consumes deliveries), Redis
    prefix, data dir and ports. The IMAP directory's `settings` fixture has no broker."""
    tag = uuid.uuid4().hex[:10]
    cert, key = tls_files
    value = Settings(
        hostname="mx.test.invalid",
        bind="127.0.0.1",
        imap_port=free_port(), imaps_port=free_port(),
        pop3_port=free_port(), pop3s_port=free_port(),
        amqp_url=f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}",
        redis_url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        redis_prefix=f"t{tag}:", queue_prefix=f"t{tag}",
        data_dir=tmp_path / "var", tls_cert=str(cert), tls_key=str(key),
        allow_plaintext_auth=True, spam="off", virus="off", learn="off", log_level="INFO",
        store_inline_max=inline_max,
    )
    yield value
    delete_queues(value)
    keys = list(redis_client.scan_iter(match=f"t{tag}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@dataclass
class Ledger:
    """What the client was promised (`sure`) and what it cannot know (`maybe`: the store died
    before answering, so any of these places is fine, but only one)."""

    sure: dict[str, str] = field(default_factory=dict)  # message-id -> INBOX|Archive|gone
    maybe: dict[str, set[str]] = field(default_factory=dict)
    uids: dict[str, int] = field(default_factory=dict)  # INBOX UID of messages sure in INBOX
    uidvalidities: set[int] = field(default_factory=set)
    oks: int = 0
    interrupted: Counter[str] = field(default_factory=Counter)

    def unsure(self, message_id: str, *places: str) -> None:
        self.sure.pop(message_id, None)
        self.uids.pop(message_id, None)
        self.maybe[message_id] = set(places)


class Client(threading.Thread):
    """APPEND, MOVE and EXPUNGE in a loop, reconnecting after every kill."""

    def __init__(self, port: int, ledger: Ledger) -> None:
        super().__init__(daemon=True)
        self.port, self.ledger = port, ledger
        self.stop = threading.Event()
        self.rng = random.Random(4)
        self.error: BaseException | None = None
        # aimed kills: the test sets what to kill during; the client pulls the trigger right
        # after sending that command, then reports it through `killed`
        self.aim: tuple[str, float, Callable[[], None]] | None = None
        self.killed = threading.Event()

    def sent(self, name: str) -> None:
        aim = self.aim
        if aim is None or aim[0] != name:
            return
        self.aim = None
        if aim[1]:
            time.sleep(aim[1])  # the kill's position inside the command, not a wait
        aim[2]()
        self.killed.set()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                raw = self._connect()
                if raw is None:
                    continue
                try:
                    while not self.stop.is_set():
                        self._step(raw)
                except (OSError, ConnectionClosed):
                    pass
                finally:
                    raw.close()
        except BaseException as exc:  # surfaced by the test, never swallowed
            self.error = exc

    def _connect(self) -> Raw | None:
        if not port_open("127.0.0.1", self.port):
            self.stop.wait(0.02)  # the store is restarting; the test bounds the total time
            return None
        try:
            raw = Raw.connect(self.port)
            checked(raw, f'LOGIN "{ALICE}" "{USERS[ALICE]}"')
            selected = checked(raw, "SELECT INBOX")
        except (OSError, ConnectionClosed, AssertionError):
            self.stop.wait(0.02)  # killed again while connecting
            return None
        validity = re.search(rb"\[UIDVALIDITY (\d+)\]", b"\n".join(selected.untagged))
        assert validity
        self.ledger.uidvalidities.add(int(validity.group(1)))
        return raw

    def _step(self, raw: Raw) -> None:
        ledger = self.ledger
        in_inbox = [m for m, place in ledger.sure.items() if place == INBOX]
        choice = self.rng.random()
        if choice < 0.25 and in_inbox:
            self._move(raw, self.rng.choice(in_inbox))
        elif choice < 0.45 and in_inbox:
            self._expunge(raw, self.rng.choice(in_inbox))
        else:
            self._append(raw)

    def _append(self, raw: Raw) -> None:
        message_id = f"<{uuid.uuid4().hex}@crash.test>"
        lines = SMALL if self.rng.random() < 0.75 else LARGE
        body = (f"From: crash@example.org\r\nSubject: crash test\r\nMessage-ID: {message_id}"
                f"\r\n\r\n" + LINE * lines).encode()
        self.ledger.unsure(message_id, INBOX, ABSENT)  # until the OK arrives
        reply = self.send(raw, b"APPEND INBOX {%d+}\r\n" % len(body) + body, "APPEND")
        if reply.status == "OK":
            uid = re.search(rb"\[APPENDUID \d+ (\d+)\]", reply.text)
            assert uid, reply
            self._promise(message_id, INBOX, int(uid.group(1)))
        else:
            self.ledger.unsure(message_id, ABSENT)

    def _move(self, raw: Raw, message_id: str) -> None:
        uid = self.ledger.uids[message_id]
        self.ledger.unsure(message_id, INBOX, ARCHIVE)
        reply = self.send(raw, f"UID MOVE {uid} {ARCHIVE}".encode(), "MOVE")
        if reply.status == "OK":
            self._promise(message_id, ARCHIVE)
        else:
            self._promise(message_id, INBOX, uid)

    def _expunge(self, raw: Raw, message_id: str) -> None:
        uid = self.ledger.uids[message_id]
        self.ledger.unsure(message_id, INBOX)  # a \Deleted flag may be set from here on
        reply = self.send(raw, f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)".encode(), "STORE")
        assert reply.status == "OK", reply
        self.ledger.unsure(message_id, INBOX, GONE)
        reply = self.send(raw, f"UID EXPUNGE {uid}".encode(), "EXPUNGE")
        if reply.status == "OK":
            self._promise(message_id, GONE)

    def _promise(self, message_id: str, place: str, uid: int | None = None) -> None:
        self.ledger.maybe.pop(message_id, None)
        self.ledger.sure[message_id] = place
        if uid is not None:
            self.ledger.uids[message_id] = uid
        self.ledger.oks += 1


    def send(self, raw: Raw, command: bytes, name: str) -> Reply:
        tag = next(raw.tags)
        try:
            raw.send(tag.encode() + b" " + command + b"\r\n")
            self.sent(name)
            return raw.reply(tag)
        except AssertionError as exc:  # Raw's "connection closed before the reply"
            self.ledger.interrupted[name] += 1
            raise ConnectionClosed(str(exc)) from exc
        except OSError:
            self.ledger.interrupted[name] += 1
            raise


class ConnectionClosed(Exception):
    pass


def checked(raw: Raw, command: str) -> object:
    reply = raw.command(command)
    assert reply.status == "OK", reply
    return reply


def start_store(settings: Settings, run_tier: Callable[..., TierProcess]) -> TierProcess:
    store = run_tier(settings, "store")
    store.wait_for_port(settings.imap_port, timeout=60)
    return store


def read_mailbox(port: int, mailbox: str) -> Counter[str]:
    """Message-IDs in a mailbox over IMAP; SELECT and FETCH 1:* must both work."""
    raw = Raw.connect(port)
    try:
        checked(raw, f'LOGIN "{ALICE}" "{USERS[ALICE]}"')
        exists = int(re.search(rb"\* (\d+) EXISTS", b"\n".join(
            checked(raw, f"SELECT {mailbox}").untagged)).group(1))
        found: Counter[str] = Counter()
        if exists:
            reply = checked(raw, "FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            fetches = reply.lines(b"FETCH")
            assert len(fetches) == exists, (mailbox, exists, len(fetches))
            for line in fetches:
                match = MESSAGE_ID.search(line)
                assert match, line
                found[match.group(1).decode()] += 1
        return found
    finally:
        raw.close()


def test_sigkill_during_append_move_and_expunge(
        store_settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    settings = store_settings
    for args, stdin in ((("domain", "add", "example.test"), ""),
                        (("user", "add", ALICE, "--password-stdin"), USERS[ALICE] + "\n")):
        result = run_cli(settings, *args, stdin=stdin)
        assert result.returncode == 0, result.stderr

    ledger = Ledger()
    client = Client(settings.imap_port, ledger)
    rng = random.Random(20261122)
    store = start_store(settings, run_tier)
    client.start()

    def progress(count: int) -> None:
        target = ledger.oks + count
        deadline = time.monotonic() + 30
        while ledger.oks < target and client.error is None:
            assert time.monotonic() < deadline, f"no progress: {ledger.oks} OKs"
            assert store.alive, store.output()
            time.sleep(0.005)  # polling the client's progress counter, bounded above

    try:
        kills: list[tuple[str, float] | None] = [*AIMED, *[None] * RANDOM_KILLS]
        rng.shuffle(kills)
        for aim in kills:
            progress(rng.randint(10, 30))  # enough in INBOX to move and expunge
            if aim is None:
                store.kill(signal.SIGKILL)
            else:
                client.killed.clear()
                client.aim = (*aim, lambda p=store.proc: p.send_signal(signal.SIGKILL))
                assert client.killed.wait(30), f"the client never sent {aim[0]}"
                store.kill(signal.SIGKILL)  # reaps it
            store = start_store(settings, run_tier)
        progress(20)  # the client carries on after the last restart
    finally:
        client.stop.set()
        client.join(30)
    assert client.error is None, repr(client.error)
    assert not client.is_alive()
    assert {"APPEND", "MOVE", "EXPUNGE"} <= set(ledger.interrupted), ledger.interrupted
    assert len(ledger.uidvalidities) == 1, "a crash changed UIDVALIDITY"

    inbox = read_mailbox(settings.imap_port, INBOX)
    archive = read_mailbox(settings.imap_port, ARCHIVE)
    store.kill(signal.SIGTERM)

    assert not [m for m, n in (inbox + archive).items() if n > 1], "duplicates"
    assert not set(inbox) & set(archive), "a message in both mailboxes"
    where = {m: INBOX for m in inbox} | {m: ARCHIVE for m in archive}
    for message_id, place in ledger.sure.items():
        assert where.get(message_id, GONE) == place, (message_id, place)
    for message_id, places in ledger.maybe.items():
        found = where.get(message_id, GONE if GONE in places else ABSENT)
        assert found in places, (message_id, places, found)
    unknown = set(where) - set(ledger.sure) - set(ledger.maybe)
    assert not unknown, unknown
    assert ledger.oks >= 10 * len(AIMED)
    # the bodies agree with the index: none lost, no orphan file stays
    check_files(settings.store_dir, len(inbox) + len(archive), settings.store_inline_max)
    print(f"\nIMAP crash test: {ledger.oks} OKs, interrupted {dict(ledger.interrupted)}, "
          f"{len(inbox)} in INBOX, {len(archive)} in Archive")


def check_files(store_dir: Path, expected: int, inline_max: int) -> None:
    bodies = check_bodies(user_path(store_dir / "mail", ALICE))
    assert len(bodies.guids) == expected
    assert all(len(data) > inline_max for data in bodies.files.values())
    assert all(len(data) <= inline_max for data in bodies.inline.values())
    assert bodies.files, "no message larger than the threshold"
    assert bool(bodies.inline) == bool(inline_max)
