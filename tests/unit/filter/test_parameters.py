"""MAIL FROM / RCPT TO parameters by RFC 5321 4.1.2's esmtp-param grammar, and repeated
keywords."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.filter.protocol.parameters import parse_parameters, repeated_keyword


@pytest.mark.parametrize(("words", "expected"), [
    ([], {}),
    (["SIZE=1000", "BODY=8BITMIME", "SMTPUTF8"],
     {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": True}),
    # A hyphen in a keyword is RFC 5321's (RFC 6710's MT-PRIORITY): a parameter to be
    # answered 555 when unknown, not a syntax error; aiosmtpd's isalnum refused it.
    (["MT-PRIORITY=3"], {"MT-PRIORITY": "3"}),
    (["ORCPT=RFC822;A@B.EXAMPLE"], {"ORCPT": "RFC822;A@B.EXAMPLE"}),
    (["X-VALUE=GRÜSSE"], {"X-VALUE": "GRÜSSE"}),  # RFC 6531 3.3: UTF-8 in a value
    (["9LIVES"], {"9LIVES": True}),
])
def test_well_formed_parameters(words: list[str], expected: dict[str, str | bool]) -> None:
    assert parse_parameters(words) == expected


@pytest.mark.parametrize("word", [
    "X_Y=1",      # "_" is not in a keyword
    "-X=1",       # a keyword starts with a letter or digit
    "FOO=",       # a value has at least one character
    "=1",
    "FOO=A=B",    # "=" is not in a value
    "FOO=A\x01",  # nor a control character
    "SIZÉ=1",     # a keyword is ASCII (str.isalnum takes this)
])
def test_malformed_parameters_are_refused(word: str) -> None:
    assert parse_parameters(["SIZE=10", word]) is None


@given(st.lists(st.text(max_size=12), max_size=4))
def test_any_words_parse_or_are_refused_and_keys_are_keywords(words: list[str]) -> None:
    result = parse_parameters(words)
    if result is not None:
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", key) for key in result)


@pytest.mark.parametrize(("words", "repeated"), [
    (["SIZE=10", "SIZE=20"], "SIZE"),
    (["BODY=8BITMIME", "SMTPUTF8", "BODY=7BIT"], "BODY"),
    (["SMTPUTF8", "SMTPUTF8"], "SMTPUTF8"),
    (["size=10", "SIZE=10"], "SIZE"),
    (["SIZE=10", "BODY=7BIT", "SMTPUTF8"], None),
    ([], None),
])
def test_repeated_keyword(words: list[str], repeated: str | None) -> None:
    assert repeated_keyword(words) == repeated
