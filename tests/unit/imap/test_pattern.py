"""LIST patterns (RFC 3501 6.3.8) matched without backtracking."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.store.imap.protocol.pattern import ListPattern


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("*", "a/b/c", True),
    ("%", "a", True),
    ("%", "a/b", False),
    ("a/%", "a/b", True),
    ("a/%", "a/b/c", False),
    ("a/*", "a/b/c", True),
    ("a*c", "a/b/c", True),
    ("a%c", "a/b/c", False),
    ("a%c", "abc", True),
    ("", "", True),
    ("", "a", False),
    ("a", "ab", False),
    ("%*", "a/b", True),
    ("*%", "a/b", True),
    ("%%/%", "ab/c", True),
    ("Sent", "Sent", True),
    ("sent", "Sent", False),
])
def test_pattern(pattern: str, name: str, matches: bool) -> None:
    assert ListPattern(pattern, "/").matches(name) is matches


@pytest.mark.parametrize(("pattern", "name", "caseless", "matches"), [
    ("inbox/%", "INBOX/a", 5, True),
    ("*b*", "INBOX", 5, True),
    ("InBoX", "INBOX", 5, True),
    ("INBOX/A", "INBOX/a", 5, False),  # only INBOX itself is a name in any case
    ("inbox", "INBOX", 0, False),
])
def test_leading_characters_in_any_case(pattern: str, name: str, caseless: int,
                                        matches: bool) -> None:
    assert ListPattern(pattern, "/").matches(name, caseless) is matches


def _as_regex(pattern: str) -> re.Pattern[str]:
    """The plain translation, right but exponential on hostile patterns."""
    parts = {"*": ".*", "%": "[^/]*"}
    return re.compile("".join(parts.get(char, re.escape(char)) for char in pattern), re.DOTALL)


@given(st.text("ab/*%", max_size=10), st.text("ab/", max_size=10))
def test_matches_what_the_regular_expression_matches(pattern: str, name: str) -> None:
    expected = _as_regex(pattern).fullmatch(name) is not None
    assert ListPattern(pattern, "/").matches(name) is expected


def test_a_hostile_pattern_is_matched_in_linear_time() -> None:
    # The regular expression of this pattern backtracks for longer than anyone waits.
    pattern = ListPattern("%*" * 30_000 + "x", "/")
    names = ["a" * 1000, "a/" * 400 + "b", "Archive"]
    assert not any(pattern.matches(name) for name in names)  # returns at all
    assert ListPattern("%a" * 500 + "%", "/").matches("a" * 999)
