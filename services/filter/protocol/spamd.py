"""SpamAssassin's spamd protocol (SPAMC/1.5): the SYMBOLS request and its reply. Pure.

    SYMBOLS SPAMC/1.5\\r\\nContent-length: N\\r\\n[User: u\\r\\n]\\r\\n<message>
    SPAMD/1.1 0 EX_OK\\r\\nContent-length: n\\r\\nSpam: True ; 15.0 / 5.0\\r\\n\\r\\nSYM1,SYM2

spamd closes the connection after its reply. A status other than 0 is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ (\d+) ?(.*)$")
_SPAM = re.compile(r"^\s*(true|false|yes|no)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)\s*$", re.I)
_USER_UNSAFE = re.compile(r"[^\x21-\x7e]")


class SpamdProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class SpamdResult:
    spam: bool
    score: float
    threshold: float
    symbols: tuple[str, ...] = ()


def symbols_request(content: bytes, user: str | None = None) -> bytes:
    head = [b"SYMBOLS SPAMC/1.5", b"Content-length: %d" % len(content)]
    if user:
        head.append(b"User: " + _USER_UNSAFE.sub("", user).encode("ascii", "replace"))
    return b"\r\n".join(head) + b"\r\n\r\n" + content


def parse_reply(data: bytes) -> SpamdResult:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise SpamdProtocolError("reply has no end of headers")
    lines = head.split(b"\r\n")
    status = _STATUS.match(lines[0])
    if status is None:
        raise SpamdProtocolError(f"bad status line {lines[0][:80]!r}")
    if status.group(1) != b"0":
        raise SpamdProtocolError(f"spamd error {lines[0][:120]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if colon:
            fields[name.strip().lower()] = value.strip()
    spam = fields.get("spam")
    if spam is None:
        raise SpamdProtocolError("reply has no Spam header")
    match = _SPAM.match(spam)
    if match is None:
        raise SpamdProtocolError(f"bad Spam header {spam[:80]!r}")
    try:
        score, threshold = float(match.group(2)), float(match.group(3))
    except ValueError:
        raise SpamdProtocolError(f"bad Spam header {spam[:80]!r}") from None
    length = fields.get("content-length")
    if length is not None and length.isdigit():
        body = body[: int(length)]
    symbols = tuple(s.strip() for s in body.decode("latin-1").split(",") if s.strip())
    return SpamdResult(match.group(1).lower() in ("true", "yes"), score, threshold, symbols)
