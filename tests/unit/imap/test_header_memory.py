"""What one SEARCH, SORT or THREAD holds does not grow with the header sections it reads.

Parsed, a header section of small fields takes about 27 times its size in Python objects,
and whoever sends mail writes up to MAX_HEADER (1 MiB) of fields into each message. A
command kept every parsed section it had read until it ended: a thousand such messages made
one SORT take tens of GB of the store that every user shares. Now each section is parsed,
answers what the command asks of it (search bits, sort keys, threading facts) and is
dropped, and the sections read at once are bounded by HEADER_BATCH_BYTES.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from services.store.imap import search as search_module
from services.store.imap.protocol.command import SearchKey
from services.store.imap.search import Headers, search
from services.store.imap.sort import SORT_STRING_MAX, header_sort_key, sort
from services.store.imap.thread import ID_KEY_MAX, thread
from tests.unit.imap.hostile_mime import MemorySource, info_for

FIELDS = b"X-A: b\r\n" * 8_000  # 64 000 octets of small fields
MESSAGES = 24
BATCH = 256 * 1024
# Python objects per octet of a parsed header section of small fields is about 27; a bound
# of 40 leaves room, and still lies far below what MESSAGES parsed sections take.
PARSED_PER_OCTET = 40


def hostile(n: int) -> bytes:
    head = (f"Subject: =?UTF-8?Q?caf=C3=A9_{n % 3}?=\r\n"
            f"From: Sender {n} <s{n % 7}@example.test>\r\n"
            f"Date: {1 + n % 28:02d} Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <m{n}@example.test>\r\n"
            + (f"References: <m{n - 1}@example.test>\r\n" if n % 2 else ""))
    return head.encode() + FIELDS + b"\r\nbody\r\n"


async def peak_of(run: Callable[[], Awaitable[object]]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        await run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def source(monkeypatch: pytest.MonkeyPatch) -> MemorySource:
    monkeypatch.setattr(search_module, "HEADER_BATCH_BYTES", BATCH)
    return MemorySource([hostile(n) for n in range(MESSAGES)])


def bound() -> int:
    """What one batch may take: its header sections (read, and the copies made reading
    them) and one parsed section at a time; nothing of MESSAGES in it."""
    section = len(FIELDS) + 200
    return 4 * (BATCH + section) + PARSED_PER_OCTET * section


async def test_search_on_header_fields_holds_one_batch(source: MemorySource) -> None:
    program = SearchKey("AND", children=(SearchKey("FROM", "s3"),
                                         SearchKey("SUBJECT", "é 1")))
    positions = list(range(MESSAGES))
    found: list[int] = []

    async def run() -> None:
        found.extend(await search(program, source.infos, source, recent=()))

    assert await peak_of(run) < bound()
    assert found == [p for p in positions if p % 7 == 3 and p % 3 == 1]
    assert bound() * 8 < MESSAGES * len(FIELDS) * 27  # what keeping them all took


async def test_sort_holds_one_batch_and_the_keys(source: MemorySource) -> None:
    ordered: list[int] = []

    async def run() -> None:
        ordered.extend(await sort(["SUBJECT", "REVERSE", "DATE", "FROM"],
                                  list(range(MESSAGES)), source.infos, source))

    assert await peak_of(run) < bound()
    assert ordered == sorted(range(MESSAGES), key=lambda n: (n % 3, -(n % 28)))


async def test_thread_holds_one_batch_and_the_facts(source: MemorySource) -> None:
    threads: list[object] = []

    async def run() -> None:
        threads.extend(await thread("REFERENCES", list(range(MESSAGES)), source.infos,
                                    source))

    assert await peak_of(run) < bound()
    assert len(threads) == 3  # one per base subject: each reply pairs with its parent


def test_sort_keys_from_a_huge_subject_are_cut() -> None:
    raw = b"Subject: " + b"word " * 200_000 + b"\r\n\r\n"
    key = header_sort_key("SUBJECT", Headers(raw), info_for(raw))
    assert isinstance(key, bytes) and len(key) == SORT_STRING_MAX


async def test_thread_facts_of_huge_ids_and_subjects_stay_small() -> None:
    long_id = "<" + "i" * 300_000 + "@x>"
    other_id = "<" + "i" * 300_000 + "@y>"
    raws = [f"Subject: {'s' * 300_000}\r\nMessage-ID: {long_id}\r\n\r\n".encode(),
            f"Subject: t\r\nMessage-ID: {other_id}\r\nReferences: {long_id}\r\n\r\n".encode(),
            f"Subject: u\r\nReferences: {other_id}\r\n\r\n".encode()]
    memory = MemorySource(raws)
    nodes = await thread("REFERENCES", [0, 1, 2], memory.infos, memory)
    # Ids equal in their first ID_KEY_MAX characters still tell apart: 0 -> 1 -> 2.
    assert len(nodes) == 1 and nodes[0].position == 0
    assert nodes[0].children[0].position == 1
    assert nodes[0].children[0].children[0].position == 2
    assert ID_KEY_MAX < 300_000
