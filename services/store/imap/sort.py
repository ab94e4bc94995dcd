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

# Characters of a string sort key (base subject, mailbox, display name) kept: RFC 5322 2.1.1
# asks for lines under 78 characters and allows at most 998, so no realistic subject or name
# reaches this, and two that agree on their first 4096 characters sort as equal (mailbox
# order, as for any tie). Without the cut a 1 MiB hostile Subject is a 1 MiB key per message.
SORT_STRING_MAX = 4096

_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class BadSortCriteria(ValueError):
    """Unknown criterion, REVERSE not followed by one, or no criteria at all (answer BAD)."""


def ascii_casemap(text: str) -> bytes:
    """The i;ascii-casemap comparator key (RFC 4790 9.2)."""
    return text.translate(_ASCII_UPPER).encode("utf-8", "surrogatepass")


# Base subject (RFC 5256 2.1)

_WSP_RUN = re.compile(r"\s+")
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(rf"(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:|[ \t]+", re.IGNORECASE)
_BLOB_PREFIX = re.compile(_BLOB)
_FWD_TRAILER = "(fwd)"
_FWD_WRAPPER = "[fwd:"


def base_subject(subject: str) -> tuple[str, bool]:
    """The base subject (already RFC 2047 decoded) and whether the subject showed it is a
    reply or forward (a Re:/Fwd: leader, a "(fwd)" trailer or a "[fwd: ...]" wrapper).

    The subject comes from whoever sent the mail: the steps move two ends through it
    instead of cutting it anew each time, and every step takes time linear in what it
    removes, so a long hostile subject cannot make SORT or THREAD quadratic."""
    text = _WSP_RUN.sub(" ", subject)  # step 1: tabs, folds and runs of spaces to one space
    start, end, reply = 0, len(text), False
    while True:
        end, forwarded = _trailer_removed(text, start, end)  # step 2
        start, replied = _leaders_removed(text, start, end)  # steps 3 to 5
        reply = reply or forwarded or replied
        if text[start:start + 5].lower() == _FWD_WRAPPER and text[end - 1] == "]":  # step 6
            start, end, reply = start + 5, end - 1, True
            continue
        return text[start:end], reply


def _trailer_removed(text: str, start: int, end: int) -> tuple[int, bool]:
    """Step 2: the end without trailing spaces and "(fwd)"s, and whether one was there."""
    forwarded = False
    while end > start:
        if text[end - 1] == " ":
            end -= 1
        elif end - start >= 5 and text[end - 5:end].lower() == _FWD_TRAILER:
            end, forwarded = end - 5, True
        else:
            break
    return end, forwarded


def _leaders_removed(text: str, start: int, end: int) -> tuple[int, bool]:
    """Steps 3 to 5: the start past every subj-leader and every subj-blob that leaves
    something behind, and whether a leader was a Re:/Fwd:."""
    replied = False
    in_failed_run = False
    while True:
        if not in_failed_run:
            leader = _LEADER.match(text, start, end)
            if leader and leader.end() > start:
                replied = replied or leader.group().strip() != ""
                start = leader.end()
                continue
        blob = _BLOB_PREFIX.match(text, start, end)
        if blob is None or blob.end() == end:
            return start, replied
        start = blob.end()
        # The leader just failed at the start of this run of blobs: it scanned the whole run
        # and found no Re:/Fwd: behind it. From any later blob of the run it would scan to the
        # same place and fail again; trying it at each would make the run's removal quadratic.
        in_failed_run = True


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
    """`positions` (a SEARCH result) ordered by the criteria, e.g. ("REVERSE", "DATE").
    Each message's header keys are taken batch by batch: only the keys are kept."""
    keys = parse_criteria(criteria)
    view = view or MessageView(messages, source)
    from_headers = list(dict.fromkeys(name for name, _ in keys if name in HEADER_SORT_KEYS))
    columns: dict[str, dict[int, Any]] = {}
    if from_headers:
        rows = await view.extract(
            positions, lambda headers, info: [header_sort_key(name, headers, info)
                                              for name in from_headers])
        for column, name in enumerate(from_headers):
            columns[name] = {p: row[column] for p, row in zip(positions, rows, strict=True)}
    ordered = sorted(positions)
    for name, reverse in reversed(_deciding(keys)):
        ordered.sort(key=_key_function(name, messages, columns), reverse=reverse)
        await view.pause()  # one sort of the whole result at a time: others go on between
    return ordered


def _deciding(keys: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The criteria that can decide an order: a key met again later (reversed or not) only
    compares messages that the first one found equal, and finds them equal again. A
    client's thousands of repeats were a full sort each (found in review)."""
    seen: set[str] = set()
    deciding = []
    for name, reverse in keys:
        if name not in seen:
            seen.add(name)
            deciding.append((name, reverse))
    return deciding


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
                  columns: dict[str, dict[int, Any]]) -> Callable[[int], Any]:
    if name == "ARRIVAL":
        return lambda p: messages[p].internaldate
    if name == "SIZE":
        return lambda p: messages[p].size
    return columns[name].__getitem__


def header_sort_key(name: str, headers: Headers, info: MessageInfo) -> float | bytes:
    """The sort key of one message for a criterion taken from its header."""
    if name == "DATE":
        return sent_datetime(headers, info)
    if name == "SUBJECT":
        text = base_subject(first_subject(headers))[0]
    elif name in ("DISPLAYFROM", "DISPLAYTO"):
        text = display_name(headers, name[len("DISPLAY"):].lower())
    else:  # CC, FROM, TO
        text = mailbox_part(headers, name.lower())
    return ascii_casemap(text[:SORT_STRING_MAX])


def first_subject(headers: Headers) -> str:
    """The first Subject field, RFC 2047 decoded (only that one is decoded)."""
    return headers.first_decoded("subject") or ""
