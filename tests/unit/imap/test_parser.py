"""The incremental command reader: framing, literals, limits, line mode; never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.budget import MemoryBudget
from services.store.imap.protocol.parser import (
    REASON_LINE_TOO_LONG,
    REASON_LITERAL_TOO_BIG,
    REASON_NO_MEMORY,
    CommandParser,
    Complete,
    Event,
    LiteralWanted,
    NeedMore,
    RawCommand,
    Refused,
)

BOUNDED = settings(max_examples=200, deadline=None)


def drain(parser: CommandParser) -> list[Event]:
    events: list[Event] = []
    while True:
        event = parser.next_event()
        if isinstance(event, NeedMore):
            return events
        events.append(event)


def run(data: bytes, max_line: int = 200, max_literal: int = 100, **kw: bool) -> list[Event]:
    parser = CommandParser(max_line, max_literal, **kw)
    parser.feed(data)
    return drain(parser)


def test_simple_command() -> None:
    assert run(b"a1 NOOP\r\n") == [Complete(RawCommand("a1", b"a1 NOOP", []))]


def test_partial_line_needs_more() -> None:
    parser = CommandParser(200, 100)
    parser.feed(b"a1 NO")
    assert parser.next_event() == NeedMore()
    parser.feed(b"OP\r")
    assert parser.next_event() == NeedMore()
    parser.feed(b"\n")
    assert parser.next_event() == Complete(RawCommand("a1", b"a1 NOOP", []))
    assert parser.next_event() == NeedMore()


def test_pipelined_commands_and_bare_lf_and_blank_lines() -> None:
    assert run(b"a NOOP\r\n\r\nb CHECK\nc LOGOUT\r\n") == [
        Complete(RawCommand("a", b"a NOOP", [])),
        Complete(RawCommand("b", b"b CHECK", [])),
        Complete(RawCommand("c", b"c LOGOUT", [])),
    ]


def test_synchronizing_literal_asks_for_continuation() -> None:
    parser = CommandParser(200, 100)
    parser.feed(b"x LOGIN {5}\r\n")
    assert parser.next_event() == LiteralWanted("x", 5)
    assert parser.next_event() == NeedMore()
    parser.feed(b"al")
    assert parser.next_event() == NeedMore()
    parser.feed(b"ice {3}\r\n")
    assert parser.next_event() == LiteralWanted("x", 3)
    parser.feed(b"p w\r\n")
    assert parser.next_event() == Complete(
        RawCommand("x", b"x LOGIN {5}\r\n {3}\r\n", [b"alice", b"p w"])
    )


def test_a_declined_literal_ends_its_command() -> None:
    """The session answered NO instead of `+`: the client sends no literal, and the parser
    does not wait for one (it took the next command as the literal's octets)."""
    memory = MemoryBudget(100)
    parser = CommandParser(200, 100, memory=memory)
    parser.feed(b"x APPEND {5}\r\n")
    assert parser.next_event() == LiteralWanted("x", 5)
    parser.feed(b"INBOX (\\Seen) {60}\r\n")
    wanted = parser.next_event()
    assert wanted == LiteralWanted("x", 60)
    assert isinstance(wanted, LiteralWanted)
    assert wanted.command == b"x APPEND {5}\r\n (\\Seen) {60}\r\n"
    parser.decline_literal()
    assert memory.held == 0  # what its literals held is given back
    parser.feed(b"y NOOP\r\n")
    assert drain(parser) == [Complete(RawCommand("y", b"y NOOP", []))]


def test_non_synchronizing_literal_is_read_without_continuation() -> None:
    events = run(b"x APPEND box {4+}\r\n\r\n\r\n y NOOP\r\nz NOOP\r\n")
    assert events == [
        Complete(RawCommand("x", b"x APPEND box {4+}\r\n y NOOP", [b"\r\n\r\n"])),
        Complete(RawCommand("z", b"z NOOP", [])),
    ]


def test_zero_length_literal() -> None:
    assert run(b"x LOGIN {0+}\r\n {0}\r\n\r\n") == [
        LiteralWanted("x", 0),
        Complete(RawCommand("x", b"x LOGIN {0+}\r\n {0}\r\n", [b"", b""])),
    ]


def test_line_too_long_is_skipped_to_its_end() -> None:
    parser = CommandParser(20, 100)
    parser.feed(b"t1 SEARCH " + b"x" * 30)
    assert parser.next_event() == NeedMore()
    parser.feed(b"y" * 150)
    assert parser.next_event() == NeedMore()
    assert len(parser._buf) == 0  # refused input is not buffered
    parser.feed(b"zz\r\nt2 NOOP\r\n")
    assert drain(parser) == [
        Refused("t1", REASON_LINE_TOO_LONG, close=False),
        Complete(RawCommand("t2", b"t2 NOOP", [])),
    ]


def test_complete_line_too_long() -> None:
    assert run(b"t1 " + b"x" * 30 + b"\r\nt2 NOOP\r\n", max_line=20) == [
        Refused("t1", REASON_LINE_TOO_LONG, close=False),
        Complete(RawCommand("t2", b"t2 NOOP", [])),
    ]


def test_endless_line_asks_to_close() -> None:
    parser = CommandParser(20, 100)
    events: list[Event] = []
    for _ in range(50):
        parser.feed(b"x" * 20)
        events += drain(parser)
    assert events == [Refused("*", REASON_LINE_TOO_LONG, close=True)]
    assert parser.closed
    parser.feed(b"\r\na NOOP\r\n")
    assert parser.next_event() == NeedMore()
    assert parser.read_line() is None


def test_synchronizing_literal_too_big_is_refused_at_once() -> None:
    assert run(b"a APPEND box {101}\r\nb NOOP\r\n") == [
        Refused("a", REASON_LITERAL_TOO_BIG, close=False),
        Complete(RawCommand("b", b"b NOOP", [])),
    ]


def test_literal_budget_is_per_command() -> None:
    assert run(b"a LOGIN {60+}\r\n" + b"u" * 60 + b" {50}\r\n") == [
        Refused("a", REASON_LITERAL_TOO_BIG, close=False)
    ]


def test_non_synchronizing_literal_too_big_is_counted_down_not_buffered() -> None:
    parser = CommandParser(200, 100)
    parser.feed(b"a APPEND box {150+}\r\n")
    assert parser.next_event() == NeedMore()
    for _ in range(14):
        parser.feed(b"m" * 10)
        assert parser.next_event() == NeedMore()
        assert len(parser._buf) == 0
    parser.feed(b"m" * 10 + b" {3+}\r\nabc\r\nb NOOP\r\n")
    assert drain(parser) == [
        Refused("a", REASON_LITERAL_TOO_BIG, close=False),
        Complete(RawCommand("b", b"b NOOP", [])),
    ]


def test_absurd_non_synchronizing_literal_closes() -> None:
    assert run(b"a APPEND box {99999999999999999999999999+}\r\n") == [
        Refused("a", REASON_LITERAL_TOO_BIG, close=True)
    ]


def test_literal_minus_limits_non_synchronizing_literals_to_4096() -> None:
    data = b"a APPEND box {4097+}\r\n" + b"m" * 4097 + b"\r\nb NOOP\r\n"
    assert run(data, max_literal=10_000, literal_minus=True) == [
        Refused("a", REASON_LITERAL_TOO_BIG, close=False),
        Complete(RawCommand("b", b"b NOOP", [])),
    ]
    assert len(run(data, max_literal=10_000)[0].raw.literals[0]) == 4097  # type: ignore[union-attr]


def test_over_long_line_ending_in_non_synchronizing_literal_skips_the_literal() -> None:
    data = b"a " + b"x" * 40 + b" {5+}\r\nhello\r\nb NOOP\r\n"
    assert run(data, max_line=20) == [
        Refused("a", REASON_LINE_TOO_LONG, close=False),
        Complete(RawCommand("b", b"b NOOP", [])),
    ]


def test_invalid_tag_is_reported_as_star() -> None:
    assert run(b"+ " + b"x" * 40 + b"\r\n", max_line=20) == [
        Refused("*", REASON_LINE_TOO_LONG, close=False)
    ]


def test_read_line() -> None:
    parser = CommandParser(20, 100)
    parser.feed(b"dGVzdA==\r\nDO")
    assert parser.read_line() == b"dGVzdA=="
    assert parser.read_line() is None
    parser.feed(b"NE\r\n{5}\r\n")
    assert parser.read_line() == b"DONE"
    assert parser.read_line() == b"{5}"  # no literal processing


def test_read_line_enforces_max_line() -> None:
    parser = CommandParser(20, 100)
    parser.feed(b"A" * 30)
    assert parser.read_line() is None
    parser.feed(b"A" * 30 + b"\r\nok\r\n")
    assert parser.read_line() == Refused("*", REASON_LINE_TOO_LONG, close=False)
    assert parser.read_line() == b"ok"


def test_read_line_then_commands() -> None:
    parser = CommandParser(100, 100)
    parser.feed(b"DONE\r\nb NOOP\r\n")
    assert parser.read_line() == b"DONE"
    assert drain(parser) == [Complete(RawCommand("b", b"b NOOP", []))]


def _events_of(data: bytes, cuts: list[int], answer_literals: bool = True) -> list[Event]:
    parser = CommandParser(64, 48)
    events: list[Event] = []
    previous = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        parser.feed(data[previous:cut])
        previous = max(previous, cut)
        events += drain(parser)
    return events


interesting = st.lists(
    st.sampled_from(
        [b"a", b" ", b"\r\n", b"\n", b"\r", b"{", b"}", b"+", b"~", b"{3}", b"{3+}", b"{60+}",
         b"{1000}", b"x NOOP", b"\x00", b"\xff", b"(", b'"', b"9"]
    ),
    max_size=40,
).map(b"".join)


@BOUNDED
@given(st.one_of(st.binary(max_size=300), interesting), st.lists(st.integers(0, 400)))
def test_random_input_in_any_chunking_gives_only_events(data: bytes, cuts: list[int]) -> None:
    events = _events_of(data, cuts)
    for event in events:
        assert isinstance(event, Complete | LiteralWanted | Refused)
        if isinstance(event, Complete):
            assert event.raw.line.count(b"}\r\n") >= len(event.raw.literals)
            assert all(len(lit) <= 48 for lit in event.raw.literals)
    # Chunking does not change what is recognised.
    assert events == _events_of(data, [])


@BOUNDED
@given(interesting)
def test_read_line_never_raises(data: bytes) -> None:
    parser = CommandParser(16, 16)
    parser.feed(data)
    for _ in range(len(data) + 1):
        line = parser.read_line()
        if line is None:
            break
        assert isinstance(line, bytes | Refused)
        if isinstance(line, bytes):
            assert b"\n" not in line and len(line) <= 14


@pytest.mark.parametrize("size", [0, 1, 47, 48])
def test_literal_sizes_within_limit(size: int) -> None:
    data = b"a X {%d+}\r\n" % size + b"z" * size + b"\r\n"
    assert run(data, max_literal=48) == [Complete(RawCommand("a", b"a X {%d+}\r\n" % size,
                                                             [b"z" * size]))]


@pytest.mark.parametrize("tag_length", [5, 18, 19, 20, 30])
def test_refused_tag_does_not_depend_on_chunking(tag_length: int) -> None:
    data = b"t" * tag_length + b" " + b"x" * 40 + b"\r\n"
    whole = run(data, max_line=20)
    parser = CommandParser(20, 100)
    events: list[Event] = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        events += drain(parser)
    assert events == whole
    assert len(whole) == 1 and isinstance(whole[0], Refused)


def test_huge_line_closes_whether_it_arrives_whole_or_in_pieces() -> None:
    data = b"a " + b"x" * 500 + b"\r\nb NOOP\r\n"
    whole = run(data, max_line=20, max_literal=10)
    assert whole == [Refused("a", REASON_LINE_TOO_LONG, close=True)]
    assert _events_of_small(data) == whole


def _events_of_small(data: bytes) -> list[Event]:
    parser = CommandParser(20, 10)
    events: list[Event] = []
    for i in range(0, len(data), 7):
        parser.feed(data[i : i + 7])
        events += drain(parser)
    return events


def test_tag_may_contain_bracket() -> None:
    assert run(b"a] LOGIN {1}\r\n") == [LiteralWanted("a]", 1)]


def test_buffered_counts_unconsumed_octets() -> None:
    parser = CommandParser(200, 100)
    parser.feed(b"a STARTTLS\r\nb NOOP")
    assert parser.next_event() == Complete(RawCommand("a", b"a STARTTLS", []))
    assert parser.buffered == len(b"b NOOP")


# Literals arriving on every connection share one MemoryBudget.

def test_a_literal_holds_the_memory_of_what_has_arrived() -> None:
    """Announced and not sent, a literal held its whole size: a few sessions doing that
    refused every other user's APPEND for as long as they stayed. It holds what arrived."""
    memory = MemoryBudget(100)
    first, second = (CommandParser(200, 100, memory=memory) for _ in range(2))
    first.feed(b"a APPEND INBOX {60}\r\n")
    assert drain(first) == [LiteralWanted("a", 60)]
    assert memory.held == 0
    first.feed(b"x" * 30)
    assert drain(first) == []
    assert memory.held == 30
    second.feed(b"b APPEND INBOX {80}\r\nc NOOP\r\n")  # 30 + 80: no room for it now
    assert drain(second) == [Refused("b", REASON_NO_MEMORY, close=False),
                             Complete(RawCommand("c", b"c NOOP", []))]
    second.feed(b"d APPEND INBOX {60+}\r\n" + b"y" * 60 + b"\r\ne NOOP\r\n")
    assert [type(event) for event in drain(second)] == [Complete, Complete]
    assert memory.held == 30
    first.feed(b"x" * 30 + b"\r\n")
    assert [type(event) for event in drain(first)] == [Complete]
    assert memory.held == 0  # given back once the command is complete
    second.feed(b"f APPEND INBOX {60}\r\n" + b"z" * 10)
    assert drain(second) == [LiteralWanted("f", 60)]
    assert memory.held == 10
    second.discard()  # the connection ended mid-literal
    assert memory.held == 0


def test_a_literal_the_memory_runs_out_for_on_the_way_is_refused_after_it() -> None:
    memory = MemoryBudget(100)
    first, second = (CommandParser(200, 100, memory=memory) for _ in range(2))
    first.feed(b"a APPEND INBOX {60}\r\n")
    second.feed(b"b APPEND INBOX {60}\r\n")
    assert drain(first) == [LiteralWanted("a", 60)] and drain(second) == [LiteralWanted("b", 60)]
    first.feed(b"x" * 60)
    assert drain(first) == [] and memory.held == 60
    second.feed(b"y" * 50)  # 110 would be held: the rest of b is skipped
    assert drain(second) == [] and memory.held == 60
    second.feed(b"y" * 10 + b" (\\Seen)\r\nc NOOP\r\n")
    assert drain(second) == [Refused("b", REASON_NO_MEMORY, close=False),
                             Complete(RawCommand("c", b"c NOOP", []))]
    first.feed(b"\r\n")
    assert [type(event) for event in drain(first)] == [Complete]
    assert memory.held == 0


def test_a_refused_command_gives_back_its_earlier_literals() -> None:
    memory = MemoryBudget(100)
    parser = CommandParser(200, 100, memory=memory)
    parser.feed(b"a LOGIN {5}\r\nalice {96}\r\n")  # 101 octets in all: one too many
    assert drain(parser) == [LiteralWanted("a", 5), Refused("a", REASON_LITERAL_TOO_BIG,
                                                             close=False)]
    assert memory.held == 0


@BOUNDED
@given(interesting, interesting, st.integers(0, 120), st.lists(st.integers(0, 400)))
def test_the_memory_budget_never_leaks(first: bytes, second: bytes, budget: int,
                                       cuts: list[int]) -> None:
    """Two connections share a budget: it never goes over, never below zero, and once both
    are done (or gone) everything is given back, whatever they sent."""
    memory = MemoryBudget(budget)
    parsers = [CommandParser(64, 48, memory=memory) for _ in range(2)]
    for data, parser in zip((first, second), parsers, strict=True):
        previous = 0
        for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            parser.feed(data[previous:cut])
            previous = max(previous, cut)
            drain(parser)
            assert 0 <= memory.held <= budget
    for parser in parsers:
        parser.discard()
    assert memory.held == 0
