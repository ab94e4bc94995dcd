"""Sequence sets: parsing, formatting and resolving against a mailbox, checked against a naive
reference that expands every range."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.store.imap.protocol.command import SequenceSet
from services.store.imap.protocol.sequence import (
    MAX_NUMBER,
    covered,
    format_sequence_set,
    format_set,
    listed,
    parse_sequence_set,
    select_seqs,
    select_uid_positions,
    select_uids,
)

BOUNDED = settings(max_examples=200, deadline=None)


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("1", ((1, 1),)),
        ("*", ((None, None),)),
        ("1:3", ((1, 3),)),
        ("3:1", ((3, 1),)),
        ("2:*", ((2, None),)),
        ("*:4", ((None, 4),)),
        ("1,3:4,*", ((1, 1), (3, 4), (None, None))),
        ("4294967295", ((MAX_NUMBER, MAX_NUMBER),)),
    ],
)
def test_parse(text: str, ranges: tuple) -> None:
    assert parse_sequence_set(text) == SequenceSet(ranges)


@pytest.mark.parametrize(
    "text",
    ["", "0", "01", "1:", ":1", "1,", ",1", "1,,2", "1:2:3", "a", "-1", "+1", " 1", "1 ",
     "4294967296", "99999999999", "$", "1:$", "1.5", "١"],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sequence_set(text)


@pytest.mark.parametrize(
    ("numbers", "text"),
    [
        ([], ""),
        ([5], "5"),
        ([1, 2, 3, 7, 9, 10, 11, 12], "1:3,7,9:12"),
        ([12, 3, 3, 1, 2, 9, 11, 10, 7], "1:3,7,9:12"),
        ([1, 3, 5], "1,3,5"),
    ],
)
def test_format_set(numbers: list[int], text: str) -> None:
    assert format_set(numbers) == text


@pytest.mark.parametrize(
    ("text", "count", "expected"),
    [
        ("1:*", 0, []),
        ("*", 0, []),
        ("1:*", 3, [1, 2, 3]),
        ("*", 5, [5]),
        ("*:3", 5, [3, 4, 5]),
        ("4:2", 5, [2, 3, 4]),
        ("2,1,2:3", 5, [1, 2, 3]),
        ("6", 5, []),
        ("4:9", 5, [4, 5]),
        ("9:*", 5, [5]),
    ],
)
def test_select_seqs(text: str, count: int, expected: list[int]) -> None:
    assert select_seqs(parse_sequence_set(text), count) == expected


@pytest.mark.parametrize(
    ("text", "uids", "expected"),
    [
        ("1:*", [], []),
        ("1:*", [3, 7, 20], [3, 7, 20]),
        ("*", [3, 7, 20], [20]),
        ("100:*", [3, 7, 20], [20]),  # RFC 3501 6.4.8: n:* includes the largest UID
        ("100", [3, 7, 20], []),
        ("4:19", [3, 7, 20], [7]),
        ("19:4", [3, 7, 20], [7]),
        ("1,3,7:8,3", [3, 7, 20], [3, 7]),
    ],
)
def test_select_uids(text: str, uids: list[int], expected: list[int]) -> None:
    s = parse_sequence_set(text)
    assert select_uids(s, uids) == expected
    assert select_uid_positions(s, uids) == [uids.index(u) for u in expected]


def test_select_uids_on_a_large_mailbox() -> None:
    # How fast this is belongs to bench/imap_bench.py (UID FETCH 1:*), not to a timed assert.
    uids = list(range(1, 300_001, 3))  # 100,000 UIDs
    assert select_uids(parse_sequence_set("1:*"), uids) == uids
    assert select_uids(parse_sequence_set("150000:150010,*"), uids) == [
        150001, 150004, 150007, 150010, 299998]
    assert select_uid_positions(parse_sequence_set("299990:*"), uids) == [
        99997, 99998, 99999]


@pytest.mark.parametrize(
    ("text", "n", "largest", "expected"),
    [
        ("1:3", 2, 10, True),
        ("1:3", 4, 10, False),
        ("*", 10, 10, True),
        ("*", 9, 10, False),
        ("5:*", 7, 10, True),
        ("20:*", 15, 10, True),  # 20:* with * = 10 is 10:20
        ("20:*", 9, 10, False),
    ],
)
def test_covered(text: str, n: int, largest: int, expected: bool) -> None:
    assert covered(parse_sequence_set(text), [n], largest) == ([n] if expected else [])


bounds = st.one_of(st.none(), st.integers(1, 60))
sequence_sets = st.lists(st.tuples(bounds, bounds), min_size=1, max_size=6).map(
    lambda r: SequenceSet(tuple(r))
)


def _naive(s: SequenceSet, largest: int) -> set[int]:
    covered: set[int] = set()
    for low, high in s.ranges:
        a = largest if low is None else low
        b = largest if high is None else high
        covered.update(range(min(a, b), max(a, b) + 1))
    return covered


@BOUNDED
@given(sequence_sets)
def test_format_parse_round_trip(s: SequenceSet) -> None:
    assert parse_sequence_set(format_sequence_set(s)) == s


@BOUNDED
@given(st.lists(st.one_of(st.integers(1, 40), st.integers(1, MAX_NUMBER)), max_size=30))
def test_format_set_round_trip(numbers: list[int]) -> None:
    text = format_set(numbers)
    if not numbers:
        assert text == ""
        return
    # format_set's ranges only span numbers that are present, so expanding them is cheap.
    assert _naive(parse_sequence_set(text), MAX_NUMBER) == set(numbers)
    assert format_set(_naive(parse_sequence_set(text), MAX_NUMBER)) == text


@BOUNDED
@given(sequence_sets, st.integers(0, 70))
def test_select_seqs_matches_reference(s: SequenceSet, count: int) -> None:
    expected = sorted(n for n in _naive(s, count) if 1 <= n <= count) if count else []
    assert select_seqs(s, count) == expected


@BOUNDED
@given(sequence_sets, st.lists(st.integers(1, 80), unique=True, max_size=30).map(sorted))
def test_select_uids_matches_reference(s: SequenceSet, uids: list[int]) -> None:
    expected = sorted(_naive(s, uids[-1]) & set(uids)) if uids else []
    assert select_uids(s, uids) == expected
    assert [uids[i] for i in select_uid_positions(s, uids)] == expected


@BOUNDED
@given(sequence_sets, st.lists(st.integers(1, 80), max_size=30), st.integers(1, 70))
def test_covered_matches_reference(s: SequenceSet, numbers: list[int], largest: int) -> None:
    assert covered(s, numbers, largest) == sorted(set(numbers) & _naive(s, largest))


def test_many_numbers_against_a_set_of_many_ranges() -> None:
    """QRESYNC's VANISHED (EARLIER) asks this of every expunged UID of a mailbox against a
    client's set of up to thousands of ranges: asked one number at a time, 10,000 ranges
    against 8,192 UIDs held the store's loop for 10 s (found in review)."""
    ranges = ",".join(str(n) for n in range(1, 40_000, 2))
    assert len(covered(parse_sequence_set(ranges), range(1, 20_001), 20_000)) == 10_000


def test_listed_walks_a_set_in_the_order_written_without_star() -> None:
    assert list(listed(parse_sequence_set("5,1:3,9:7"))) == [5, 1, 2, 3, 7, 8, 9]
    assert list(listed(parse_sequence_set("2,4:*,6"))) == [2]  # "*" is not allowed there
