"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256) and the THREAD response."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from services.store.backends.textindex import message_text, text_contains
from services.store.imap.thread import BadThreadAlgorithm, ThreadNode, format_thread, thread
from services.store.mailbox import MessageInfo


def msg(subject: str, day: int, message_id: str | None = None, references: str = "",
        in_reply_to: str = "") -> bytes:
    lines = [f"Subject: {subject}", f"Date: {day:02d} Jan 2024 10:00:00 +0000"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    if references:
        lines.append(f"References: {references}")
    if in_reply_to:
        lines.append(f"In-Reply-To: {in_reply_to}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Source:
    def __init__(self, raws: list[bytes]) -> None:
        self.raws = raws
        self.infos = [MessageInfo(uid=10 + i, guid=f"{i:032x}", size=len(r),
                                  internaldate=0.0, flags=frozenset(), modseq=1)
                      for i, r in enumerate(raws)]

    async def raw(self, info: MessageInfo) -> bytes:
        return self.raws[info.uid - 10]

    async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
        return [self.raws[info.uid - 10] for info in infos]

    async def text_matches(self, needle: str, field: str,
                           guids: Sequence[str]) -> set[str] | None:
        return None

    async def scan(self, needle: str, field: str, guids: Sequence[str]) -> set[str]:
        return {g for g in guids
                if text_contains(message_text(self.raws[int(g, 16)]), needle, field)}


async def threads(algorithm: str, raws: list[bytes], uid: bool = False) -> bytes:
    source = Source(raws)
    positions = list(range(len(raws)))
    forest = await thread(algorithm, positions, source.infos, source)
    number = (lambda p: source.infos[p].uid) if uid else (lambda p: p + 1)
    return format_thread(forest, number)


CONVERSATION = [
    msg("Party", 1, "<a@x>"),                                   # 1
    msg("Re: Party", 3, "<b@x>", "<a@x>"),                      # 2 reply to 1
    msg("Lunch", 2, "<c@x>"),                                   # 3
    msg("Re: Party", 4, "<d@x>", "<a@x> <b@x>"),                # 4 reply to 2
    msg("Re: Party", 5, "<e@x>", "<a@x>"),                      # 5 reply to 1
    msg("Re: Lunch", 6, "<f@x>", in_reply_to="<c@x> <zzz@x>"),  # 6 reply to 3
    msg("Unrelated", 7),                                        # 7 no Message-ID
]


async def test_references() -> None:
    assert await threads("REFERENCES", CONVERSATION) == b"* THREAD (1 (2 4)(5))(3 6)(7)"


async def test_references_with_uids() -> None:
    assert await threads("references", CONVERSATION, uid=True) == (
        b"* THREAD (10 (11 13)(14))(12 15)(16)")


async def test_orderedsubject() -> None:
    # Threads are ordered by their first message: Party (day 1), Lunch (day 2), Unrelated.
    assert await threads("ORDEREDSUBJECT", CONVERSATION) == (
        b"* THREAD (1 (2)(4)(5))(3 6)(7)")


# Replies written in a different order from the one they arrived in: 3 was sent (day 3)
# before 2 (day 5).
LATE_REPLY = [
    msg("Party", 1, "<a@x>"),
    msg("Re: Party", 5, "<b@x>", "<a@x>"),
    msg("Re: Party", 3, "<c@x>", "<a@x>"),
]


@pytest.mark.parametrize("algorithm", ["ORDEREDSUBJECT", "REFERENCES"])
async def test_replies_are_ordered_by_sent_date_not_by_arrival(algorithm: str) -> None:
    """RFC 5256: siblings are sorted by sent date, so the reply sent first comes first even
    when it reached the mailbox last."""
    assert await threads(algorithm, LATE_REPLY) == b"* THREAD (1 (3)(2))"


async def test_references_a_later_message_does_not_move_an_earlier_link() -> None:
    """RFC 5256 5 step 1.B: ids already linked keep their parent. 3 says the missing <x@x>
    is under 1; 4 says it is under 2: it stays under 1, and 4 joins it there."""
    raws = [
        msg("Apples", 1, "<a@x>"),
        msg("Pears", 2, "<b@x>"),
        msg("Re: Apples", 3, references="<a@x> <x@x> <d@x>"),
        msg("Re: Pears", 4, references="<b@x> <x@x> <f@x>"),
    ]
    assert await threads("REFERENCES", raws) == b"* THREAD (1 (3)(4))(2)"


async def test_references_a_dummy_takes_the_subject_of_its_earliest_reply() -> None:
    """RFC 5256 5 steps 4 and 5.B: a thread under a missing message has the subject of its
    earliest message, so a message with that subject joins it. Here 2 was sent first (day 2)
    though 1 was linked first, and 3 shares 2's subject."""
    raws = [
        msg("Re: Budget", 3, "<b@x>", "<gone@x>"),
        msg("Re: Offsite", 2, "<c@x>", "<gone@x>"),
        msg("Offsite", 4, "<d@x>"),
    ]
    assert await threads("REFERENCES", raws) == b"* THREAD ((2)(1)(3))"


async def test_references_missing_parent_is_a_dummy_holding_siblings() -> None:
    raws = [
        msg("Re: Topic", 2, "<b@x>", "<gone@x>"),
        msg("Re: Topic", 3, "<c@x>", "<gone@x>"),
    ]
    # The referenced message is not in the mailbox: a dummy at the top keeps both.
    assert await threads("REFERENCES", raws) == b"* THREAD ((1)(2))"


async def test_references_dummy_with_one_child_is_replaced_by_it() -> None:
    raws = [msg("Re: Topic", 2, "<b@x>", "<gone@x> <b0@x>"), msg("Other", 1, "<o@x>")]
    assert await threads("REFERENCES", raws) == b"* THREAD (2)(1)"


async def test_references_same_subject_without_references_is_grouped() -> None:
    raws = [msg("Plans", 1, "<a@x>"), msg("Re: Plans", 2, "<b@x>"), msg("Plans", 3, "<c@x>")]
    # 2 is a reply by subject only: it goes under the non-reply that holds the subject (1);
    # 3 is not a reply either, so 1 and 3 end up side by side under a dummy.
    assert await threads("REFERENCES", raws) == b"* THREAD ((1 2)(3))"


async def test_references_loops_and_duplicate_ids_do_not_break() -> None:
    raws = [
        msg("A", 1, "<a@x>", "<b@x>"),
        msg("B", 2, "<b@x>", "<a@x>"),  # would make a loop
        msg("A copy", 3, "<a@x>"),      # duplicate Message-ID
    ]
    result = await threads("REFERENCES", raws)
    assert sorted(int(n) for n in result.replace(b"(", b" ").replace(b")", b" ").split()[2:]
                  ) == [1, 2, 3]


async def test_empty() -> None:
    assert await threads("REFERENCES", []) == b"* THREAD"


async def test_unknown_algorithm() -> None:
    with pytest.raises(BadThreadAlgorithm):
        await threads("X-FANCY", CONVERSATION)


def test_format_rfc_example() -> None:
    # RFC 5256 section 4: (3 6 (4 23)(44 7 96))
    tree = ThreadNode(3, [ThreadNode(6, [ThreadNode(4, [ThreadNode(23)]),
                                         ThreadNode(44, [ThreadNode(7, [ThreadNode(96)])])])])
    assert format_thread([ThreadNode(2), tree], lambda n: n) == (
        b"* THREAD (2)(3 6 (4 23)(44 7 96))")


# Whoever sends the mail writes its References; a few thousand ids fit in one header.


async def test_one_message_with_a_very_long_references_chain() -> None:
    chain = " ".join(f"<r{n}@x>" for n in range(60_000))
    raws = [msg("hello", 2, "<self@x>", references=chain), msg("first", 1, "<r5@x>")]
    # Each id was linked after walking up all the ids before it (quadratic), and the
    # chain of empty containers was pruned by recursion (RecursionError past ~1000).
    assert await threads("REFERENCES", raws) == b"* THREAD (2 1)"


async def test_threads_thousands_deep() -> None:
    depth = 3000
    chain = [msg("deep", 1, "<m0@x>")]
    for n in range(1, depth):
        chain.append(msg("Re: deep", 1, f"<m{n}@x>", in_reply_to=f"<m{n - 1}@x>"))
    numbers = " ".join(str(n) for n in range(1, depth + 1))
    assert await threads("REFERENCES", chain) == f"* THREAD ({numbers})".encode()


async def test_a_long_references_keeps_its_last_ids() -> None:
    """Of a References longer than 128 ids, the first 8 and the last 120 are kept: the last
    one is the parent, so a reply with 200 ids still goes under the message it answers
    (their subjects differ: only References can join them)."""
    ids = [f"<r{n}@x>" for n in range(200)]
    raws = [msg("first", 1, ids[-1]), msg("second", 2, "<s@x>", " ".join(ids))]
    assert await threads("REFERENCES", raws) == b"* THREAD (1 2)"


def test_a_thread_branching_thousands_deep_is_formatted() -> None:
    tree = ThreadNode(0)
    node = tree
    for n in range(1, 3000):
        leaf, deeper = ThreadNode(2 * n - 1), ThreadNode(2 * n)
        node.children = [leaf, deeper]
        node = deeper
    formatted = format_thread([tree], lambda p: p + 1)
    assert formatted.startswith(b"* THREAD (1 (2)(3 (4)(5 (6)(7")
    assert formatted.endswith(b"(5998)(5999)" + b")" * 2999)
