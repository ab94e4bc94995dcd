"""FETCH responses (RFC 3501 6.4.5 and 7.4.2, RFC 7162 MODSEQ). Pure: no asyncio, no I/O.

The session resolves the sequence set, reads the stored message when `needs_body` says so,
and calls `render_fetch` once per message; the message is parsed at most once per call.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class _Message:
    """The stored message with its structure parsed on first use (at most once)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._root: mime.Part | None = None
        self._header: mime.Part | None = None

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

    def section(self, sect: Section) -> bytes:
        if not sect.part and sect.text is None:
            return self.raw
        if not sect.part and sect.text in _ROOT_TEXTS:
            data = mime.section(self.raw, self.header, sect)
        else:
            data = mime.section(self.raw, self.root, sect)
        # A part that does not exist reads as empty, as most servers answer.
        return b"" if data is None else data


def _partial(data: bytes, partial: tuple[int, int] | None) -> bytes:
    if partial is None:
        return data
    origin, count = partial
    return data[origin : origin + count]


def _body_item(att: FetchAtt, message: _Message) -> bytes:
    sect = att.section or Section()
    name = b"BODY[" + section_spec(sect) + b"]"
    if att.partial is not None:
        name += b"<%d>" % att.partial[0]  # RFC 3501 7.4.2: only the origin is echoed
    return name + b" " + wire.literal(_partial(message.section(sect), att.partial))


def _item(
    att: FetchAtt, info: MessageInfo, message: _Message, extra_flags: frozenset[str]
) -> bytes | None:
    name = att.name
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
        return b"RFC822 " + wire.literal(message.raw)
    if name == "RFC822.HEADER":
        return b"RFC822.HEADER " + wire.literal(message.section(Section(text="HEADER")))
    if name == "RFC822.TEXT":
        return b"RFC822.TEXT " + wire.literal(message.section(Section(text="TEXT")))
    if name == "ENVELOPE":
        return b"ENVELOPE " + mime.envelope(message.header)  # the top header is all it needs
    if name == "BODY":
        return b"BODY " + mime.bodystructure(message.root, extended=False)
    if name == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + mime.bodystructure(message.root, extended=True)
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
) -> bytes:
    """The whole `* <seq> FETCH (...)` response line, CRLF included, literals inline.

    `raw` may be None when `needs_body(atts)` is false. `extra_flags` are session flags such as
    \\Recent. UID (UID FETCH, RFC 3501 6.4.8) and MODSEQ (CONDSTORE, RFC 7162 3.1.4.1) are put
    first when the session must include them and they were not asked for."""
    names = {att.name for att in atts}
    implicit: list[FetchAtt] = []
    if include_uid and "UID" not in names:
        implicit.append(FetchAtt("UID"))
    if include_modseq and "MODSEQ" not in names:
        implicit.append(FetchAtt("MODSEQ"))
    message = _Message(raw if raw is not None else b"")
    items: list[bytes] = []
    seen: set[FetchAtt] = set()
    for att in (*implicit, *atts):
        if att in seen:
            continue
        seen.add(att)
        item = _item(att, info, message, extra_flags)
        if item is not None:
            items.append(item)
    return b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n"
