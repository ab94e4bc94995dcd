#!/usr/bin/env python3
"""IMAP benchmark: tiermail's store beside a loopback Dovecot, on one mailbox of N messages.

A benchmark, not a test: it measures and prints, and fails only when something breaks. An
answer that is wrong (a search that misses a needle, a FETCH that returns too few messages) is
marked WRONG in the table and in the JSON, and the run goes on.

Both systems get the same mailbox: N messages (default 100,000) generated deterministically
from a seed: different senders, subjects with RFC 2047 encoded words, plain, alternative and
mixed multiparts with attachments and forwarded messages, 2-20 KB each, and a few known needles
for the searches. Dovecot's Maildir is written directly (files in cur/ and a dovecot-uidlist in
delivery order); tiermail's mailbox is filled through MailDB.deliver in batches before its
store starts (and its text index is waited for). Then, with the same client code for both
(imaplib's connection and LOGIN/SELECT, a lean reader of its own for the big responses), each
operation runs once untimed (warm-up: Dovecot fills its cache on first use) and `--repeats`
times timed; the median is reported:

  * LOGIN + SELECT INBOX (a new connection each time);
  * UID FETCH 1:* (UID FLAGS);
  * FETCH N-999:N ENVELOPE (the newest 1,000);
  * FETCH of BODY.PEEK[] for 500 random messages (one command);
  * UID SEARCH HEADER Subject <needle> and UID SEARCH TEXT <needle>;
  * STORE 1:* +FLAGS (\\Flagged) (timed), then -FLAGS to restore (untimed);
  * 20 concurrent clients (processes) doing a mixed load for 30 s: ops/s, p50/p99 latency;
    three rounds per system, the systems taking turns, the median round reported.

    .venv/bin/python bench/imap_bench.py                  # 100,000 messages, both systems
    .venv/bin/python bench/imap_bench.py --quick          # 10,000 messages, 10 s mixed load
    .venv/bin/python bench/imap_bench.py --quick --dovecot-only     # or --tiermail-only
    .venv/bin/python bench/imap_bench.py --tiermail-only --tiermail-data DIR --mixed-only

Needs root for the Dovecot reference (its own master process, mail files owned by nobody).
Writes a JSON file to bench/results/. docs/benchmarks.md has the method and the results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import imaplib
import importlib.util
import json
import multiprocessing
import os
import platform
import pwd
import queue
import quopri
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import (
    PASSWORD,
    USER,
    BenchError,
    CpuReport,
    LatencyResult,
    TiermailStack,
    free_port,
    log,
    port_open,
    settle,
    temp_root,
    terminate_on_sigterm,
    wait_for,
)

from common.passwords import hash_password

DOVECOT = "/usr/sbin/dovecot"
RESULTS = Path(__file__).resolve().parent / "results"
SUBJECT_NEEDLE = "kumquat7"  # never produced by the word generator (it has no digits)
TEXT_NEEDLE = "zq7vortex"
NEEDLES_EACH = 8
TARGET = 1.5  # tiermail / Dovecot, from issue 4
TEXT_SEARCH_TARGET = 0.1
BASE_TIME = 1_735_689_600  # 2025-01-01 00:00 UTC; message i arrives 5 minutes after i-1


# The mailbox: deterministic, varied mail

SYLLABLES = ["ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "ri",
             "so", "tu", "va", "we", "xi", "yo", "za", "bri", "cla", "dre", "fla", "gro",
             "pla", "sta", "tre", "ver", "mon", "len", "dor", "sin", "tal", "ber", "qui"]
COMMON_TEXT = ("the and for you with this that have from meeting report please attached thanks "
          "regards update project budget review next week today tomorrow team invoice order "
          "shipping delivery account password security notice newsletter offer sale price "
          "schedule agenda minutes draft final version question answer support ticket issue "
          "release server backup database customer contract payment receipt travel hotel "
          "flight conference slides photos family dinner weekend holiday birthday")
COMMON = COMMON_TEXT.split()
UNICODE_WORDS = ["Grüße", "café", "naïve", "résumé", "Übersicht", "日本語", "Привет",
                 "smörgåsbord", "façade", "jalapeño", "Ærøskøbing", "Zürich", "Łódź"]
FIRST_NAMES = ["Anna", "Ben", "Chloé", "David", "Eva", "François", "Greta", "Hiro", "Ines",
               "Jürgen", "Kai", "Lena", "Mateo", "Nora", "Oskar", "Priya", "Quinn", "Rosa",
               "Søren", "Tomás", "Ulla", "Vikram", "Wen", "Xavier", "Yusuf", "Zoë", "Łukasz",
               "Ayşe", "Björn", "Mei"]
LAST_NAMES = ["Andersen", "Brown", "Castro", "Dubois", "Eriksson", "Fischer", "García", "Hoang",
              "Ivanova", "Jensen", "Kowalski", "López", "Müller", "Nakamura", "O'Brien",
              "Petrov", "Rossi", "Schmidt", "Tanaka", "Usman", "Varga", "Weiß", "Yilmaz",
              "Zhang"]
DOMAINS = ["example.com", "example.net", "mail.example.org", "lists.example.io",
           "corp.example", "shop.example", "news.example.co.uk", "uni.example.edu"]
ATTACHMENTS = [("application/pdf", "report", "pdf"), ("image/png", "photo", "png"),
               ("application/zip", "archive", "zip"), ("image/jpeg", "scan", "jpg"),
               ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "budget",
                "xlsx")]
ZONES = [datetime.timezone(datetime.timedelta(hours=h)) for h in (-7, -5, 0, 1, 2, 5.5, 9)]


def _vocabulary(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = {"".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(6000)}
    return sorted(words) + COMMON * 20  # common words weigh more, as in real text


def _b_word(text: str) -> str:
    """An RFC 2047 B-encoded word in UTF-8 (short inputs only: one word stays <= 75 chars)."""
    return "=?UTF-8?B?" + base64.b64encode(text.encode()).decode() + "?="


def _q_word(text: str) -> str:
    """An RFC 2047 Q-encoded word in ISO-8859-1, or UTF-8 when Latin-1 cannot hold it."""
    charset = "ISO-8859-1"
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        charset, raw = "UTF-8", text.encode()
    encoded = "".join(chr(b) if chr(b).isalnum() and b < 128 else "_" if b == 32
                      else f"={b:02X}" for b in raw)
    return f"=?{charset}?Q?{encoded}?="


@dataclass(frozen=True)
class Needles:
    subject: frozenset[int]  # 0-based message indexes whose Subject holds SUBJECT_NEEDLE
    text: frozenset[int]  # ... whose body text holds TEXT_NEEDLE

    def subject_uids(self) -> set[int]:
        return {i + 1 for i in self.subject}

    def text_uids(self) -> set[int]:
        return {i + 1 for i in self.text}


class Corpus:
    """N messages, message i built from Random(seed, i) alone, so any one can be rebuilt.

    Messages are CRLF bytes, as they arrive over SMTP. UID i+1 is message i in both systems.
    """

    def __init__(self, count: int, seed: int) -> None:
        self.count = count
        self.seed = seed
        self.words = _vocabulary(seed)
        rng = random.Random(seed)
        last = count - 1
        self.needles = Needles(
            subject=frozenset(rng.sample(range(count), min(count, NEEDLES_EACH - 1)) + [last]),
            text=frozenset(rng.sample(range(count), min(count, NEEDLES_EACH - 1)) + [last]),
        )

    @staticmethod
    def internaldate(index: int) -> float:
        return float(BASE_TIME + index * 300)

    def messages(self) -> Iterator[tuple[int, bytes]]:
        for index in range(self.count):
            yield index, self.message(index)

    def message(self, index: int) -> bytes:
        rng = random.Random(self.seed * 1_000_003 + index)
        target = rng.randint(2000, 20000)
        kind = rng.random()
        text_needle = index in self.needles.text
        headers = self._headers(rng, index)
        room = max(600, target - len(headers))
        if kind < 0.55:
            body_headers, body = self._text_part(rng, room, text_needle)
            return self._join(headers + body_headers, body)
        boundary = f"----=_Part_{index}_{rng.getrandbits(40):010x}"
        parts: list[bytes] = []
        if kind < 0.75:
            mime_type = "multipart/alternative"
            plain_h, plain = self._text_part(rng, room // 2, text_needle and rng.random() < 0.5)
            html_h, html = self._html_part(rng, room // 2, text_needle)
            parts = [self._join(plain_h, plain), self._join(html_h, html)]
        elif kind < 0.95:
            mime_type = "multipart/mixed"
            share = rng.uniform(0.4, 0.85)
            text_h, text = self._text_part(rng, int(room * (1 - share)), text_needle)
            parts = [self._join(text_h, text)]
            attachments = 2 if rng.random() < 0.2 else 1
            for _ in range(attachments):
                parts.append(self._attachment(rng, int(room * share) // attachments))
        else:
            mime_type = "multipart/mixed"
            text_h, text = self._text_part(rng, room // 4, text_needle)
            inner = self._forwarded(rng, room * 3 // 4)
            parts = [self._join(text_h, text),
                     b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
                     + inner]
        head = headers + (f"MIME-Version: 1.0\r\nContent-Type: {mime_type};\r\n"
                          f" boundary=\"{boundary}\"\r\n").encode()
        body = b"This is a multi-part message in MIME format.\r\n\r\n"
        for part in parts:
            body += f"--{boundary}\r\n".encode() + part + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        return head + b"\r\n" + body

    @staticmethod
    def _join(headers: bytes, body: bytes) -> bytes:
        return headers + b"\r\n" + body

    def _person(self, rng: random.Random) -> str:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        address = f"{first}.{last}".lower().encode("ascii", "ignore").decode().replace("'", "")
        address = f"{address or 'someone'}@{rng.choice(DOMAINS)}"
        name = f"{first} {last}"
        if not name.isascii():
            return f"{_q_word(name)} <{address}>"
        if rng.random() < 0.15:
            return f"\"{last}, {first}\" <{address}>"
        return f"{name} <{address}>"

    def _phrase(self, rng: random.Random, count: int) -> str:
        return " ".join(rng.choices(self.words, k=count))

    def _subject(self, rng: random.Random, index: int) -> str:
        words = self._phrase(rng, rng.randint(2, 8)).capitalize()
        roll = rng.random()
        if roll < 0.2:
            words = f"{words} {_b_word(rng.choice(UNICODE_WORDS))}"
        elif roll < 0.3:
            words = f"{_q_word(rng.choice(UNICODE_WORDS) + ' ' + rng.choice(COMMON))} {words}"
        if index in self.needles.subject:
            if index % 2:  # half of the needles hide inside an encoded word
                words = f"{words} {_b_word(SUBJECT_NEEDLE.capitalize() + ' Übersicht')}"
            else:
                words = f"{SUBJECT_NEEDLE.upper()} {words}"
        prefix = rng.choice(["", "", "", "Re: ", "RE: ", "Fwd: ", "AW: ", "[list] "])
        return prefix + words

    def _headers(self, rng: random.Random, index: int) -> bytes:
        when = datetime.datetime.fromtimestamp(self.internaldate(index) - rng.randint(2, 600),
                                               rng.choice(ZONES))
        sender = self._person(rng)
        lines = [
            f"Return-Path: <{sender.rsplit('<', 1)[1]}",
            f"Received: from mx{rng.randint(1, 9)}.{rng.choice(DOMAINS)} "
            f"(mx.{rng.choice(DOMAINS)} [192.0.2.{rng.randint(1, 254)}])\r\n\tby mx.bench.test "
            f"with ESMTPS id {rng.getrandbits(48):012X}\r\n\tfor <{USER}>; "
            f"{when.strftime('%a, %d %b %Y %H:%M:%S %z')}",
            f"From: {sender}",
            f"To: {USER}" + (f", {self._person(rng)}" if rng.random() < 0.3 else ""),
        ]
        if rng.random() < 0.2:
            lines.append(f"Cc: {self._person(rng)}, {self._person(rng)}")
        lines.append(f"Subject: {self._subject(rng, index)}")
        lines.append(f"Date: {when.strftime('%a, %d %b %Y %H:%M:%S %z')}")
        lines.append(f"Message-ID: <{index}.{rng.getrandbits(64):016x}@{rng.choice(DOMAINS)}>")
        if index and rng.random() < 0.3:
            parent = rng.randrange(max(0, index - 500), index)
            lines.append(f"In-Reply-To: <{parent}.ref@bench.test>")
            lines.append(f"References: <{parent}.ref@bench.test>")
        if rng.random() < 0.3:
            signature = base64.b64encode(rng.randbytes(128)).decode()
            lines.append(f"DKIM-Signature: v=1; a=rsa-sha256; d={rng.choice(DOMAINS)}; s=sel;"
                         f"\r\n\tbh={signature[:44]};\r\n\tb={signature[44:]}")
        if rng.random() < 0.2:
            lines.append(f"List-Id: <list{rng.randint(1, 20)}.lists.example.io>")
        return ("\r\n".join(lines) + "\r\n").encode()

    def _lines(self, rng: random.Random, size: int, needle: bool) -> list[str]:
        words = rng.choices(self.words, k=max(20, size // 9))  # ~9 bytes a word
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 4)):
                words[rng.randrange(len(words))] = rng.choice(UNICODE_WORDS)
        if needle:
            words[rng.randrange(len(words))] = TEXT_NEEDLE
        return [" ".join(words[i:i + 11]) for i in range(0, len(words), 11)]

    def _text_part(self, rng: random.Random, size: int, needle: bool) -> tuple[bytes, bytes]:
        text = "\r\n".join(self._lines(rng, size, needle)) + "\r\n"
        if text.isascii():
            return b"Content-Type: text/plain; charset=us-ascii\r\n" \
                   b"Content-Transfer-Encoding: 7bit\r\n", text.encode()
        if rng.random() < 0.5:
            return b"Content-Type: text/plain; charset=utf-8\r\n" \
                   b"Content-Transfer-Encoding: 8bit\r\n", text.encode()
        encoded = quopri.encodestring(text.replace("\r\n", "\n").encode())
        if needle:  # a soft line break inside the needle: found only by decoding
            encoded = encoded.replace(TEXT_NEEDLE.encode(),
                                      TEXT_NEEDLE[:4].encode() + b"=\n" + TEXT_NEEDLE[4:].encode(),
                                      1)
        return (b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: quoted-printable\r\n",
                encoded.replace(b"\n", b"\r\n"))

    def _html_part(self, rng: random.Random, size: int, needle: bool) -> tuple[bytes, bytes]:
        paragraphs = "\r\n".join(f"<p>{line}</p>" for line in self._lines(rng, size, needle))
        html = f"<html><body>\r\n{paragraphs}\r\n</body></html>\r\n"
        return (b"Content-Type: text/html; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n", html.encode())

    def _attachment(self, rng: random.Random, size: int) -> bytes:
        mime_type, stem, ext = rng.choice(ATTACHMENTS)
        data = base64.encodebytes(rng.randbytes(max(200, size * 3 // 4)))
        if rng.random() < 0.2:  # RFC 2231 parameter with a non-ASCII file name
            name = f"filename*=UTF-8''%C3%9Cbersicht-{stem}.{ext}"
        else:
            name = f"filename=\"{stem}-{rng.randint(1, 999)}.{ext}\""
        return (f"Content-Type: {mime_type}\r\nContent-Transfer-Encoding: base64\r\n"
                f"Content-Disposition: attachment; {name}\r\n\r\n").encode() \
            + data.replace(b"\n", b"\r\n")

    def _forwarded(self, rng: random.Random, size: int) -> bytes:
        headers = (f"From: {self._person(rng)}\r\nTo: {self._person(rng)}\r\n"
                   f"Subject: {self._phrase(rng, 4)}\r\nDate: Mon, 6 Jan 2025 10:00:00 +0100\r\n"
                   f"Message-ID: <{uuid.UUID(int=rng.getrandbits(128))}@example.net>\r\n"
                   f"MIME-Version: 1.0\r\n").encode()
        text_h, text = self._text_part(rng, size, False)
        return headers + text_h + b"\r\n" + text


# Populating the two mailboxes

@dataclass
class Population:
    seconds: float
    sizes: list[int]  # CRLF size of message i: what BODY[] must return
    bytes_total: int


def populate_maildir(maildir: Path, corpus: Corpus, owner: str = "nobody") -> Population:
    """Write the corpus into a Maildir as an LDA would have (cur/, LF line ends, S= and W=
    sizes in the names) plus a dovecot-uidlist that gives UID i+1 to message i."""
    entry = pwd.getpwnam(owner)
    started = time.monotonic()
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    uidlist: list[str] = []
    sizes: list[int] = []
    for index, message in corpus.messages():
        lf = message.replace(b"\r\n", b"\n")
        when = corpus.internaldate(index)
        base = f"{int(when)}.M{index}P1.bench,S={len(lf)},W={len(message)}"
        path = maildir / "cur" / f"{base}:2,"
        path.write_bytes(lf)
        os.utime(path, (when, when))  # Maildir INTERNALDATE is the file's mtime
        os.chown(path, entry.pw_uid, entry.pw_gid)
        uidlist.append(f"{index + 1} :{base}\n")
        sizes.append(len(message))
    header = f"3 V{int(time.time())} N{corpus.count + 1} G{uuid.uuid4().hex}\n"
    (maildir / "dovecot-uidlist").write_text(header + "".join(uidlist))
    for path in [maildir.parent, maildir, *(maildir / s for s in ("cur", "new", "tmp")),
                 maildir / "dovecot-uidlist"]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return Population(time.monotonic() - started, sizes, sum(sizes))


async def populate_maildb(store_dir: Path, corpus: Corpus, inline_max: int,
                          batch: int = 1000) -> Population:
    """Deliver the corpus through MailDB.deliver (inline bodies or files, index rows), in
    order, with the store's inline threshold."""
    from services.store.backends.maildb import MailDB
    from services.store.mailbox import Delivery

    started = time.monotonic()
    db = MailDB.for_store(store_dir, inline_max=inline_max)
    sizes: list[int] = []
    try:
        pending: list[Delivery] = []
        for index, message in corpus.messages():
            pending.append(Delivery(f"imapbench{index:08d}", USER, message,
                                    corpus.internaldate(index)))
            sizes.append(len(message))
            if len(pending) >= batch or index == corpus.count - 1:
                stored = await db.deliver(pending)
                if not all(stored):
                    raise BenchError(f"MailDB.deliver refused {stored.count(False)} messages")
                pending = []
                if (index + 1) % 20000 == 0:
                    log(f"tiermail: {index + 1} messages delivered")
    finally:
        await db.close()
    return Population(time.monotonic() - started, sizes, sum(sizes))


# Dovecot on loopback

DOVECOT_CONF = """\
# Written by bench/imap_bench.py: a throw-away Dovecot for the benchmark only.
base_dir = {root}/run
state_dir = {root}/state
instance_name = imapbench-{tag}
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_login_user = dovenull
default_internal_user = dovecot
mail_location = maildir:~/Maildir
mail_plugins =
# 20 concurrent clients of one user from one address (the default allows 10).
mail_max_userip_connections = 100
passdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
{listener}
"""


def dovecot_listener(protocol: str, port: int) -> str:
    """The login service of `protocol` (imap, pop3) on 127.0.0.1:`port`, its TLS port off."""
    return (f"service {protocol}-login {{\n  inet_listener {protocol} {{\n"
            f"    address = 127.0.0.1\n    port = {port}\n  }}\n"
            f"  inet_listener {protocol}s {{\n    port = 0\n  }}\n}}")


class DovecotStack:
    """Dovecot with its own config, base_dir, state, log and Maildir under one temp dir."""

    def __init__(self, root: Path, extra_settings: list[str]) -> None:
        self.root = root
        self.extra_settings = extra_settings
        self.port = free_port()
        self.conf = root / "dovecot.conf"
        self.maildir = root / "home" / USER / "Maildir"
        self.process: subprocess.Popen[bytes] | None = None

    def configure(self) -> None:
        nobody = pwd.getpwnam("nobody")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("run", "state", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chown(self.root / "home", nobody.pw_uid, nobody.pw_gid)
        self.conf.write_text(DOVECOT_CONF.format(root=self.root,
                                                 listener=dovecot_listener("imap", self.port),
                                                 uid=nobody.pw_uid, gid=nobody.pw_gid,
                                                 tag=os.getpid())
                             + "".join(f"{line}\n" for line in self.extra_settings))
        # The same argon2id hash (and cost) tiermail stores, so LOGIN costs both servers the
        # same password check (Dovecot verifies any argon2id PHC string).
        (self.root / "passwd").write_text(f"{USER}:{{ARGON2ID}}{hash_password(PASSWORD)}\n")

    def start(self, timeout: float = 30) -> None:
        with open(self.root / "dovecot.out", "ab") as out:
            # Its own session: Ctrl-C reaches us, and we stop Dovecot in `stop()`.
            self.process = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)],
                                            stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise BenchError(f"dovecot exited {process.returncode}:\n{self.log_tail()}")
            return port_open(self.port)

        wait_for(up, timeout, f"dovecot on port {self.port}")

    def log_tail(self) -> str:
        return "\n".join(benchlib.tail(self.root / name, 20)
                         for name in ("dovecot.out", "dovecot.log"))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        # Its children (login, imap, auth processes) share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def dovecot_version() -> str:
    return benchlib.run([DOVECOT, "--version"], timeout=30).stdout.strip()


# The operations, the same client code for both systems

class WrongAnswer(BenchError):
    """The server answered, but not what the mailbox holds."""


def connect(port: int, timeout: float = 900) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", port, timeout=timeout)


def login_select(port: int) -> tuple[imaplib.IMAP4, int]:
    imap = connect(port)
    ok(imap.login(USER, PASSWORD), "LOGIN")
    data = ok(imap.select("INBOX"), "SELECT")
    return imap, int(data[0] or 0)


def logout(imap: imaplib.IMAP4) -> None:
    with contextlib.suppress(imaplib.IMAP4.error, OSError):
        imap.logout()


def ok(reply: tuple[str, list[Any]], what: str) -> list[Any]:
    status, data = reply
    if status != "OK":
        raise BenchError(f"{what} answered {status} {data!r}")
    return data


@dataclass
class Reply:
    lines: list[bytes]  # every line of the response, literals taken out
    literals: list[tuple[bytes, bytes]]  # (the line that announced it, its bytes)

    def fetches(self) -> int:
        return sum(1 for line in self.lines if _UNTAGGED_FETCH.match(line))

    def search(self) -> set[int]:
        found: set[int] = set()
        for line in self.lines:
            if line.startswith(b"* SEARCH"):
                found.update(int(x) for x in line[8:].split())
        return found


_UNTAGGED_FETCH = re.compile(rb"^\* \d+ FETCH ")
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_tags = iter(range(1, 1 << 62))


def command(imap: imaplib.IMAP4, text: str) -> Reply:
    """Send one command on imaplib's connection and read its whole response, fast.

    imaplib's own response handling (regexes and bookkeeping per line) costs the client as
    much CPU as the server spends on UID FETCH 1:* of 100,000 messages; this reader keeps the
    client's share small, so the times measure the servers. Literals are read by their size.
    """
    tag = f"b{next(_tags)}".encode()
    imap.send(tag + b" " + text.encode() + b"\r\n")
    lines: list[bytes] = []
    literals: list[tuple[bytes, bytes]] = []
    readline, read, done = imap.readline, imap.read, tag + b" "
    while True:
        line = readline()
        if not line:
            raise BenchError(f"connection closed during {text[:60]!r}")
        if line.endswith(b"}\r\n"):
            match = _LITERAL.search(line)
            if match:
                literals.append((line, read(int(match.group(1)))))
        lines.append(line)
        if line.startswith(done):
            status = line[len(done):].split(b" ", 1)[0]
            if status != b"OK":
                raise BenchError(f"{text[:60]!r} answered {line.decode(errors='replace')}")
            return Reply(lines, literals)


@dataclass
class Context:
    port: int
    count: int
    corpus: Corpus
    sizes: list[int]
    seed: int
    session: imaplib.IMAP4 | None = None

    def imap(self) -> imaplib.IMAP4:
        if self.session is None:
            self.session, _ = login_select(self.port)
        return self.session

    def reset(self) -> None:
        if self.session is not None:
            logout(self.session)
            self.session = None


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise WrongAnswer(message)


def op_login_select(ctx: Context, run: int) -> Callable[[], None]:
    def go() -> None:
        imap, exists = login_select(ctx.port)
        logout(imap)
        expect(exists == ctx.count, f"SELECT says {exists} messages, expected {ctx.count}")
    return go


def op_uid_fetch_flags(ctx: Context, run: int) -> Callable[[], None]:
    imap = ctx.imap()

    def go() -> None:
        got = command(imap, "UID FETCH 1:* (UID FLAGS)").fetches()
        expect(got == ctx.count, f"UID FETCH 1:* returned {got} of {ctx.count}")
    return go


def op_envelope(ctx: Context, run: int) -> Callable[[], None]:
    imap = ctx.imap()
    first = max(1, ctx.count - 999)
    wanted = ctx.count - first + 1

    def go() -> None:
        got = command(imap, f"FETCH {first}:{ctx.count} ENVELOPE").fetches()
        expect(got == wanted, f"FETCH ENVELOPE returned {got} of {wanted}")
    return go


def body_sample(ctx: Context, run: int) -> list[int]:
    rng = random.Random(ctx.seed * 31 + run)
    return sorted(rng.sample(range(1, ctx.count + 1), min(500, ctx.count)))


_BODY_HEAD = re.compile(rb"^\* (\d+) FETCH \(.*BODY\[\] \{(\d+)\}\r\n$")


def drop_page_cache() -> None:
    """Start from cold files. Fair only when both systems start alike: this machine's kernel
    reclaims idle page cache (DAMON), so which of the two mail stores is still cached depends
    on the order the benchmark ran in, not on the server."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def op_body_peek(ctx: Context, run: int) -> Callable[[], None]:
    imap = ctx.imap()
    seqs = body_sample(ctx, run)
    drop_page_cache()  # untimed: both systems read these 500 files from disk

    def go() -> None:
        reply = command(imap, f"FETCH {','.join(map(str, seqs))} (BODY.PEEK[])")
        sizes = {}
        for head, data in reply.literals:
            match = _BODY_HEAD.match(head)
            if match:
                sizes[int(match.group(1))] = len(data)
        expect(len(sizes) == len(seqs), f"BODY.PEEK[] returned {len(sizes)} of {len(seqs)}")
        wrong = [s for s in seqs if sizes.get(s) != ctx.sizes[s - 1]]
        expect(not wrong, f"{len(wrong)} bodies differ in size from what was stored, "
                          f"e.g. {wrong[:3]}")
    return go


def search_op(key: str, expected: set[int]) -> Callable[[Context, int], Callable[[], None]]:
    def make(ctx: Context, run: int) -> Callable[[], None]:
        imap = ctx.imap()

        def go() -> None:
            found = command(imap, f"UID SEARCH {key}").search()
            expect(found == expected, f"UID SEARCH {key} found {sorted(found)}, "
                                      f"expected {sorted(expected)}")
        return go
    return make


def op_store_all(ctx: Context, run: int) -> Callable[[], None]:
    imap = ctx.imap()

    def go() -> None:
        got = command(imap, r"STORE 1:* +FLAGS (\Flagged)").fetches()
        expect(got == ctx.count, f"STORE +FLAGS returned {got} FETCH responses of {ctx.count}")
    return go


def undo_store_all(ctx: Context) -> None:
    command(ctx.imap(), r"STORE 1:* -FLAGS.SILENT (\Flagged)")


@dataclass
class Operation:
    name: str
    make: Callable[[Context, int], Callable[[], None]]  # untimed setup -> the timed call
    after: Callable[[Context], None] | None = None  # untimed, after each run
    target: float = TARGET


def operations(corpus: Corpus) -> list[Operation]:
    return [
        Operation("LOGIN + SELECT INBOX", op_login_select),
        Operation("UID FETCH 1:* (UID FLAGS)", op_uid_fetch_flags),
        Operation("FETCH newest 1,000 ENVELOPE", op_envelope),
        Operation("FETCH 500 x BODY.PEEK[]", op_body_peek),
        Operation(f"UID SEARCH HEADER Subject {SUBJECT_NEEDLE}",
                  search_op(f"HEADER Subject {SUBJECT_NEEDLE}",
                            corpus.needles.subject_uids())),
        Operation(f"UID SEARCH TEXT {TEXT_NEEDLE}",
                  search_op(f"TEXT {TEXT_NEEDLE}", corpus.needles.text_uids()),
                  target=TEXT_SEARCH_TARGET),
        Operation(r"STORE 1:* +FLAGS (\Flagged)", op_store_all, after=undo_store_all),
    ]


@dataclass
class Timing:
    name: str
    target: float
    warmup_ms: float | None = None
    runs_ms: list[float] = field(default_factory=list)
    wrong: str | None = None
    error: str | None = None
    client_cpu_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.runs_ms) if self.runs_ms else None


def time_operation(op: Operation, ctx: Context, repeats: int) -> Timing:
    """One untimed warm-up run, then `repeats` timed runs. A wrong answer is recorded and
    timing goes on; a failure (NO, BAD, dropped connection) ends this operation."""
    timing = Timing(op.name, op.target)
    for run in range(repeats + 1):
        try:
            call = op.make(ctx, run)
            cpu, started = time.process_time(), time.perf_counter()
            try:
                call()
            except WrongAnswer as exc:
                timing.wrong = timing.wrong or str(exc)
            elapsed = (time.perf_counter() - started) * 1000
            cpu_ms = (time.process_time() - cpu) * 1000
            if op.after is not None:
                op.after(ctx)
        except (BenchError, imaplib.IMAP4.error, OSError) as exc:
            timing.error = f"{type(exc).__name__}: {exc}"[:500]
            ctx.reset()
            break
        if run == 0:
            timing.warmup_ms = elapsed
        else:
            timing.runs_ms.append(elapsed)
            timing.client_cpu_ms.append(cpu_ms)
    return timing


# The mixed load: N client processes

MIXED_OPS = (("SELECT", 10), ("FETCH FLAGS", 25), ("BODY.PEEK[]", 25), ("STORE", 20),
             ("NOOP", 20))


def mixed_client(port: int, count: int, seed: int, start_at: float,
                 seconds: float, interval: float = 0.0) -> dict[str, Any]:
    """One client process: log in, wait for the common start, then random operations, one
    after another, or one every `interval` seconds when it is above 0 (a late one starts at
    once; the latency counts from its start)."""
    rng = random.Random(seed)
    names = [name for name, _ in MIXED_OPS]
    weights = [weight for _, weight in MIXED_OPS]
    samples: dict[str, list[float]] = {name: [] for name in names}
    errors: list[str] = []
    imap, _ = login_select(port)
    time.sleep(max(0.0, start_at - time.time()))
    end = time.monotonic() + seconds
    cpu_at_start = time.process_time()
    next_at = time.monotonic() + rng.uniform(0, interval)  # spread the clients' slots
    try:
        while time.monotonic() < end:
            if interval:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            name = rng.choices(names, weights)[0]
            started = time.perf_counter()
            try:
                mixed_operation(imap, name, rng, count)
            except (BenchError, imaplib.IMAP4.error, OSError) as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
                logout(imap)
                imap, _ = login_select(port)
                continue
            samples[name].append((time.perf_counter() - started) * 1000)
    finally:
        cpu_seconds = time.process_time() - cpu_at_start
        logout(imap)
    return {"samples": samples, "errors": errors, "cpu_seconds": cpu_seconds}


def _report_mixed_client(results: Any, *args: Any) -> None:
    """mixed_client in a child process; a client that failed reports it as an error."""
    try:
        outcome = mixed_client(*args)
    except BaseException as exc:
        outcome = {"samples": {}, "errors": [f"client failed: {type(exc).__name__}: {exc}"]}
    results.put(outcome)


def mixed_operation(imap: imaplib.IMAP4, name: str, rng: random.Random, count: int) -> None:
    if name == "SELECT":
        command(imap, "SELECT INBOX")
    elif name == "FETCH FLAGS":
        first = rng.randint(1, max(1, count - 199))
        command(imap, f"FETCH {first}:{min(count, first + 199)} (UID FLAGS)")
    elif name == "BODY.PEEK[]":
        command(imap, f"FETCH {rng.randint(1, count)} (BODY.PEEK[])")
    elif name == "STORE":
        sign = "+" if rng.random() < 0.5 else "-"
        command(imap, f"STORE {rng.randint(1, count)} {sign}FLAGS (\\Answered)")
    else:
        command(imap, "NOOP")


@dataclass
class MixedResult:
    clients: int
    seconds: float
    operations: int = 0
    errors: list[str] = field(default_factory=list)
    latency: LatencyResult = field(default_factory=LatencyResult)
    per_op: dict[str, dict[str, float]] = field(default_factory=dict)
    machine: CpuReport | None = None  # the whole machine over the load's seconds
    clients_cpu_seconds: float = 0.0  # the client processes' own, over the same

    @property
    def ops_per_second(self) -> float:
        return self.operations / self.seconds

    @property
    def clients_part(self) -> float:
        """The client processes' share of the CPU in use (the rest: the server, the kernel
        and anything else running)."""
        busy = self.machine.machine_busy if self.machine else 0.0
        return self.clients_cpu_seconds / busy if busy else 0.0

    @property
    def busy_share(self) -> float:
        """The machine's CPU in use during the load, as a share of all it had."""
        return self.machine.utilisation if self.machine else 0.0

    @property
    def cpu_text(self) -> str:
        return f"machine {self.busy_share:.0%} busy, {self.clients_part:.0%} of it the clients"

    def as_dict(self) -> dict[str, Any]:
        return {"clients": self.clients, "seconds": self.seconds,
                "operations": self.operations, "ops_per_second": self.ops_per_second,
                "p50_ms": self.latency.p50, "p99_ms": self.latency.p99,
                "errors": len(self.errors), "first_errors": self.errors[:10],
                "per_operation": self.per_op,
                "machine_busy_seconds": self.machine.machine_busy if self.machine else 0.0,
                "clients_cpu_seconds": self.clients_cpu_seconds}


def mixed_load(port: int, count: int, clients: int, seconds: float, seed: int,
               rate: float = 0.0) -> MixedResult:
    """`clients` processes for `seconds`; with `rate` > 0 they offer that many operations per
    second in all instead of going flat out."""
    interval = clients / rate if rate > 0 else 0.0
    # Plain processes and a queue, not multiprocessing.Pool: a Pool once hung the whole
    # benchmark after every client had finished (its handler threads), with no error.
    context = multiprocessing.get_context("fork")
    start_at = time.time() + 3 + clients * 0.1  # every client logged in before the start
    results = context.Queue()
    workers = [context.Process(target=_report_mixed_client, daemon=True,
                               args=(results, port, count, seed * 1000 + n, start_at,
                                     seconds, interval))
               for n in range(clients)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + (start_at - time.time()) + seconds + 300
    outcomes: list[dict[str, Any]] = []
    try:
        time.sleep(max(0.0, start_at - time.time()))
        machine_before = benchlib.machine_cpu_seconds()
        time.sleep(seconds)
        busy, idle, stolen = (after - before for after, before in
                              zip(benchlib.machine_cpu_seconds(), machine_before, strict=True))
        while len(outcomes) < clients:
            try:
                outcomes.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise BenchError(f"mixed load: {clients - len(outcomes)} of {clients} clients "
                                 "gave no result in time") from None
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join()
    result = MixedResult(clients, seconds)
    merged: dict[str, list[float]] = {}
    for outcome in outcomes:
        result.errors += outcome["errors"]
        result.clients_cpu_seconds += outcome.get("cpu_seconds", 0.0)
        for name, samples in outcome["samples"].items():
            merged.setdefault(name, []).extend(samples)
            result.latency.samples_ms.extend(samples)
    result.operations = len(result.latency.samples_ms)
    result.machine = CpuReport(result.operations, busy, idle, stolen, {})
    for name, samples in merged.items():
        per = LatencyResult(samples)
        result.per_op[name] = {"count": len(samples), "p50_ms": per.p50, "p99_ms": per.p99}
    return result


# One system, start to finish

@dataclass
class SystemResult:
    system: str
    version: str
    population: dict[str, float] = field(default_factory=dict)
    timings: list[Timing] = field(default_factory=list)
    mixed_rounds: list[MixedResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: str | None = None
    port: int = 0  # while its server runs
    finish: Callable[[], None] | None = None  # after the mixed load, before the server stops

    def timing(self, name: str) -> Timing | None:
        return next((t for t in self.timings if t.name == name), None)

    @property
    def mixed(self) -> MixedResult | None:
        """The mixed-load round with the median p50."""
        if not self.mixed_rounds:
            return None
        by_p50 = sorted(self.mixed_rounds, key=lambda m: m.latency.p50)
        return by_p50[(len(by_p50) - 1) // 2]


def measure(system: SystemResult, port: int, corpus: Corpus, sizes: list[int],
            args: argparse.Namespace) -> None:
    ctx = Context(port, corpus.count, corpus, sizes, args.seed)
    try:
        # Untimed: mark the older 90% read, as in a mailbox someone actually uses.
        seen = corpus.count * 9 // 10
        if seen:
            command(ctx.imap(), f"STORE 1:{seen} +FLAGS.SILENT (\\Seen)")
        for op in ([] if args.mixed_only else operations(corpus)):
            log(f"{system.system}: {op.name}")
            timing = time_operation(op, ctx, args.repeats)
            system.timings.append(timing)
            median = timing.median_ms
            log(f"{system.system}: {op.name}: warm-up {fmt_ms(timing.warmup_ms)} ms, median "
                f"{fmt_ms(median)} ms{' WRONG: ' + timing.wrong if timing.wrong else ''}"
                f"{' FAILED: ' + timing.error if timing.error else ''}")
    finally:
        ctx.reset()
    system.port = port


def mixed_rounds(systems: list[SystemResult], count: int, args: argparse.Namespace) -> None:
    """The mixed load in `args.mixed_rounds` rounds, the systems taking turns (both servers
    up, one loaded at a time), each round on a quiet machine: this VM's speed drifts by a
    fifth and more within minutes, and one run per system minutes apart measured the drift as
    much as the servers. Each system's reported round is its median by p50."""
    pace = f", paced to {args.mixed_rate:g} ops/s" if args.mixed_rate > 0 else ""
    for number in range(1, args.mixed_rounds + 1):
        for system in systems:
            settled = settle()
            log(f"{system.system}: mixed load round {number}, {args.clients} clients for "
                f"{args.mixed_seconds:.0f} s{pace} (machine quiet after {settled:.1f} s)")
            mixed = mixed_load(system.port, count, args.clients, args.mixed_seconds,
                               args.seed + number - 1, args.mixed_rate)
            system.mixed_rounds.append(mixed)
            log(f"{system.system}: mixed {mixed.ops_per_second:.0f} ops/s, p50 "
                f"{mixed.latency.p50:.3f} ms, p99 {mixed.latency.p99:.1f} ms, "
                f"{len(mixed.errors)} errors; {mixed.cpu_text}")


def run_dovecot(root: Path, corpus: Corpus, args: argparse.Namespace,
                result: SystemResult, running: contextlib.ExitStack) -> None:
    """Fill Dovecot's Maildir, start it and time the single operations; it keeps running
    (`running` stops it) for the mixed load."""
    stack = DovecotStack(root, args.dovecot_setting)
    running.callback(stack.stop)
    result.version = dovecot_version()
    try:
        stack.configure()
        log(f"dovecot: writing {corpus.count} messages into {stack.maildir}")
        population = populate_maildir(stack.maildir, corpus)
        result.population = {"seconds": population.seconds, "bytes": population.bytes_total}
        log(f"dovecot: Maildir written in {population.seconds:.1f} s "
            f"({population.bytes_total / 2**20:.0f} MiB)")
        stack.start()
        log(f"dovecot: listening on 127.0.0.1:{stack.port} (config {stack.conf})")
        # First SELECT: Dovecot reads cur/ and the uidlist and builds dovecot.index.
        started = time.perf_counter()
        imap, exists = login_select(stack.port)
        first = time.perf_counter() - started
        logout(imap)
        if exists != corpus.count:
            raise BenchError(f"dovecot sees {exists} messages, expected {corpus.count}")
        result.population["first_select_seconds"] = first
        result.notes.append(f"first LOGIN+SELECT (builds dovecot.index from the Maildir): "
                            f"{first * 1000:.0f} ms")
        log(f"dovecot: first LOGIN+SELECT (index build) {first * 1000:.0f} ms")
        measure(result, stack.port, corpus, population.sizes, args)
    except BenchError:
        log("dovecot log tail:\n" + stack.log_tail())
        raise


def run_tiermail(root: Path, corpus: Corpus, args: argparse.Namespace,
                 result: SystemResult, running: contextlib.ExitStack) -> None:
    """As run_dovecot, for a tiermail stack of its own."""
    if args.tiermail_data:
        root = Path(args.tiermail_data).resolve()
    stack = TiermailStack(root, args.redis_db)
    running.callback(stack.close)
    stack.env.update(tiermail_settings(args.tiermail_setting))
    if args.tiermail_setting:
        result.notes.append("settings: " + ", ".join(args.tiermail_setting))
    result.version = tiermail_version()
    try:
        log(f"tiermail: vhost {stack.vhost}, data {stack.data_dir}")
        from common.settings import Settings

        inline_max = Settings.from_env(stack.env).store_inline_max  # what the store will use
        marker = root / "populated.json"
        wanted = {"messages": corpus.count, "seed": corpus.seed, "inline_max": inline_max}
        if args.tiermail_data and marker.exists() and json.loads(marker.read_text()) == wanted:
            stack.create_vhost()
            sizes = [len(message) for _, message in corpus.messages()]
            population = Population(0.0, sizes, sum(sizes))
            log(f"tiermail: reusing the mailbox in {root} (populated earlier, same corpus)")
        else:
            stack.setup()
            log(f"tiermail: delivering {corpus.count} messages through MailDB.deliver")
            population = asyncio.run(populate_maildb(stack.data_dir / "store", corpus,
                                                     inline_max))
            log(f"tiermail: delivered in {population.seconds:.1f} s")
            if args.tiermail_data:
                marker.write_text(json.dumps(wanted))
        result.population = {"seconds": population.seconds, "bytes": population.bytes_total}
        started = time.monotonic()
        stack.start_store()
        try:
            wait_for(lambda: port_open(stack.imap_port), args.imap_wait,
                     f"tiermail IMAP on port {stack.imap_port}")
        except BenchError as exc:
            raise BenchError(f"{exc}: the store does not serve IMAP (yet)") from None
        result.population["store_start_seconds"] = time.monotonic() - started
        catch_up = wait_text_index(stack, corpus, args, started)
        if catch_up is not None:
            log(f"tiermail: {catch_up}")
            result.population["text_index_wait_seconds"] = time.monotonic() - started
            result.population["text_indexed"] = text_indexed(stack)
            result.notes.append(catch_up)
        started = time.perf_counter()
        imap, exists = login_select(stack.imap_port)
        first = time.perf_counter() - started
        logout(imap)
        if exists != corpus.count:
            raise BenchError(f"tiermail sees {exists} messages, expected {corpus.count}")
        result.population["first_select_seconds"] = first
        result.notes.append(f"first LOGIN+SELECT: {first * 1000:.0f} ms")
        measure(result, stack.imap_port, corpus, population.sizes, args)
    except BenchError:
        stack.log_tails()
        raise

    def finish() -> None:
        stack.check_alive()
        result.notes.append(f"store RSS at the end: {stack.rss_kib('store') // 1024} MiB")

    result.finish = finish


def wait_text_index(stack: TiermailStack, corpus: Corpus, args: argparse.Namespace,
                    started: float) -> str | None:
    """Wait until the store's text index (text.sqlite beside the user's index,
    services/store/backends/textindex.py) holds every message, and say how long that took
    from the store's start; None if this code has no text index.

    The store indexes in the background, in the process that serves IMAP, so timing before
    it has caught up would measure the indexer as much as the server. An index that makes no
    progress for --index-stall seconds is reported, and the run goes on.
    """
    if importlib.util.find_spec("services.store.backends.textindex") is None:
        return None
    progress = {"count": -1, "at": time.monotonic(), "logged": time.monotonic()}

    def finished() -> bool:
        stack.check_alive()
        now, done = time.monotonic(), text_indexed(stack)
        if done != progress["count"]:
            progress.update(count=done, at=now)
        if now - progress["logged"] > 30:
            progress["logged"] = now
            log(f"tiermail: text index holds {done} of {corpus.count} messages")
        return done >= corpus.count or now - progress["at"] > args.index_stall

    wait_for(finished, args.timeout, "the text index to catch up", interval=0.5)
    elapsed = time.monotonic() - started
    done = int(progress["count"])
    if done >= corpus.count:
        return f"text index caught up with all {done} messages {elapsed:.1f} s after store start"
    return (f"text index NOT caught up: {done} of {corpus.count} messages indexed, no progress "
            f"for {args.index_stall:.0f} s ({elapsed:.0f} s after store start)")


def text_indexed(stack: TiermailStack) -> int:
    """Messages in the user's text index: a read-only count, no login."""
    index = stack.index_path()
    if index is None or not (index.parent / "text.sqlite").exists():
        return 0
    conn = sqlite3.connect(f"file:{index.parent / 'text.sqlite'}?mode=ro", uri=True,
                           timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM doc").fetchone()[0])
    except sqlite3.OperationalError:  # created, schema not there yet
        return 0
    finally:
        conn.close()


def tiermail_version() -> str:
    try:
        return benchlib.run(["git", "-C", str(benchlib.REPO), "describe", "--always",
                             "--dirty"], timeout=30).stdout.strip()
    except (BenchError, OSError):
        return "unknown"


# Report

def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def table(results: list[SystemResult]) -> str:
    dovecot = next((r for r in results if r.system == "dovecot"), None)
    tiermail = next((r for r in results if r.system == "tiermail"), None)
    names = [t.name for t in (dovecot or tiermail or SystemResult("", "")).timings]
    lines = ["| operation | dovecot ms | tiermail ms | ratio | target |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in names:
        d = dovecot.timing(name) if dovecot else None
        t = tiermail.timing(name) if tiermail else None
        either = d or t
        target = either.target if either else TARGET
        lines.append(f"| {name} | {cell(d)} | {cell(t)} | {ratio(d, t)} | <= {target:g} |")
    mixed = [(r.mixed if r else None) for r in (dovecot, tiermail)]
    if any(mixed):
        dm, tm = mixed
        clients = next(m.clients for m in mixed if m)
        label = f"mixed, {clients} clients"
        lines.append(f"| {label}: p50 latency | {mixed_cell(dm, 'p50')} | "
                     f"{mixed_cell(tm, 'p50')} | {mixed_ratio(dm, tm, 'p50')} | <= {TARGET:g} |")
        lines.append(f"| {label}: p99 latency | {mixed_cell(dm, 'p99')} | "
                     f"{mixed_cell(tm, 'p99')} | {mixed_ratio(dm, tm, 'p99')} | <= {TARGET:g} |")
        ops = [f"{m.ops_per_second:,.0f} ops/s" if m else "-" for m in mixed]
        ops_ratio = (f"{dm.ops_per_second / tm.ops_per_second:.2f}"
                     if dm and tm and tm.ops_per_second else "-")
        lines.append(f"| {label}: throughput (ratio = dovecot/tiermail) | {ops[0]} | {ops[1]} "
                     f"| {ops_ratio} | <= {TARGET:g} |")
    rounds = mixed_round_lines(dovecot, tiermail)
    warm = ["", "Warm-up run (the first, untimed for the table: Dovecot fills its cache here):",
            "", "| operation | dovecot ms | tiermail ms |", "| --- | ---: | ---: |"]
    for name in names:
        d = dovecot.timing(name) if dovecot else None
        t = tiermail.timing(name) if tiermail else None
        warm.append(f"| {name} | {fmt_ms(d.warmup_ms if d else None)} "
                    f"| {fmt_ms(t.warmup_ms if t else None)} |")
    notes = []
    for result in results:
        for timing in result.timings:
            if timing.wrong:
                notes.append(f"- {result.system}, {timing.name}: WRONG: {timing.wrong}")
            if timing.error:
                notes.append(f"- {result.system}, {timing.name}: FAILED: {timing.error}")
        notes += [f"- {result.system}: {note}" for note in result.notes]
        if result.mixed and result.mixed.errors:
            notes.append(f"- {result.system}: mixed load errors: {len(result.mixed.errors)}, "
                         f"first: {result.mixed.errors[0]}")
        if result.failed:
            notes.append(f"- {result.system}: FAILED: {result.failed}")
    return "\n".join(lines + rounds + warm + ([""] + notes if notes else []))


def mixed_round_lines(dovecot: SystemResult | None,
                      tiermail: SystemResult | None) -> list[str]:
    """Every mixed-load round, p50 ms (ops/s), and the ratio of the two run one after the
    other."""
    count = max((len(r.mixed_rounds) for r in (dovecot, tiermail) if r), default=0)
    if count < 2:
        return []
    lines = ["", "Mixed-load rounds (the systems taking turns; the table has each one's median;",
             "CPU: the machine's busy share of both cores, and the client processes' part of",
             "that):", "",
             "| round | dovecot p50 ms (ops/s; CPU) | tiermail p50 ms (ops/s; CPU) | ratio |",
             "| ---: | ---: | ---: | ---: |"]
    for number in range(count):
        cells = [result.mixed_rounds[number]
                 if result and number < len(result.mixed_rounds) else None
                 for result in (dovecot, tiermail)]
        text = [f"{m.latency.p50:.3f} ({m.ops_per_second:,.0f}; {m.busy_share:.0%}, "
                f"clients {m.clients_part:.0%})" if m else "-" for m in cells]
        lines.append(f"| {number + 1} | {text[0]} | {text[1]} | "
                     f"{mixed_ratio(cells[0], cells[1], 'p50')} |")
    return lines


def cell(timing: Timing | None) -> str:
    if timing is None:
        return "-"
    if timing.error and not timing.runs_ms:
        return "failed"
    text = fmt_ms(timing.median_ms)
    return f"{text} WRONG" if timing.wrong else text


def ratio(d: Timing | None, t: Timing | None) -> str:
    if d is None or t is None or not d.median_ms or t.median_ms is None:
        return "-"
    return f"{t.median_ms / d.median_ms:.2f}"


def mixed_cell(result: MixedResult | None, which: str) -> str:
    if result is None:
        return "-"
    return fmt_ms(result.latency.p50 if which == "p50" else result.latency.p99)


def mixed_ratio(d: MixedResult | None, t: MixedResult | None, which: str) -> str:
    if d is None or t is None:
        return "-"
    dv = d.latency.p50 if which == "p50" else d.latency.p99
    tv = t.latency.p50 if which == "p50" else t.latency.p99
    return f"{tv / dv:.2f}" if dv else "-"


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpu_model": model,
            "memory_mib": memory, "kernel": platform.release(),
            "python": platform.python_version()}


def write_json(results: list[SystemResult], corpus: Corpus, args: argparse.Namespace,
               argv: list[str]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"imap-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join(["bench/imap_bench.py", *argv]),
        "machine": machine(),
        "messages": corpus.count, "seed": corpus.seed, "repeats": args.repeats,
        "needles": {"subject": SUBJECT_NEEDLE, "subject_uids": sorted(
                        corpus.needles.subject_uids()),
                    "text": TEXT_NEEDLE, "text_uids": sorted(corpus.needles.text_uids())},
        "systems": [{
            "system": r.system, "version": r.version, "population": r.population,
            "notes": r.notes, "failed": r.failed,
            "operations": [{"name": t.name, "median_ms": t.median_ms, "runs_ms": t.runs_ms,
                            "warmup_ms": t.warmup_ms, "client_cpu_ms": t.client_cpu_ms,
                            "wrong": t.wrong, "error": t.error, "target": t.target}
                           for t in r.timings],
            "mixed": r.mixed.as_dict() if r.mixed else None,
            "mixed_rounds": [m.as_dict() for m in r.mixed_rounds],
        } for r in results],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def tiermail_settings(pairs: list[str]) -> dict[str, str]:
    """--tiermail-setting KEY=VALUE pairs as TIERMAIL_* variables."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BenchError(f"--tiermail-setting {pair!r}: expected KEY=VALUE")
        key = key.strip().upper()
        env[key if key.startswith("TIERMAIL_") else f"TIERMAIL_{key}"] = value
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10,000 messages, 10 s of mixed load")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per operation")
    parser.add_argument("--clients", type=int, default=20, help="mixed-load client processes")
    parser.add_argument("--mixed-rate", type=float, default=0.0, metavar="OPS",
                        help="mixed load paced to OPS operations/s in all (default: flat out)")
    parser.add_argument("--mixed-seconds", type=float, default=30.0,
                        help="length of the mixed load (0 skips it)")
    parser.add_argument("--mixed-rounds", type=int, default=3,
                        help="mixed-load rounds per system (odd), the systems taking turns")
    parser.add_argument("--dovecot-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="one more line for dovecot.conf (repeatable), e.g. "
                             "maildir_very_dirty_syncs=yes")
    parser.add_argument("--tiermail-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a TIERMAIL_* setting for tiermail (repeatable; the prefix may be "
                             "left out), e.g. STORE_INLINE_MAX=0")
    parser.add_argument("--dovecot-only", action="store_true")
    parser.add_argument("--tiermail-only", action="store_true")
    parser.add_argument("--imap-wait", type=float, default=30,
                        help="seconds to wait for the store's IMAP port after it started")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds the text index may take to catch up")
    parser.add_argument("--index-stall", type=float, default=60,
                        help="stop waiting for the text index after this many seconds "
                             "without progress")
    parser.add_argument("--redis-db", type=int, default=13,
                        help="Redis database for the tiermail stack (keys get a unique prefix)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, mail)")
    parser.add_argument("--tiermail-data", metavar="DIR",
                        help="keep tiermail's mailbox in DIR and reuse it in later runs with "
                             "the same --messages/--seed (skips filling it and the text index "
                             "wait: minutes for 100,000 messages)")
    parser.add_argument("--mixed-only", action="store_true",
                        help="skip the single operations; only the mixed load")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.mixed_seconds = 10_000, 10.0
    if args.messages < 1000:
        parser.error("--messages must be at least 1000 (the ENVELOPE fetch takes 1,000)")
    if args.dovecot_only and args.tiermail_only:
        parser.error("--dovecot-only and --tiermail-only exclude each other")
    if args.mixed_rounds < 1 or args.mixed_rounds % 2 == 0:
        parser.error("--mixed-rounds must be odd (the reported round is the median)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.tiermail_only:
        if not Path(DOVECOT).exists():
            print(f"{DOVECOT} missing: install dovecot-imapd", file=sys.stderr)
            return 2
        if os.geteuid() != 0:
            print("the Dovecot reference needs root (its own master, mail owned by nobody); "
                  "use --tiermail-only otherwise", file=sys.stderr)
            return 2
    corpus = Corpus(args.messages, args.seed)
    results: list[SystemResult] = []
    status = 0
    failures = (BenchError, subprocess.TimeoutExpired, multiprocessing.TimeoutError)
    with terminate_on_sigterm(), temp_root("tiermail-imap-bench-", args.keep) as root, \
            contextlib.ExitStack() as running:
        for name, runner in (("dovecot", run_dovecot), ("tiermail", run_tiermail)):
            if (name == "dovecot" and args.tiermail_only) or \
                    (name == "tiermail" and args.dovecot_only):
                continue
            result = SystemResult(name, "")
            results.append(result)
            try:
                runner(root / name, corpus, args, result, running)
            except failures as exc:
                log(f"{name}: benchmark failed: {exc}")
                result.failed = str(exc)[:2000]
                status = 1
        measured = [result for result in results if not result.failed]
        try:
            if args.mixed_seconds > 0 and measured:
                mixed_rounds(measured, corpus.count, args)
            for result in measured:
                if result.finish:
                    result.finish()
        except failures as exc:
            log(f"mixed load failed: {exc}")
            for result in measured:
                result.failed = result.failed or f"mixed load: {exc}"[:2000]
            status = 1
    print(table(results))
    print(f"\nJSON: {write_json(results, corpus, args, argv)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
