"""Pure checks and formatting on message content: bare newlines and the Received header."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import format_datetime

SOFTWARE = "tiermail"


# The largest header section taken (Exim's header_maxsize default). Every field the filter
# looks at (Authentication-Results, the scan fields a sender may forge) is in it: a message
# of 25 MB of header fields made that work hold the worker for seconds (found in review).
MAX_HEADER_SECTION = 1024 * 1024
# How far a header section is looked for: past the limit by a line's length (RFC 5322 2.1.1:
# 998 octets), so that a line starting at the limit is seen whole.
HEADER_SCAN = MAX_HEADER_SECTION + 1000
# A line start that begins neither a header field ("name:") nor a continuation: the empty
# line after the header section, or a body with no empty line before it.
_NOT_A_FIELD_LINE = re.compile(rb"^(?![ \t])(?![!-9;-~]+[ \t]*:)", re.MULTILINE)
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_FIELD_START = re.compile(rb"^[!-9;-~]+[ \t]*:", re.MULTILINE)
# At most this many header fields: the store's IMAP reads no more than its MAX_HEADER_FIELDS
# (10,000) of a stored message's fields and runs its header on to the next blank line, so
# the fields the filter removes (forged Authentication-Results, a Return-Path) must lie
# within them (found in review). The store adds three (Return-Path, Delivered-To, and the
# filter's Received); the margin keeps well clear of its limit.
MAX_HEADER_FIELDS = 9000
# RFC 5321 4.4: the final delivery adds Return-Path (the store does), and an originating
# system SHOULD NOT send one; one the sender wrote stood below ours (found in review).
# Postfix drops it too (message_drop_headers).
RETURN_PATH_FIELD = re.compile(rb"^Return-Path[ \t]*:", re.IGNORECASE | re.MULTILINE)


def header_section_too_big(content: bytes, end: int | None = None) -> bool:
    """Whether the header section of `content` is longer than MAX_HEADER_SECTION octets
    (only that much of it is looked at), or has more than MAX_HEADER_FIELDS fields. `end`:
    header_section_end(content), when the caller has it."""
    end = header_section_end(content) if end is None else end
    if end > MAX_HEADER_SECTION:
        return True
    return (content.count(b"\n", 0, end) > MAX_HEADER_FIELDS  # (lines: cheap, and enough)
            and len(_FIELD_START.findall(content, 0, end)) > MAX_HEADER_FIELDS)


def header_section_end(content: bytes) -> int:
    """Where the header section ends: at the start of its first line that is neither a
    field nor a continuation (the empty line, or a body with no empty line before it, as
    the store's IMAP and POP3 read it); 0 when there is none. Past HEADER_SCAN octets it is
    not looked for (the filter refuses a longer header section)."""
    end = _first_line_no_field(content)
    return min(len(content), HEADER_SCAN) if end is None else end


def _first_line_no_field(content: bytes) -> int | None:
    """Where the first line that is no field and no continuation starts, if it starts
    within HEADER_SCAN octets. A field line that starts within them but whose colon lies
    past them is a field: the search, which looks no further, took it for none, and the
    fields after it, a forged one too, went past the size check and the removal while the
    store read them as fields (found in review)."""
    pos = 0
    while (found := _NOT_A_FIELD_LINE.search(content, pos, HEADER_SCAN)) is not None:
        start = found.start()
        if not _FIELD_NAME.match(content, start):  # seen to the line's end this time
            return start
        pos = content.find(b"\n", start) + 1
        if pos == 0:
            return None
    return None


def has_bare_newline(content: bytes) -> bool:
    """True when content holds a CR or LF that is not part of a CRLF pair (RFC 5321 2.3.8).

    Three C-level counts instead of a Python loop: fast on a 25 MB body.
    """
    pairs = content.count(b"\r\n")
    return content.count(b"\n") != pairs or content.count(b"\r") != pairs


@dataclass(frozen=True)
class ReceivedInfo:
    """What RFC 5321 4.4 puts in the trace header of one hop."""

    helo: str
    client_ip: str
    hostname: str
    queue_id: str
    recipients: Sequence[str]
    received_at: float
    esmtp: bool = True
    tls: str | None = None
    smtputf8: bool = False


def protocol_name(esmtp: bool, tls: bool, smtputf8: bool) -> str:
    """The "with" keyword: RFC 3848 (ESMTP, ESMTPS) and RFC 6531 (UTF8SMTP, UTF8SMTPS)."""
    if smtputf8:
        return "UTF8SMTPS" if tls else "UTF8SMTP"
    if not esmtp:
        return "SMTP"
    return "ESMTPS" if tls else "ESMTP"


def received_header(info: ReceivedInfo) -> bytes:
    """A folded `Received:` header ending in CRLF, for the top of the message.

    The client's HELO name is untrusted text: anything that could break the header (controls,
    and non-ASCII unless the message is SMTPUTF8) is replaced by "?".
    """
    helo = _helo_name(info.helo, info.smtputf8)
    with_tls = info.tls is not None
    lines = [f"Received: from {helo} ([{_ip_literal(info.client_ip)}])"]
    by = f"by {info.hostname} ({SOFTWARE}) with "
    by += protocol_name(info.esmtp, with_tls, info.smtputf8)
    if info.tls is not None:
        by += " (" + " ".join(_clean(word, False) for word in info.tls.split()) + ")"
    lines.append(f"{by} id {info.queue_id}")
    when = _date(int(info.received_at))
    if len(info.recipients) == 1:
        rcpt = _clean(info.recipients[0], info.smtputf8)
        lines.append(f"for <{rcpt}>; {when}")
    else:
        lines[-1] += ";"
        lines.append(when)
    text = "\r\n\t".join(lines) + "\r\n"
    return text.encode("utf-8" if info.smtputf8 else "ascii")


@functools.lru_cache(maxsize=1)  # every message received within a second has the same
def _date(second: int) -> str:
    """The RFC 5322 date of a Unix second."""
    return format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def without_own_received(message: bytes, queue_id: str) -> bytes:
    """`message` as the client sent it: without the Received header `received_header` put
    on top for `queue_id` (what a message accepted under `defer` waits with in the scan
    queue). The deferred scan sends the scanners what the scan at DATA would have: the same
    octets, so that the same TIERMAIL_CLAMD_STREAM_MAX holds. Unchanged when it does not
    start with that header."""
    end = _end_of_field(message) if message.startswith(b"Received: ") else -1
    if end < 0:
        return message
    unfolded = message[:end].replace(b"\r\n", b"")
    marker = b" id " + queue_id.encode("ascii", "replace")
    at = unfolded.find(marker)
    after = unfolded[at + len(marker):at + len(marker) + 1]
    return message[end:] if at >= 0 and after in (b";", b"\t", b" ", b"") else message


def _end_of_field(message: bytes) -> int:
    """Where the header field at the start of `message` ends (after its CRLF, and after
    the folded lines that continue it); -1 when it does not end."""
    end = 0
    while True:
        end = message.find(b"\r\n", end)
        if end < 0:
            return -1
        end += 2
        if message[end:end + 1] not in (b" ", b"\t"):
            return end


def _helo_name(helo: str, allow_utf8: bool) -> str:
    """The HELO name, cleaned; an address literal ([192.0.2.1], [IPv6:2001:db8::1]: what a
    client without a DNS name sends, Thunderbird among them; RFC 5321 4.1.3) kept whole, as
    RFC 5321 4.4's Received syntax allows it."""
    # Not with a scope (fe80::1%eth0): Python takes any text after the "%", and RFC 5321's
    # IPv6 literal has none. Kept whole, `[IPv6:fe80::1%x]) by forged; date (x]` wrote its
    # own trace fields into ours, and control characters with them.
    if helo.startswith("[") and helo.endswith("]") and "%" not in helo:
        inner = helo[1:-1]
        is_ipv6 = inner[:5].upper() == "IPV6:"
        try:
            address = ipaddress.ip_address(inner[5:] if is_ipv6 else inner)
        except ValueError:
            pass
        else:
            if address.version == (6 if is_ipv6 else 4):
                return helo
    return _clean(helo, allow_utf8) or "unknown"


# What _clean keeps as it is in any case: printable ASCII but the Received syntax's specials.
_SAFE = re.compile(r'[!#-\'*-:=?-Z^-~]*')


def _ip_literal(ip: str) -> str:
    return f"IPv6:{ip}" if ":" in ip else ip


def _clean(text: str, allow_utf8: bool) -> str:
    if _SAFE.fullmatch(text):
        return text  # most names and addresses: nothing to replace
    out = []
    for char in text:
        code = ord(char)
        printable_ascii = 0x20 < code < 0x7F and char not in "()[]<>;\\\""
        utf8_ok = allow_utf8 and code > 0x7F and unicodedata.category(char)[0] not in "CZ"
        out.append(char if printable_ascii or utf8_ok else "?")
    return "".join(out)
