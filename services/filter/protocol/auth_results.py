"""Authentication-Results fields that arrive claiming to be ours, removed (RFC 8601 section 5).

A mail client that trusts our Authentication-Results (`dmarc=pass` shown as a verified
sender) trusts them by their authserv-id. A sender could write such a field in our name into
the message itself, so a receiver "MUST delete any discovered instance of this header field
that claims, by virtue of its authentication service identifier, to have been added within
its trust boundary". Ours is our host name and the domains we take mail for: a field whose
authserv-id is one of those, or a host under one of them, is removed from the header section
before anything else sees the message; fields of other ADMDs stay.

Pure bytes in, bytes out. A message without the field (nearly all) costs one search of its
header section.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from common.directory import normalize_domain
from common.rfc5322 import read_comment, read_quoted
from services.filter.protocol.message import header_section_end

_FIELD = re.compile(rb"^Authentication-Results[ \t]*:", re.IGNORECASE | re.MULTILINE)
_TOKEN = re.compile(r'[^\s;()"]*')  # RFC 2045 `value` as a token, loosely
# The rest of a field from inside its first line: that line, its continuation lines (they
# start with a space or a tab) and the last line end. Matched in C: a field of millions of
# continuation lines, walked a line at a time in Python, held the filter for seconds.
_REST_OF_FIELD = re.compile(rb"[^\n]*(?:\n[ \t][^\n]*)*\n?")
# An authserv-id is looked for this far into a value (past its leading white space): only
# comments could come before it, and nobody writes kilobytes of those.
_ID_WITHIN = 4096


def without_claimed_results(content: bytes, claimed: Callable[[str], bool],
                            limit: int | None = None) -> tuple[bytes, int]:
    """`content` without the Authentication-Results fields of its header section whose
    authserv-id (lower case) `claimed` says is ours, and how many were removed."""
    return without_fields(content, _FIELD, lambda value: claimed(authserv_id_of(value)), limit)


def without_fields(content: bytes, field: re.Pattern[bytes], drop: Callable[[bytes], bool],
                   limit: int | None = None) -> tuple[bytes, int]:
    """`content` without the fields of its header section that `field` (a pattern of the
    name and colon at a line start) finds and `drop` says to remove, given the value
    (continuation lines included), and how many were removed. `limit`: where the header
    section ends (header_section_end), when the caller has it."""
    limit = header_section_end(content) if limit is None else limit
    match = field.search(content, 0, limit)
    if match is None:
        return content, 0
    parts: list[bytes] = []
    start = removed = 0
    while match is not None:
        end = _field_end(content, match.end(), limit)
        if drop(content[match.end():end]):
            parts.append(content[start:match.start()])
            start = end
            removed += 1
        match = field.search(content, end, limit)
    if not removed:
        return content, 0
    parts.append(content[start:])
    return b"".join(parts), removed


def claimed_by(hostname_id: str, domains: Iterable[str]) -> Callable[[str], bool]:
    """Whether an authserv-id is within our trust boundary: our own (`hostname_id`), or one
    of `domains` (those we take this message for) or a host under one; names compared as
    the directory stores domains (normalize_domain: lower case, A-labels)."""
    domains = tuple(domains)

    def claimed(identifier: str) -> bool:  # asked only when such a field is there: rarely
        if not identifier:
            return False
        names = {normalize_domain(name) for name in (hostname_id, *domains)}
        identifier = normalize_domain(identifier)
        return identifier in names or identifier.endswith(tuple("." + name for name in names))
    return claimed


def authserv_id_of(value: bytes) -> str:
    """The authserv-id a field value starts with (RFC 8601 section 2.2: after optional CFWS,
    a token or a quoted string), lower case and without a trailing dot; "" if none."""
    text = value.lstrip(b" \t\r\n")[:_ID_WITHIN].decode("utf-8", "replace")
    i = 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "(":
            i, _ = read_comment(text, i)
        else:
            break
    if text.startswith('"', i):
        _, identifier = read_quoted(text, i)
    else:
        match = _TOKEN.match(text, i)
        identifier = match.group() if match else ""
    return identifier.strip().rstrip(".").lower()


def _field_end(content: bytes, position: int, limit: int) -> int:
    """Where the field running on at `position` ends: after the line end of its last line
    (continuation lines start with a space or a tab)."""
    match = _REST_OF_FIELD.match(content, position, limit)
    assert match is not None  # the pattern matches the empty string too
    return match.end()
