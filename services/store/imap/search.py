"""IMAP SEARCH evaluation (RFC 3501 6.4.4, RFC 7162 3.1.5 MODSEQ) over a selected mailbox.

`search` narrows a list of candidate positions key by key: cheap keys (flags, UIDs, sequence
numbers, sizes, INTERNALDATE, MODSEQ) are decided from `MessageInfo`; header keys read only
the header section of the files that are still candidates, in batches: each message's header
section is read and parsed once per command, every header key of the command is decided on
it at once, and only those answers (one bit per key) are kept, never the parsed headers;
TEXT/BODY ask the full-text index through `MessageSource.text_matches` and scan only what it
cannot answer. AND runs its cheap children first, OR evaluates its right side only on what the left
side left over, NOT only on the candidates it was given.

Strings match as case-insensitive substrings of RFC 2047-decoded text (RFC 3501 6.4.4);
dates ignore time and timezone: SENT* use the date written in the Date header, BEFORE/ON/SINCE
the INTERNALDATE's date in UTC (the zone FETCH INTERNALDATE is shown in).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
from collections.abc import Awaitable, Callable, Container, Iterator, Sequence
from typing import Protocol, TypeVar

from services.store.backends.maildb import MailDB
from services.store.backends.textindex import (
    TextIndex,
    TextIndexer,
    fold,
    message_text,
    text_contains,
)
from services.store.imap.protocol.command import SearchKey, SequenceSet
from services.store.imap.protocol.mime import parse_header_only, searchable_value
from services.store.imap.protocol.sequence import select_seqs, select_uid_positions
from services.store.mailbox import MessageInfo, NoSuchMessage

SEARCH_CHARSETS = frozenset({"UTF-8", "US-ASCII"})  # RFC 3501 6.4.4: US-ASCII is required
READ_BATCH = 256  # files read per worker-thread call
# Header octets one batch may hold, counted before the read as min(size, MAX_HEADER) per
# message (a message's size bounds its header section). Parsed, a header section takes about
# 27 times its size in Python objects; only one message's at a time is alive, so one command
# holds at most this plus one parsed MAX_HEADER section, however many messages it looks at.
HEADER_BATCH_BYTES = 8 << 20
# Messages parsed per worker-thread call when a TEXT/BODY key is scanned: between two calls
# the search lets other sessions' commands go first.
SCAN_BATCH = 16
SCAN_BYTES = 512 * 1024
HEADER_BREAKS = (b"\r\n\r\n", b"\n\n")
MAX_HEADER = 1 << 20  # a header section longer than this is cut (it is not a real one)
# Header octets of one batch parsed (and decoded for the keys) in the event loop; more go to
# a worker thread. Parsing takes about 0.4 s per MB of header fields and RFC 2047 decoding
# about 0.25 s per MB of encoded words, and a sender can write up to MAX_HEADER of them into
# each message (256 such messages stalled every session for 90 s).
PARSE_IN_LOOP_MAX = 256 * 1024
# Keys decided from the message list (flags, sizes, dates, sets) are tested in the loop; the
# loop is given a turn after this many tests (a few ms), however many keys a program has.
YIELD_AFTER_TESTS = 50_000

SYSTEM_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
ADDRESS_AND_SUBJECT = {"FROM": "from", "TO": "to", "CC": "cc", "BCC": "bcc",
                       "SUBJECT": "subject"}
HEADER_KEYS = frozenset({*ADDRESS_AND_SUBJECT, "HEADER", "SENTBEFORE", "SENTON", "SENTSINCE"})
TEXT_KEYS = frozenset({"TEXT", "BODY"})


class UnsupportedSearchKey(ValueError):
    """A key kind this module does not know (the grammar should never produce one)."""


def charset_supported(charset: str | None) -> bool:
    """For SEARCH/SORT/THREAD CHARSET: otherwise answer NO [BADCHARSET (UTF-8 US-ASCII)]."""
    return charset is None or charset.upper() in SEARCH_CHARSETS


class MessageSource(Protocol):
    """Where message contents come from (the store, or an in-memory fake in unit tests)."""

    async def raw(self, info: MessageInfo) -> bytes: ...

    async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
        """The header section of each message (up to the first empty line), in order."""
        ...

    async def text_matches(self, needle: str, field: str,
                           guids: Sequence[str]) -> set[str] | None:
        """Which of `guids` contain `needle` (case-insensitively) in `field`: "TEXT" or
        "BODY" exactly; for "HEADER" a superset (some header field contains it) the caller
        narrows down. None: no index answer (no index, or a needle too short for it)."""
        ...

    async def scan(self, needle: str, field: str, guids: Sequence[str]) -> set[str]:
        """Which of `guids` contain the folded `needle` in `field`, each message read and
        parsed (off the event loop: this is seconds of work for large multiparts)."""
        ...


class Headers:
    """Header fields of one message, looked up case-insensitively: `raw_all` as stored
    (latin-1 text, unfolded), `get_all` RFC 2047 decoded."""

    def __init__(self, block: bytes) -> None:
        self._part = parse_header_only(block)

    def raw_all(self, name: str) -> list[str]:
        return self._part.headers(name)

    def get_all(self, name: str) -> list[str]:
        return [searchable_value(value) for value in self._part.headers(name)]

    def first_raw(self, name: str) -> str | None:
        return self._part.header(name)

    def first_decoded(self, name: str) -> str | None:
        value = self._part.header(name)
        return None if value is None else searchable_value(value)


async def _no_pause() -> None:
    await asyncio.sleep(0)


T = TypeVar("T")


class MessageView:
    """What SEARCH, SORT and THREAD know about the messages of one command: the infos, and
    their header sections read in batches, each turned into the small answer the command
    needs (`extract`) and then dropped. `pause` is awaited between batches (the session's:
    other sessions' commands go first)."""

    def __init__(self, messages: Sequence[MessageInfo], source: MessageSource,
                 pause: Callable[[], Awaitable[None]] = _no_pause) -> None:
        self.messages = messages
        self.source = source
        self.pause = pause

    async def extract(self, positions: Sequence[int],
                      answer: Callable[[Headers, MessageInfo], T]) -> list[T]:
        """`answer(headers, info)` for each of `positions`, in order. `answer` runs in a
        worker thread for a large batch, so it must only read what it is given."""
        messages = self.messages
        answers: list[T] = []
        for number, batch in enumerate(header_batches(messages, positions)):
            if number:
                await self.pause()
            infos = [messages[p] for p in batch]
            blocks = await self.source.headers(infos)
            if sum(map(len, blocks)) > PARSE_IN_LOOP_MAX:
                answers += await asyncio.to_thread(_answered, blocks, infos, answer)
            else:
                answers += _answered(blocks, infos, answer)
        return answers


def header_batches(messages: Sequence[MessageInfo], positions: Sequence[int],
                   ) -> Iterator[list[int]]:
    """`positions` in batches of READ_BATCH messages or about HEADER_BATCH_BYTES of header
    sections, whichever comes first (a message's size bounds its header section)."""
    batch: list[int] = []
    size = 0
    for position in positions:
        batch.append(position)
        size += min(messages[position].size, MAX_HEADER)
        if len(batch) == READ_BATCH or size >= HEADER_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _answered(blocks: list[bytes], infos: list[MessageInfo],
              answer: Callable[[Headers, MessageInfo], T]) -> list[T]:
    # One message's parsed headers at a time: each is garbage once its answer is taken.
    return [answer(Headers(block), info) for block, info in zip(blocks, infos, strict=True)]


# The entry point


async def search(key: SearchKey, messages: Sequence[MessageInfo], source: MessageSource, *,
                 recent: Container[int], today: datetime.date | None = None,
                 view: MessageView | None = None) -> list[int]:
    """0-based positions in `messages` (ascending UIDs) of the messages matching `key`.

    `recent`: the UIDs that are \\Recent in this session (not always the newest: another
    session may have claimed some between them). `view` lets SORT and
    THREAD read headers with the same pause as the search they start with. `today` is unused
    by the RFC 3501 keys and kept for the RFC 5032 WITHIN keys (OLDER/YOUNGER) should they come.
    """
    evaluator = _Evaluator(view or MessageView(messages, source), recent, key)
    return await evaluator.run(key, list(range(len(messages))))


class _Evaluator:
    def __init__(self, view: MessageView, recent: Container[int], program: SearchKey) -> None:
        self.view = view
        self.messages = view.messages
        self.recent = recent
        self._lower_flags: dict[frozenset[str], frozenset[str]] = {}
        # TEXT/BODY by (needle, field): the positions examined and those that matched, so a
        # key repeated in one command looks up or scans each message once.
        self._text_answers: dict[tuple[str, str], tuple[set[int], set[int]]] = {}
        # Every distinct header key of the program has a bit; a message's header section,
        # once read, answers all of them, and only that bitmask is kept (by position).
        self._header_bits: dict[_LeafId, int] = {}
        self._header_tests: list[_HeaderTest] = []
        for leaf in _header_leaves(program):
            if _leaf_id(leaf) not in self._header_bits:
                self._header_bits[_leaf_id(leaf)] = len(self._header_tests)
                self._header_tests.append(_header_test(leaf))
        self._header_answers: dict[int, int] = {}
        # SEQ and UID sets by their text: a set repeated in one command is resolved once.
        self._chosen: dict[tuple[str, object], set[int]] = {}
        self._tested = 0  # candidates tested since the loop last had a turn

    async def run(self, key: SearchKey, candidates: list[int]) -> list[int]:
        if not candidates:
            return []
        kind = key.kind
        if kind == "AND":
            for child in sorted(key.children, key=_cost):
                candidates = await self.run(child, candidates)
                if not candidates:
                    break
            return candidates
        if kind == "OR":
            left, right = key.children
            first = await self.run(left, candidates)
            taken = set(first)
            second = await self.run(right, [p for p in candidates if p not in taken])
            return sorted(first + second)
        if kind == "NOT":
            excluded = set(await self.run(key.children[0], candidates))
            return [p for p in candidates if p not in excluded]
        if kind in HEADER_KEYS:
            return await self._header_key(key, candidates)
        if kind in TEXT_KEYS:
            return await self._text_key(str(key.value), kind, candidates)
        test = self._cheap(key)
        messages = self.messages
        matched = [p for p in candidates if test(p, messages[p])]
        self._tested += len(candidates)
        if self._tested >= YIELD_AFTER_TESTS:
            # A program of many keys over a large mailbox is millions of tests: other
            # sessions get the loop between keys (found in review: 14 s held by one SEARCH).
            self._tested = 0
            await self.view.pause()
        return matched

    # Keys decided from MessageInfo

    def _cheap(self, key: SearchKey) -> Callable[[int, MessageInfo], bool]:
        kind = key.kind
        if kind in SYSTEM_FLAG_KEYS:
            flag, wanted = SYSTEM_FLAG_KEYS[kind]
            return lambda _, info: (flag in info.flags) is wanted
        if kind == "ALL":
            return lambda _, info: True
        if kind in ("KEYWORD", "UNKEYWORD"):
            keyword, wanted = str(key.value).lower(), kind == "KEYWORD"
            return lambda _, info: (keyword in self._folded_flags(info.flags)) is wanted
        recent = self.recent
        if kind == "RECENT":
            return lambda _, info: info.uid in recent
        if kind == "OLD":
            return lambda _, info: info.uid not in recent
        if kind == "NEW":
            return lambda _, info: info.uid in recent and "\\Seen" not in info.flags
        if kind in ("LARGER", "SMALLER", "MODSEQ"):
            return _number_test(kind, _int(key.value))
        if kind in ("BEFORE", "ON", "SINCE"):
            when = _date(key.value)
            return lambda _, info: _compare(kind, internal_date(info), when)
        if kind in ("SEQ", "UID"):
            chosen = self._chosen_positions(kind, key.value)
            return lambda position, _: position in chosen
        raise UnsupportedSearchKey(kind)

    def _chosen_positions(self, kind: str, value: object) -> set[int]:
        chosen = self._chosen.get((kind, value))
        if chosen is None:
            if kind == "SEQ":
                chosen = {n - 1 for n in select_seqs(_seqset(value), len(self.messages))}
            else:
                uids = [info.uid for info in self.messages]
                chosen = set(select_uid_positions(_seqset(value), uids))
            self._chosen[(kind, value)] = chosen
        return chosen

    def _folded_flags(self, flags: frozenset[str]) -> frozenset[str]:
        folded = self._lower_flags.get(flags)
        if folded is None:
            folded = self._lower_flags[flags] = frozenset(f.lower() for f in flags)
        return folded

    # Keys on header fields

    async def _header_key(self, key: SearchKey, candidates: list[int]) -> list[int]:
        if not key.kind.startswith("SENT"):
            needle = fold(str(key.value))
            if needle:
                candidates = await self._text_prefilter(needle, candidates)
        await self._read_headers(candidates)
        bit = 1 << self._header_bits[_leaf_id(key)]
        answers = self._header_answers
        return [p for p in candidates if answers[p] & bit]

    async def _text_prefilter(self, needle: str, candidates: list[int]) -> list[int]:
        """Messages whose header text contains the needle at all: every match is one."""
        guids = _guids(self.messages, candidates)
        hits = await self.view.source.text_matches(needle, "HEADER", guids)
        if hits is None:
            return candidates
        return [p for p, guid in zip(candidates, guids, strict=True) if guid in hits]

    async def _read_headers(self, candidates: list[int]) -> None:
        answers = self._header_answers
        new = [p for p in candidates if p not in answers]
        if new:
            found = await self.view.extract(new, self._all_header_keys)
            answers.update(zip(new, found, strict=True))

    def _all_header_keys(self, headers: Headers, info: MessageInfo) -> int:
        """The answers of every header key on one message, as a bitmask (runs in a worker
        thread for large batches)."""
        fields = _FoldedFields(headers)
        bits = 0
        for number, test in enumerate(self._header_tests):
            if test(fields, info):
                bits |= 1 << number
        return bits

    # TEXT and BODY

    async def _text_key(self, value: str, field: str, candidates: list[int]) -> list[int]:
        needle = fold(value)
        if not needle:
            return candidates
        examined, matched = self._text_answers.setdefault((needle, field), (set(), set()))
        new = [p for p in candidates if p not in examined]
        if new:
            matched.update(await self._text_lookup(value, field, new))
            examined.update(new)
        return [p for p in candidates if p in matched]

    async def _text_lookup(self, value: str, field: str, candidates: list[int]) -> list[int]:
        guids = _guids(self.messages, candidates)
        hits = await self.view.source.text_matches(value, field, guids)
        if hits is not None:
            return [p for p, guid in zip(candidates, guids, strict=True) if guid in hits]
        return await self._scan(fold(value), field, candidates)

    async def _scan(self, needle: str, field: str, candidates: list[int]) -> list[int]:
        """Without the index (a needle under MIN_NEEDLE characters): every message read and
        parsed, in a worker thread, a few at a time with a pause between (a mailbox of large
        multiparts takes seconds: the other sessions go on meanwhile)."""
        messages, source = self.messages, self.view.source
        found: list[int] = []
        for number, chunk in enumerate(_scan_batches(messages, candidates)):
            if number:
                await self.view.pause()
            hits = await source.scan(needle, field, _guids(messages, chunk))
            found.extend(p for p in chunk if messages[p].guid in hits)
        return found


# Header keys


_LeafId = tuple[str, str | None, object]
_HeaderTest = Callable[["_FoldedFields", MessageInfo], bool]


class _FoldedFields:
    """One message's header fields, each name's values decoded and folded once (several keys
    may ask for the same field)."""

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        self._folded: dict[str, list[str]] = {}

    def folded(self, name: str) -> list[str]:
        lower = name.lower()
        found = self._folded.get(lower)
        if found is None:
            found = self._folded[lower] = [fold(v) for v in self.headers.get_all(lower)]
        return found


def _header_leaves(key: SearchKey) -> Iterator[SearchKey]:
    stack = [key]
    while stack:
        node = stack.pop()
        if node.kind in HEADER_KEYS:
            yield node
        stack.extend(node.children)


def _leaf_id(key: SearchKey) -> _LeafId:
    if key.kind.startswith("SENT"):
        return key.kind, None, key.value
    name = key.name if key.kind == "HEADER" else ADDRESS_AND_SUBJECT[key.kind]
    assert name is not None, "HEADER without a field name"
    return "STRING", name.lower(), fold(str(key.value))


def _header_test(key: SearchKey) -> _HeaderTest:
    kind, name, value = _leaf_id(key)
    if name is None:
        relation, when = kind[len("SENT"):], _date(value)
        return lambda fields, info: _compare(
            relation, sent_date(fields.headers.first_raw("date"), info), when)
    needle = str(value)
    return lambda fields, _: any(needle in v for v in fields.folded(name))


# Values and small helpers


def _scan_batches(messages: Sequence[MessageInfo], candidates: list[int]) -> Iterator[list[int]]:
    """`candidates` in batches of SCAN_BATCH messages or SCAN_BYTES octets, whichever comes
    first (a large message is a batch of its own)."""
    batch: list[int] = []
    size = 0
    for position in candidates:
        batch.append(position)
        size += messages[position].size
        if len(batch) == SCAN_BATCH or size >= SCAN_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cost(key: SearchKey) -> int:
    """0: decided from MessageInfo; 1: needs header sections; 2: needs text (index or scan)."""
    if key.kind in TEXT_KEYS:
        return 2
    if key.kind in HEADER_KEYS:
        return 1
    return max((_cost(child) for child in key.children), default=0)


def _guids(messages: Sequence[MessageInfo], positions: list[int]) -> list[str]:
    if len(positions) == len(messages):  # every message: skip the indexing (100k: 7 ms)
        return [info.guid for info in messages]
    return [messages[p].guid for p in positions]


def _int(value: object) -> int:
    assert isinstance(value, int), f"expected a number, got {value!r}"
    return value


def _date(value: object) -> datetime.date:
    assert isinstance(value, datetime.date), f"expected a date, got {value!r}"
    return value


def _seqset(value: object) -> SequenceSet:
    assert isinstance(value, SequenceSet), f"expected a sequence set, got {value!r}"
    return value


def _number_test(kind: str, number: int) -> Callable[[int, MessageInfo], bool]:
    if kind == "LARGER":
        return lambda _, info: info.size > number
    if kind == "SMALLER":
        return lambda _, info: info.size < number
    return lambda _, info: info.modseq >= number  # MODSEQ (RFC 7162 3.1.5)


def _compare(relation: str, date: datetime.date, when: datetime.date) -> bool:
    if relation == "BEFORE":
        return date < when
    if relation == "ON":
        return date == when
    return date >= when  # SINCE


def internal_date(info: MessageInfo) -> datetime.date:
    return datetime.datetime.fromtimestamp(info.internaldate, datetime.UTC).date()


# email.utils.parsedate_tz's answer: year, month, day, hour, minute, second, 3 unused, and
# the zone's offset in seconds (None when the header names no zone).
DateFields = tuple[int, int, int, int, int, int, int, int, int, int | None]


def parse_date_header(value: str | None) -> DateFields | None:
    """A Date header as email.utils.parsedate_tz reads it, or None when it cannot be read or
    names no real instant (31 Feb, 25:61): SEARCH SENT* and SORT DATE then use the
    INTERNALDATE (RFC 5256 2.2), and both must agree on which headers those are."""
    parsed = email.utils.parsedate_tz(value) if value else None
    if parsed is None:
        return None
    try:  # the leap second, 60, is a real second
        datetime.datetime(*parsed[:5], min(parsed[5], 59))
    except (ValueError, OverflowError):
        return None
    return parsed


def sent_date(value: str | None, info: MessageInfo) -> datetime.date:
    """The date written in a Date header (its own zone); INTERNALDATE's if absent or bad."""
    parsed = parse_date_header(value)
    if parsed is None:
        return internal_date(info)
    return datetime.date(parsed[0], parsed[1], parsed[2])


# The store-backed source


class StoreMessageSource:
    """Message contents from a MailDB, TEXT/BODY answered by the user's TextIndex.

    Messages the index has not reached yet (delivered moments ago, or the indexer is behind)
    are scanned, and handed to the indexer when there is one, so results never depend on it.
    """

    def __init__(self, maildb: MailDB, text_index: TextIndex | None, user: str, *,
                 indexer: TextIndexer | None = None) -> None:
        self._maildb = maildb
        self._index = text_index
        self._user = user
        self._indexer = indexer

    async def raw(self, info: MessageInfo) -> bytes:
        return await asyncio.to_thread(self._read, info.guid, None)

    async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
        return await asyncio.to_thread(
            lambda: [self._read(info.guid, MAX_HEADER) for info in infos])

    async def text_matches(self, needle: str, field: str,
                           guids: Sequence[str]) -> set[str] | None:
        index = self._index
        if index is None:
            return None
        hits, indexed = await asyncio.to_thread(index.lookup, self._user, needle, field)
        if hits is None:
            return None
        # issuperset first: the usual case (nothing missing) in one C loop.
        missing = [] if indexed.issuperset(guids) else [g for g in guids if g not in indexed]
        found = hits.intersection(guids)
        if missing:
            if self._indexer is not None:
                self._indexer.request(self._user, missing)
            found |= await self.scan(fold(needle), field, missing)
        return found

    async def scan(self, needle: str, field: str, guids: Sequence[str]) -> set[str]:
        return await asyncio.to_thread(self._scan, needle, field, guids)

    def _scan(self, needle: str, field: str, guids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for guid in guids:
            header_only = field == "HEADER"
            raw = self._read(guid, MAX_HEADER if header_only else None)
            if text_contains(message_text(raw, with_body=not header_only), needle, field):
                found.add(guid)
        return found

    def _read(self, guid: str, limit: int | None) -> bytes:
        """The file's bytes, or only its header section when `limit` is given. An expunged
        message (gone since the session's view was taken) reads as empty."""
        try:
            with self._maildb.open_message(self._user, guid) as file:
                if limit is None:
                    return file.read()
                return read_header(file.read, limit)
        except NoSuchMessage:
            return b""


def read_header(read: Callable[[int], bytes], limit: int = MAX_HEADER) -> bytes:
    """The start of a stored message up to (at least) the blank line after its header, read in
    8 KiB steps; at most about `limit` octets (FETCH ENVELOPE and header SEARCH keys need no
    more, and a 25 MB body is never read for them)."""
    data = b""
    while len(data) < limit:
        chunk = read(8192)
        if not chunk:
            break
        data += chunk
        # Look only near the new chunk (a separator may straddle the boundary).
        tail = data[-(len(chunk) + 3):]
        if any(sep in tail for sep in HEADER_BREAKS):
            break
    return data
