"""FETCH through the shared cache (commands._render_fetch): a second ENVELOPE FETCH reads no
message file, and its responses are the same."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

from services.store.backends.snapshots import Snapshot
from services.store.imap import commands
from services.store.imap.cache import FetchCache
from services.store.imap.protocol.command import FetchAtt
from services.store.imap.selected import SelectedMailbox
from services.store.imap.session import Enabled
from services.store.mailbox import MailboxStatus, MessageInfo
from tests.unit.imap.test_fetch import RAW


class FakeStore:
    def __init__(self) -> None:
        self.opened: list[str] = []

    def open_message(self, user: str, guid: str) -> io.BytesIO:
        self.opened.append(guid)
        return io.BytesIO(RAW)


def session(cache: FetchCache) -> Any:
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    return SimpleNamespace(store=FakeStore(), logged_in_user="alice", send=send, sent=sent,
                           enabled=Enabled(), deps=SimpleNamespace(fetch_cache=cache,
                                                                   fetch_memory=None))


def mailbox(count: int) -> SelectedMailbox:
    infos = [MessageInfo(uid=n, guid=f"{n:032x}", size=len(RAW), internaldate=0.0,
                         flags=frozenset(), modseq=n) for n in range(1, count + 1)]
    status = MailboxStatus("INBOX", uidvalidity=1, uidnext=count + 1, highestmodseq=count,
                           messages=count)
    return SelectedMailbox("INBOX", readonly=True, status=status,
                           snapshot=Snapshot.of(1, count, infos), recent_from=count + 1,
                           version=0)


async def fetch(s: Any, selected: SelectedMailbox, *names: str) -> bytes:
    s.sent.clear()
    await commands._render_fetch(s, selected, list(range(selected.count)),
                                 [FetchAtt(name) for name in names], set(), uid=True,
                                 modseq=False)
    return b"".join(s.sent)


async def test_cached_items_need_no_read() -> None:
    cache, selected = FetchCache(), mailbox(3)
    first, second = session(cache), session(cache)  # two sessions share one cache
    cold = await fetch(first, selected, "ENVELOPE", "BODYSTRUCTURE")
    assert len(first.store.opened) == 3
    assert await fetch(second, selected, "ENVELOPE", "FLAGS", "BODYSTRUCTURE") != b""
    assert await fetch(second, selected, "ENVELOPE", "BODYSTRUCTURE") == cold
    assert second.store.opened == []
    assert cache.hits == 12


async def test_other_items_still_read_the_message() -> None:
    cache, selected = FetchCache(), mailbox(2)
    s = session(cache)
    await fetch(s, selected, "ENVELOPE")
    out = await fetch(s, selected, "ENVELOPE", "RFC822.SIZE", "RFC822.HEADER")
    assert len(s.store.opened) == 4
    assert out.count(b"RFC822.HEADER {") == 2
