#!/usr/bin/env python3
"""Chaos driver: many faults at once while mail flows in and IMAP clients rearrange it.

The failure-contract tests each take ONE thing away. This driver combines them, at random,
for a bounded time and count, and then checks the promise as a whole: no mail lost, nothing
duplicated, every index consistent with its files, UIDs never reused.

What runs (all on 127.0.0.1, free ports, a temporary data directory):
  * one `tiermail store` and `--filters` `tiermail filter` workers (one SMTP port), each
    reaching RabbitMQ and Redis through `tests.support.TcpProxy` relays the driver can cut
    (connections reset, new ones refused) or hang (open but silent): one relay for the
    store's AMQP link, one for the filters' AMQP link, one for Redis;
  * RabbitMQ and Redis are the machine's shared ones, but the stack uses an AMQP vhost of
    its own (created and deleted here) and its own Redis database and key prefix. The
    shared servers themselves are never stopped, restarted or reconfigured: the faults are
    the relays and the tiermail processes. With `--private-broker` the stack runs on a
    RabbitMQ node of its own (`tests.support.PrivateBroker`), and SIGKILLing that node (then
    starting it again) is one more fault; with `--disk-full` the data directory is a tmpfs
    of its own (`tests.support.tmpfs`, root only), and filling it to the last block
    (`tests.support.fill`) for 1-`--max-outage` seconds is one more; with `--scanning` the
    filters scan with a real rspamd and clamd (started here, test configuration) reached
    through relays of their own, which the faults cut and hang like the others, with
    `TIERMAIL_SCAN_FAILURE=defer`: mail accepted while a scanner is away waits in the scan
    queue and the filters' drainers scan it and send it on once it answers again. The IMAP
    clients then move and copy mail into and out of Junk too, and a `tiermail learner`
    (SIGKILLed among the faults like the filters) trains rspamd through a relay of its
    own to rspamd's controller;
  * `--senders` SMTP clients (smtplib) sending a steady stream (`--rate` messages per second
    in all) to alice, bob, both, and the alias team@ (both); most messages small, 14% over
    the inline threshold (a file each), 1% over 1 MiB (the large queue); every message has
    a unique Message-ID, the key everything is counted by;
  * `--imap-clients` IMAP clients per account (imapclient) doing MOVE, COPY, UID EXPUNGE
    and APPEND between INBOX, Archive and Trash, while mail is delivered there: all of an
    account's clients select and list the same mailboxes, each changes its own share of
    the messages (by a hash of the Message-ID);
  * the chaos thread: every 0.5-2x `--fault-every` seconds, one fault on a target that has
    none: SIGKILL the store or a filter (restarted 0-3 s later, even while the stack is
    still starting; half the store kills are aimed at a moment an IMAP write is in
    flight), or cut or hang one of the three relays for 1-`--max-outage` seconds.
    Faults on different targets overlap.

The ledger of what each message may look like at the end (`Token.possible`, a set of
"multisets of mailboxes", one entry per copy): a 250 is one copy in INBOX per recipient; a
4xx or a broken connection may or may not have been queued (no copy or one); a 5xx none.
Each IMAP operation is planned on a message whose state is certain; its OK makes the new
state certain, its NO keeps the old one, a broken connection (the store SIGKILLed) leaves
both possible, and that message is then left alone.

At the end every fault is undone and every process restarted; the senders and IMAP clients
stop; the driver waits until the queues are empty with the store stopped (nothing unacked
can hide there); then, for each user directory, `tests.support.check_bodies` (integrity
check, message counts, exactly one body per message, no orphan file, empty tmp/) and the
invariants below are checked from the files themselves:
  * each (user, Message-ID) is found in one of the states its token allows: in particular
    every 250 is there exactly once per recipient (wherever IMAP moved it), nothing that got
    a 4xx or 5xx shows up twice, no Message-ID appears that nobody sent;
  * per mailbox: every UID below UIDNEXT, MODSEQs at most HIGHESTMODSEQ, no expunged UID
    still present;
  * what the IMAP clients saw along the way: a UID, once seen naming a message, names that
    message for ever (never reused, also across store crashes); a UID seen for the first
    time is above every UID seen before in that mailbox; UIDNEXT and HIGHESTMODSEQ never
    go back; and UIDVALIDITY never changes;
  * the dead-letter queue is empty, or each message in it is printed with its reason.
The exit status is 1 if anything did not hold, with every finding printed.

Run from the repository root (the tiers are started from this checkout's code):

    PYTHONPATH=. .venv/bin/python bench/chaos.py                       # seed 1, 180 s
    PYTHONPATH=. .venv/bin/python bench/chaos.py --seed 7 --duration 120 --max-faults 40
    PYTHONPATH=. .venv/bin/python bench/chaos.py --seed 3 --inline-max 0 --keep  # bodies as files
    PYTHONPATH=. .venv/bin/python bench/chaos.py --seed 5 --delivery-attempts 3 --fault-every 1
    PYTHONPATH=. .venv/bin/python bench/chaos.py --seed 17 --private-broker --disk-full  # root
    PYTHONPATH=. .venv/bin/python bench/chaos.py --seed 23 --scanning --private-broker \
        --disk-full --inline-max 0    # rspamd and clamd too, behind relays the faults cut

It stops sending after `--duration` seconds or `--max-messages` messages, whichever comes
first, and stops injecting faults after `--max-faults`. It is meant to be cheap: a few
messages per second, two IMAP clients per account; the store and filters log at INFO into
the kept directory (`--keep`) for reading a failure (with `--disk-full` the data goes with
the tmpfs).

Runs of 2026-12-04 on the 2-core development VM: seeds 2-8, 10, 12 and 14-18, 150-240 s
each, bodies as files (`--inline-max 0`) in seven of them, `--private-broker` in 12, 14,
17 and 18, `--disk-full` in 16-18, three IMAP clients per account in 18: 15,929 SMTP
messages (10,257 answered 250, 5,426 451), 266 store SIGKILLs (125 aimed at an IMAP
write), 208 filter SIGKILLs, 269 relay cuts and hangs, 24 broker SIGKILLs, 17 full disks,
15,014 IMAP changes (194 unanswered, 256 NO).
Every invariant held in every run; the dead-letter queue stayed empty. Each 4xx that was
delivered anyway (4-10 a run) was a `not queued: no confirm within 5 s` in the filter's log:
the confirm lost in a hang (the smtplib senders here do not retry; an MTA's retry now
goes out under the same queue id and is delivered once: docs/architecture.md). The
driver itself was checked against two planted bugs (an expunge answering OK without
expunging; the consumer acking some deliveries it dropped): both reported.

Runs of 2026-12-05 with `--scanning` (seeds 21-25, 120-180 s, `--private-broker
--disk-full` in 22-25, bodies as files in 23 and 25): 5,807 SMTP messages (4,747 answered
250), 152 faults, 21 of them cuts and hangs of the scanners' relays; over 600 messages
were deferred to the scan queue and drained from it. The first run of seed 23 found a
message dead-lettered after a 250: the disk had room for the store's probe write but not
for a 2 MB body, so its ENOSPC looked like the message's fault (fixed, with a test, in
services/store/consumer.py and MailDB.probe). The logs of these runs also showed a user's
text index deleted on a full disk and a traceback per delivery while the disk was full
(both fixed). With the fixes every invariant held in every run, and the only ERROR lines
left were the store's `storage is failing`. Then seeds 26-28 (26: 4 senders at 20/s, 3
filters, 3 IMAP clients per account; 27-28 with the learner, 28 with `--private-broker`):
3,967 SMTP messages, every invariant held; rspamd answered 663 learn jobs (276 learned,
387 "already learned": copies of one message), 77 tries waited for a retry while the
controller's relay was cut; the one new kind of ERROR, pika's six lines per lost
connection in the learner, is gone (fixed). The
end of each run counts the ERROR lines of the tiers' logs by logger and event
(`log ERROR ...`).

Runs of 2026-12-05, later: seed 29 (`--scanning`, 40 s, Bayes statistics in a database of
their own), then, after the storage probe reserved its room with posix_fallocate, hung
relays held back the end of the stream and the learner's broker waits were bounded, seeds
30 (`--scanning --private-broker --disk-full`, 120 s) and 31 (`--scanning
--private-broker`, 120 s): 1,875 SMTP messages (1,530 answered 250), 49 faults (store,
filter, learner and broker SIGKILLs; cuts and hangs of the AMQP, Redis and scanner relays;
one full disk). Every invariant held; the only ERROR lines were seed 30's six `storage is
failing`.

Runs of 2026-12-05, evening, after the store's space reserve and `up`'s per-tier stop
graces: seeds 33 (`--scanning --private-broker`, 150 s) and 34 (`--scanning
--private-broker --disk-full`, 150 s; the store made its 16 MiB reserve on the 256 MiB
tmpfs and kept it through three full disks): 1,964 SMTP messages, 57 faults. Every
invariant held; seed 34's only ERROR lines were four `storage is failing`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import imaplib
import random
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiormq
import redis
from benchlib import BenchError, TiermailStack, log, port_open, tail, temp_root, wait_for
from imapclient import IMAPClient

from services.devscanners.devdns import DnsStub
from services.devscanners.ports import free_port
from services.devscanners.runner import Scanner, start_clamd, start_dns_stub, start_rspamd
from tests.support import PrivateBroker, TcpProxy, check_bodies, fill, tmpfs

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "chaos.test"
USERS = (f"alice@{DOMAIN}", f"bob@{DOMAIN}")
ALIAS = f"team@{DOMAIN}"
PASSWORD = "chaos-password"
SENDER = "sender@client.test"
FOLDERS = ("INBOX", "Archive", "Trash")
QUEUE_ID = re.compile(rb"^\s+by \S+ .* id ([A-Z0-9]+)", re.MULTILINE)  # in our Received header
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
# RCPT lists a sender picks from; the alias and its target in one transaction give one copy.
RECIPIENT_LISTS = ((USERS[0],), (USERS[1],), USERS, (ALIAS,), (USERS[0], ALIAS))
EXPANSION = {USERS[0]: {USERS[0]}, USERS[1]: {USERS[1]}, ALIAS: set(USERS)}

State = tuple[str, ...]  # the mailboxes holding a copy, one entry per copy, sorted
NONE: State = ()


def state_with(state: State, add: str | None = None, remove: str | None = None) -> State:
    items = list(state)
    if remove is not None:
        items.remove(remove)
    if add is not None:
        items.append(add)
    return tuple(sorted(items))


@dataclass
class Token:
    """What one message may look like, at the end, in one user's mailboxes."""

    possible: set[State]
    origin: str  # "smtp 250", "smtp 451", "append", ...
    done: State | None = None  # of two possible states, the one if the change happened

    @property
    def certain(self) -> State | None:
        return next(iter(self.possible)) if len(self.possible) == 1 else None


@dataclass
class Ledger:
    """Every message the driver made, per user, and everything counted along the way."""

    tokens: dict[tuple[str, str], Token] = field(default_factory=dict)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, user: str, msgid: str, possible: set[State], origin: str) -> None:
        with self.lock:
            self.tokens[(user, msgid)] = Token(set(possible), origin)

    def unsure(self, user: str, msgid: str, before: State, after: State, origin: str) -> None:
        """A change whose outcome the client could not learn: either state may be found."""
        with self.lock:
            self.tokens[(user, msgid)] = Token({before, after}, origin, done=after)

    def get(self, user: str, msgid: str) -> Token | None:
        with self.lock:
            return self.tokens.get((user, msgid))

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def finding(self, text: str) -> None:
        with self.lock:
            self.findings.append(text)
        log(f"FINDING: {text}")


# The stack: processes and the relays between them and the shared servers

class ChaosStack(TiermailStack):
    """benchlib's isolated stack (own vhost, Redis db and key prefix, data dir, ports), its
    tiers reaching RabbitMQ and Redis through relays, restarted at will."""

    def __init__(self, root: Path, redis_db: int, inline_max: int, filters: int,
                 delivery_attempts: int) -> None:
        super().__init__(root, redis_db)
        self.queue_prefix = "tiermail"  # the default; the vhost is the stack's own
        self.env.update({
            "PYTHONPATH": str(REPO),  # the tiers run this checkout's code
            "TIERMAIL_STORE_INLINE_MAX": str(inline_max),
            "TIERMAIL_PUBLISH_TIMEOUT": "5",
            "TIERMAIL_DELIVERY_ATTEMPTS": str(delivery_attempts),
        })
        self.proxies: dict[str, TcpProxy] = {}
        self.broker: PrivateBroker | None = None
        self.disk: Path | None = None  # the data directory's own file system, to fill
        self.broker_port = 5672
        self.store: subprocess.Popen[bytes] | None = None
        self.filters: list[subprocess.Popen[bytes] | None] = [None] * filters
        self.started = 0
        self.lock = threading.Lock()
        self.scanners: list[Scanner] = []
        self.dns: DnsStub | None = None  # what rspamd resolves through
        self.bayes_db: int | None = None  # rspamd's Bayes statistics: a database of their own
        self.learner: subprocess.Popen[bytes] | None = None

    def amqp_url(self, port: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port}/{self.vhost}"

    def setup(self, private_broker: bool) -> None:
        """With `private_broker`, a RabbitMQ node of the run's own (which may then be
        killed too), its default vhost used; else a vhost of its own on the shared one."""
        if private_broker:
            self.broker = PrivateBroker()
            self.broker.start()
            self.broker_port, self.vhost = self.broker.port, ""
            self.env["TIERMAIL_AMQP_URL"] = self.amqp_url(self.broker_port)
        else:
            self.create_vhost()
        self.cli("domain", "add", DOMAIN)
        for user in USERS:
            self.cli("user", "add", user, "--password-stdin", input_text=PASSWORD + "\n")
            self.cli("alias", "add", ALIAS, user)
        self.proxies = {"store-amqp": TcpProxy(self.broker_port),
                        "filter-amqp": TcpProxy(self.broker_port),
                        "redis": TcpProxy(6379)}

    def start_scanners(self, bayes_db: int) -> None:
        """rspamd and clamd of the run's own, each behind a relay; the filters scan at DATA
        and defer what they cannot scan (the scan queue, drained by the filters). rspamd's
        keys have no prefix: its Bayes statistics go to `bayes_db`, emptied before and
        after the run so that each run learns from nothing."""
        self.bayes_db = bayes_db
        flush_redis_db(bayes_db)
        self.dns = start_dns_stub()
        rspamd = start_rspamd(self.root / "rspamd", port=free_port(),
                              controller_port=free_port(), dns_address=self.dns.address,
                              bayes_redis_url=f"redis://127.0.0.1:6379/{bayes_db}")
        self.scanners.append(rspamd)
        clamd = start_clamd(self.root / "clamd", address=f"127.0.0.1:{free_port()}")
        self.scanners.append(clamd)
        for name, address in (("rspamd", rspamd.address), ("clamd", clamd.address),
                              ("rspamd-controller", rspamd.controller_url)):
            self.proxies[name] = TcpProxy(int(address.rsplit(":", 1)[1]))
        self.env.update({
            "TIERMAIL_SPAM": "rspamd",
            "TIERMAIL_RSPAMD_URL": f"http://127.0.0.1:{self.proxies['rspamd'].port}",
            "TIERMAIL_VIRUS": "clamd",
            "TIERMAIL_CLAMD_ADDRESS": f"127.0.0.1:{self.proxies['clamd'].port}",
            "TIERMAIL_SCAN_FAILURE": "defer",
            "TIERMAIL_SCAN_TIMEOUT": "5",
            "TIERMAIL_LEARN": "rspamd",
            "TIERMAIL_RSPAMD_CONTROLLER_URL":
                f"http://127.0.0.1:{self.proxies['rspamd-controller'].port}",
            "TIERMAIL_RSPAMD_CONTROLLER_PASSWORD": rspamd.controller_password,
        })

    def _tier_env(self, tier: str) -> dict[str, str]:
        env = dict(self.env)
        link = "store-amqp" if tier == "learner" else f"{tier}-amqp"  # the store's host
        env["TIERMAIL_AMQP_URL"] = self.amqp_url(self.proxies[link].port)
        env["TIERMAIL_REDIS_URL"] = \
            f"redis://127.0.0.1:{self.proxies['redis'].port}/{self.redis_db}"
        return env

    def _spawn(self, tier: str) -> subprocess.Popen[bytes]:
        with self.lock:
            self.started += 1
            number = self.started
        log_path = self.logs / f"{tier}-{number:03d}.log"
        with open(log_path, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "services.cli", tier],
                                    env=self._tier_env(tier), cwd=REPO,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)

    def start_store(self) -> None:
        self.store = self._spawn("store")

    def start_filter(self, index: int) -> None:
        self.filters[index] = self._spawn("filter")

    def start_learner(self) -> None:
        self.learner = self._spawn("learner")

    def tier_processes(self) -> dict[str, subprocess.Popen[bytes] | None]:
        """The tier processes by fault target: store, filter-N, learner (with scanning)."""
        found = {"store": self.store,
                 **{f"filter-{i}": proc for i, proc in enumerate(self.filters)}}
        if self.scanners:
            found["learner"] = self.learner
        return found

    def start_process(self, target: str) -> None:
        if target == "store":
            self.start_store()
        elif target == "learner":
            self.start_learner()
        else:
            self.start_filter(int(target.split("-")[1]))

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(lambda: port_open(self.imap_port) and port_open(self.pop3_port)
                 and port_open(self.smtp_port), timeout, "the store and the filters to listen",
                 interval=0.2)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)

    @staticmethod
    def terminate(proc: subprocess.Popen[bytes] | None) -> int | None:
        if proc is None or proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            return -9

    def restart_processes(self) -> None:
        for target, proc in self.tier_processes().items():
            if proc is None or proc.poll() is not None:
                self.start_process(target)

    def queue_counts(self, queues: list[str]) -> dict[str, int]:
        """Ready messages of each queue (passive declare, directly to the broker)."""
        async def counts() -> dict[str, int]:
            connection = await aiormq.connect(self.amqp_url(self.broker_port))
            try:
                channel = await connection.channel()
                found = {}
                for queue in queues:
                    ok = await channel.queue_declare(queue, passive=True)
                    found[queue] = int(ok.message_count or 0)
                return found
            finally:
                await connection.close()
        return asyncio.run(asyncio.wait_for(counts(), 30))

    def dead_letters(self) -> list[str]:
        """A line for each message in the dead-letter queue, which is left as it was."""
        async def peek() -> list[str]:
            connection = await aiormq.connect(self.amqp_url(self.broker_port))
            lines = []
            try:
                channel = await connection.channel()
                while True:
                    got = await channel.basic_get(f"{self.queue_prefix}.deliver.dead")
                    if got.delivery_tag is None or got.body is None:
                        break
                    headers = got.header.properties.headers or {}
                    found = MESSAGE_ID.search(got.body)
                    queue_id = QUEUE_ID.search(got.body)
                    lines.append(f"{found.group(1).decode() if found else '?'} queue id "
                                 f"{queue_id.group(1).decode() if queue_id else '?'} reason="
                                 f"{headers.get('x-tiermail-reason')} "
                                 f"first-death={headers.get('x-first-death-reason')} "
                                 f"count={headers.get('x-delivery-count')}")
            finally:
                await connection.close()  # unacked: back in the queue
            return lines
        return asyncio.run(asyncio.wait_for(peek(), 60))

    def close(self) -> None:
        for proc in [*self.filters, self.learner, self.store]:
            self.terminate(proc)
        for proxy in self.proxies.values():
            proxy.resume()
            proxy.cut()
        if self.broker is not None:
            self.broker.stop()
        for scanner in self.scanners:
            scanner.stop()
        if self.dns is not None:
            self.dns.stop()
        if self.bayes_db is not None:
            flush_redis_db(self.bayes_db)
        super().close()


def flush_redis_db(db: int) -> None:
    client = redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()


# SMTP senders

def message_bytes(msgid: str, to: str, rng: random.Random, subject: str) -> bytes:
    # Some bodies over the inline threshold (a file each), a few over 1 MiB (the large queue).
    size = rng.choices([200, 70_000, 1_100_000], [85, 14, 1])[0]
    line = "chaos " * 12 + "\r\n"
    body = line * max(1, size // len(line))
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
            f"\r\n{body}").encode()


class Sender(threading.Thread):
    def __init__(self, stack: ChaosStack, ledger: Ledger, rng: random.Random,
                 interval: float, budget: Callable[[], bool], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.stack, self.ledger, self.rng = stack, ledger, rng
        self.interval, self.budget, self.halt = interval, budget, stop

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.stack.smtp_port, timeout=60) as smtp:
                    smtp.ehlo("client.test")
                    while not self.halt.is_set() and self.budget():
                        self.one_message(smtp)
                        self.halt.wait(self.rng.expovariate(1 / self.interval))
            except (OSError, smtplib.SMTPException):
                self.halt.wait(0.3)
            if not self.budget():
                return

    def one_message(self, smtp: smtplib.SMTP) -> None:
        msgid = f"<{uuid.uuid4().hex}@smtp.chaos.test>"
        rcpts = self.rng.choice(RECIPIENT_LISTS)
        users = set().union(*(EXPANSION[r] for r in rcpts))
        for user in users:  # until the reply is known, it may or may not be queued
            self.ledger.unsure(user, msgid, NONE, ("INBOX",), "smtp unanswered")
        self.ledger.count("smtp sent")
        accepted: set[str] = set()
        try:
            code, _ = smtp.mail(SENDER)
            if code == 250:
                for rcpt in rcpts:
                    if smtp.rcpt(rcpt)[0] == 250:
                        accepted |= EXPANSION[rcpt]
            if accepted:
                code, _ = smtp.data(message_bytes(msgid, ", ".join(rcpts), self.rng, "smtp"))
            elif code == 250:
                code = 451  # every RCPT refused (Redis away): nothing queued
            if code != 250:
                smtp.rset()
        except (OSError, smtplib.SMTPException):
            self.ledger.count("smtp connection broken")
            raise
        self.ledger.count(f"smtp {code}")
        for user in users:
            if code == 250 and user in accepted:
                self.ledger.set(user, msgid, {("INBOX",)}, "smtp 250")
            elif 400 <= code < 500:
                self.ledger.unsure(user, msgid, NONE, ("INBOX",), f"smtp {code}")
            else:
                self.ledger.set(user, msgid, {NONE}, f"smtp {code}")
        if code != 250 and not 400 <= code < 500:
            self.ledger.finding(f"{msgid}: SMTP answered {code}, neither 250 nor 4xx")


# IMAP clients

IMAP_BROKEN = (imaplib.IMAP4.abort, OSError, socket.timeout)


@dataclass
class MailboxView:
    """What one IMAP client saw of one mailbox over the whole run."""

    uidvalidity: int = 0
    uidnext: int = 0
    highestmodseq: int = 0
    max_uid: int = 0
    names: dict[int, str] = field(default_factory=dict)  # UID -> Message-ID, for ever
    checked_since_connect: bool = False


class ImapClient(threading.Thread):
    """One IMAP client of an account: MOVE, COPY, UID EXPUNGE and APPEND in a loop, each on
    a message whose state the ledger knows for certain. Several clients of one account share
    its mailboxes (selected at once, changed under each other) but each changes only the
    messages of its `share` (index, of how many) of Message-IDs, so that what the ledger
    expects of each message follows from one client's replies."""

    def __init__(self, stack: ChaosStack, ledger: Ledger, user: str, share: tuple[int, int],
                 rng: random.Random, pause: float, stop: threading.Event,
                 writing: threading.Event) -> None:
        super().__init__(daemon=True)
        self.stack, self.ledger, self.user, self.share, self.rng = \
            stack, ledger, user, share, rng
        self.pause, self.halt, self.writing = pause, stop, writing
        self.folders = (*FOLDERS, "Junk") if stack.scanners else FOLDERS
        self.views = {name: MailboxView() for name in self.folders}

    def owns(self, msgid: str) -> bool:
        index, of = self.share
        return zlib.crc32(msgid.encode()) % of == index

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with IMAPClient("127.0.0.1", self.stack.imap_port, ssl=False,
                                timeout=30) as imap:
                    imap.login(self.user, PASSWORD)
                    for view in self.views.values():
                        view.checked_since_connect = False
                    while not self.halt.is_set():
                        self.step_or_refused(imap)
                        self.halt.wait(self.rng.expovariate(1 / self.pause))
            except (*IMAP_BROKEN, imaplib.IMAP4.error):
                self.halt.wait(0.5)

    def step_or_refused(self, imap: IMAPClient) -> None:
        try:
            self.step(imap)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:  # a NO to SELECT, SEARCH or FETCH
            self.ledger.count("imap read refused")
            log(f"{self.user}: refused: {exc}")

    def step(self, imap: IMAPClient) -> None:
        op = self.rng.choices(("move", "copy", "expunge", "append"), (4, 2, 3, 2))[0]
        if op == "append":
            self.append(imap)
            return
        source = self.rng.choice(self.folders)
        present = self.look(imap, source)
        candidates = []
        for msgid, uids in present.items():
            if not self.owns(msgid):
                continue
            token = self.ledger.get(self.user, msgid)
            state = token.certain if token is not None else None
            if state is not None and state.count(source) == len(uids):
                candidates.append((msgid, uids[0], state))
        if not candidates:
            return
        msgid, uid, state = self.rng.choice(candidates)
        target = self.rng.choice([f for f in self.folders if f != source])
        if op == "move":
            self.change(msgid, state, state_with(state, add=target, remove=source),
                        lambda: imap.move([uid], target), "move")
        elif op == "copy" and len(state) < 3:
            self.change(msgid, state, state_with(state, add=target),
                        lambda: imap.copy([uid], target), "copy")
        elif op == "expunge":
            def expunge() -> None:
                imap.add_flags([uid], [b"\\Deleted"])
                imap.expunge([uid])
            self.change(msgid, state, state_with(state, remove=source), expunge, "expunge")

    def append(self, imap: IMAPClient) -> None:
        msgid = f"<{uuid.uuid4().hex}@imap.chaos.test>"
        while not self.owns(msgid):
            msgid = f"<{uuid.uuid4().hex}@imap.chaos.test>"
        target = self.rng.choice(self.folders)
        data = message_bytes(msgid, self.user, self.rng, "append")
        self.ledger.set(self.user, msgid, {NONE}, "append")
        self.change(msgid, NONE, (target,), lambda: imap.append(target, data), "append")

    def change(self, msgid: str, before: State, after: State, act: Callable[[], object],
               what: str) -> None:
        """Run one IMAP write; the ledger learns its outcome, or that it is unknown."""
        self.writing.set()  # an aimed store kill may be waiting for this
        try:
            act()
        except IMAP_BROKEN:
            self.ledger.unsure(self.user, msgid, before, after, f"{what} unanswered")
            self.ledger.count(f"imap {what} unanswered")
            raise
        except imaplib.IMAP4.error as exc:  # NO or BAD: nothing happened
            self.ledger.count(f"imap {what} refused")
            log(f"{self.user}: {what} {msgid} refused: {exc}")
            return
        finally:
            self.writing.clear()
        self.ledger.set(self.user, msgid, {after}, what)
        self.ledger.count(f"imap {what}")

    def look(self, imap: IMAPClient, mailbox: str) -> dict[str, list[int]]:
        """SELECT and list the mailbox by Message-ID, checking what UIDs promise."""
        status = imap.select_folder(mailbox)
        view = self.views[mailbox]
        uidvalidity, uidnext = int(status[b"UIDVALIDITY"]), int(status[b"UIDNEXT"])
        if view.uidvalidity and uidvalidity != view.uidvalidity:
            self.ledger.finding(f"{self.user} {mailbox}: UIDVALIDITY changed "
                                f"{view.uidvalidity} -> {uidvalidity}")
            self.views[mailbox] = view = MailboxView()
        view.uidvalidity = uidvalidity
        if uidnext < view.uidnext:
            self.ledger.finding(f"{self.user} {mailbox}: UIDNEXT went back "
                                f"{view.uidnext} -> {uidnext}")
        view.uidnext = max(view.uidnext, uidnext)
        modseq = int(status.get(b"HIGHESTMODSEQ", 0))
        if modseq < view.highestmodseq:
            self.ledger.finding(f"{self.user} {mailbox}: HIGHESTMODSEQ went back "
                                f"{view.highestmodseq} -> {modseq}")
        view.highestmodseq = max(view.highestmodseq, modseq)
        uids = sorted(imap.search("ALL"))
        wanted = uids if not view.checked_since_connect else \
            [u for u in uids if u not in view.names]
        fetched = imap.fetch(wanted, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if wanted \
            else {}
        view.checked_since_connect = True
        previous_max = view.max_uid
        for uid, item in fetched.items():
            header = next((v for k, v in item.items() if k.startswith(b"BODY[")), b"")
            found = MESSAGE_ID.search(header)
            msgid = found.group(1).decode() if found else f"(none, uid {uid})"
            known = view.names.get(uid)
            if known is None and uid <= previous_max:
                self.ledger.finding(f"{self.user} {mailbox}: new UID {uid} for {msgid} is not "
                                    f"above UID {previous_max} seen before")
            if known is not None and known != msgid:
                self.ledger.finding(f"{self.user} {mailbox}: UID {uid} named {known}, now "
                                    f"{msgid} (UID reused)")
            view.names[uid] = msgid
        view.max_uid = max([view.max_uid, *uids])
        present: dict[str, list[int]] = collections.defaultdict(list)
        for uid in uids:
            present[view.names[uid]].append(uid)
        return present


# Faults

@dataclass
class Fault:
    target: str
    kind: str
    until: float
    undo: Callable[[], None]


class Chaos(threading.Thread):
    def __init__(self, stack: ChaosStack, ledger: Ledger, rng: random.Random, every: float,
                 max_outage: float, max_faults: int, stop: threading.Event,
                 imap_writing: threading.Event) -> None:
        super().__init__(daemon=True)
        self.stack, self.ledger, self.rng = stack, ledger, rng
        self.imap_writing = imap_writing
        self.every, self.max_outage, self.max_faults = every, max_outage, max_faults
        self.halt = stop
        self.active: dict[str, Fault] = {}
        self.injected = 0
        self.error: BaseException | None = None

    def targets(self) -> list[str]:
        broker = ["broker"] if self.stack.broker is not None else []
        disk = ["disk"] if self.stack.disk is not None else []
        return [*self.stack.tier_processes(), *self.stack.proxies, *broker, *disk]

    def run(self) -> None:
        try:
            next_fault = time.monotonic() + self.every
            while not self.halt.wait(0.1):
                self.undo_due()
                self.restart_the_fallen()
                if time.monotonic() >= next_fault and self.injected < self.max_faults:
                    self.inject()
                    next_fault = time.monotonic() + self.rng.uniform(0.5, 2) * self.every
        except BaseException as exc:
            self.error = exc
            raise

    def restart_the_fallen(self) -> None:
        """A process that exited without being killed is a finding; it is started again."""
        for target, proc in self.stack.tier_processes().items():
            if target in self.active or proc is None or proc.poll() is None:
                continue
            self.ledger.finding(f"{target} exited on its own with {proc.returncode}")
            self.stack.start_process(target)

    def undo_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        for target, fault in list(self.active.items()):
            if everything or fault.until <= now:
                fault.undo()
                del self.active[target]

    def inject(self) -> None:
        idle = [t for t in self.targets() if t not in self.active]
        if not idle:
            return
        # The store is where mail is written: it is picked three times as often.
        target = self.rng.choices(idle, [3 if t == "store" else 1 for t in idle])[0]
        if target in self.stack.proxies:
            proxy = self.stack.proxies[target]
            duration = self.rng.uniform(1, self.max_outage)
            if self.rng.random() < 0.5:
                proxy.cut()
                self.add(target, "cut", duration, proxy.start)
            else:
                proxy.hang()
                self.add(target, "hang", duration, proxy.resume)
        elif target == "disk" and self.stack.disk is not None:
            ballast = fill(self.stack.disk)
            self.add(target, "full", self.rng.uniform(1, self.max_outage), ballast.unlink)
        elif target == "broker" and self.stack.broker is not None:
            self.stack.broker.kill()  # its restart takes seconds: the undo waits for it
            self.add(target, "sigkill", self.rng.uniform(0, 3), self.stack.broker.start)
        elif target == "store":
            # Half the kills are aimed: during an IMAP write, a few milliseconds in, where
            # unaimed ones rarely land (a write takes milliseconds, the pause between them
            # a third of a second).
            aimed = self.rng.random() < 0.5 and self.imap_writing.wait(3)
            if aimed:
                time.sleep(self.rng.uniform(0, 0.01))
            ChaosStack.kill(self.stack.store)
            self.add(target, "sigkill during an IMAP write" if aimed else "sigkill",
                     self.rng.uniform(0, 3), self.stack.start_store)
        else:  # a filter or the learner
            ChaosStack.kill(self.stack.tier_processes()[target])
            self.add(target, "sigkill", self.rng.uniform(0, 3),
                     lambda: self.stack.start_process(target))

    def add(self, target: str, kind: str, duration: float, undo: Callable[[], None]) -> None:
        self.active[target] = Fault(target, kind, time.monotonic() + duration, undo)
        self.injected += 1
        self.ledger.count(f"fault {target} {kind}")
        log(f"fault {self.injected}: {target} {kind}, undone after {duration:.1f}s")


# The end: drain, stop, check everything from the files

def drain(stack: ChaosStack, timeout: float) -> None:
    """Until the delivery queues are empty with the store stopped: then nothing is held
    unacked by a consumer either. The store is left stopped (cleanly) for the file checks."""
    queues = [f"{stack.queue_prefix}.deliver", f"{stack.queue_prefix}.deliver.large"]
    if stack.scanners:  # drained by the filters, which are running
        queues.append(f"{stack.queue_prefix}.scan")
    deadline = time.monotonic() + timeout
    while True:
        if stack.store is not None and stack.store.poll() is not None:
            stack.start_store()
        stack.wait_ready()
        wait_for(lambda: not any(stack.queue_counts(queues).values()),
                 max(1.0, deadline - time.monotonic()), "the delivery queues to drain",
                 interval=1.0)
        code = stack.terminate(stack.store)
        if code != 0:
            raise BenchError(f"the store exited {code} on SIGTERM after the run")
        left = stack.queue_counts(queues)
        if not any(left.values()):
            return
        log(f"after stopping the store, still queued: {left}; once more")
        stack.start_store()


def stored_states(user_dir: Path, ledger: Ledger, user: str,
                  queue_ids: dict[str, str]) -> dict[str, State]:
    """Message-ID -> the mailboxes holding it, read from the index and files themselves;
    the queue id of each message that came by SMTP (from its Received header) goes into
    `queue_ids`, to follow it through the tiers' logs."""
    try:
        bodies = check_bodies(user_dir)
    except AssertionError as exc:
        ledger.finding(f"{user}: index and files disagree: {exc}")
        return {}
    conn = sqlite3.connect(f"file:{user_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        check_counters(conn, ledger, user)
        rows = conn.execute("SELECT mailbox.name, message.guid FROM message"
                            " JOIN mailbox ON mailbox.id = message.mailbox_id").fetchall()
    finally:
        conn.close()
    found: dict[str, list[str]] = collections.defaultdict(list)
    for mailbox, guid in rows:
        header = bodies[guid][:8192]
        match = MESSAGE_ID.search(header)
        msgid = match.group(1).decode() if match else f"(no Message-ID, {guid})"
        found[msgid].append(mailbox)
        if queue_id := QUEUE_ID.search(header):
            queue_ids[msgid] = queue_id.group(1).decode()
    return {msgid: tuple(sorted(boxes)) for msgid, boxes in found.items()}


def check_counters(conn: sqlite3.Connection, ledger: Ledger, user: str) -> None:
    for name, uidnext, highest, max_uid, max_modseq in conn.execute(
            "SELECT name, uidnext, highestmodseq, (SELECT max(uid) FROM message m"
            " WHERE m.mailbox_id = mailbox.id), (SELECT max(modseq) FROM message m"
            " WHERE m.mailbox_id = mailbox.id) FROM mailbox"):
        if max_uid is not None and max_uid >= uidnext:
            ledger.finding(f"{user} {name}: UID {max_uid} >= UIDNEXT {uidnext} in the index")
        if max_modseq is not None and max_modseq > highest:
            ledger.finding(f"{user} {name}: MODSEQ {max_modseq} > HIGHESTMODSEQ {highest}")
    both = conn.execute("SELECT count(*) FROM message JOIN expunged USING (mailbox_id, uid)")
    if (n := both.fetchone()[0]):
        ledger.finding(f"{user}: {n} UIDs both present and in the expunge log")


def check_ledger(stack: ChaosStack, ledger: Ledger, clients: list[ImapClient]) -> None:
    mail_root = stack.data_dir / "store" / "mail"
    for user in USERS:
        user_dirs = list(mail_root.glob(f"*/{user}"))
        queue_ids: dict[str, str] = {}
        stored = stored_states(user_dirs[0], ledger, user, queue_ids) if user_dirs else {}
        mine = {msgid: token for (u, msgid), token in ledger.tokens.items() if u == user}
        for msgid, token in mine.items():
            actual = stored.get(msgid, NONE)
            if token.done is not None:
                ledger.count(f"{token.origin}: found "
                             f"{'done' if actual == token.done else 'not done'}")
            if token.origin.startswith("smtp 4") and actual:
                log(f"{user}: {msgid} got {token.origin} and was delivered (queue id "
                    f"{queue_ids.get(msgid)}: its story is in the filters' logs)")
            if actual not in token.possible:
                ledger.finding(f"{user} {msgid} ({token.origin}): stored in {list(actual)}, "
                               f"expected one of {sorted(map(list, token.possible))}")
        for msgid in stored.keys() - mine.keys():
            ledger.finding(f"{user} {msgid}: stored in {list(stored[msgid])}, never sent")
        ledger.count(f"{user} messages stored", sum(len(s) for s in stored.values()))
    for client in clients:
        check_uids_kept(client, mail_root, ledger)


def check_uids_kept(client: ImapClient, mail_root: Path, ledger: Ledger) -> None:
    """Every UID the client saw and that is still there names the message it named then."""
    user_dirs = list(mail_root.glob(f"*/{client.user}"))
    if not user_dirs:
        return
    conn = sqlite3.connect(f"file:{user_dirs[0] / 'index.sqlite'}?mode=ro", uri=True)
    try:
        for mailbox, view in client.views.items():
            row = conn.execute("SELECT id, uidvalidity FROM mailbox WHERE name = ?",
                               (mailbox,)).fetchone()
            if row is None or row[1] != view.uidvalidity:
                ledger.finding(f"{client.user} {mailbox}: UIDVALIDITY at the end {row}")
                continue
            guids = dict(conn.execute("SELECT uid, guid FROM message WHERE mailbox_id = ?",
                                      (row[0],)))
            for uid, msgid in view.names.items():
                if uid in guids:
                    ledger.count("UIDs rechecked")
                    body = stored_body(conn, user_dirs[0], guids[uid])
                    match = MESSAGE_ID.search(body)
                    if match is None or match.group(1).decode() != msgid:
                        ledger.finding(f"{client.user} {mailbox}: UID {uid} was {msgid}, now "
                                       f"{match.group(1).decode() if match else None}")
    finally:
        conn.close()


def stored_body(conn: sqlite3.Connection, user_dir: Path, guid: str) -> bytes:
    row = conn.execute("SELECT data FROM body WHERE guid = ?", (guid,)).fetchone()
    if row is not None:
        return bytes(row[0])[:8192]
    with open(user_dir / "m" / guid[:2] / guid, "rb") as file:
        return file.read(8192)


# The run

@dataclasses.dataclass
class Options:
    seed: int
    duration: float
    max_messages: int
    max_faults: int
    fault_every: float
    max_outage: float
    rate: float
    senders: int
    filters: int
    imap_pause: float
    imap_clients: int
    inline_max: int
    delivery_attempts: int
    redis_db: int
    drain_timeout: float
    keep: bool
    private_broker: bool
    disk_full: bool
    disk_size: str
    scanning: bool
    bayes_redis_db: int


def run(opts: Options) -> int:
    rng = random.Random(opts.seed)
    ledger = Ledger()
    started = time.monotonic()
    log(f"seed {opts.seed}: {opts.duration:.0f} s or {opts.max_messages} messages, at most "
        f"{opts.max_faults} faults, inline max {opts.inline_max}, {opts.filters} filters")
    with temp_root("tiermail-chaos-", opts.keep) as root, contextlib.ExitStack() as disk, \
            closing_stack(ChaosStack(root, opts.redis_db, opts.inline_max,
                                     opts.filters, opts.delivery_attempts)) as stack:
        if opts.disk_full:
            stack.disk = disk.enter_context(tmpfs(stack.data_dir, opts.disk_size))
        stack.setup(opts.private_broker)
        if opts.scanning:
            stack.start_scanners(opts.bayes_redis_db)
            stack.start_learner()
        stack.start_store()
        for index in range(opts.filters):
            stack.start_filter(index)
        stack.wait_ready()
        stop_traffic, stop_faults = threading.Event(), threading.Event()

        def budget() -> bool:
            return (ledger.counts["smtp sent"] < opts.max_messages
                    and time.monotonic() - started < opts.duration)

        senders = [Sender(stack, ledger, random.Random(rng.random()),
                          opts.senders / opts.rate, budget, stop_traffic)
                   for _ in range(opts.senders)]
        imap_writing = threading.Event()
        clients = [ImapClient(stack, ledger, user, (index, opts.imap_clients),
                              random.Random(rng.random()), opts.imap_pause, stop_traffic,
                              imap_writing)
                   for user in USERS for index in range(opts.imap_clients)]
        chaos = Chaos(stack, ledger, random.Random(rng.random()), opts.fault_every,
                      opts.max_outage, opts.max_faults, stop_faults, imap_writing)
        for thread in [*senders, *clients, chaos]:
            thread.start()
        while budget() and chaos.is_alive():
            time.sleep(0.5)
        stop_faults.set()
        chaos.join(timeout=120)
        if chaos.error is not None:
            raise BenchError(f"the chaos thread failed: {chaos.error!r}")
        chaos.undo_due(everything=True)
        stack.restart_processes()
        log("faults undone; stopping traffic")
        stop_traffic.set()
        for thread in [*senders, *clients]:
            thread.join(timeout=120)
            if thread.is_alive():
                ledger.finding(f"{thread!r} did not finish within 120 s")
        drain(stack, opts.drain_timeout)
        dead = stack.dead_letters()
        for line in dead:
            ledger.finding(f"dead-lettered: {line}")
        if opts.scanning:
            quarantined = stack.queue_counts([f"{stack.queue_prefix}.quarantine"])
            if any(quarantined.values()):
                ledger.finding(f"quarantined, though no message carries a virus: {quarantined}")
        check_ledger(stack, ledger, clients)
        count_errors(stack.logs, ledger)
        report(opts, ledger, time.monotonic() - started)
        if ledger.findings:
            log(f"logs in {stack.logs} (use --keep to keep them)")
            for path in sorted(stack.logs.glob("store-*.log"))[-2:]:
                log(f"{path.name}:\n{tail(path, 15)}")
    return 1 if ledger.findings else 0


@contextlib.contextmanager
def closing_stack(stack: ChaosStack) -> Iterator[ChaosStack]:
    try:
        yield stack
    finally:
        stack.close()


def count_errors(logs: Path, ledger: Ledger) -> None:
    """The tiers' ERROR lines by logger and event, as counts: an expected state (a full disk,
    a broker away) should not be one, so each kind is worth a look."""
    for path in logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split(" ", 3)
            if len(fields) == 4 and fields[1] == "ERROR":
                event = re.search(r" event=(\S+)", line)
                ledger.count(f"log ERROR {fields[2]} {event.group(1) if event else ''}".strip())


def report(opts: Options, ledger: Ledger, elapsed: float) -> None:
    log(f"seed {opts.seed} done in {elapsed:.0f} s")
    for key in sorted(ledger.counts):
        log(f"  {key}: {ledger.counts[key]}")
    log(f"  tokens (user, message): {len(ledger.tokens)}, of them uncertain: "
        f"{sum(1 for t in ledger.tokens.values() if t.certain is None)}")
    if ledger.findings:
        log(f"{len(ledger.findings)} FINDINGS:")
        for text in ledger.findings:
            log(f"  {text}")
    else:
        log("every invariant held")


def parse_args() -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=180.0,
                        help="seconds of traffic and faults (default 180)")
    parser.add_argument("--max-messages", type=int, default=2000)
    parser.add_argument("--max-faults", type=int, default=60)
    parser.add_argument("--fault-every", type=float, default=4.0,
                        help="mean seconds between faults")
    parser.add_argument("--max-outage", type=float, default=10.0,
                        help="longest cut or hang of a relay, seconds")
    parser.add_argument("--rate", type=float, default=8.0, help="SMTP messages per second")
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--filters", type=int, default=2)
    parser.add_argument("--imap-pause", type=float, default=0.3,
                        help="mean seconds between one IMAP client's operations")
    parser.add_argument("--imap-clients", type=int, default=2,
                        help="IMAP clients per account, each changing its share of the mail")
    parser.add_argument("--inline-max", type=int, default=65536,
                        help="TIERMAIL_STORE_INLINE_MAX (0: every body a file)")
    parser.add_argument("--delivery-attempts", type=int, default=10,
                        help="TIERMAIL_DELIVERY_ATTEMPTS: low (3) to make broken store links "
                             "reach the delivery limit, where the store renews messages")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the data and logs")
    parser.add_argument("--private-broker", action="store_true",
                        help="a RabbitMQ node of the run's own, SIGKILLed among the faults")
    parser.add_argument("--disk-full", action="store_true",
                        help="the data directory on a tmpfs of its own (root), filled to the "
                        "last block among the faults")
    parser.add_argument("--disk-size", default="256m", help="that tmpfs's size")
    parser.add_argument("--scanning", action="store_true",
                        help="rspamd and clamd behind relays the faults cut and hang, "
                        "TIERMAIL_SCAN_FAILURE=defer, a learner trained by moves into and "
                        "out of Junk")
    parser.add_argument("--bayes-redis-db", type=int, default=13,
                        help="with --scanning: the Redis database for rspamd's Bayes "
                        "statistics, EMPTIED before and after the run (rspamd's keys have no "
                        "prefix to delete them by)")
    args = parser.parse_args()
    return Options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Options)})


if __name__ == "__main__":
    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(run(parse_args()))
