"""FETCH responses (RFC 3501 6.4.5 and 7.4.2, RFC 7162 MODSEQ). Pure: no asyncio, no I/O.

The session resolves the sequence set, reads the stored message when `needs_body` says so,
and calls `render_fetch` once per message; the message is parsed at most once per call. For a
large message whose items need no parsing (`streamable`: the whole message or a partial of
it, metadata, cached structure) or whose long runs are better sent from the file,
`render_pieces` gives the response with `Span`s where the stored octets go, which the session
sends from the file a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import cast

from services.store.imap.protocol import mime, wire
from services.store.imap.protocol.command import FetchAtt, Section
from services.store.mailbox import MessageInfo

# Items answered from MessageInfo alone; every other item needs the stored message.
_METADATA_ITEMS = frozenset({"FLAGS", "INTERNALDATE", "RFC822.SIZE", "UID", "MODSEQ"})
# RFC 3501 6.4.5: these set \Seen; BODY.PEEK and RFC822.HEADER do not.
_SEEN_ITEMS = frozenset({"RFC822", "RFC822.TEXT"})
# Sections of the top-level message that need only its header, not the MIME tree.
_ROOT_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"})
# Items answered from the top-level header alone (what a mail list view asks for).
_HEADER_ITEMS = frozenset({"ENVELOPE", "RFC822.HEADER"})
_HEADER_SECTIONS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})
# Items computed by parsing the message, small enough to keep in the session-shared cache.
CACHEABLE_ITEMS = frozenset({"ENVELOPE", "BODY", "BODYSTRUCTURE"})


def needs_body(atts: Sequence[FetchAtt]) -> bool:
    """Whether answering these items needs the stored message bytes."""
    return any(att.name not in _METADATA_ITEMS for att in atts)


def needs_header_only(atts: Sequence[FetchAtt]) -> bool:
    """Whether the message's header section is all these items need: then the session reads
    the stored file only up to the blank line after the header."""
    return needs_body(atts) and all(
        att.name in _METADATA_ITEMS or att.name in _HEADER_ITEMS
        or (att.name == "BODY[]" and att.section is not None and not att.section.part
            and att.section.text in _HEADER_SECTIONS)
        for att in atts)


def cacheable(atts: Sequence[FetchAtt]) -> tuple[str, ...]:
    """The names of the cacheable items asked for, without duplicates."""
    return tuple(dict.fromkeys(att.name for att in atts if att.name in CACHEABLE_ITEMS))


def needs_only_cacheable(atts: Sequence[FetchAtt]) -> bool:
    """Whether every item that needs the message is cacheable: with all of them cached, the
    session need not read the message at all."""
    return all(att.name in _METADATA_ITEMS or att.name in CACHEABLE_ITEMS for att in atts)


def derive(names: Sequence[str], raw: bytes) -> dict[str, bytes]:
    """The values of cacheable items (e.g. the envelope's parenthesised list) for one message,
    parsing it at most once."""
    message = _Message(raw)
    return {name: _derived(name, message) for name in names}


def _derived(name: str, message: _Message) -> bytes:
    if name == "ENVELOPE":
        return mime.envelope(message.header)  # the top header is all it needs
    return mime.bodystructure(message.root, extended=name == "BODYSTRUCTURE")


def streamable(atts: Sequence[FetchAtt], derived: Container[str]) -> bool:
    """Whether these items can be answered without the message in memory: each one is
    metadata, a structure item found in `derived`, or the whole message (or a partial of it),
    which is sent straight from the stored file."""
    return all(att.name in _METADATA_ITEMS or att.name in derived or att.name == "RFC822"
               or _is_whole_message(att) for att in atts)


def _is_whole_message(att: FetchAtt) -> bool:
    section = att.section
    return att.name == "BODY[]" and (section is None or (not section.part and section.text is None))


def sets_seen(atts: Sequence[FetchAtt]) -> bool:
    """Whether fetching these items sets \\Seen (the session stores it unless read-only)."""
    return any(att.name in _SEEN_ITEMS or (att.name == "BODY[]" and not att.peek) for att in atts)


def section_spec(sect: Section) -> bytes:
    """The section as echoed in the response, e.g. b"1.2.HEADER.FIELDS (FROM TO)"."""
    pieces = [b"%d" % n for n in sect.part]
    if sect.text is not None:
        text = sect.text.encode("ascii")
        if sect.text.startswith("HEADER.FIELDS"):
            text += b" (" + b" ".join(wire.astring(f) for f in sect.fields) + b")"
        pieces.append(text)
    return b".".join(pieces)


@dataclass(frozen=True, slots=True)
class Span:
    """Octets `start` to `start + length` of the stored message, to be sent from its file
    through `wire.literal_octets`."""

    start: int
    length: int


Piece = bytes | Span


class _Message:
    """The stored message with its structure parsed on first use (at most once). With
    `spans_over`, a run of its octets longer than that is given as a Span, not copied."""

    def __init__(self, raw: bytes, spans_over: int | None = None) -> None:
        self.raw = raw
        self.size = len(raw)
        self._spans_over = spans_over
        self._root: mime.Part | None = None
        self._header: mime.Part | None = None

    def octets(self, start: int, count: int) -> Piece:
        """`count` octets from `start` (fewer at the end of the message)."""
        start = min(start, self.size)
        return self._run(start, min(start + count, self.size))

    def _run(self, start: int, end: int) -> Piece:
        if self._spans_over is not None and end - start > self._spans_over:
            return Span(start, end - start)
        return self.raw[start:end]

    @property
    def root(self) -> mime.Part:
        if self._root is None:
            self._root = mime.parse_message(self.raw)
        return self._root

    @property
    def header(self) -> mime.Part:
        """The top-level part; its header is parsed without walking a (large) body."""
        if self._root is not None:
            return self._root
        if self._header is None:
            self._header = mime.parse_header_only(self.raw)
        return self._header

    def section(self, sect: Section, partial: tuple[int, int] | None = None) -> Piece:
        """BODY[<section>]<partial>. A part that does not exist reads as empty, as most
        servers answer."""
        tree = self.header if not sect.part and sect.text in _ROOT_TEXTS else self.root
        if not mime.is_range(sect):
            return _partial(mime.section(self.raw, tree, sect) or b"", partial)
        where = mime.section_range(tree, sect)
        if where is None:
            return b""
        start, end = where
        if partial is not None:
            origin, count = partial
            start = min(start + origin, end)
            end = min(start + count, end)
        return self._run(start, end)


class _Unread(_Message):
    """A stored message that is not in memory: only its size is known, and only the octets
    of the whole message can be asked for (as Spans). `streamable` admits no other item."""

    def __init__(self, size: int) -> None:
        super().__init__(b"")
        self.size = size

    def _run(self, start: int, end: int) -> Piece:
        return Span(start, end - start)


def _partial(data: bytes, partial: tuple[int, int] | None) -> bytes:
    if partial is None:
        return data
    origin, count = partial
    return data[origin : origin + count]


def _literal(name: bytes, data: Piece) -> list[Piece]:
    """`name {n}` CRLF and the octets; a Span's octets go through `wire.literal_octets` as
    the session sends them."""
    if isinstance(data, bytes):
        return [name + b" {%d}\r\n" % len(data), wire.literal_octets(data)]
    return [name + b" {%d}\r\n" % data.length, data]


def _body_item(att: FetchAtt, message: _Message) -> bytes | list[Piece]:
    sect = att.section or Section()
    whole = not sect.part and sect.text is None
    if att.partial is None and whole:
        return _literal(b"BODY[]", message.octets(0, message.size))
    name = b"BODY[" + section_spec(sect) + b"]"
    if att.partial is not None:
        name += b"<%d>" % att.partial[0]  # RFC 3501 7.4.2: only the origin is echoed
        if whole:
            return _literal(name, message.octets(*att.partial))
    return _literal(name, message.section(sect, att.partial))


def _item(
    att: FetchAtt,
    info: MessageInfo,
    message: _Message,
    extra_flags: frozenset[str],
    derived: Mapping[str, bytes],
) -> bytes | list[Piece] | None:
    name = att.name
    if name in derived:
        return name.encode("ascii") + b" " + derived[name]
    if name == "FLAGS":
        return b"FLAGS " + wire.flag_list(info.flags | extra_flags)
    if name == "UID":
        return b"UID %d" % info.uid
    if name == "MODSEQ":
        return b"MODSEQ (%d)" % info.modseq
    if name == "INTERNALDATE":
        return b"INTERNALDATE " + wire.internaldate(info.internaldate)
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % info.size
    if name == "RFC822":
        return _literal(b"RFC822", message.octets(0, message.size))
    if name == "RFC822.HEADER":
        return _literal(b"RFC822.HEADER", message.section(Section(text="HEADER")))
    if name == "RFC822.TEXT":
        return _literal(b"RFC822.TEXT", message.section(Section(text="TEXT")))
    if name in CACHEABLE_ITEMS:
        return name.encode("ascii") + b" " + _derived(name, message)
    if name == "BODY[]":
        return _body_item(att, message)
    return None  # the grammar only produces the items above


def render_fetch(
    seq: int,
    info: MessageInfo,
    atts: Sequence[FetchAtt],
    raw: bytes | None,
    *,
    extra_flags: frozenset[str] = frozenset(),
    include_uid: bool = False,
    include_modseq: bool = False,
    derived: Mapping[str, bytes] | None = None,
) -> bytes:
    """The whole `* <seq> FETCH (...)` response line, CRLF included, literals inline.

    `raw` may be None when `needs_body(atts)` is false, or when `derived` (the values of
    cacheable items, from `derive` or a cache) holds every item that needs the message.
    `extra_flags` are session flags such as \\Recent. UID (UID FETCH, RFC 3501 6.4.8) and
    MODSEQ (CONDSTORE, RFC 7162 3.1.4.1) are put first when the session must include them and
    they were not asked for."""
    message = _Message(raw if raw is not None else b"")
    pieces = _pieces(seq, info, atts, message, extra_flags, include_uid, include_modseq,
                     derived or {})
    return b"".join(cast(list[bytes], pieces))  # a message in memory gives no Span


def render_pieces(
    seq: int,
    info: MessageInfo,
    atts: Sequence[FetchAtt],
    stored: int | bytes,
    *,
    spans_over: int = 0,
    extra_flags: frozenset[str] = frozenset(),
    include_uid: bool = False,
    include_modseq: bool = False,
    derived: Mapping[str, bytes] | None = None,
) -> list[Piece]:
    """The response `render_fetch` gives, with Spans where octets of the stored message go,
    so that the caller sends them from the file. `stored` is the message's size when it was
    not read (only for `streamable` items: every run is a Span), or the message itself (a
    run longer than `spans_over`, such as a large part or its TEXT, is a Span, and the
    caller can let the message go)."""
    message = _Unread(stored) if isinstance(stored, int) else _Message(stored, spans_over)
    return _merged(_pieces(seq, info, atts, message, extra_flags, include_uid,
                           include_modseq, derived or {}))


def _pieces(seq: int, info: MessageInfo, atts: Sequence[FetchAtt], message: _Message,
            extra_flags: frozenset[str], include_uid: bool, include_modseq: bool,
            derived: Mapping[str, bytes]) -> list[Piece]:
    names = {att.name for att in atts}
    implicit = _implicit(names, include_uid=include_uid, include_modseq=include_modseq)
    pieces: list[Piece] = [b"* %d FETCH (" % seq]
    seen: set[FetchAtt] = set()
    for att in (*(FetchAtt(name) for name in implicit), *atts):
        if att in seen:
            continue
        seen.add(att)
        item = _item(att, info, message, extra_flags, derived)
        if item is None:
            continue
        if len(pieces) > 1:
            pieces.append(b" ")
        if isinstance(item, bytes):
            pieces.append(item)
        else:
            pieces.extend(item)
    pieces.append(b")\r\n")
    return pieces


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent bytes joined: the pieces alternate between bytes and Spans."""
    out: list[Piece] = []
    run: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            run.append(piece)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(b"".join(run))
    return out


def _implicit(names: set[str], *, include_uid: bool, include_modseq: bool) -> list[str]:
    implicit = []
    if include_uid and "UID" not in names:
        implicit.append("UID")
    if include_modseq and "MODSEQ" not in names:
        implicit.append("MODSEQ")
    return implicit


# The metadata fast path: each item as a %-format piece and the index of its value in the row
# that `MetadataRenderer.__call__` builds.
_METADATA_FORMATS = {
    "UID": (b"UID %d", 1),
    "FLAGS": (b"FLAGS %b", 2),
    "MODSEQ": (b"MODSEQ (%d)", 3),
    "INTERNALDATE": (b"INTERNALDATE %b", 4),
    "RFC822.SIZE": (b"RFC822.SIZE %d", 5),
}


class MetadataRenderer:
    """Renders FETCH lines of metadata-only items (UID FETCH 1:* FLAGS, what a client syncs
    with) exactly as `render_fetch` does, but with one %-format per message instead of one call
    per item, and each distinct flag list formatted once."""

    def __init__(self, atts: Sequence[FetchAtt], *, include_uid: bool = False,
                 include_modseq: bool = False) -> None:
        names = [att.name for att in atts]
        order = list(dict.fromkeys([*_implicit(set(names), include_uid=include_uid,
                                                 include_modseq=include_modseq), *names]))
        self._template = (b"* %d FETCH (" + b" ".join(_METADATA_FORMATS[n][0] for n in order)
                          + b")\r\n")
        self._pick: Callable[[tuple[object, ...]], object] = itemgetter(
            0, *(_METADATA_FORMATS[n][1] for n in order))
        self._flags = "FLAGS" in order
        self._date = "INTERNALDATE" in order
        self._flag_lists: dict[tuple[frozenset[str], frozenset[str]], bytes] = {}
        # The `(UID FLAGS)` path's: keyed by the flags, or by (flags, recent) for \Recent ones.
        self._flag_texts: dict[frozenset[str] | tuple[frozenset[str], frozenset[str]], str] = {}
        # `(UID FLAGS)`, what clients sync with: formatted from (seq, uid, flags) directly.
        self._uid_flags = order == ["UID", "FLAGS"]

    def __call__(self, seq: int, info: MessageInfo,
                 extra_flags: frozenset[str] = frozenset()) -> bytes:
        flags = self._flag_list(info.flags, extra_flags) if self._flags else b""
        date = wire.internaldate(info.internaldate) if self._date else b""
        return self._template % self._pick((seq, info.uid, flags, info.modseq, date, info.size))

    def lines(self, positions: Sequence[int], infos: Sequence[MessageInfo],
              changed: Mapping[int, MessageInfo], recent_uids: Container[int],
              recent: frozenset[str]) -> bytes:
        """The lines for many messages, joined (position p is sequence number p + 1; a message
        in `changed` is read there, not in `infos`): the loop a 100,000-message `UID FETCH 1:*
        (FLAGS)` spends its time in, kept free of calls."""
        if self._uid_flags:
            return self._uid_flags_lines(positions, infos, changed, recent_uids, recent)
        template, pick, flag_lists = self._template, self._pick, self._flag_lists
        want_flags, want_date = self._flags, self._date
        none: frozenset[str] = frozenset()
        changed_info = changed.get
        out = []
        for p in positions:
            info = changed_info(p) or infos[p]
            flags = b""
            if want_flags:
                key = (info.flags, recent if info.uid in recent_uids else none)
                flags = flag_lists.get(key) or self._flag_list(*key)
            date = wire.internaldate(info.internaldate) if want_date else b""
            out.append(template % pick((p + 1, info.uid, flags, info.modseq, date, info.size)))
        return b"".join(out)

    def _uid_flags_lines(self, positions: Sequence[int], infos: Sequence[MessageInfo],
                         changed: Mapping[int, MessageInfo], recent_uids: Container[int],
                         recent: frozenset[str]) -> bytes:
        # Formatted as text and encoded once: an f-string per line costs about two thirds of
        # a bytes %-format (measured with 200-line FETCHes, the mixed load's).
        texts = self._flag_texts
        changed_info = changed.get
        out = []
        for p in positions:
            info = changed_info(p) or infos[p]
            uid = info.uid
            key = (info.flags, recent) if uid in recent_uids else info.flags
            flags = texts.get(key) or self._flag_text(key)
            out.append(f"* {p + 1} FETCH (UID {uid} FLAGS {flags})\r\n")
        return "".join(out).encode()

    def _flag_text(self, key: frozenset[str] | tuple[frozenset[str], frozenset[str]]) -> str:
        flags = key[0] | key[1] if isinstance(key, tuple) else key
        text = self._flag_texts[key] = wire.flag_list(flags).decode()
        return text

    def _flag_list(self, flags: frozenset[str], extra: frozenset[str]) -> bytes:
        key = (flags, extra)
        formatted = self._flag_lists.get(key)
        if formatted is None:
            formatted = self._flag_lists[key] = wire.flag_list(flags | extra)
        return formatted
