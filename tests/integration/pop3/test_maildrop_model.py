"""Random POP3 sessions against a model of the maildrop (RFC 1939): STAT, LIST, UIDL, RETR,
DELE and RSET with valid, deleted and out-of-range numbers, sessions ended by QUIT (deletions
committed) or by dropping the connection (nothing committed), new mail and IMAP-side
expunges between sessions, and an expunge by another client during a session (its RETR is
refused; its DELE is harmless). Every answer and the store afterwards must agree with the
model; UIDLs never change.
"""

from __future__ import annotations

import asyncio
import poplib
import random
from collections.abc import Callable

import pytest

from services.store.mailbox import INBOX
from tests.integration.pop3.conftest import ALICE, USERS, Pop3Stack


def refused(command: Callable[[int], object], number: int) -> None:
    """The server answers -ERR (poplib raises it)."""
    with pytest.raises(poplib.error_proto):
        command(number)


def body(n: int) -> bytes:
    return (f"From: carol@example.org\r\nSubject: message {n}\r\n\r\n" + "line\r\n" * (n % 7)
            + (".dot line\r\n" if n % 3 == 0 else "")).encode()


class Maildrop:
    """The model: the maildrop's messages in order, as (UIDL, bytes)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def without(self, gone: set[str]) -> None:
        self.messages = [m for m in self.messages if m[0] not in gone]


class Session:
    def __init__(self, pop3: Pop3Stack, maildrop: Maildrop, rng: random.Random,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.pop3, self.rng, self.loop = pop3, rng, loop
        self.maildrop = maildrop
        self.listing = list(maildrop.messages)  # what this session sees (RFC 1939 section 8)
        self.deleted: set[int] = set()  # message numbers
        self.gone: set[str] = set()  # expunged by another client meanwhile
        self.client = poplib.POP3("127.0.0.1", pop3.port, timeout=30)
        self.client.user(ALICE)
        self.client.pass_(USERS[ALICE])

    def number(self) -> int:
        return self.rng.randint(0, len(self.listing) + 1)  # 0 and past the end: refused

    def valid(self, n: int) -> bool:
        return 1 <= n <= len(self.listing) and n not in self.deleted

    def step(self) -> None:
        action = self.rng.choice(["stat", "list", "uidl", "retr", "dele", "dele", "rset",
                                  "expunge_elsewhere"])
        getattr(self, action)()

    def stat(self) -> None:
        present = [m for i, m in enumerate(self.listing, 1) if i not in self.deleted]
        assert self.client.stat() == (len(present), sum(len(m[1]) for m in present))

    def list(self) -> None:
        n = self.number()
        if self.rng.random() < 0.5:
            _, lines, _ = self.client.list()
            assert lines == [f"{i} {len(m[1])}".encode() for i, m in enumerate(self.listing, 1)
                             if i not in self.deleted]
        elif self.valid(n):
            assert self.client.list(n) == f"+OK {n} {len(self.listing[n - 1][1])}".encode()
        else:
            refused(self.client.list, n)

    def uidl(self) -> None:
        n = self.number()
        if self.valid(n):
            assert self.client.uidl(n) == f"+OK {n} {self.listing[n - 1][0]}".encode()
        else:
            refused(self.client.uidl, n)

    def retr(self) -> None:
        n = self.number()
        if self.valid(n) and self.listing[n - 1][0] not in self.gone:
            _, lines, _ = self.client.retr(n)
            assert b"".join(line + b"\r\n" for line in lines) == self.listing[n - 1][1]
        else:
            refused(self.client.retr, n)

    def dele(self) -> None:
        n = self.number()
        if self.valid(n):
            assert self.client.dele(n).startswith(b"+OK")
            self.deleted.add(n)
        else:
            refused(self.client.dele, n)

    def rset(self) -> None:
        assert self.client.rset().startswith(b"+OK")
        self.deleted.clear()

    def expunge_elsewhere(self) -> None:
        """An IMAP client expunges a message while this session has the maildrop."""
        if not self.maildrop.messages:
            return
        uidl, _ = self.rng.choice(self.maildrop.messages)
        store = self.pop3.store

        async def expunge() -> None:
            uids = {m.guid: m.uid for m in await store.list_messages(ALICE, INBOX)}
            await store.expunge(ALICE, INBOX, [uids[uidl]])

        asyncio.run_coroutine_threadsafe(expunge(), self.loop).result(10)
        self.maildrop.without({uidl})
        self.gone.add(uidl)

    def end(self) -> None:
        if self.rng.random() < 0.7:
            assert self.client.quit().startswith(b"+OK")
            self.maildrop.without({self.listing[n - 1][0] for n in self.deleted})
        else:
            self.client.close()  # no QUIT: RFC 1939 6, nothing is deleted


@pytest.mark.parametrize("seed", [1, 2])
async def test_sessions_agree_with_the_model(pop3: Pop3Stack, seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    maildrop = Maildrop()
    delivered = 0
    for _ in range(8):
        for _ in range(rng.randint(0, 4)):
            raw = body(delivered)
            await pop3.deliver(ALICE, raw)
            delivered += 1
            newest = max(await pop3.store.list_messages(ALICE, INBOX), key=lambda m: m.uid)
            maildrop.messages.append((newest.guid, raw))
        await pop3.wait_unlocked(ALICE)

        def session() -> None:
            current = Session(pop3, maildrop, rng, loop)
            for _ in range(rng.randint(5, 25)):
                current.step()
            current.end()

        await asyncio.to_thread(session)
        await pop3.wait_unlocked(ALICE)
        stored = [info.guid for info in await pop3.store.list_messages(ALICE, INBOX)]
        assert stored == [uidl for uidl, _ in maildrop.messages]
