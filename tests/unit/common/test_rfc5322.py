"""RFC 5322 3.2.2 comments and 3.2.4 quoted strings (common/rfc5322.py): what a header's
display name and IMAP's ENVELOPE are read from."""

from __future__ import annotations

import pytest

from common.rfc5322 import read_comment, read_quoted


@pytest.mark.parametrize(("value", "start", "read"), [
    ("(a (b) c) rest", 0, (9, "a (b) c")),  # a nested comment is part of the text
    ("x (a \\) b) y", 2, (10, "a ) b")),  # a quoted-pair closes nothing
    ("((a)(b))", 0, (8, "(a)(b)")),
    ("(unclosed (still", 0, (16, "unclosed (still")),
])
def test_comments(value: str, start: int, read: tuple[int, str]) -> None:
    assert read_comment(value, start) == read


@pytest.mark.parametrize(("value", "start", "read"), [
    ('"Doe, John" <j@x>', 0, (11, "Doe, John")),
    ('a "say \\"hi\\"" b', 2, (14, 'say "hi"')),
    ('"unclosed', 0, (9, "unclosed")),
])
def test_quoted_strings(value: str, start: int, read: tuple[int, str]) -> None:
    assert read_quoted(value, start) == read
