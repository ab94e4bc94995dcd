"""IMAP response formatting: the bytes the server writes. Pure: no asyncio, no I/O.

RFC 3501 section 4 (data formats) and section 9 (formal syntax). Every helper returns bytes
ready to be joined into a response line; only `tagged`, `untagged` and `continuation` end with
CRLF.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from services.store.imap.protocol import mutf7

CRLF = b"\r\n"
NIL = b"NIL"

# RFC 3501 section 9: atom-specials are "(" ")" "{" SP CTL list-wildcards ("%" "*")
# quoted-specials ('"' "\") and resp-specials ("]"). ASTRING-CHAR adds "]" back.
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
# A quoted string may not hold CR, LF or NUL (RFC 3501 section 4.3, QUOTED-CHAR is TEXT-CHAR),
# nor 8-bit octets unless UTF8=ACCEPT is enabled (RFC 6855): a literal is always safe. Long
# values go as literals too so no response line grows beyond what clients buffer (RFC 7162
# section 4 recommends clients accept 8192-octet lines; 1000 keeps us well inside).
_MAX_QUOTED = 1000

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def quoted(value: str | bytes) -> bytes:
    """A quoted string with backslash and double quote escaped. The caller guarantees the value
    holds no CR, LF or NUL; use `string` for arbitrary data."""
    data = _as_bytes(value)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(data: bytes) -> bytes:
    """A synchronising literal: `{n}` CRLF and the octets (RFC 3501 section 4.3)."""
    return b"{%d}\r\n" % len(data) + data


def literal_octets(data: bytes) -> bytes:
    """Stored message octets as a literal may carry them: NUL is no CHAR8 (RFC 3501 section
    9; only BINARY's literal8, RFC 3516, holds NUL), so each becomes 0x80, as Dovecot sends
    them. The length stays the same, so RFC822.SIZE and every partial's offsets still hold."""
    return data.replace(b"\x00", b"\x80") if b"\x00" in data else data


def _quotable(data: bytes) -> bool:
    if len(data) > _MAX_QUOTED:
        return False
    return not any(octet in (0, 10, 13) or octet > 0x7F for octet in data)


def string(value: str | bytes) -> bytes:
    """A quoted string when the value can be one, otherwise a literal."""
    data = _as_bytes(value)
    return quoted(data) if _quotable(data) else literal(data)


def nstring(value: str | bytes | None) -> bytes:
    """NIL for None, otherwise `string`."""
    return NIL if value is None else string(value)


def is_atom(value: str | bytes, *, astring_chars: bool = False) -> bool:
    """True when the value is a non-empty RFC 3501 atom (or astring atom with `astring_chars`,
    which also allows "]")."""
    data = _as_bytes(value)
    if not data:
        return False
    for octet in data:
        if octet <= 0x20 or octet >= 0x7F:
            return False
        if octet in _ATOM_SPECIALS and not (astring_chars and octet == ord("]")):
            return False
    return True


def astring(value: str | bytes) -> bytes:
    """An atom when the value is a valid astring atom, otherwise a string. "NIL" is quoted so
    no client mistakes it for the nil value."""
    data = _as_bytes(value)
    if is_atom(data, astring_chars=True) and data.upper() != NIL:
        return data
    return string(data)


def mailbox(name: str) -> bytes:
    """A mailbox name: INBOX in any case as INBOX, others modified UTF-7 encoded (RFC 3501
    section 5.1.3) then as an astring."""
    if name.upper() == "INBOX":
        return b"INBOX"
    return astring(mutf7.encode(name))


def _flag_order(flag: str) -> tuple[int, str]:
    # System flags, then keywords, then PERMANENTFLAGS' \* ; each alphabetical: stable output.
    rank = 2 if flag == "\\*" else 0 if flag.startswith("\\") else 1
    return (rank, flag.lower())


def flag_list(flags: Iterable[str]) -> bytes:
    """A parenthesised flag list, e.g. b"(\\\\Seen foo)". Flags are atoms already validated by
    the parser or storage."""
    return b"(" + b" ".join(f.encode("utf-8") for f in sorted(flags, key=_flag_order)) + b")"


def internaldate(epoch: float) -> bytes:
    """A quoted RFC 3501 date-time in UTC, e.g. b'"17-Jul-1996 09:44:25 +0000"' (the day is
    space-padded: date-day-fixed)."""
    t = time.gmtime(int(epoch))
    day = f"{t.tm_mday:2d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d}"
    text = f"{day} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    return b'"' + text.encode("ascii") + b'"'


def number_list(numbers: Iterable[int]) -> bytes:
    """Numbers separated by single spaces (SEARCH, ESEARCH ALL parts are built from these)."""
    return b" ".join(b"%d" % n for n in numbers)


def _line_text(text: str | bytes) -> bytes:
    # A response line must not be split by text from elsewhere (a mailbox name, an error).
    return _as_bytes(text).replace(b"\r", b" ").replace(b"\n", b" ")


def tagged(
    tag: str | bytes, status: str, text: str | bytes, code: str | bytes | None = None
) -> bytes:
    """`<tag> <status> [<code>] <text>` CRLF, e.g. tagged("a1", "OK", "done", "READ-WRITE")."""
    parts = [_as_bytes(tag), status.encode("ascii")]
    if code is not None:
        parts.append(b"[" + _line_text(code) + b"]")
    parts.append(_line_text(text) or b"done")
    return b" ".join(parts) + CRLF


def untagged(text: str | bytes) -> bytes:
    """`* <text>` CRLF. The text may carry literals (FETCH), so only a trailing CRLF is added."""
    return b"* " + _as_bytes(text) + CRLF


def continuation(text: str | bytes = b"") -> bytes:
    """`+ <text>` CRLF (RFC 3501 7.5); an empty text still sends "+ " as many clients expect."""
    return b"+ " + _line_text(text) + CRLF
