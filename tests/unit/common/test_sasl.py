"""SASL PLAIN messages (common/sasl.py): what is a message, and what fails the login."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.sasl import PlainCredentials, parse_plain


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\x00alice@example.test\x00secret", PlainCredentials("", "alice@example.test", "secret")),
        (b"alice@example.test\x00alice@example.test\x00s p",
         PlainCredentials("alice@example.test", "alice@example.test", "s p")),
        ("\x00ü@example.test\x00pässword \"\\".encode(),
         PlainCredentials("", "ü@example.test", "pässword \"\\")),
        (b"", None),  # an empty response ("=" as an initial response)
        (b"\x00alice\x00", None),  # empty password
        (b"\x00\x00secret", None),  # empty authcid
        (b"alice\x00secret", None),  # one NUL
        (b"\x00a\x00b\x00c", None),  # three NULs
        (b"\x00a\x00\xff", None),  # not UTF-8
    ],
)
def test_parse_plain(message: bytes, expected: PlainCredentials | None) -> None:
    assert parse_plain(message) == expected


@given(st.binary(max_size=100))
def test_parse_plain_never_raises(message: bytes) -> None:
    parse_plain(message)


# Any text a client can put in a field: UTF-8 encodable, without the NUL that separates them.
FIELD = st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))


@given(st.text(FIELD), st.text(FIELD, min_size=1), st.text(FIELD, min_size=1))
def test_parse_plain_reads_back_what_a_client_sends(authzid: str, authcid: str,
                                                    password: str) -> None:
    message = f"{authzid}\0{authcid}\0{password}".encode()
    assert parse_plain(message) == PlainCredentials(authzid, authcid, password)
