"""SEARCH evaluation over a small synthetic mailbox (an in-memory MessageSource)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import time
from collections.abc import Iterator, Sequence

import pytest

from services.store.backends.textindex import fold, message_text, text_contains
from services.store.imap import search as search_module
from services.store.imap.protocol.command import SearchKey, SequenceSet
from services.store.imap.search import (
    SCAN_BATCH,
    SCAN_BYTES,
    UnsupportedSearchKey,
    _scan_batches,
    charset_supported,
    search,
)
from services.store.imap.sort import sort
from services.store.mailbox import MessageInfo
from tests.unit.imap.hostile_mime import MemorySource

UTC = datetime.UTC


def epoch(year: int, month: int, day: int, hour: int = 12) -> float:
    return datetime.datetime(year, month, day, hour, tzinfo=UTC).timestamp()


def message(headers: list[tuple[str, str]], body: str | bytes) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
    return head + b"\r\n" + (body.encode() if isinstance(body, str) else body)


RAW = [
    # 0: plain, Seen+Answered, keyword $Work, two Received fields
    message([("Received", "from a.example.org"), ("Received", "from relay.example.net"),
             ("From", "Alice Example <alice@example.org>"), ("To", "bob@example.net"),
             ("Subject", "Quarterly report"), ("Date", "Mon, 1 Jan 2024 23:30:00 -0500"),
             ("X-Priority", "1")],
            "Numbers are up this quarter.\r\n"),
    # 1: encoded-word subject and From name, Cc, flagged
    message([("From", "=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.de>"),
             ("To", "alice@example.org"), ("Cc", "Carol <carol@example.com>"),
             ("Subject", "=?UTF-8?B?" + base64.b64encode("Grüße aus Köln".encode()).decode()
              + "?="),
             ("Date", "Tue, 2 Jan 2024 08:00:00 +0100")],
            "Hallo!\r\n"),
    # 2: base64 body, Bcc, deleted
    message([("From", "carol@example.com"), ("To", "alice@example.org"),
             ("Bcc", "secret@example.org"), ("Subject", "Re: Quarterly report"),
             ("Date", "Wed, 3 Jan 2024 10:00:00 +0000"),
             ("MIME-Version", "1.0"), ("Content-Type", "text/plain; charset=utf-8"),
             ("Content-Transfer-Encoding", "base64")],
            base64.encodebytes("Die Zahlen sind großartig: ÜBERRASCHUNG\n".encode()).decode()),
    # 3: draft, no Date header, big
    message([("From", "dave@example.org"), ("Subject", "draft notes")],
            "x" * 5000 + "\r\nhidden needle at the end\r\n"),
    # 4: html alternative, recent
    message([("From", "newsletter@shop.test"), ("To", "alice@example.org"),
             ("Subject", "Sale!"), ("Date", "Fri, 5 Jan 2024 09:00:00 +0000"),
             ("MIME-Version", "1.0"),
             ("Content-Type", 'multipart/alternative; boundary="b1"')],
            "--b1\r\nContent-Type: text/plain\r\n\r\nBig SALE today\r\n"
            "--b1\r\nContent-Type: text/html\r\n\r\n<p>Big <b>SALE</b> today</p>\r\n--b1--\r\n"),
    # 5: recent and seen
    message([("From", "bob@example.net"), ("To", "alice@example.org"),
             ("Subject", "lunch?"), ("Date", "bad date")],
            "Shall we meet at noon?\r\n"),
]

FLAGS: list[frozenset[str]] = [
    frozenset({"\\Seen", "\\Answered", "$Work"}),
    frozenset({"\\Flagged"}),
    frozenset({"\\Deleted", "\\Seen"}),
    frozenset({"\\Draft"}),
    frozenset(),
    frozenset({"\\Seen"}),
]
INTERNAL = [epoch(2024, 1, 2, 5), epoch(2024, 1, 2, 12), epoch(2024, 1, 3),
            epoch(2024, 1, 4), epoch(2024, 1, 5), epoch(2024, 1, 6)]
UIDS = [3, 7, 8, 20, 21, 30]
MODSEQS = [5, 12, 9, 40, 41, 42]
RECENT = frozenset({21, 30})

INFOS = [MessageInfo(uid=UIDS[i], guid=f"{i:032x}", size=len(RAW[i]),
                     internaldate=INTERNAL[i], flags=FLAGS[i], modseq=MODSEQS[i])
         for i in range(len(RAW))]


class FakeSource:
    """Messages in memory. With `indexed`, text_matches answers like the store's index does
    for those GUIDs (so both code paths are exercised); without, it has no index."""

    def __init__(self, indexed: bool) -> None:
        self.by_guid = {info.guid: raw for info, raw in zip(INFOS, RAW, strict=True)}
        self.indexed = indexed
        self.header_reads = 0
        self.raw_reads = 0

    async def raw(self, info: MessageInfo) -> bytes:
        self.raw_reads += 1
        return self.by_guid[info.guid]

    async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
        self.header_reads += len(infos)
        return [self.by_guid[info.guid].split(b"\r\n\r\n")[0] + b"\r\n\r\n" for info in infos]

    async def scan(self, needle: str, field: str, guids: Sequence[str]) -> set[str]:
        self.raw_reads += len(guids)
        return {g for g in guids if text_contains(message_text(self.by_guid[g]), needle, field)}

    async def text_matches(self, needle: str, field: str,
                           guids: Sequence[str]) -> set[str] | None:
        if not self.indexed or len(needle) < 3:
            return None
        folded = fold(needle)
        return {g for g in guids if text_contains(message_text(self.by_guid[g]), folded, field)}


def key(kind: str, value: object = None, name: str | None = None,
        *children: SearchKey) -> SearchKey:
    return SearchKey(kind, value, name, tuple(children))  # type: ignore[arg-type]


def seqset(*ranges: tuple[int | None, int | None]) -> SequenceSet:
    return SequenceSet(tuple(ranges))


async def run(program: SearchKey, indexed: bool = False) -> list[int]:
    return await search(program, INFOS, FakeSource(indexed), recent=RECENT)


D = datetime.date
CASES: list[tuple[SearchKey, list[int]]] = [
    (key("ALL"), [0, 1, 2, 3, 4, 5]),
    (key("ANSWERED"), [0]),
    (key("UNANSWERED"), [1, 2, 3, 4, 5]),
    (key("DELETED"), [2]),
    (key("UNDELETED"), [0, 1, 3, 4, 5]),
    (key("DRAFT"), [3]),
    (key("UNDRAFT"), [0, 1, 2, 4, 5]),
    (key("FLAGGED"), [1]),
    (key("UNFLAGGED"), [0, 2, 3, 4, 5]),
    (key("SEEN"), [0, 2, 5]),
    (key("UNSEEN"), [1, 3, 4]),
    (key("KEYWORD", "$work"), [0]),  # keywords compare case-insensitively
    (key("UNKEYWORD", "$Work"), [1, 2, 3, 4, 5]),
    (key("RECENT"), [4, 5]),
    (key("NEW"), [4]),
    (key("OLD"), [0, 1, 2, 3]),
    (key("LARGER", len(RAW[3]) - 1), [3]),
    # the two smallest messages
    (key("SMALLER", sorted(map(len, RAW))[2]),
     sorted(sorted(range(6), key=lambda i: len(RAW[i]))[:2])),
    (key("MODSEQ", 40), [3, 4, 5]),
    (key("MODSEQ", 1), [0, 1, 2, 3, 4, 5]),
    # INTERNALDATE dates in UTC, time of day ignored
    (key("ON", D(2024, 1, 2)), [0, 1]),
    (key("BEFORE", D(2024, 1, 3)), [0, 1]),
    (key("SINCE", D(2024, 1, 5)), [4, 5]),
    # Date header in its own zone: message 0 is 1 Jan at -0500 (2 Jan in UTC); no or a bad
    # Date header falls back to INTERNALDATE (3: 4 Jan, 5: 6 Jan)
    (key("SENTON", D(2024, 1, 1)), [0]),
    (key("SENTBEFORE", D(2024, 1, 2)), [0]),
    (key("SENTSINCE", D(2024, 1, 4)), [3, 4, 5]),
    (key("SENTON", D(2024, 1, 6)), [5]),
    # header strings: decoded, case-insensitive substrings
    (key("FROM", "ALICE"), [0]),
    (key("FROM", "jörg müller"), [1]),
    (key("FROM", "example.org"), [0, 3]),
    (key("TO", "alice@"), [1, 2, 4, 5]),
    (key("CC", "carol"), [1]),
    (key("BCC", "secret"), [2]),
    (key("SUBJECT", "quarterly"), [0, 2]),
    (key("SUBJECT", "GRÜSSE"), []),  # no case folding to "ss": one character stays one
    (key("SUBJECT", "grüße aus"), [1]),
    (key("SUBJECT", "e"), [0, 1, 2, 3, 4]),  # short needle
    (key("HEADER", "1", "x-priority"), [0]),
    (key("HEADER", "", "Cc"), [1]),  # empty value: has the field
    (key("HEADER", "", "X-Missing"), []),
    # every field of that name is looked at, not only the first (relays add one each)
    (key("HEADER", "relay", "Received"), [0]),
    # TEXT / BODY
    (key("BODY", "quarter"), [0]),
    (key("TEXT", "quarter"), [0, 2]),  # message 2 only has it in its Subject
    # BODY's answer is not TEXT's: TEXT still finds message 2 after BODY passed it over
    (key("OR", None, None, key("BODY", "quarter"), key("TEXT", "quarter")), [0, 2]),
    (key("BODY", "großartig"), [2]),  # base64 UTF-8 body
    (key("BODY", "überraschung"), [2]),
    (key("BODY", "needle at the end"), [3]),
    (key("BODY", "sale"), [4]),
    (key("BODY", "<b>"), []),  # HTML tags are not text
    (key("TEXT", "Subject: lunch"), [5]),
    (key("BODY", "at"), [3, 5]),  # below the trigram minimum: scanned
    (key("TEXT", ""), [0, 1, 2, 3, 4, 5]),
    # sequence numbers and UIDs, "*" = last
    (key("SEQ", seqset((2, 3))), [1, 2]),
    (key("SEQ", seqset((None, None))), [5]),
    (key("SEQ", seqset((5, None), (1, 1))), [0, 4, 5]),
    (key("SEQ", seqset((100, 200))), []),
    (key("UID", seqset((7, 20))), [1, 2, 3]),
    (key("UID", seqset((None, None))), [5]),
    (key("UID", seqset((999, None))), [5]),  # n:* always includes the last (RFC 3501 6.4.8)
    (key("UID", seqset((4, 6))), []),
    # nesting
    (key("NOT", None, None, key("SEEN")), [1, 3, 4]),
    (key("OR", None, None, key("DRAFT"), key("FLAGGED")), [1, 3]),
    (key("OR", None, None, key("SEEN"), key("OR", None, None, key("DRAFT"), key("NEW"))),
     [0, 2, 3, 4, 5]),
    (key("AND", None, None, key("TO", "alice"), key("NOT", None, None, key("RECENT")),
         key("BODY", "hallo")), [1]),
    (key("AND", None, None, key("SEEN"), key("NOT", None, None,
                                              key("OR", None, None, key("DELETED"),
                                                  key("SUBJECT", "lunch")))), [0]),
    (key("NOT", None, None, key("NOT", None, None, key("UID", seqset((3, 8))))), [0, 1, 2]),
    (key("AND"), [0, 1, 2, 3, 4, 5]),
]


@pytest.mark.parametrize("indexed", [False, True], ids=["scan", "index"])
@pytest.mark.parametrize(("program", "expected"), CASES,
                         ids=[f"{i}-{c[0].kind}" for i, c in enumerate(CASES)])
async def test_search_key(program: SearchKey, expected: list[int], indexed: bool) -> None:
    assert await run(program, indexed) == expected


@pytest.fixture(params=["America/Los_Angeles", "Pacific/Kiritimati"])
def server_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                ) -> Iterator[str]:
    """The server's local time zone set to one far from UTC (-8 and +14) for one test."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()  # the zone of the tests that follow is the one they started with


async def test_internaldate_keys_use_the_utc_date_whatever_the_servers_zone(
        server_zone: str) -> None:
    """BEFORE, ON and SINCE compare the INTERNALDATE's date in UTC, the zone FETCH shows it
    in: a server run in another zone must not move a message to the day before or after.
    (Message 0 arrived on 2 Jan at 05:00 UTC, 1 Jan in Los Angeles; message 1 at 12:00 UTC,
    3 Jan on Kiritimati.)"""
    assert await run(key("ON", D(2024, 1, 2))) == [0, 1]
    assert await run(key("BEFORE", D(2024, 1, 2))) == []
    assert await run(key("SINCE", D(2024, 1, 3))) == [2, 3, 4, 5]
    # no or a bad Date header: SENT* use the INTERNALDATE's date, in UTC too
    assert await run(key("SENTON", D(2024, 1, 4))) == [3]


async def test_cheap_keys_read_no_message() -> None:
    source = FakeSource(indexed=False)
    program = key("AND", None, None, key("UNSEEN"), key("UID", seqset((1, 20))),
                  key("LARGER", 10), key("MODSEQ", 1), key("SINCE", D(2020, 1, 1)))
    assert await search(program, INFOS, source, recent=RECENT) == [1, 3]
    assert (source.header_reads, source.raw_reads) == (0, 0)


async def test_expensive_keys_only_see_survivors_of_cheap_ones() -> None:
    source = FakeSource(indexed=False)
    # Written with the expensive keys first; the cheap one still narrows the set first.
    program = key("AND", None, None, key("BODY", "e"), key("FROM", "example"), key("DRAFT"))
    assert await search(program, INFOS, source, recent=RECENT) == [3]
    assert (source.header_reads, source.raw_reads) == (1, 1)


async def test_or_right_side_only_sees_what_the_left_left() -> None:
    source = FakeSource(indexed=False)
    program = key("OR", None, None, key("UNDRAFT"), key("SUBJECT", "notes"))
    assert await search(program, INFOS, source, recent=RECENT) == list(
        range(6))
    assert source.header_reads == 1


async def test_headers_are_read_once_per_search() -> None:
    source = FakeSource(indexed=False)
    program = key("AND", None, None, key("FROM", "example"), key("SUBJECT", "e"),
                  key("SENTSINCE", D(2000, 1, 1)))
    await search(program, INFOS, source, recent=RECENT)
    assert source.header_reads == len(INFOS)


async def test_a_text_key_repeated_in_one_search_reads_each_message_once() -> None:
    """A needle too short for the index is scanned; the same key again in the same command
    (a client can send thousands in one line) is answered from the first scan."""
    source = FakeSource(indexed=False)
    once = await search(key("TEXT", "e"), INFOS, source, recent=RECENT)
    reads = source.raw_reads
    assert reads == len(INFOS)
    program = key("AND", None, None, *[key("TEXT", "e") for _ in range(50)])
    assert await search(program, INFOS, source, recent=RECENT) == once
    assert source.raw_reads == 2 * reads
    narrowed = key("AND", None, None, key("UID", seqset((3, 8))), key("OR", None, None,
                   key("BODY", "E"), key("BODY", "e")))
    await search(narrowed, INFOS, source, recent=RECENT)
    assert source.raw_reads == 2 * reads + 3  # only UIDs 3, 7 and 8, once


async def test_a_program_of_many_keys_gives_the_loop_turns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys decided from the message list are tested in the loop: a program of many of them
    over a large mailbox held the store's loop, and every other session, for seconds (found
    in review). The loop now gets a turn every YIELD_AFTER_TESTS tests."""
    monkeypatch.setattr(search_module, "YIELD_AFTER_TESTS", 1)
    program = key("AND", None, None, *[key("UNSEEN") for _ in range(20)])
    async with LoopTurns() as turns:
        found = await search(program, INFOS, FakeSource(False), recent=RECENT)
    assert found == await search(key("UNSEEN"), INFOS, FakeSource(False), recent=RECENT)
    assert turns.count >= 20


class LoopTurns:
    """`async with LoopTurns() as turns:`: how many turns another task had meanwhile."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _count(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.create_task(self._count())
        await asyncio.sleep(0)
        self.count = 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_a_set_repeated_in_one_program_is_resolved_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    resolved = 0
    select = search_module.select_uid_positions

    def counting(*args: object) -> list[int]:
        nonlocal resolved
        resolved += 1
        return select(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(search_module, "select_uid_positions", counting)
    program = key("AND", None, None, *[key("UID", seqset((2, 6))) for _ in range(30)])
    assert await search(program, INFOS, FakeSource(False), recent=RECENT) == \
        await search(key("UID", seqset((2, 6))), INFOS, FakeSource(False), recent=RECENT)
    assert resolved == 2


def test_scans_go_in_batches_of_a_few_messages_or_octets() -> None:
    infos = [MessageInfo(uid=n + 1, guid=f"{n:032x}", size=size, internaldate=0.0,
                         flags=frozenset(), modseq=1)
             for n, size in enumerate([10] * 20 + [SCAN_BYTES, 10, SCAN_BYTES // 2] * 2)]
    batches = list(_scan_batches(infos, list(range(len(infos)))))
    assert [len(batch) for batch in batches] == [SCAN_BATCH, 5, 3, 2]
    assert [p for batch in batches for p in batch] == list(range(len(infos)))


async def test_empty_mailbox() -> None:
    assert await search(key("UID", seqset((None, None))), [], FakeSource(False),
                        recent=frozenset()) == []


async def test_unknown_key_is_an_error() -> None:
    with pytest.raises(UnsupportedSearchKey):
        await run(key("FUZZY", "x"))


@pytest.mark.parametrize(("charset", "ok"), [(None, True), ("UTF-8", True), ("utf-8", True),
                                             ("US-ASCII", True), ("ISO-8859-1", False),
                                             ("KOI8-R", False)])
def test_charsets(charset: str | None, ok: bool) -> None:
    assert charset_supported(charset) is ok


async def test_large_header_sections_are_parsed_while_other_tasks_go_on() -> None:
    # Parsing takes about 0.4 s per MB of header fields, and it ran in the event loop: 256
    # messages with 1 MB of fields each (all a sender needs) stalled every session for 90 s.
    # (Subject first: fields past mime.MAX_HEADER_FIELDS, 10,000, are not parsed.)
    fields = b"X-A: b\r\n" * 20_000
    source = MemorySource([b"Subject: b\r\n" + fields + b"\r\n",
                           b"Subject: a\r\n" + fields + b"\r\n"])
    async with LoopTurns() as turns:
        ordered = await sort(["SUBJECT"], [0, 1], source.infos, source)
    assert ordered == [1, 0]
    assert turns.count > 0
