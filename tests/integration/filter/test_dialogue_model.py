"""Random SMTP dialogues against a model of the transaction state (RFC 5321 4.1.4, 3.3):
several transactions per connection, RSET, NOOP, HELO/EHLO in the middle, commands out of
order, unknown and malformed commands, refused recipients, and pipelined groups of commands
(RFC 2920: DATA last in a group). Every reply code must be the one the state calls for, and
what was accepted must be in the queue exactly once, with exactly the accepted recipients.
"""

from __future__ import annotations

import random

import pytest

from services.filter.main import FilterWorker
from tests.integration.filter.conftest import (
    ALICE,
    BOB,
    SENDER,
    TEAM,
    RawClient,
    drain_queue,
    in_thread,
    message,
)

KNOWN = [ALICE, BOB, TEAM]
UNKNOWN = "nobody@example.test"
REMOTE = "someone@remote.test"


class HungUp(Exception):
    """The server closed the connection after too many errors, as it should."""


class Dialogue:
    """One connection: what the server must answer, given what was said so far."""

    def __init__(self, client: RawClient, name: str, rng: random.Random,
                 max_errors: int) -> None:
        self.client = client
        self.max_errors = max_errors
        self.errors = 0
        self.name = name
        self.rng = rng
        self.greeted = False
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.accepted: dict[str, tuple[str, list[str]]] = {}  # subject -> (sender, rcpts)
        self.subject = ""
        self.log: list[str] = []

    def next_command(self) -> tuple[bytes, str]:
        """A random command and the reply code the model expects for it."""
        kind = self.rng.choices(
            ["EHLO", "HELO", "MAIL", "RCPT", "RSET", "NOOP", "BAD", "SYNTAX"],
            [1, 1, 5, 8, 1, 1, 1, 1])[0]
        if kind in ("EHLO", "HELO"):
            self.greeted, self.sender, self.recipients = True, None, []
            return f"{kind} client.remote.test".encode(), "250"
        if kind == "MAIL":
            sender = self.rng.choice([SENDER, ""])
            expected = "250" if self.greeted and self.sender is None else "503"
            if expected == "250":
                self.sender = sender
            return f"MAIL FROM:<{sender}>".encode(), expected
        if kind == "RCPT":
            rcpt = self.rng.choice([*KNOWN, UNKNOWN, REMOTE])
            if self.sender is None:
                return f"RCPT TO:<{rcpt}>".encode(), "503"
            expected = {UNKNOWN: "550", REMOTE: "554"}.get(rcpt, "250")
            if expected == "250":
                self.recipients.append(rcpt)
            return f"RCPT TO:<{rcpt}>".encode(), expected
        if kind == "RSET":
            self.sender, self.recipients = None, []
            return b"RSET", "250"
        if kind == "NOOP":
            return b"NOOP", "250"
        if kind == "BAD":
            return b"XYZZY", "500"
        return b"MAIL TO:<" + SENDER.encode() + b">", "501" if self.greeted else "503"

    def data(self) -> tuple[bytes, str]:
        """DATA: 354 when the transaction has a sender and a recipient (it then ends, with
        the message under `self.subject`), else 503."""
        if self.sender is None or not self.recipients:
            return b"DATA", "503"
        self.subject = f"{self.name}-{len(self.accepted)}"
        self.accepted[self.subject] = (self.sender, self.recipients)
        self.sender, self.recipients = None, []
        return b"DATA", "354"

    def run(self, steps: int) -> None:
        try:
            self._run(steps)
        except HungUp:
            pass

    def _run(self, steps: int) -> None:
        for _ in range(steps):
            group = [self.next_command() for _ in range(self.rng.choice([1, 1, 1, 2, 4]))]
            if self.rng.random() < 0.35:
                group.append(self.data())  # RFC 2920 3.1: DATA ends a pipelined group
            self.exchange(group)
            if group[-1][1] == "354":
                self.exchange([(message(self.subject) + b".", "250")])
                self.errors = 0  # a queued message forgives the errors before it
        self.exchange([(b"QUIT", "221")])

    def exchange(self, group: list[tuple[bytes, str]]) -> None:
        """Send the group in one write (pipelined) and check every reply in order. The
        client's max_errors-th error reply is followed by a 421 and the end of the
        connection; the rest of the group goes unanswered."""
        self.client.sock.sendall(b"".join(line + b"\r\n" for line, _ in group))
        for line, expected in group:
            reply = self.client.reply()
            self.log.append(f"{line[:40]!r} -> {reply[:60]}")
            assert reply[:3] == expected, (self.name, line[:60], reply, self.log[-8:])
            if expected[0] in "45":
                self.errors += 1
                if self.errors == self.max_errors:
                    assert self.client.reply().startswith("421 4.7.0"), self.log[-3:]
                    assert self.client.closed()
                    raise HungUp


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_dialogues_agree_with_the_model(worker: FilterWorker, seed: int) -> None:
    rng = random.Random(seed)

    def converse() -> dict[str, tuple[str, list[str]]]:
        accepted: dict[str, tuple[str, list[str]]] = {}
        for n in range(6):
            client = RawClient(worker.ports[0])
            assert client.reply().startswith("220")
            dialogue = Dialogue(client, f"s{seed}c{n}", rng, worker.settings.smtp_max_errors)
            try:
                dialogue.run(8)
            finally:
                client.close()
            accepted.update(dialogue.accepted)
        return accepted

    accepted = await in_thread(converse)
    queued = await drain_queue(worker.settings)
    by_subject: dict[str, list[tuple[str, list[str]]]] = {}
    for item in queued:
        subject = item.body.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        envelope = item.envelope
        by_subject.setdefault(subject, []).append(
            (envelope.mail_from, [r.address for r in envelope.recipients]))
    assert by_subject == {subject: [sent] for subject, sent in accepted.items()}
