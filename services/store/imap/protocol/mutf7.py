"""Modified UTF-7 for mailbox names (RFC 3501 section 5.1.3). Pure.

Printable US-ASCII (0x20-0x7e) stands for itself except "&", written "&-"; everything else is
UTF-16BE in base64 with "," for "/" and no padding, between "&" and "-".

`decode` is strict: it accepts exactly the strings `encode` produces, so every mailbox has one
spelling on the wire. Non-minimal forms are rejected with ValueError: printable ASCII inside a
shift ("&AGE-" for "a"), two adjacent shifts ("&AOk-&AOk-"), non-zero padding bits, as are
unpaired surrogates, an unterminated shift, raw 8-bit or control characters.
"""

from __future__ import annotations

import base64
import binascii

_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _is_direct(char: str) -> bool:
    return " " <= char <= "~"


def encode(name: str) -> str:
    """Unicode mailbox name -> modified UTF-7. Raises ValueError for unpaired surrogates."""
    out: list[str] = []
    shifted: list[str] = []
    for char in name:
        if _is_direct(char):
            if shifted:
                out.append(_encode_shift("".join(shifted)))
                shifted.clear()
            out.append("&-" if char == "&" else char)
        else:
            shifted.append(char)
    if shifted:
        out.append(_encode_shift("".join(shifted)))
    return "".join(out)


def _encode_shift(text: str) -> str:
    raw = base64.b64encode(text.encode("utf-16-be")).rstrip(b"=").replace(b"/", b",")
    return "&" + raw.decode("ascii") + "-"


def decode(text: str) -> str:
    """Modified UTF-7 -> Unicode. Raises ValueError unless `text` is the canonical encoding."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if not _is_direct(char):
            raise ValueError("mailbox name has a character outside printable US-ASCII")
        if char != "&":
            out.append(char)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError("unterminated modified UTF-7 shift")
        out.append("&" if end == i + 1 else _decode_shift(text[i + 1 : end]))
        i = end + 1
    decoded = "".join(out)
    if encode(decoded) != text:
        raise ValueError("not the minimal modified UTF-7 encoding")
    return decoded


def _decode_shift(chunk: str) -> str:
    raw = chunk.encode("ascii")
    if not _B64_ALPHABET.issuperset(raw) or len(raw) % 4 == 1:
        raise ValueError("bad base64 in modified UTF-7")
    padded = raw.replace(b",", b"/") + b"=" * (-len(raw) % 4)
    try:
        utf16 = base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise ValueError("bad base64 in modified UTF-7") from exc
    if len(utf16) % 2:
        raise ValueError("odd number of octets in modified UTF-7")
    # UnicodeDecodeError (a ValueError) for unpaired surrogates.
    return utf16.decode("utf-16-be")
