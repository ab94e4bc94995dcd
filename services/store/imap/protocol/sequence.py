"""Sequence sets (RFC 3501 section 9 `sequence-set`): parsing, formatting, resolving. Pure.

A set is kept as written (`SequenceSet.ranges`, None for "*"); it is resolved against a
mailbox only when used, because "*" means the largest number *at that time*. Message sequence
numbers are resolved by arithmetic (`select_seqs`), UIDs by bisecting the mailbox's ascending
UID list (`select_uids`), so "1:*" over 100,000 UIDs costs two bisections, not a scan.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence

from services.store.imap.protocol.command import Bound, SequenceSet

# RFC 3501 section 9: nz-number is a non-zero unsigned 32-bit integer.
MAX_NUMBER = 2**32 - 1
_DIGITS = frozenset("0123456789")


def parse_sequence_set(text: str) -> SequenceSet:
    """Parse "1:3,7,9:*". Raises ValueError on anything else ("$" of RFC 5182 included)."""
    if not text:
        raise ValueError("empty sequence set")
    ranges: list[tuple[Bound, Bound]] = []
    for element in text.split(","):
        low, sep, high = element.partition(":")
        if sep:
            ranges.append((_parse_seq_number(low), _parse_seq_number(high)))
        else:
            number = _parse_seq_number(low)
            ranges.append((number, number))
    return SequenceSet(tuple(ranges))


def _parse_seq_number(text: str) -> Bound:
    if text == "*":
        return None
    if text == "$":
        raise ValueError("search result references ($) are not supported")
    # nz-number = digit-nz *DIGIT: no sign, no leading zero, no whitespace.
    if not text or text[0] == "0" or not _DIGITS.issuperset(text) or len(text) > 10:
        raise ValueError(f"bad sequence number {text[:20]!r}")
    number = int(text)
    if number > MAX_NUMBER:
        raise ValueError("sequence number out of range")
    return number


def format_set(numbers: Iterable[int]) -> str:
    """Compact ascending ranges without duplicates: [9, 1, 2, 3, 7, 3] -> "1:3,7,9".

    Returns "" for no numbers (a sequence set cannot be empty: callers decide what to send)."""
    parts: list[str] = []
    for low, high in _runs(sorted(set(numbers))):
        parts.append(str(low) if low == high else f"{low}:{high}")
    return ",".join(parts)


def _runs(ordered: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for number in ordered:
        if runs and runs[-1][1] + 1 == number:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs


def format_sequence_set(s: SequenceSet) -> str:
    """The set as written: `parse_sequence_set(format_sequence_set(s)) == s`."""
    return ",".join(_format_range(low, high) for low, high in s.ranges)


def _format_range(low: Bound, high: Bound) -> str:
    low_text = "*" if low is None else str(low)
    if low == high:
        return low_text
    return f"{low_text}:{'*' if high is None else high}"


def _resolved(s: SequenceSet, largest: int) -> list[tuple[int, int]]:
    """Ranges with "*" replaced by `largest` and each range ordered low <= high."""
    out = []
    for low, high in s.ranges:
        a = largest if low is None else low
        b = largest if high is None else high
        out.append((a, b) if a <= b else (b, a))
    return out


def _merged(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent half-open intervals [start, stop)."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(i for i in intervals if i[0] < i[1]):
        if merged and start <= merged[-1][1]:
            if stop > merged[-1][1]:
                merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def select_seqs(s: SequenceSet, count: int) -> list[int]:
    """Message sequence numbers 1..count covered by `s`, ascending, once each.

    "*" is `count`; numbers above `count` are simply not selected (the session decides whether
    that is an error, RFC 3501 section 9 "seq-number"). An empty mailbox selects nothing."""
    if count <= 0:
        return []
    spans = ((max(low, 1), min(high, count) + 1) for low, high in _resolved(s, count))
    return [n for start, stop in _merged(spans) for n in range(start, stop)]


def select_uid_positions(s: SequenceSet, uids: Sequence[int]) -> list[int]:
    """0-based positions in `uids` (ascending UIDs of the mailbox) of the UIDs `s` covers.

    "*" is the largest UID present; by RFC 3501 section 6.4.8 "n:*" therefore always includes
    the last message, even when n is above every UID."""
    if not uids:
        return []
    return _positions(s, uids, uids[-1])


def _positions(s: SequenceSet, numbers: Sequence[int], largest: int) -> list[int]:
    """0-based positions in `numbers` (ascending) of those `s` covers, "*" being `largest`:
    each range bisected once, so a set of many ranges over many numbers costs ranges times
    log(numbers), not their product."""
    spans = ((bisect_left(numbers, low), bisect_right(numbers, high))
             for low, high in _resolved(s, largest))
    return [i for start, stop in _merged(spans) for i in range(start, stop)]


def select_uids(s: SequenceSet, uids: Sequence[int]) -> list[int]:
    """The UIDs of `uids` (ascending) that `s` covers, ascending; see `select_uid_positions`."""
    return [uids[i] for i in select_uid_positions(s, uids)]


def listed(s: SequenceSet) -> Iterator[int]:
    """The numbers of a set without "*" (QRESYNC's sequence match data), each range low to
    high, in the order written; lazily, as such sets may be long and are read pairwise."""
    for low, high in s.ranges:
        if low is None or high is None:
            return
        yield from range(min(low, high), max(low, high) + 1)


def covered(s: SequenceSet, numbers: Iterable[int], largest: int) -> list[int]:
    """The numbers `s` covers, ascending, when "*" stands for `largest`. Asked one number at
    a time (the set's ranges resolved for each), the expunged UIDs of a mailbox against a
    client's set of thousands of ranges took seconds with the store's loop held (found in
    review)."""
    ordered = sorted(set(numbers))
    return [ordered[i] for i in _positions(s, ordered, largest)]
