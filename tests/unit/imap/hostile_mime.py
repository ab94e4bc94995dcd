"""Hostile messages for the MIME, ENVELOPE, section, SEARCH, SORT and THREAD code paths, and
one function that drives every one of those paths over a message and checks the answers.

The generators build messages the way broken or malicious senders do: multiparts cut short or
never closed, boundaries that are prefixes of each other, delimiters missing or repeated, a
delimiter inside a quoted-printable line, deep nesting of multiparts and message/rfc822, header
lines without a colon, NUL, 8-bit and invalid UTF-8 octets, broken RFC 2047 encoded words
(also inside addresses and groups), RFC 2231 continuations out of order or missing, a
Content-Type without subtype, bare CR or LF line ends, no header/body separator, nothing at
all. `exercise` answers FETCH, SEARCH, SORT and THREAD over one of them and checks that each
answer is well formed and each BODY[section] is a slice of the stored octets."""

from __future__ import annotations

import asyncio
import datetime
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hypothesis import strategies as st

from services.store.backends.maildb import user_path
from services.store.backends.textindex import TextIndex, fold, message_text, text_contains
from services.store.imap.protocol import fetch, mime, wire
from services.store.imap.protocol.command import FetchAtt, SearchKey, Section
from services.store.imap.search import HEADER_BREAKS, read_header, search
from services.store.imap.sort import sort
from services.store.imap.thread import format_thread, thread
from services.store.mailbox import MessageInfo
from tests.unit.imap.test_mime import Data, read_all

# --- building blocks ----------------------------------------------------------------------

# Boundaries that are prefixes of each other (and one that ends in "--", one with a space:
# RFC 2046 allows both), so a delimiter of one level looks like one of another.
BOUNDARIES = ("a", "ab", "a--", "ab c", "=_q", "a" * 70)
LINE_ENDS = (b"\r\n", b"\n", b"\r")

ENCODED_WORDS = (
    b"=?utf-8?q?caf=C3=A9?=",
    b"=?utf-8?b?Y2Fmw6k=?=",
    b"=?x-no-such-charset?q?abc?=",  # unknown charset
    b"=?utf-8?b?!!!?=",  # bad base64
    b"=?utf-8?b?Y?=",  # base64 of no whole octet
    b"=?utf-8?x?abc?=",  # unknown encoding
    b"=?utf-8*en?q?lang?=",  # RFC 2231 language in a word
    b"=?utf-8?q?=ZZ=?=",  # bad quoted-printable
    b"=?utf-16?b?2D3eAA==?=",  # a lone surrogate
    b"=??q?empty-charset?=",
    b"=?utf-8?q?",  # unterminated
    b"=?utf-8?B?" + b"QUFB" * 40 + b"?=",
    b"=?utf-8?q?nul=00here?=",  # decodes to a NUL
    b"=?utf-7?q?+2AA-?=",  # decodes to half a surrogate pair
    b"=?punycode?q?abc-def?=",  # a Python codec but no charset
)
HEADER_NOISE = (
    b"\x00", b"\xff\xfe", b"\xc3\x28", b"\xe9t\xe9", b"\"", b"\\", b"(", b")", b"<", b">",
    b",", b";", b":", b"@", b"[", b"]", b"{5}", b"%", b"*", b" ", b"\t", b"NIL",
)
ADDRESSES = (
    b"a@b", b"<a@b>", b"\"q\\\" x\" <a@b>", b"=?utf-8?q?Zo=C3=AB?= <z@e>",
    b"group: =?utf-8?b?QQ==?= <a@b>, c@d;", b"=?utf-8?q?g?=: x@y;", b"undisclosed:;",
    b"<@route,@r2:a@b>", b"a@", b"@b", b"<>", b"(comment) a@b (c)", b"a@[1.2.3.4]",
    b"a.b@c, d@e", b"\"unterminated <a@b>", b"x: (y) ;", b"<a@b", b"a@b>", b"g: a@b, g2: c@d;;",
)


def _text(draw: st.DrawFn, choices: Sequence[bytes], max_size: int = 6) -> bytes:
    return b"".join(draw(st.lists(st.sampled_from(choices), max_size=max_size)))


@st.composite
def header_value(draw: st.DrawFn) -> bytes:
    return _text(draw, (*ENCODED_WORDS, *HEADER_NOISE, *ADDRESSES, b"word", b"\r\n folded"))


@st.composite
def content_type(draw: st.DrawFn, boundary: str | None) -> bytes:
    kind = draw(st.sampled_from((
        b"multipart/mixed", b"multipart/digest", b"multipart/alternative", b"multipart",
        b"multipart/", b"text", b"text/html", b"message/rfc822", b"application/pdf",
        b"/plain", b"", b"text/plain/extra", b"multipart/mixed (comment)")))
    params = []
    if boundary is not None:
        params.append(b'boundary="' + boundary.encode() + b'"')
    params += draw(st.lists(st.sampled_from((
        b"charset=utf-8", b"charset=\"x-unknown\"", b"charset=", b"charset=utf-7",
        b"charset=unicode-escape", b"charset=utf-16", b"name*0=ab", b"name*1=cd",
        b"name*3=lost", b"name*0*=utf-8''%C3%A9", b"name*1*=%ZZ", b"name*2=\"q\"",
        b"filename*1=only-one", b"boundary=\"\"", b"boundary", b"=x", b"\x00=\xff",
        b"name=\"unterminated")), max_size=4))
    return b"Content-Type: " + b"; ".join([kind, *params])


@st.composite
def headers(draw: st.DrawFn, eol: bytes, type_line: bytes | None) -> bytes:
    lines = []
    if type_line is not None:
        lines.append(type_line)
    lines += draw(st.lists(st.one_of(
        st.builds(lambda name, value: name + b": " + value,
                  st.sampled_from((b"Subject", b"From", b"To", b"Cc", b"Bcc", b"Sender",
                                   b"Reply-To", b"Date", b"Message-ID", b"References",
                                   b"In-Reply-To", b"Content-Transfer-Encoding",
                                   b"Content-Disposition", b"Content-Language",
                                   b"Content-ID", b"X-Y")),
                  header_value()),
        st.sampled_from((
            b"no colon here", b": no name", b"Bad Name: x", b"Subject\t: tab before colon",
            b"\x00NUL: x", b"Content-Transfer-Encoding: base64",
            b"Content-Transfer-Encoding: quoted-printable", b"Content-Type: text/plain",
            b" continuation first", b"Content-Disposition: attachment; filename*1=\"x\"",
            b"Date: Mon, 32 Jan 2024 25:61:61 +9999", b"References: <a@b> <" + b"x" * 300,
        ))), max_size=6))
    return b"".join(line + eol for line in lines)


@st.composite
def entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One MIME entity (header, separator, body), possibly broken."""
    eol = draw(st.sampled_from(LINE_ENDS)) if draw(st.integers(0, 9)) == 0 else b"\r\n"
    kind = draw(st.sampled_from(("leaf", "multipart", "rfc822")) if depth < 3 else
                st.just("leaf"))
    if kind == "multipart":
        boundary = draw(st.sampled_from(BOUNDARIES))
        head = draw(headers(eol, b'Content-Type: multipart/mixed; boundary="'
                            + boundary.encode() + b'"'))
        body = draw(multipart_body(boundary.encode(), eol, depth))
    elif kind == "rfc822":
        head = draw(headers(eol, b"Content-Type: message/rfc822"))
        body = draw(entity(depth + 1))
    else:
        head = draw(headers(eol, draw(st.none() | content_type(None))))
        body = draw(leaf_body(eol))
    separator = draw(st.sampled_from((eol, eol, eol, b"", b"\r\r\n", b"\n\r\n")))
    return head + separator + body


@st.composite
def leaf_body(draw: st.DrawFn, eol: bytes) -> bytes:
    pieces = draw(st.lists(st.sampled_from((
        b"plain text", b"=C3=A9", b"soft break=", b"=\r\n--a", b"--a", b"--ab c--", b"--=_q",
        b"<p>html<b>bold</b>", b"<!--", b"<script>", b"QUFB", b"\x00", b"\xff", b"\r", b"",
        b"=", b"=?utf-8?q?x?=", b"+2AA-", b"\\ud800", b"=00",
    )), max_size=8))
    return b"".join(piece + eol for piece in pieces)


@st.composite
def multipart_body(draw: st.DrawFn, boundary: bytes, eol: bytes, depth: int) -> bytes:
    out = [draw(st.sampled_from((b"", b"preamble" + eol, b"--" + boundary + b"x" + eol)))]
    for _ in range(draw(st.integers(0, 3))):
        delimiter = draw(st.sampled_from((
            b"--" + boundary, b"--" + boundary + b"  ", b"--" + boundary + b"--",
            b"--" + boundary[:-1], b"-- " + boundary, b"--" + boundary + b"\t\r")))
        out += [delimiter, eol, draw(entity(depth + 1)), eol]
    close = draw(st.sampled_from((b"--" + boundary + b"--" + eol, b"", b"--" + boundary + eol,
                                  b"--" + boundary + b"--")))
    out += [close, draw(st.sampled_from((b"", b"epilogue" + eol)))]
    return b"".join(out)


@st.composite
def hostile_message(draw: st.DrawFn) -> bytes:
    """A whole message, sometimes truncated anywhere, sometimes empty."""
    raw = draw(entity())
    if draw(st.integers(0, 4)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


# --- deep and large messages, by construction ---------------------------------------------


def nested_multiparts(depth: int, boundary: str = "b{}") -> bytes:
    """Multiparts nested `depth` deep, each with its own boundary (by default; a boundary
    without "{}" is shared by every level)."""
    names = [boundary.format(level) for level in range(depth)]
    head = b"".join(b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n--%s\r\n'
                    % (name.encode(), name.encode()) for name in names)
    tail = b"".join(b"\r\n--%s--\r\n" % name.encode() for name in reversed(names))
    return head + b"Content-Type: text/plain\r\n\r\nleaf" + tail


def nested_messages(depth: int) -> bytes:
    return b"Subject: top\r\nContent-Type: message/rfc822\r\n\r\n" * depth + b"Subject: x\r\n\r\nx"


INDEX_USER = "fuzz@example.test"

# --- driving the code paths ---------------------------------------------------------------

FETCH_SECTIONS = (
    Section(), Section(text="HEADER"), Section(text="TEXT"),
    Section(text="HEADER.FIELDS", fields=("SUBJECT", "FROM", "X-NONE")),
    Section(text="HEADER.FIELDS.NOT", fields=("SUBJECT", "CONTENT-TYPE")),
    Section((1,)), Section((1,), "MIME"), Section((2,)), Section((1, 2)),
    Section((1, 2), "MIME"), Section((1,), "HEADER"), Section((1,), "TEXT"),
    Section((2, 1), "HEADER.FIELDS", ("TO",)),
)


def fetch_atts(root: mime.Part) -> list[FetchAtt]:
    """The items a client asks for: the fixed ones plus a section of every part there is."""
    atts = [FetchAtt("ENVELOPE"), FetchAtt("BODY"), FetchAtt("BODYSTRUCTURE"),
            FetchAtt("RFC822.HEADER"), FetchAtt("RFC822.SIZE")]
    sections = list(FETCH_SECTIONS) + [Section(path, text) for path in part_paths(root)
                                       for text in (None, "MIME")]
    for sect in sections:
        atts.append(FetchAtt("BODY[]", section=sect, peek=True))
    atts.append(FetchAtt("BODY[]", section=Section(text="TEXT"), peek=True, partial=(0, 100)))
    atts.append(FetchAtt("BODY[]", section=Section((1,)), peek=True, partial=(3, 5)))
    return atts


def part_paths(root: mime.Part, limit: int = 40) -> list[tuple[int, ...]]:
    """Section numbers of the parts (at most `limit`), through multiparts and messages."""
    found: list[tuple[int, ...]] = []
    stack: list[tuple[tuple[int, ...], mime.Part]] = [((), root)]
    while stack and len(found) < limit:
        path, node = stack.pop()
        if node.message is not None:
            node = node.message
        for number, child in enumerate(node.children, 1):
            found.append((*path, number))
            stack.append(((*path, number), child))
    return found


def info_for(raw: bytes, uid: int = 1) -> MessageInfo:
    return MessageInfo(uid=uid, guid=f"{uid:032x}", size=len(raw),
                       internaldate=1_700_000_000.0 + uid, flags=frozenset(), modseq=1)


class MemorySource:
    """Messages in memory, read as the store reads them (headers: up to the blank line)."""

    def __init__(self, raws: Sequence[bytes]) -> None:
        self.raws = list(raws)
        self.infos = [info_for(raw, uid) for uid, raw in enumerate(self.raws, 1)]

    async def raw(self, info: MessageInfo) -> bytes:
        return self.raws[info.uid - 1]

    async def headers(self, infos: Sequence[MessageInfo]) -> list[bytes]:
        return [header_block(self.raws[info.uid - 1]) for info in infos]

    async def text_matches(self, needle: str, field: str,
                           guids: Sequence[str]) -> set[str] | None:
        return None

    async def scan(self, needle: str, field: str, guids: Sequence[str]) -> set[str]:
        return {g for g in guids
                if text_contains(message_text(self.raws[int(g, 16) - 1],
                                              with_body=field != "HEADER"), needle, field)}


def header_block(raw: bytes) -> bytes:
    """What the store reads of a message for header-only items (commands._read_header)."""
    chunks = iter([raw[i:i + 8192] for i in range(0, len(raw), 8192)])
    data = read_header(lambda _size: next(chunks, b""))
    if not any(separator in data for separator in HEADER_BREAKS):
        data += b"".join(chunks)
    return data


def _values(line: bytes) -> dict[bytes, Data]:
    prefix = b"* 1 FETCH "
    assert line.startswith(prefix) and line.endswith(b")\r\n"), line[:80]
    items = read_all(line[len(prefix):-2])
    assert isinstance(items, list) and len(items) % 2 == 0
    return {bytes(name): value for name, value in zip(items[0::2], items[1::2], strict=True)
            if isinstance(name, bytes)}


def check_fetch(raw: bytes) -> None:
    root = mime.parse_message(raw)
    atts = fetch_atts(root)
    info = info_for(raw)
    line = fetch.render_fetch(1, info, atts, raw)
    values = _values(line)
    envelope = values[b"ENVELOPE"]
    assert isinstance(envelope, list) and len(envelope) == 10
    assert isinstance(values[b"BODYSTRUCTURE"], list)
    for att in atts:
        if att.name == "BODY[]" and att.section is not None:
            _check_section(raw, root, att, values)
    # The same answer when sent from the file (Spans) and from the header block only.
    pieces = fetch.render_pieces(1, info, atts, raw, spans_over=0)
    assert b"".join(p if isinstance(p, bytes)
                    else wire.literal_octets(raw[p.start:p.start + p.length])
                    for p in pieces) == line
    header_atts = [att for att in atts if att.name in ("ENVELOPE", "RFC822.HEADER")
                   or (att.section is not None and not att.section.part
                       and att.section.text in ("HEADER", "HEADER.FIELDS",
                                                "HEADER.FIELDS.NOT"))]
    assert fetch.needs_header_only(header_atts)
    assert (fetch.render_fetch(1, info, header_atts, header_block(raw))
            == fetch.render_fetch(1, info, header_atts, raw))


def _check_section(raw: bytes, root: mime.Part, att: FetchAtt,
                   values: dict[bytes, Data]) -> None:
    sect = att.section
    assert sect is not None
    name = b"BODY[" + fetch.section_spec(sect) + b"]"
    if att.partial is not None:
        name += b"<%d>" % att.partial[0]
    got = values[name]
    assert isinstance(got, bytes)
    if mime.is_range(sect):
        where = mime.section_range(root, sect)
        start, end = where if where is not None else (0, 0)
        assert 0 <= start <= end <= len(raw)
        whole = raw[start:end]
        if att.partial is not None:
            origin, count = att.partial
            whole = whole[origin:origin + count]
        assert got == wire.literal_octets(whole)  # NUL sent as 0x80
    else:
        # HEADER.FIELDS(.NOT): stored lines, in order, then the blank line if the header
        # has one; a part that does not exist reads as empty.
        fields = _fields_of(root, sect)
        if fields is None:
            assert got == b""
            return
        position = 0
        for field in fields:
            line = wire.literal_octets(raw[field.start:field.end])
            assert got.find(line, position) == position
            position += len(line) + (0 if line.endswith(b"\n") else 2)
        assert got[position:] == blank_line_after_fields(raw, root, sect)


def _addressed(root: mime.Part, sect: Section) -> mime.Part | None:
    message = root if not sect.part else mime.find_part(root, sect.part)
    if message is None or (sect.part and message.message is None):
        return None
    if sect.part:
        assert message.message is not None
        message = message.message
    return message


def _fields_of(root: mime.Part, sect: Section) -> list[mime.HeaderField] | None:
    message = _addressed(root, sect)
    if message is None:
        return None
    wanted = {name.lower() for name in sect.fields}
    exclude = sect.text == "HEADER.FIELDS.NOT"
    return [f for f in message.fields if (f.name.lower() in wanted) != exclude]


def blank_line_after_fields(raw: bytes, root: mime.Part, sect: Section) -> bytes:
    """What HEADER.FIELDS(.NOT) ends with: the blank line, unless the header section has
    none (a message with no body and no blank line, RFC 3501 6.4.5)."""
    message = _addressed(root, sect)
    assert message is not None
    # Lines end at LF only: a bare CR is inside a line (bytes.splitlines would end one there
    # and see a blank line in "...\r\r\n").
    lines = raw[message.start:message.body_start].split(b"\n")
    return b"\r\n" if len(lines) >= 2 and lines[-1] == b"" and lines[-2] in (b"", b"\r") else b""


SEARCH_KEYS = (
    SearchKey("SUBJECT", "caf"), SearchKey("FROM", "a@b"), SearchKey("TO", "é"),
    SearchKey("HEADER", "x", name="References"), SearchKey("HEADER", "", name="X-Y"),
    SearchKey("TEXT", "html"), SearchKey("BODY", "plain"), SearchKey("TEXT", "\x00"),
    SearchKey("SENTSINCE", datetime.date(2000, 1, 1)),
)


async def _search_sort_thread(raws: Sequence[bytes]) -> None:
    source = MemorySource(raws)
    positions = list(range(len(raws)))
    for key in SEARCH_KEYS:
        found = await search(SearchKey("AND", children=(key,)), source.infos, source,
                             recent=())
        assert set(found) <= set(positions)
    for criteria in (["SUBJECT"], ["FROM"], ["DISPLAYFROM"], ["REVERSE", "DATE"], ["CC"]):
        assert sorted(await sort(criteria, positions, source.infos, source)) == positions
    for algorithm in ("REFERENCES", "ORDEREDSUBJECT"):
        forest = await thread(algorithm, positions, source.infos, source)
        read_all(b"(" + format_thread(forest, lambda p: p + 1) + b")")


def check_search(raws: Sequence[bytes]) -> None:
    asyncio.run(_search_sort_thread(raws))
    for raw in raws:
        text = message_text(raw)
        assert fold(text.header) is not None and fold(text.body) is not None


INDEX_NEEDLES = ("caf", "plain", "html", "a@b", "nul here", "\ufffd\ufffd\ufffd", "abc", "x-y",
                 "+2aa-", "ud800")


def check_index(raws: Sequence[bytes]) -> None:
    """The full-text index (real SQLite FTS5) takes the messages and answers as a scan does."""
    with tempfile.TemporaryDirectory() as root:
        user_path(Path(root), INDEX_USER).mkdir(parents=True)
        index = TextIndex(Path(root))
        try:
            texts = [message_text(raw) for raw in raws]
            assert index.add(INDEX_USER, [(str(i), t) for i, t in enumerate(texts)]) == len(raws)
            for needle in INDEX_NEEDLES:
                for field in ("TEXT", "BODY", "HEADER"):
                    hits, _ = index.lookup(INDEX_USER, needle, field)
                    scanned = {str(i) for i, t in enumerate(texts)
                               if text_contains(t, fold(needle), field)}
                    assert hits == scanned, (needle, field)
        finally:
            index.close()


def exercise(raw: bytes) -> None:
    """Every FETCH, SEARCH, SORT and THREAD path over the message; raises on a bad answer."""
    check_fetch(raw)
    check_search([raw, raw + b"", b"Subject: Re: " + raw[:40] + b"\r\n\r\nx"])
