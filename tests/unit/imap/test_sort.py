"""SORT (RFC 5256, RFC 5957 DISPLAYFROM/DISPLAYTO) and base subject extraction."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from services.store.backends.textindex import message_text, text_contains
from services.store.imap.sort import BadSortCriteria, base_subject, parse_criteria, sort
from services.store.mailbox import MessageInfo


@pytest.mark.parametrize(("subject", "base", "reply"), [
    ("Hello", "Hello", False),
    ("Re: Hello", "Hello", True),
    ("RE:   re: Fwd: Hello", "Hello", True),
    ("Fw: Hello (fwd)", "Hello", True),
    ("Hello (fwd) (FWD)  ", "Hello", True),
    ("[list] Re: Hello", "Hello", True),
    ("Re[2]: Hello", "Hello", True),
    ("Re: [list] Hello", "Hello", True),
    ("[list] Hello", "Hello", False),
    ("[only a blob]", "[only a blob]", False),  # removing it would leave nothing
    ("[Fwd: Re: Hello]", "Hello", True),
    ("  Hello\t  world ", "Hello world", False),
    ("Reply: Hello", "Reply: Hello", False),
    ("", "", False),
    ("Re:", "", True),
    ("[a] [b] Re: x", "x", True),
    ("[a][b] x", "x", False),
    ("[a] [b]", "[b]", False),
    ("[fwd: [a] Re: x] (fwd)", "x", True),
    ("[a] [b] [Fwd: y]", "y", True),
    ("[Fwd: hello", "[Fwd: hello", False),  # a wrapper only with its closing "]"
])
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    assert base_subject(subject) == (base, reply)


@pytest.mark.parametrize("hostile", [
    "[a] " * 250_000 + "x",  # blobs that no Re: follows: each was scanned again per removal
    "(fwd) " * 200_000 + "x",  # a trailer searched for from every position
    "[fwd:" * 200_000 + "x" + "]" * 200_000,  # wrappers: the subject was cut anew per layer
])
def test_base_subject_stays_linear_on_hostile_subjects(hostile: str) -> None:
    # Whoever sends the mail writes its subject (a header may fold to a megabyte);
    # SORT and THREAD compute it on the event loop.
    assert base_subject(hostile)  # returns at all (a quadratic loop would not, here)


def msg(subject: str, sender: str, to: str, cc: str, date: str | None) -> bytes:
    lines = [f"Subject: {subject}", f"From: {sender}", f"To: {to}", f"Cc: {cc}"]
    if date is not None:
        lines.append(f"Date: {date}")
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


RAW = [
    msg("Re: beta", "Zed <amy@z.test>", "carl@x.test", "dan@x.test",
        "Mon, 01 Jan 2024 10:00:00 +0000"),
    msg("alpha", "=?UTF-8?Q?Bj=C3=B6rn?= <zoe@z.test>", "Bea <bea@x.test>", "",
        "Mon, 01 Jan 2024 09:00:00 -0200"),  # 11:00 UTC: after message 0
    msg("[list] Beta", "\"Last, First\" <mike@z.test>", "abe@x.test", "cat@x.test",
        None),  # no Date: INTERNALDATE (the earliest)
    msg("gamma", "MIKE@z.test", "", "", "Mon, 01 Jan 2024 10:00:00 +0000"),  # ties with 0
]
INFOS = [MessageInfo(uid=i + 1, guid=f"{i:032x}", size=size, internaldate=t, flags=frozenset(),
                     modseq=1)
         for i, (size, t) in enumerate([(300, 1704067200.0 + 50), (100, 1704067200.0 + 10),
                                        (200, 1704000000.0), (100, 1704067200.0 + 30)])]


class Source:
    async def raw(self, info: MessageInfo) -> bytes:
        return RAW[info.uid - 1]

    async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
        return [RAW[info.uid - 1] for info in infos]

    async def text_matches(self, needle: str, field: str,
                           guids: Sequence[str]) -> set[str] | None:
        return None

    async def scan(self, needle: str, field: str, guids: Sequence[str]) -> set[str]:
        return {g for g in guids if text_contains(message_text(RAW[int(g, 16)]), needle, field)}


@pytest.mark.parametrize(("criteria", "expected"), [
    (["ARRIVAL"], [2, 1, 3, 0]),
    (["REVERSE", "ARRIVAL"], [0, 3, 1, 2]),
    (["SIZE"], [1, 3, 2, 0]),  # 1 and 3 tie: mailbox order
    (["REVERSE", "SIZE"], [0, 2, 1, 3]),  # reversing keeps ties in mailbox order
    (["DATE"], [2, 0, 3, 1]),
    (["SUBJECT"], [1, 0, 2, 3]),  # alpha, beta, beta, gamma
    (["SUBJECT", "REVERSE", "DATE"], [1, 0, 2, 3]),
    (["FROM"], [0, 2, 3, 1]),  # amy, mike, MIKE (case-insensitive tie), zoe
    (["TO"], [3, 2, 1, 0]),  # "" first, then abe, bea, carl
    (["CC"], [1, 3, 2, 0]),
    (["DISPLAYFROM"], [1, 2, 3, 0]),  # Björn, "Last, First", mike@z.test, Zed
    (["DISPLAYTO"], [3, 2, 1, 0]),  # "", abe@x.test, Bea, carl@x.test
    (["SIZE", "REVERSE", "ARRIVAL"], [3, 1, 2, 0]),
])
async def test_sort(criteria: list[str], expected: list[int]) -> None:
    assert await sort(criteria, [0, 1, 2, 3], INFOS, Source()) == expected


async def test_sort_only_the_given_positions() -> None:
    assert await sort(["REVERSE", "SIZE"], [3, 1, 0], INFOS, Source()) == [0, 1, 3]


@pytest.mark.parametrize("criteria", [[], ["REVERSE"], ["SIZE", "REVERSE"], ["COLOUR"],
                                      ["REVERSE", "REVERSE", "DATE"]])
def test_bad_criteria(criteria: list[str]) -> None:
    with pytest.raises(BadSortCriteria):
        parse_criteria(criteria)


async def test_a_date_that_names_no_real_instant_sorts_by_internaldate() -> None:
    """RFC 5256 2.2: a Date that cannot be parsed counts as the INTERNALDATE. 31 Feb 25:61
    is read by a lenient parser as 2 March; it must not be."""
    raw = [msg("a", "a@z.test", "", "", "Mon, 01 Jan 2024 10:00:00 +0000"),
           msg("b", "b@z.test", "", "", "31 Feb 24 25:61 XYZ")]
    infos = [MessageInfo(uid=i + 1, guid=f"{i:032x}", size=10, internaldate=t,
                         flags=frozenset(), modseq=1)
             for i, t in enumerate([1704103200.0, 1700000000.0])]  # b arrived in 2023

    class Two(Source):
        async def raw(self, info: MessageInfo) -> bytes:
            return raw[info.uid - 1]

        async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
            return [raw[info.uid - 1] for info in infos]

    assert await sort(["DATE"], [0, 1], infos, Two()) == [1, 0]


async def test_a_criterion_met_again_decides_nothing_more() -> None:
    """A key repeated (reversed or not) only compares what its first use found equal: a
    client's thousands of repeats were a full sort each (found in review)."""
    infos = [MessageInfo(uid=n + 1, guid=f"{n:032x}", size=size, internaldate=float(day),
                         flags=frozenset(), modseq=1)
             for n, (size, day) in enumerate([(30, 2), (10, 1), (30, 1), (20, 3)])]
    positions = list(range(len(infos)))
    once = await sort(["SIZE", "REVERSE", "ARRIVAL"], positions, infos, Source())
    assert once == [1, 3, 0, 2]
    repeated = ["SIZE", "REVERSE", "ARRIVAL"] + ["REVERSE", "SIZE", "ARRIVAL"] * 500
    assert await sort(repeated, positions, infos, Source()) == once


class Listed(Source):
    """The messages of one test: `raws[n]` has UID n + 1."""

    def __init__(self, raws: list[bytes]) -> None:
        self.raws = raws

    async def raw(self, info: MessageInfo) -> bytes:
        return self.raws[info.uid - 1]

    async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
        return [self.raws[info.uid - 1] for info in infos]


def arrived(*times: float) -> list[MessageInfo]:
    return [MessageInfo(uid=i + 1, guid=f"{i:032x}", size=10, internaldate=t,
                        flags=frozenset(), modseq=1) for i, t in enumerate(times)]


@pytest.mark.parametrize("date", [None, "31 Feb 24 25:61 XYZ"], ids=["no-date", "bad-date"])
async def test_a_message_without_a_usable_date_sorts_by_when_it_arrived(
        date: str | None) -> None:
    """RFC 5256 2.2: without a Date it can read, a message's sent date is its INTERNALDATE,
    not the oldest possible date: mail that arrived in 2025 sorts after a 2024 one."""
    raws = [msg("a", "a@z.test", "", "", "Mon, 01 Jan 2024 10:00:00 +0000"),
            msg("b", "b@z.test", "", "", date)]
    infos = arrived(1704103200.0, 1735700000.0)  # b arrived in January 2025
    assert await sort(["DATE"], [0, 1], infos, Listed(raws)) == [0, 1]


async def test_a_group_sorts_by_its_first_mailbox_not_its_name() -> None:
    """RFC 5256 addr-mailbox is the first mailbox: "alpha: zed@x.test, amy@y.test;" sorts
    as zed, after bob (the group's name "alpha" is no mailbox)."""
    raws = [msg("a", "a@z.test", "alpha: zed@x.test, amy@y.test;", "", None),
            msg("b", "b@z.test", "bob@x.test", "", None)]
    assert await sort(["TO"], [0, 1], arrived(1.0, 2.0), Listed(raws)) == [1, 0]
