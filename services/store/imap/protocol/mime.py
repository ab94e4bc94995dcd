"""MIME structure of stored messages for FETCH and SEARCH. Pure: no asyncio, no I/O.

`parse_message` turns the stored bytes into a tree of `Part`s that record byte offsets into
those bytes (so sections are slices, never copies of re-encoded data) plus the header fields
BODYSTRUCTURE and ENVELOPE need. Stored messages may be malformed and up to the message size
limit: nothing here raises on bad input, and large bodies are only scanned with `bytes.find`
and `bytes.count`.

RFC 5322 (header fields, addresses), RFC 2045/2046 (Content-* fields, multipart boundaries),
RFC 2047 (encoded words), RFC 2183 (Content-Disposition), RFC 3282 (Content-Language),
RFC 2557 (Content-Location), RFC 3501 sections 6.4.5 and 7.4.2 (sections, ENVELOPE, BODY and
BODYSTRUCTURE).

Header text is handled as latin-1 `str` inside this module: one character per octet, so raw
8-bit (RFC 6532 UTF-8) header bytes survive parsing unchanged and are written back as they were.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import encodings
import encodings.aliases
import html
import pkgutil
import quopri
import re
import urllib.parse
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from common.rfc5322 import read_comment, read_quoted
from services.store.imap.protocol import wire
from services.store.imap.protocol.command import Section

# Deeper nesting than this is treated as an opaque leaf: a message built to nest thousands of
# multiparts must not exhaust the stack or the CPU.
MAX_DEPTH = 50
# More parts than this in one message are not split further (the rest stays inside the last
# part); no legitimate message comes close.
MAX_PARTS = 5000
# Fields of one header past this many are not parsed (the rest of the header, up to its blank
# line, stays in BODY[HEADER] but is no field): a message of 25 MB could carry millions, one
# Python object each, and parsing 2.2 million took 10 s of CPU in a store thread, with pauses
# of the event loop (the interpreter lock, garbage collections) up to 0.84 s. Real headers
# have dozens; Received chains hundreds at most.
MAX_HEADER_FIELDS = 10_000
_BLANK_LINE_AFTER_LF = re.compile(rb"\n\r?\n")

# Envelope placeholders for an address without a domain or local part: NIL as host would mean
# "group start" (RFC 3501 7.4.2), so something non-NIL is needed; these names are the ones
# clients already know from other servers.
MISSING_DOMAIN = "MISSING_DOMAIN"
MISSING_MAILBOX = "MISSING_MAILBOX"


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")


def _raw(text: str) -> bytes:
    return text.encode("latin-1")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field: its name as written, the offsets of its whole line(s) including the
    line ending, and its value (latin-1, folding kept, line ending removed)."""

    name: str
    start: int
    end: int
    value: str

    @property
    def unfolded(self) -> str:
        # RFC 5322 2.2.3: unfolding removes the line breaks, keeping the whitespace after them.
        return self.value.replace("\r", "").replace("\n", "").strip()


@dataclass(slots=True)
class Part:
    """One MIME entity. `start`..`body_start` is its header including the blank line (when the
    header has one), `body_start`..`end` its body. For a message/rfc822 part `message` is the
    encapsulated message, whose range is this part's body."""

    start: int
    body_start: int
    end: int
    fields: list[HeaderField] = field(default_factory=list)
    maintype: str = "TEXT"
    subtype: str = "PLAIN"
    params: list[tuple[str, str]] = field(default_factory=list)
    encoding: str = "7BIT"
    content_id: str | None = None
    description: str | None = None
    md5: str | None = None
    disposition: str | None = None
    disposition_params: list[tuple[str, str]] = field(default_factory=list)
    language: list[str] = field(default_factory=list)
    location: str | None = None
    lines: int = 0
    children: list[Part] = field(default_factory=list)
    message: Part | None = None

    @property
    def size(self) -> int:
        return self.end - self.body_start

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "MULTIPART"

    def header(self, name: str) -> str | None:
        """The first field of that name, unfolded, or None."""
        lower = name.lower()
        for f in self.fields:
            if f.name.lower() == lower:
                return f.unfolded
        return None

    def headers(self, name: str) -> list[str]:
        lower = name.lower()
        return [f.unfolded for f in self.fields if f.name.lower() == lower]

    def param(self, name: str) -> str | None:
        upper = name.upper()
        for key, value in self.params:
            if key == upper:
                return value
        return None


# --- header parsing ---------------------------------------------------------------------


def _line_end(raw: bytes, pos: int, end: int) -> int:
    """Offset just after the line starting at pos (after its LF, or `end`)."""
    newline = raw.find(b"\n", pos, end)
    return end if newline < 0 else newline + 1


def _is_field_name(name: bytes) -> bool:
    return bool(name) and all(33 <= octet <= 126 for octet in name)


def _parse_header(raw: bytes, start: int, end: int) -> tuple[list[HeaderField], int]:
    """Header fields from `start` and the offset where the body begins. The header ends after
    a blank line, or before the first line that is neither a field nor a continuation (the
    body then starts at that line, as with a MIME part that has no header)."""
    spans: list[tuple[str, int, int, int]] = []  # name, line start, value start, end
    pos = start
    body_start = end
    while pos < end:
        if len(spans) > MAX_HEADER_FIELDS:
            spans.pop()  # it may go on in continuation lines: the rest is no field
            body_start = _after_blank_line(raw, spans[-1][3], end)
            break
        after = _line_end(raw, pos, end)
        if raw[pos:after] in (b"\r\n", b"\n"):
            body_start = after
            break
        if raw[pos : pos + 1] in (b" ", b"\t") and spans:
            name, line_start, value_start, _ = spans[-1]
            spans[-1] = (name, line_start, value_start, after)
        else:
            colon = raw.find(b":", pos, after)
            field_name = raw[pos:colon].rstrip(b" \t") if colon > pos else b""
            if not _is_field_name(field_name):
                body_start = pos
                break
            spans.append((_latin1(field_name), pos, colon + 1, after))
        pos = after
    return [_field(raw, *span) for span in spans], body_start


def _after_blank_line(raw: bytes, pos: int, end: int) -> int:
    """Where the body begins when the header goes on from `pos` (a line start, after a field)
    past MAX_HEADER_FIELDS: after its blank line, or at `end`."""
    blank = _BLANK_LINE_AFTER_LF.search(raw, pos - 1, end)
    return end if blank is None else blank.end()


def _field(raw: bytes, name: str, start: int, value_start: int, end: int) -> HeaderField:
    value_end = end
    if raw[value_end - 1 : value_end] == b"\n":
        value_end -= 1
        if raw[value_end - 1 : value_end] == b"\r":
            value_end -= 1
    return HeaderField(name, start, end, _latin1(raw[value_start:value_end]))


# --- structured field values (Content-Type and friends) ---------------------------------

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments outside quoted strings (nesting allowed, unterminated ignored)."""
    out: list[str] = []
    depth = 0
    in_quote = False
    i = 0
    while i < len(value):
        ch = value[i]
        if in_quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(value):
                out.append(value[i + 1])
                i += 1
            elif ch == '"':
                in_quote = False
        elif depth:
            if ch == "\\":
                i += 1
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == "(":
            depth = 1
        else:
            out.append(ch)
            in_quote = ch == '"'
        i += 1
    return "".join(out)


def _split_semicolons(value: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    in_quote = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif in_quote and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ";" and not in_quote:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return items


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
    if value.startswith('"'):  # unterminated
        return re.sub(r"\\(.)", r"\1", value[1:], flags=re.DOTALL)
    return value


def _parse_params(items: list[str]) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not _TOKEN_RE.fullmatch(name):
            continue
        params.append((name.upper(), _unquote(value)))
    return _join_continuations(params)


_SECTION_RE = re.compile(r"(.+)\*(\d+)(\*?)")


def _join_continuations(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """RFC 2231 3: NAME*0, NAME*1, ... become one NAME (as Dovecot shows them), and when a
    section is encoded (NAME*0*=utf-8''...), one NAME* in RFC 2231's single-value form, so a
    client that reads an attachment's name from BODYSTRUCTURE sees it whole. Sections that
    do not run 0, 1, 2, ... stay as they were."""
    if not any("*" in name for name, _ in params):  # nearly always: nothing to join
        return params
    sections: dict[str, dict[int, tuple[str, bool]]] = {}
    for name, value in params:
        match = _SECTION_RE.fullmatch(name)
        if match:
            number, encoded = int(match.group(2)), bool(match.group(3))
            sections.setdefault(match.group(1), {}).setdefault(number, (value, encoded))
    joinable = {base for base, parts in sections.items() if set(parts) == set(range(len(parts)))}
    if not joinable:
        return params
    joined: list[tuple[str, str]] = []
    for name, value in params:
        match = _SECTION_RE.fullmatch(name)
        if not match or match.group(1) not in joinable:
            joined.append((name, value))
        elif int(match.group(2)) == 0:
            joined.append(_joined(match.group(1), sections[match.group(1)]))
    return joined


def _joined(base: str, parts: dict[int, tuple[str, bool]]) -> tuple[str, str]:
    ordered = [parts[number] for number in range(len(parts))]
    if not any(encoded for _, encoded in ordered):
        return base, "".join(value for value, _ in ordered)
    # An encoded value: the first section carries charset'language'; plain sections are
    # percent-encoded so the whole is one valid extended value.
    first, first_encoded = ordered[0]
    pieces = [first if first_encoded else "''" + _percent(first)]
    pieces += [value if encoded else _percent(value) for value, encoded in ordered[1:]]
    return base + "*", "".join(pieces)


def _percent(value: str) -> str:
    """RFC 2231 percent-encoding of a header value (held as latin-1: one char per octet)."""
    return urllib.parse.quote(value.encode("latin-1", "replace"), safe="!#$&+^`|")


def _parse_structured(value: str) -> tuple[str, list[tuple[str, str]]]:
    """`token; a=b; c="d"` into ("token", [("A", "b"), ("C", "d")])."""
    items = _split_semicolons(_strip_comments(value))
    return items[0].strip(), _parse_params(items[1:])


def _content_type(
    value: str | None, default: tuple[str, str]
) -> tuple[str, str, list[tuple[str, str]]]:
    """RFC 2045 5.2: a missing or syntactically invalid Content-Type means the default."""
    if value is None:
        return default[0], default[1], []
    kind, params = _parse_structured(value)
    maintype, slash, subtype = kind.partition("/")
    maintype, subtype = maintype.strip(), subtype.strip()
    if not slash or not _TOKEN_RE.fullmatch(maintype) or not _TOKEN_RE.fullmatch(subtype):
        return "TEXT", "PLAIN", []
    return maintype.upper(), subtype.upper(), params


# --- the part tree ----------------------------------------------------------------------


class _Budget:
    """One parse's state: the parts made so far (MAX_PARTS), and the message's delimiter
    lines by boundary, found in one pass when the first multipart needs them."""

    def __init__(self, raw: bytes) -> None:
        self.parts = 0
        self._raw = raw
        self._delimiters: dict[bytes, _Lines] | None = None

    def delimiter_lines(self, start: int, end: int,
                        boundary: bytes) -> Iterator[tuple[int, int, bool]]:
        """Each boundary delimiter line in raw[start:end] as (line start, line end, is close
        delimiter), as they are read. RFC 2046 5.1.1: "--" boundary at the start of a line,
        optionally "--", then only linear white space before the line break."""
        if self._delimiters is None:
            self._delimiters = _delimiter_index(self._raw)
        if start and self._raw[start - 1:start] != b"\n":  # a part that starts mid-line
            first = _delimiter_at(self._raw, start, end, boundary)
            if first is not None:
                yield first[0], min(first[1], end), first[2]
        lines = self._delimiters.get(boundary.rstrip(b" \t"))
        if lines is not None:
            for line, line_end, close in lines.within(start, end):
                yield line, min(line_end, end), close


class _Lines:
    """The lines that could delimit one boundary, in order, in flat arrays: a message of
    millions of dash lines made a tuple of each, and freeing them alone held the
    interpreter lock, so every session of the store, for 0.1-0.2 s."""

    __slots__ = ("closes", "ends", "starts")

    def __init__(self) -> None:
        self.starts = array("q")
        self.ends = array("q")
        self.closes = bytearray()

    def add(self, start: int, end: int, close: bool) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.closes.append(close)

    def within(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """The lines that start in [start, end)."""
        first, stop = bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)
        for at in range(first, stop):
            yield self.starts[at], self.ends[at], bool(self.closes[at])


def parse_message(raw: bytes) -> Part:
    """The part tree of a whole stored message. Never raises."""
    return _parse_entity(raw, 0, len(raw), ("TEXT", "PLAIN"), 0, _Budget(raw))


def parse_header_only(raw: bytes) -> Part:
    """The top-level part with its header fields but no structure: enough for BODY[HEADER],
    BODY[TEXT] and HEADER.FIELDS without scanning a large body. Never raises."""
    fields, body_start = _parse_header(raw, 0, len(raw))
    return Part(0, body_start, len(raw), fields)


def _count_lines(raw: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    lines = raw.count(b"\n", start, end)
    return lines if raw[end - 1 : end] == b"\n" else lines + 1


def _parse_entity(
    raw: bytes, start: int, end: int, default: tuple[str, str], depth: int, budget: _Budget
) -> Part:
    budget.parts += 1
    fields, body_start = _parse_header(raw, start, end)
    part = Part(start, body_start, end, fields)
    maintype, subtype, params = _content_type(part.header("Content-Type"), default)
    encoding = part.header("Content-Transfer-Encoding")
    # ASCII letters only: str.upper() turns latin-1's µ and ÿ into Greek and Latin Extended
    # letters, which the latin-1 response cannot carry.
    part.encoding = _latin1(_raw(_strip_comments(encoding).strip()).upper()) if encoding else ""
    part.encoding = part.encoding or "7BIT"
    part.content_id = part.header("Content-ID")
    part.description = part.header("Content-Description")
    part.md5 = part.header("Content-MD5")
    part.location = part.header("Content-Location")
    language = part.header("Content-Language")
    if language:
        part.language = [t.strip() for t in _strip_comments(language).split(",") if t.strip()]
    disposition = part.header("Content-Disposition")
    if disposition:
        kind, disposition_params = _parse_structured(disposition)
        if _TOKEN_RE.fullmatch(kind):
            part.disposition = kind.upper()
            part.disposition_params = disposition_params
    _set_type(raw, part, maintype, subtype, params, depth, budget)
    return part


def _set_type(
    raw: bytes,
    part: Part,
    maintype: str,
    subtype: str,
    params: list[tuple[str, str]],
    depth: int,
    budget: _Budget,
) -> None:
    part.maintype, part.subtype, part.params = maintype, subtype, params
    too_deep = depth >= MAX_DEPTH or budget.parts >= MAX_PARTS
    if maintype == "MULTIPART":
        boundary = part.param("BOUNDARY")
        if boundary and not too_deep:
            child_default = ("MESSAGE", "RFC822") if subtype == "DIGEST" else ("TEXT", "PLAIN")
            part.children = _split_multipart(raw, part, boundary, child_default, depth, budget)
        if not part.children:
            # No boundary, or no delimiter line in the body: a multipart needs at least one
            # body part (RFC 3501 body-type-mpart), so show it as the text it is.
            part.maintype, part.subtype, part.params = "TEXT", "PLAIN", []
            maintype = "TEXT"
    elif maintype == "MESSAGE" and subtype == "RFC822":
        if too_deep or part.encoding not in ("7BIT", "8BIT", "BINARY"):
            # RFC 2046 5.2.1 forbids encoding message/rfc822; an encoded one cannot be shown
            # as an envelope and structure, so it is an opaque attachment.
            part.maintype, part.subtype = "APPLICATION", "OCTET-STREAM"
        else:
            part.message = _parse_entity(
                raw, part.body_start, part.end, ("TEXT", "PLAIN"), depth + 1, budget
            )
            part.lines = _count_lines(raw, part.body_start, part.end)
    if maintype == "TEXT":
        if part.param("CHARSET") is None:
            part.params = [("CHARSET", "US-ASCII"), *part.params]
        part.lines = _count_lines(raw, part.body_start, part.end)


_DASH_LINE = re.compile(rb"^--([^\n]*)", re.MULTILINE)


def _delimiter_index(raw: bytes) -> dict[bytes, _Lines]:
    """Every line that could be a boundary delimiter, by the boundary it would delimit, in
    order. One pass for the whole message: nested multiparts whose lines all begin with
    every level's "--boundary" cost one look per line, not one per line and level. A line
    "--ab--" is the close delimiter of "ab" and a delimiter of "ab--" (a boundary may end
    in "-")."""
    index: dict[bytes, _Lines] = {}
    for match in _DASH_LINE.finditer(raw):
        rest = match.group(1).rstrip(b" \t\r")
        line_end = match.end() + 1  # after its LF (beyond the end: clipped by the caller)
        lines = index.get(rest)
        if lines is None:
            lines = index[rest] = _Lines()
        lines.add(match.start(), line_end, False)
        if rest.endswith(b"--"):
            closing = index.get(rest[:-2])
            if closing is None:
                closing = index[rest[:-2]] = _Lines()
            closing.add(match.start(), line_end, True)
    return index


def _delimiter_at(raw: bytes, start: int, end: int,
                  boundary: bytes) -> tuple[int, int, bool] | None:
    line_end = _line_end(raw, start, end)
    line = raw[start:line_end]
    marker = b"--" + boundary
    if not line.startswith(marker):
        return None
    rest = line[len(marker):]
    close = rest.startswith(b"--")
    if close:
        rest = rest[2:]
    return (start, line_end, close) if not rest.strip(b" \t\r\n") else None


def _before_line_break(raw: bytes, line_start: int, floor: int) -> int:
    """The CRLF (or LF) before a delimiter belongs to the delimiter (RFC 2046 5.1.1)."""
    end = line_start
    if end - 1 >= floor and raw[end - 1 : end] == b"\n":
        end -= 1
        if end - 1 >= floor and raw[end - 1 : end] == b"\r":
            end -= 1
    return end


def _split_multipart(
    raw: bytes,
    part: Part,
    boundary: str,
    child_default: tuple[str, str],
    depth: int,
    budget: _Budget,
) -> list[Part]:
    children: list[Part] = []
    content_start: int | None = None  # start of the body part being collected
    for line_start, line_end, close in budget.delimiter_lines(
        part.body_start, part.end, _raw(boundary)
    ):
        if content_start is not None:
            content_end = max(content_start, _before_line_break(raw, line_start, content_start))
            children.append(
                _parse_entity(raw, content_start, content_end, child_default, depth + 1, budget)
            )
        if close or budget.parts >= MAX_PARTS:
            return children
        content_start = line_end
    if content_start is not None:  # no close delimiter: the last part runs to the end
        children.append(
            _parse_entity(raw, content_start, part.end, child_default, depth + 1, budget)
        )
    return children


# --- ENVELOPE ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """An RFC 3501 envelope address. Group start: mailbox is the group name and host None;
    group end: everything None."""

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "atom", "quoted", "literal" (domain literal), "special", "comment"
    text: str  # quoted: the unescaped content
    space_before: bool


_SPECIALS = frozenset('()<>[]:;@\\,."')


def _tokenize(value: str) -> list[_Token]:
    """Address tokens, comments included (the last comment names a bare addr-spec)."""
    tokens: list[_Token] = []
    i, n = 0, len(value)
    space = False
    while i < n:
        ch = value[i]
        if ch in " \t\r\n":
            space = True
            i += 1
        elif ch == "(":
            i, comment = read_comment(value, i)
            tokens.append(_Token("comment", comment, space))
            space = True
        elif ch == '"':
            i, text = read_quoted(value, i)
            tokens.append(_Token("quoted", text, space))
            space = False
        elif ch == "[":
            close = value.find("]", i)
            close = n - 1 if close < 0 else close
            tokens.append(_Token("literal", value[i : close + 1], space))
            i, space = close + 1, False
        elif ch in _SPECIALS:
            tokens.append(_Token("special", ch, space))
            i, space = i + 1, False
        else:
            j = i
            while j < n and value[j] not in _SPECIALS and value[j] not in " \t\r\n":
                j += 1
            tokens.append(_Token("atom", value[i:j], space))
            i, space = j, False
    return tokens



def _phrase(tokens: list[_Token]) -> str | None:
    words: list[str] = []
    for token in tokens:
        if words and token.space_before:
            words.append(" ")
        words.append(token.text)
    text = "".join(words).strip()
    return text or None


_DOT_ATOM_RE = re.compile(
    r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+(\.[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+)*"
)


def _local_part(tokens: list[_Token]) -> str:
    # A quoted local part keeps its quotes when it needs them, so "mailbox@host" rebuilt by
    # the client is the same address.
    text = "".join(t.text for t in tokens)
    if any(t.kind == "quoted" for t in tokens) and not _DOT_ATOM_RE.fullmatch(text):
        return wire.quoted(_raw(text)).decode("latin-1")
    return text


def _addr_spec(tokens: list[_Token], name: str | None, adl: str | None) -> Address:
    at = max((i for i, t in enumerate(tokens) if t.kind == "special" and t.text == "@"), default=-1)
    if at < 0:
        local, domain = tokens, []
    else:
        local, domain = tokens[:at], tokens[at + 1 :]
    mailbox = _local_part(local) if local else MISSING_MAILBOX
    host = "".join(t.text for t in domain) or MISSING_DOMAIN
    return Address(name, adl, mailbox, host)


def _mailbox(with_comments: list[_Token]) -> Address | None:
    tokens = [t for t in with_comments if t.kind != "comment"]
    comments = [t.text for t in with_comments if t.kind == "comment"]
    if not tokens:
        return None
    opening = next((i for i, t in enumerate(tokens) if t.kind == "special" and t.text == "<"), None)
    if opening is None:
        name = comments[-1].strip() if comments else None
        return _addr_spec(tokens, name or None, None)
    name = _phrase(tokens[:opening])
    closing = next(
        (
            i
            for i in range(opening + 1, len(tokens))
            if tokens[i].text == ">" and tokens[i].kind == "special"
        ),
        len(tokens),
    )
    inner = tokens[opening + 1 : closing]
    adl = None
    colon = next((i for i, t in enumerate(inner) if t.kind == "special" and t.text == ":"), None)
    if colon is not None:
        adl = "".join(t.text for t in inner[:colon]) or None
        inner = inner[colon + 1 :]
    if not inner:
        return Address(name, adl, "", "")
    return _addr_spec(inner, name, adl)


def parse_addresses(value: str) -> list[Address]:
    """An RFC 5322 address list (latin-1 text as stored) as envelope addresses, groups as
    start/end markers. Lenient: whatever cannot be an address is skipped."""
    tokens = _tokenize(value)
    out: list[Address] = []
    current: list[_Token] = []
    in_group = False
    angle = 0

    def flush() -> None:
        if current:
            address = _mailbox(current)
            if address is not None:
                out.append(address)
            current.clear()

    for token in tokens:
        special = token.text if token.kind == "special" else None
        if special == "<":
            angle += 1
        elif special == ">":
            angle = max(0, angle - 1)
        if angle == 0 and special == ":" and not in_group:
            words = [t for t in current if t.kind != "comment"]
            out.append(Address(None, None, _phrase(words) or "", None))
            current.clear()
            in_group = True
        elif angle == 0 and special == ";" and in_group:
            flush()
            out.append(Address(None, None, None, None))
            in_group = False
        elif angle == 0 and special in (",", ";"):
            # A ";" outside a group separates addresses as a "," does: Outlook writes lists
            # so, and read as part of an address it lost every recipient after the first.
            flush()
        else:
            current.append(token)
    flush()
    if in_group:
        out.append(Address(None, None, None, None))
    return out


def _address_list(value: str | None) -> bytes:
    if value is None:
        return wire.NIL
    addresses = parse_addresses(value)
    if not addresses:
        return wire.NIL
    return b"(" + b"".join(_address(a) for a in addresses) + b")"


def _nstr(value: str | None) -> bytes:
    # NUL is not allowed in any IMAP4rev1 string, quoted or literal (RFC 3501 section 9).
    return wire.nstring(None if value is None else _raw(value.replace("\x00", "")))


def _address(a: Address) -> bytes:
    return b"(" + b" ".join(_nstr(v) for v in (a.name, a.adl, a.mailbox, a.host)) + b")"


def envelope(part: Part) -> bytes:
    """RFC 3501 ENVELOPE of a message part (the root, or a message/rfc822 part's `message`).
    Strings are sent as stored: encoded words stay encoded, 8-bit text goes as literals."""
    from_ = _address_list(part.header("From"))
    # RFC 3501 7.4.2: an absent or empty Sender or Reply-To is reported as From.
    sender = _address_list(part.header("Sender"))
    reply_to = _address_list(part.header("Reply-To"))
    items = [
        _nstr(part.header("Date")),
        _nstr(part.header("Subject")),
        from_,
        from_ if sender == wire.NIL else sender,
        from_ if reply_to == wire.NIL else reply_to,
        _address_list(part.header("To")),
        _address_list(part.header("Cc")),
        _address_list(part.header("Bcc")),
        _nstr(part.header("In-Reply-To")),
        _nstr(part.header("Message-ID")),
    ]
    return b"(" + b" ".join(items) + b")"


# --- BODY / BODYSTRUCTURE ---------------------------------------------------------------


def _param_list(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return wire.NIL
    return b"(" + b" ".join(_nstr(k) + b" " + _nstr(v) for k, v in params) + b")"


def _disposition(part: Part) -> bytes:
    if part.disposition is None:
        return wire.NIL
    return b"(" + _nstr(part.disposition) + b" " + _param_list(part.disposition_params) + b")"


def _language(part: Part) -> bytes:
    if not part.language:
        return wire.NIL
    if len(part.language) == 1:
        return _nstr(part.language[0])
    return b"(" + b" ".join(_nstr(tag) for tag in part.language) + b")"


def bodystructure(part: Part, extended: bool) -> bytes:
    """BODY (extended=False) or BODYSTRUCTURE (True) of a message part, RFC 3501 7.4.2."""
    if part.is_multipart:
        items = [b"".join(bodystructure(child, extended) for child in part.children)]
        items.append(_nstr(part.subtype))
        if extended:
            params = [(k, v) for k, v in part.params]
            items += [_param_list(params), _disposition(part), _language(part)]
            items.append(_nstr(part.location))
        return b"(" + b" ".join(items) + b")"
    items = [
        _nstr(part.maintype),
        _nstr(part.subtype),
        _param_list(part.params),
        _nstr(part.content_id),
        _nstr(part.description),
        _nstr(part.encoding),
        b"%d" % part.size,
    ]
    if part.message is not None:
        items += [envelope(part.message), bodystructure(part.message, extended)]
        items.append(b"%d" % part.lines)
    elif part.maintype == "TEXT":
        items.append(b"%d" % part.lines)
    if extended:
        items += [_nstr(part.md5), _disposition(part), _language(part), _nstr(part.location)]
    return b"(" + b" ".join(items) + b")"


# --- sections ---------------------------------------------------------------------------


# How a part was reached while following a section's numbers.
_MESSAGE = "message"  # the root, or the message a MESSAGE/RFC822 part encapsulates
_CHILD = "child"  # a part of a multipart
_ALIAS = "alias"  # part 1 of a non-multipart: the same part again


def _descend(node: Part, number: int, reached: str) -> tuple[Part, str] | None:
    """Part `number` inside `node`. A non-multipart message has only part 1, its own body;
    a MESSAGE/RFC822 part's numbers go on inside the message it encapsulates; any other part
    of a multipart has a part 1 too, itself (2.1 of a text part 2 is 2, as Dovecot answers),
    and nothing below that."""
    if node.is_multipart:
        if 1 <= number <= len(node.children):
            return node.children[number - 1], _CHILD
        return None
    if reached != _MESSAGE and node.message is not None:
        return _descend(node.message, number, _MESSAGE)
    if reached == _ALIAS:
        return None
    return (node, _ALIAS) if number == 1 else None


def find_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """The part a section's part numbers address (the root itself for no numbers)."""
    node: Part = root
    reached = _MESSAGE
    for number in numbers:
        found = _descend(node, number, reached)
        if found is None:
            return None
        node, reached = found
    return node


def _header_lines(raw: bytes, part: Part, names: tuple[str, ...], exclude: bool) -> bytes:
    wanted = {n.lower() for n in names}
    lines = [raw[f.start : f.end] for f in part.fields if (f.name.lower() in wanted) != exclude]
    # Each field keeps its stored line ending; one without (a header that ends the message)
    # gets CRLF so the blank line stays a line of its own.
    text = b"".join(line if line.endswith(b"\n") else line + b"\r\n" for line in lines)
    # RFC 3501 6.4.5: the blank line is included, except for a message with no body and no
    # blank line (as BODY[HEADER] has it).
    return text + b"\r\n" if _ends_with_blank_line(raw, part.start, part.body_start) else text


def _ends_with_blank_line(raw: bytes, start: int, end: int) -> bool:
    header = raw[max(start, end - 4) : end]
    return header.endswith((b"\n\n", b"\n\r\n")) or raw[start:end] in (b"\r\n", b"\n")


_CHOSEN_LINES = frozenset({"HEADER.FIELDS", "HEADER.FIELDS.NOT"})


def section(raw: bytes, root: Part, sect: Section) -> bytes | None:
    """The octets of BODY[<section>] (RFC 3501 6.4.5), or None when that part does not exist."""
    if sect.text in _CHOSEN_LINES:
        message = _addressed_message(root, sect)
        if message is None:
            return None
        return _header_lines(raw, message, sect.fields, exclude=sect.text == "HEADER.FIELDS.NOT")
    where = section_range(root, sect)
    return None if where is None else raw[where[0] : where[1]]


def is_range(sect: Section) -> bool:
    """Whether the section is one run of the stored octets (all but HEADER.FIELDS(.NOT),
    which are the chosen lines of a header)."""
    return sect.text not in _CHOSEN_LINES


def section_range(root: Part, sect: Section) -> tuple[int, int] | None:
    """Where BODY[<section>] is in the stored message, as (start, end) offsets; None when that
    part does not exist. Only for sections that `is_range`."""
    if sect.text is None:
        if not sect.part:
            return root.start, root.end
        node = find_part(root, sect.part)
        return None if node is None else (node.body_start, node.end)
    if sect.text == "MIME":
        node = find_part(root, sect.part) if sect.part else None
        return None if node is None else (node.start, node.body_start)
    message = _addressed_message(root, sect)
    if message is None:
        return None
    if sect.text == "HEADER":
        return message.start, message.body_start
    return message.body_start, message.end  # TEXT


def _addressed_message(root: Part, sect: Section) -> Part | None:
    """The message whose HEADER or TEXT a section names: the root, or an attached one."""
    if not sect.part:
        return root
    node = find_part(root, sect.part)
    return None if node is None else node.message


# --- decoding for SEARCH ----------------------------------------------------------------

_ENCODED_WORD_RE = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS_RE = re.compile(r"(=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=)\s+(?==\?[^?\s]+\?[QqBb]\?)")


# Python codecs that are no charsets (MIME or SEARCH), read as unknown ones: punycode (and
# idna, built on it) decodes in quadratic time (a 200 KB body took 9 s), and the escape
# codecs read backslashes as escapes and make lone surrogates.
NOT_CHARSETS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape"})


# The names Python's codec registry can find. codecs.lookup remembers every name it was
# asked about, found or not, for the life of the process: senders write any charset name
# they like (a 1 MB header holds 40,000 different ones, 7 MB remembered), so only these
# are ever asked about.
_CODEC_NAMES = (frozenset(encodings.aliases.aliases)
                | {module.name for module in pkgutil.iter_modules(encodings.__path__)})
_NOT_IN_CODEC_NAMES_RE = re.compile(r"[^a-z0-9.]+")


def known_codec(charset: str) -> str | None:
    """Python's codec for a charset name (`UTF-8`, `iso_8859-1`, `utf-8*en`: RFC 2231's
    language suffix), or None for a name it does not know or a codec that is no charset."""
    name = charset.split("*", 1)[0].lower()
    key = _NOT_IN_CODEC_NAMES_RE.sub("_", name).strip("_")  # as the registry spells names
    if key not in _CODEC_NAMES:
        key = key.replace(".", "_")
        if key not in _CODEC_NAMES:
            return None
    try:
        codec = codecs.lookup(key).name
    except (LookupError, ValueError):
        return None
    return None if codec in NOT_CHARSETS else codec


def _codec(charset: str) -> str:
    return known_codec(charset) or "utf-8"


def _decode_bytes(data: bytes, charset: str | None) -> str:
    codec = _codec(charset) if charset else "utf-8"
    if codec == "ascii":
        # US-ASCII, also the default of a part that names no charset, holds no 8-bit octet:
        # one there is nearly always UTF-8 sent unlabelled, which UTF-8 reads and ASCII
        # turned into U+FFFD, so SEARCH never found the word.
        codec = "utf-8"
    try:
        text = data.decode(codec, errors="replace")
    except (LookupError, UnicodeError, ValueError):
        return data.decode("utf-8", errors="replace")
    # UTF-7 (and perhaps other decoders) let half a surrogate pair through, which no UTF-8
    # consumer (the full-text index) accepts; UTF-8's own decoder never does.
    if codec != "utf-8" and not text.isascii():
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _b64(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data)  # skips line breaks and other non-alphabet octets
    except (binascii.Error, ValueError):
        pass
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    if len(cleaned) % 4 == 1:  # a lone trailing character cannot encode anything
        cleaned = cleaned[:-1]
    try:
        return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        return b""


def _encoded_word(match: re.Match[str]) -> str:
    charset, kind, text = match.group(1), match.group(2).upper(), match.group(3)
    data = _raw(text) if text.isascii() else text.encode("utf-8")
    if kind == "B":
        decoded = _b64(data)
    else:
        decoded = quopri.decodestring(data.replace(b"_", b" "), header=False)
    return _decode_bytes(decoded, charset)


def decode_words(value: str) -> str:
    """RFC 2047 decoding of an unfolded latin-1 header value; raw 8-bit octets are read as
    UTF-8 (RFC 6532) with replacement characters where they are not."""
    if not value.isascii():
        value = _raw(value).decode("utf-8", errors="replace")
    value = _BETWEEN_WORDS_RE.sub(r"\1", value)  # RFC 2047 6.2: space between words drops
    return _ENCODED_WORD_RE.sub(_encoded_word, value)


def searchable_value(value: str) -> str:
    """An unfolded header value as SEARCH compares it: RFC 2047 decoded, and the tabs that
    folding leaves (`Subject: a\r\n\tb` unfolds to "a<TAB>b") read as spaces, since no
    one types a tab into a search box."""
    return decode_words(value).replace("\t", " ")


def decoded_header(part: Part, name: str) -> list[str]:
    """Every `name` field of the part, unfolded and decoded as SEARCH compares it."""
    return [searchable_value(value) for value in part.headers(name)]


def header_lines(part: Part) -> str:
    """The part's header as SEARCH TEXT reads it: "Name: value" lines, values decoded."""
    return "\n".join(f"{f.name}: {searchable_value(f.unfolded)}" for f in part.fields)


# HTML into the text a reader sees, for search: crude on purpose (search only needs the
# words), and linear on hostile markup (an unclosed "<" or "<!--" costs a bounded look).
_HIDDEN_START_RE = re.compile(r"<!--|<(script|style)\b[^<>]{0,4096}>", re.IGNORECASE)
_HIDDEN_END_RES = {"": re.compile("-->"),
                   "script": re.compile(r"</script\b[^<>]{0,4096}>", re.IGNORECASE),
                   "style": re.compile(r"</style\b[^<>]{0,4096}>", re.IGNORECASE)}
_HTML_BLOCK_RE = re.compile(
    r"</?(?:p|br|div|tr|td|th|li|ul|ol|dl|dt|dd|h[1-6]|hr|table|thead|tbody|tfoot|caption|"
    r"blockquote|pre|address|section|article|header|footer|nav|aside|title|body|html|head)"
    r"\b[^<>]{0,4096}>", re.IGNORECASE)
_TAG_RE = re.compile(r"<[^<>]{0,4096}>")


def html_text(markup: str) -> str:
    """Visible text of an HTML body: comments, scripts and styles dropped, whitespace runs
    collapsed as a browser does, block elements on their own lines, inline tags removed
    without a trace (so `Ver<b>y</b>` still reads "Very"), entities resolved."""
    text = " ".join(_without_hidden(markup).split())  # str.split: C speed, no regex
    text = _TAG_RE.sub("", _HTML_BLOCK_RE.sub("\n", text))
    text = html.unescape(text).replace("\xa0", " ")
    return "\n".join(line for line in map(str.strip, text.split("\n")) if line)


def _without_hidden(markup: str) -> str:
    """Comments, <script> and <style> elements cut out; one left open runs to the end, as
    in a browser. Each search starts where the last one ended, so this is linear."""
    kept: list[str] = []
    position = 0
    while (match := _HIDDEN_START_RE.search(markup, position)) is not None:
        kept += [markup[position:match.start()], " "]
        element = (match.group(1) or "").lower()
        end = _HIDDEN_END_RES[element].search(markup, match.end())
        if end is None:
            return "".join(kept)
        position = end.end()
    kept.append(markup[position:])
    return "".join(kept)


def _transfer_decode(data: bytes, encoding: str) -> bytes:
    if encoding == "BASE64":
        return _b64(data)
    if encoding == "QUOTED-PRINTABLE":
        try:
            return quopri.decodestring(data)
        except (ValueError, binascii.Error):
            return data
    return data


def _leaf_text(raw: bytes, part: Part) -> str:
    body = _transfer_decode(raw[part.body_start : part.end], part.encoding)
    text = _decode_bytes(body, part.param("CHARSET"))
    return html_text(text) if part.subtype == "HTML" else text


def attachment_name(part: Part) -> str | None:
    """The file name a mail client shows for the part: Content-Disposition's filename or
    Content-Type's name, RFC 2231 (`filename*=utf-8''...`) or RFC 2047 encoded, or neither."""
    for params, key in ((part.disposition_params, "FILENAME"), (part.params, "NAME")):
        for name, value in params:
            if name == key + "*":
                return _extended_value(value)
            if name == key:
                return decode_words(value)
    return None


def _extended_value(value: str) -> str:
    """RFC 2231 4: charset'language'percent-encoded octets."""
    charset, quote, rest = value.partition("'")
    if not quote:
        return decode_words(value)
    encoded = rest.partition("'")[2]
    octets = urllib.parse.unquote_to_bytes(encoded.encode("latin-1", "replace"))
    return _decode_bytes(octets, charset or "us-ascii")


def _readable(raw: bytes, root: Part) -> Iterator[str]:
    """In reading order: each text/* leaf's text, each attachment's file name, and the header
    of each attached message (a forwarded mail's From and Subject are part of what it says).
    Other message/* parts are read as text: a bounce's message/delivery-status names the
    failed recipient, and a message/global (RFC 6532 3.7) is an attached message in UTF-8."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node is not root and (name := attachment_name(node)):
            yield name
        if node.is_multipart:
            stack.extend(reversed(node.children))
        elif node.message is not None:
            yield header_lines(node.message)
            stack.append(node.message)
        elif node.maintype in ("TEXT", "MESSAGE"):
            yield _leaf_text(raw, node)


def decoded_text(raw: bytes, part: Part) -> str:
    """The readable text of the part's body, for SEARCH BODY/TEXT (see `_readable`): text
    transfer- and charset-decoded with replacement characters, HTML as `html_text` reads it,
    joined with newlines."""
    return "\n".join(_readable(raw, part))
