"""IMAP response formatting (services/store/imap/protocol/wire.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.store.imap.protocol import wire


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", b'""'),
        ("plain", b'"plain"'),
        ('say "hi"', b'"say \\"hi\\""'),
        ("back\\slash", b'"back\\\\slash"'),
        (b"bytes", b'"bytes"'),
    ],
)
def test_quoted_escapes_backslash_and_quote(value: str | bytes, expected: bytes) -> None:
    assert wire.quoted(value) == expected


def test_literal_counts_octets() -> None:
    assert wire.literal(b"") == b"{0}\r\n"
    assert wire.literal("é".encode()) == b"{2}\r\n\xc3\xa9"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Hello world", b'"Hello world"'),
        ("two\r\nlines", b"{10}\r\ntwo\r\nlines"),
        ("bare\nlf", b"{7}\r\nbare\nlf"),
        ("nul\x00", b"{4}\r\nnul\x00"),
        ("café", b"{5}\r\ncaf\xc3\xa9"),
        ("x" * 1000, b'"' + b"x" * 1000 + b'"'),
        ("x" * 1001, b"{1001}\r\n" + b"x" * 1001),
    ],
)
def test_string_quotes_only_safe_values(value: str, expected: bytes) -> None:
    assert wire.string(value) == expected


def test_nstring() -> None:
    assert wire.nstring(None) == b"NIL"
    assert wire.nstring("NIL") == b'"NIL"'
    assert wire.nstring("") == b'""'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("INBOX", b"INBOX"),
        ("Archive]2024", b"Archive]2024"),
        ("with space", b'"with space"'),
        ("paren(", b'"paren("'),
        ("star*", b'"star*"'),
        ("pct%", b'"pct%"'),
        ("brace{", b'"brace{"'),
        ('q"', b'"q\\""'),
        ("", b'""'),
        ("nil", b'"nil"'),
        ("ünï", b"{5}\r\n\xc3\xbcn\xc3\xaf"),
    ],
)
def test_astring_uses_atom_when_valid(value: str, expected: bytes) -> None:
    assert wire.astring(value) == expected


def test_flag_list_is_stable_system_flags_first() -> None:
    flags = frozenset({"foo", "\\Seen", "$Junk", "\\Answered"})
    assert wire.flag_list(flags) == b"(\\Answered \\Seen $Junk foo)"
    assert wire.flag_list([]) == b"()"


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, b'" 1-Jan-1970 00:00:00 +0000"'),
        # RFC 3501's example instant, 17-Jul-1996 02:44:25 -0700, in UTC.
        (837596665, b'"17-Jul-1996 09:44:25 +0000"'),
        (837596665.99, b'"17-Jul-1996 09:44:25 +0000"'),
        (1709208000, b'"29-Feb-2024 12:00:00 +0000"'),
    ],
)
def test_internaldate_is_rfc3501_date_time_in_utc(epoch: float, expected: bytes) -> None:
    assert wire.internaldate(epoch) == expected


def test_number_list() -> None:
    assert wire.number_list([1, 2, 30]) == b"1 2 30"
    assert wire.number_list([]) == b""


def test_tagged_untagged_continuation() -> None:
    assert wire.tagged("a1", "OK", "SELECT completed", "READ-WRITE") == (
        b"a1 OK [READ-WRITE] SELECT completed\r\n"
    )
    assert wire.tagged("a2", "NO", "nope") == b"a2 NO nope\r\n"
    assert wire.untagged("3 EXISTS") == b"* 3 EXISTS\r\n"
    assert wire.continuation("Ready") == b"+ Ready\r\n"
    assert wire.continuation() == b"+ \r\n"


def test_response_text_cannot_inject_a_line() -> None:
    line = wire.tagged("a1", "NO", "bad\r\n* 1 EXISTS", "CODE\r\nX")
    assert line.count(b"\r\n") == 1 and line.endswith(b"\r\n")
    assert wire.continuation("x\ny").count(b"\n") == 1
    # Nor a lone CR, which is no TEXT-CHAR either (RFC 3501 9) and which some clients take
    # for a line end.
    for line in (wire.tagged("a1", "NO", "x\ry", "C\rD"), wire.continuation("x\ry")):
        assert b"\r" not in line[:-2] and line.endswith(b"\r\n")


def test_mailbox_inbox_any_case_is_inbox() -> None:
    assert wire.mailbox("inbox") == b"INBOX"
    assert wire.mailbox("InBoX") == b"INBOX"


def test_mailbox_encodes_modified_utf7() -> None:
    assert wire.mailbox("Sent") == b"Sent"
    assert wire.mailbox("My Folder") == b'"My Folder"'
    # RFC 3501 5.1.3's example: "~peter/mail/台北/日本語".
    assert wire.mailbox("~peter/mail/台北/日本語") == b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert wire.mailbox("A&B") == b"A&-B"


_QUOTED_RE = re.compile(rb'"(?:[^"\\\r\n\x00]|\\["\\])*"')
_LITERAL_RE = re.compile(rb"\{(\d+)\}\r\n")


def _unstring(encoded: bytes) -> bytes:
    match = _LITERAL_RE.match(encoded)
    if match:
        data = encoded[match.end() :]
        assert len(data) == int(match.group(1))
        return data
    assert _QUOTED_RE.fullmatch(encoded)
    return re.sub(rb"\\(.)", rb"\1", encoded[1:-1])


@given(st.binary(max_size=1200))
def test_string_round_trips(data: bytes) -> None:
    assert _unstring(wire.string(data)) == data


@given(st.binary(max_size=50))
def test_astring_is_atom_or_round_tripping_string(data: bytes) -> None:
    encoded = wire.astring(data)
    if encoded == data:
        assert wire.is_atom(data, astring_chars=True)
    else:
        assert _unstring(encoded) == data
