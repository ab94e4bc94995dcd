"""Modified UTF-7 mailbox names (RFC 3501 section 5.1.3)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.store.imap.protocol.mutf7 import decode, encode

BOUNDED = settings(max_examples=200, deadline=None)


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("", ""),
        ("INBOX", "INBOX"),
        ("&", "&-"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("~peter/mail/日本語/台北", "~peter/mail/&ZeVnLIqe-/&U,BTFw-"),  # RFC 3501 5.1.3 example
        ("Entwürfe", "Entw&APw-rfe"),
        ("Ça va", "&AMc-a va"),
        ("tab\there", "tab&AAk-here"),
        ("😀", "&2D3eAA-"),
        ("ü&ö", "&APw-&-&APY-"),
    ],
)
def test_known_encodings(name: str, wire: str) -> None:
    assert encode(name) == wire
    assert decode(wire) == name


@pytest.mark.parametrize(
    "wire",
    [
        "&",  # unterminated
        "a&APw",  # unterminated
        "&AGE-",  # printable ASCII inside a shift
        "&APw-&APw-",  # two adjacent shifts: must be one
        "&APw",
        "&A-",  # one base64 character cannot carry an octet
        "&AP-",  # odd number of octets
        "&APx-",  # non-zero padding bits
        "&AP/8-",  # "/" is written ","
        "&AP=-",
        "&2D0-",  # unpaired high surrogate
        "&3gA-",  # unpaired low surrogate
        "Entwürfe",  # raw 8-bit
        "a\tb",  # control character
        "a\x7fb",
    ],
)
def test_rejects_invalid_and_non_minimal(wire: str) -> None:
    with pytest.raises(ValueError):
        decode(wire)


def test_encode_rejects_unpaired_surrogate() -> None:
    with pytest.raises(ValueError):
        encode("a\ud800b")


@BOUNDED
@given(st.text())
def test_round_trip(name: str) -> None:
    wire = encode(name)
    assert all(" " <= c <= "~" for c in wire)
    assert decode(wire) == name


@BOUNDED
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_decode_never_raises_anything_but_value_error(text: str) -> None:
    try:
        name = decode(text)
    except ValueError:
        return
    assert encode(name) == text
