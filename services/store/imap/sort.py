"""IMAP SORT (RFC 5256 section 3) with DISPLAYFROM/DISPLAYTO (RFC 5957), and the pieces
THREAD shares: base subject extraction (RFC 5256 2.1) and the sent date (2.2).

Ties are broken by mailbox order (RFC 5256 3: "the order in which they appear in the
mailbox"), which a stable sort over ascending positions gives for free. Strings compare with
i;ascii-casemap (ASCII letters folded, then octets), the collation RFC 5256 requires; the
display names of RFC 5957 are compared the same way.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Sequence
from typing import Any

from services.store.imap.protocol.mime import Address, decode_words, parse_addresses
from services.store.imap.search import Headers, MessageSource, MessageView, parse_date_header
from services.store.mailbox import MessageInfo

SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO",
                       "DISPLAYFROM", "DISPLAYTO"})
HEADER_SORT_KEYS = SORT_KEYS - {"ARRIVAL", "SIZE"}

_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class BadSortCriteria(ValueError):
    """Unknown criterion, REVERSE not followed by one, or no criteria at all (answer BAD)."""


def ascii_casemap(text: str) -> bytes:
    """The i;ascii-casemap comparator key (RFC 4790 9.2)."""
    return text.translate(_ASCII_UPPER).encode("utf-8", "surrogatepass")


# Base subject (RFC 5256 2.1)

_WSP_RUN = re.compile(r"\s+")
_TRAILER = re.compile(r"(?:[ \t]|\(fwd\))+$", re.IGNORECASE)
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(rf"(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:|[ \t]+", re.IGNORECASE)
_BLOB_PREFIX = re.compile(_BLOB)


def base_subject(subject: str) -> tuple[str, bool]:
    """The base subject (already RFC 2047 decoded) and whether the subject showed it is a
    reply or forward (a Re:/Fwd: leader, a "(fwd)" trailer or a "[fwd: ...]" wrapper)."""
    text = _WSP_RUN.sub(" ", subject)  # step 1: tabs, folds and runs of spaces to one space
    reply = False
    while True:
        trimmed = _TRAILER.sub("", text)  # step 2
        if "(fwd)" in text[len(trimmed):].lower():
            reply = True
        text = trimmed
        while True:  # steps 3 to 5
            leader = _LEADER.match(text)
            if leader and leader.end():
                reply = reply or leader.group().strip() != ""
                text = text[leader.end():]
                continue
            blob = _BLOB_PREFIX.match(text)
            if blob and text[blob.end():]:
                text = text[blob.end():]
                continue
            break
        if text[:5].lower() == "[fwd:" and text.endswith("]"):  # step 6
            text, reply = text[5:-1], True
            continue
        return text, reply


# Sent date (RFC 5256 2.2)


def sent_datetime(headers: Headers, info: MessageInfo) -> float:
    """The Date header's instant (its zone taken into account; none named reads as UTC) as
    epoch seconds, or INTERNALDATE when the header is missing or cannot be parsed."""
    parsed = parse_date_header(headers.first_raw("date"))
    if parsed is None:
        return info.internaldate
    return float(calendar.timegm(parsed[:6]) - (parsed[9] or 0))


# Addresses


def first_address(headers: Headers, field: str) -> Address | None:
    """The first mailbox (not a group marker) of a field, parsed from the raw value: decoding
    first would let a decoded comma split a display name."""
    for value in headers.raw_all(field):
        for address in parse_addresses(value):
            if address.host is not None:
                return address
    return None


def mailbox_part(headers: Headers, field: str) -> str:
    """RFC 5256 addr-mailbox: the local part of the first address (empty if none)."""
    found = first_address(headers, field)
    return decode_words(found.mailbox or "") if found is not None else ""


def display_name(headers: Headers, field: str) -> str:
    """RFC 5957: the decoded display name of the first address, else its addr-spec."""
    found = first_address(headers, field)
    if found is None:
        return ""
    name = decode_words(found.name or "").strip()
    return name or decode_words(f"{found.mailbox}@{found.host}")


# SORT


async def sort(criteria: Sequence[str], positions: list[int], messages: Sequence[MessageInfo],
               source: MessageSource, *, view: MessageView | None = None) -> list[int]:
    """`positions` (a SEARCH result) ordered by the criteria, e.g. ("REVERSE", "DATE")."""
    keys = parse_criteria(criteria)
    view = view or MessageView(messages, source)
    headers: dict[int, Headers] = {}
    if any(name in HEADER_SORT_KEYS for name, _ in keys):
        headers = await view.headers(positions)
    ordered = sorted(positions)
    for name, reverse in reversed(keys):
        key_of = _key_function(name, messages, headers)
        ordered.sort(key=key_of, reverse=reverse)
    return ordered


def parse_criteria(criteria: Sequence[str]) -> list[tuple[str, bool]]:
    keys: list[tuple[str, bool]] = []
    reverse = False
    for word in criteria:
        upper = word.upper()
        if upper == "REVERSE" and not reverse:
            reverse = True
            continue
        if upper not in SORT_KEYS:
            raise BadSortCriteria(word)
        keys.append((upper, reverse))
        reverse = False
    if reverse or not keys:
        raise BadSortCriteria(" ".join(criteria))
    return keys


def _key_function(name: str, messages: Sequence[MessageInfo],
                  headers: dict[int, Headers]) -> Callable[[int], Any]:
    if name == "ARRIVAL":
        return lambda p: messages[p].internaldate
    if name == "SIZE":
        return lambda p: messages[p].size
    if name == "DATE":
        return lambda p: sent_datetime(headers[p], messages[p])
    if name == "SUBJECT":
        return lambda p: ascii_casemap(base_subject(_subject(headers[p]))[0])
    if name in ("DISPLAYFROM", "DISPLAYTO"):
        field = name[len("DISPLAY"):].lower()
        return lambda p: ascii_casemap(display_name(headers[p], field))
    field = name.lower()  # CC, FROM, TO
    return lambda p: ascii_casemap(mailbox_part(headers[p], field))


def _subject(headers: Headers) -> str:
    values = headers.get_all("subject")
    return values[0] if values else ""
