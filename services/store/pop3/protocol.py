"""POP3 grammar: parsing command lines and formatting replies. Pure: no asyncio, no I/O.

RFC 1939 (POP3), RFC 2449 (CAPA, extended response codes, line limits), RFC 2595 (STLS),
RFC 5034 with RFC 4616 (SASL PLAIN), RFC 3206 (SYS and AUTH response codes).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from common.words import counted
from services.store.imap.protocol.mime import MAX_HEADER_FIELDS

CRLF = b"\r\n"
TERMINATOR = b".\r\n"

# RFC 2449 section 4: a command line is at most 255 octets including the CRLF, and a server
# that supports CAPA "MUST support commands up to 255 octets": RFC 1939's 40-character limit
# on an argument is lifted with it (USER names are addresses of up to 254 octets, RFC 5321
# section 4.5.3.1.3; PASS's one argument may contain spaces, RFC 1939 section 7).
MAX_COMMAND_LINE = 255
# RFC 5034 section 4: SASL client responses are not bound by the 255-octet limit. Our own
# ceiling for any line we buffer (a PLAIN response with an address and password fits easily).
MAX_SASL_LINE = 4096

_KEYWORD_RE = re.compile(r"[A-Za-z]{3,4}")

# RFC 2449 section 8 / RFC 3206 extended response codes.
CODE_AUTH = "AUTH"
CODE_SYS_TEMP = "SYS/TEMP"
CODE_SYS_PERM = "SYS/PERM"
CODE_IN_USE = "IN-USE"


@dataclass(frozen=True)
class Command:
    keyword: str  # upper case
    args: tuple[str, ...]
    rest: str  # everything after the keyword and one space, verbatim (PASS uses it)


@dataclass(frozen=True)
class BadCommand:
    reason: str


def parse_command(line: bytes) -> Command | BadCommand:
    """Parse one command line (with or without its CRLF). Never raises."""
    if len(line) > MAX_COMMAND_LINE:
        return BadCommand("command line too long")
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    if b"\r" in line or b"\n" in line or b"\x00" in line:
        return BadCommand("invalid characters in command line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadCommand("command line is not valid UTF-8")
    keyword, _, rest = text.partition(" ")
    if not _KEYWORD_RE.fullmatch(keyword):
        return BadCommand("unknown command" if keyword else "empty command")
    keyword = keyword.upper()
    args = tuple(rest.split()) if rest else ()
    return Command(keyword, args, rest)


@dataclass(frozen=True)
class Reply:
    """The first line of a response: +OK / -ERR with an optional RFC 2449 response code."""

    ok: bool
    text: str
    code: str | None = None

    def format(self, **values: object) -> Reply:
        """The text with `values` filled in; a `count` also fills `{messages}` (`1 message`,
        `2 messages`)."""
        if isinstance(count := values.get("count"), int):
            values.setdefault("messages", counted(count, "message"))
        return Reply(self.ok, self.text.format(**values), self.code)

    def encode(self) -> bytes:
        status = "+OK" if self.ok else "-ERR"
        code = f" [{self.code}]" if self.code else ""
        text = f" {self.text}" if self.text else ""
        return f"{status}{code}{text}".encode() + CRLF


def ok(text: str) -> Reply:
    return Reply(True, text)


def err(text: str, code: str | None = None) -> Reply:
    return Reply(False, text, code)


# Named replies; tests import these.
OK_GREETING = ok("tiermail POP3 server ready")
OK_CAPA = ok("capability list follows")
OK_AUTH_LIST = ok("SASL mechanisms follow")
OK_USER = ok("send PASS")
OK_LOGGED_IN = ok("{user} has {messages} ({octets} octets)")
OK_STAT = ok("{count} {octets}")
OK_LIST_ALL = ok("{messages} ({octets} octets)")
OK_LIST_ONE = ok("{number} {size}")
OK_UIDL_ALL = ok("unique-id listing follows")
OK_UIDL_ONE = ok("{number} {uid}")
OK_RETR = ok("{size} octets")
OK_TOP = ok("top of message follows")
OK_DELE = ok("message {number} deleted")
OK_RSET = ok("maildrop has {messages} ({octets} octets)")
OK_NOOP = ok("")
OK_STLS = ok("begin TLS negotiation")
OK_BYE = ok("tiermail POP3 server signing off")
OK_BYE_UPDATED = ok("tiermail POP3 server signing off ({messages} left)")

ERR_UNKNOWN_COMMAND = err("unknown command")
ERR_BAD_SYNTAX = err("{reason}")
ERR_WRONG_STATE = err("command not valid in this state")
ERR_TOO_MANY_ERRORS = err("too many errors, closing connection")
ERR_TOO_MANY_CONNECTIONS = err("too many connections, try again later", CODE_SYS_TEMP)
ERR_TOO_MANY_FROM_ADDRESS = err("too many connections from your address, try again later",
                                CODE_SYS_TEMP)
ERR_LINE_TOO_LONG = err("line too long, closing connection")
ERR_NEED_USER = err("send USER first")
ERR_AUTH_FAILED = err("invalid credentials", CODE_AUTH)
ERR_STLS_FIRST = err("plaintext login not allowed, use STLS first", CODE_AUTH)
ERR_AUTH_CANCELLED = err("authentication cancelled")
ERR_AUTH_MECHANISM = err("unsupported SASL mechanism")
ERR_AUTH_MALFORMED = err("malformed SASL response")
ERR_IN_USE = err("mailbox locked by another session", CODE_IN_USE)
ERR_TLS_ACTIVE = err("TLS already active")
ERR_TLS_UNAVAILABLE = err("TLS not available")
ERR_STLS_PIPELINED = err("nothing may follow STLS before the TLS handshake")
ERR_NO_SUCH_MESSAGE = err("no such message")
ERR_DELETED = err("message {number} already deleted")
ERR_BAD_NUMBER = err("invalid message number")
ERR_INTERNAL = err("internal error", CODE_SYS_TEMP)
ERR_STORAGE_TEMP = err("mailbox temporarily unavailable", CODE_SYS_TEMP)
ERR_STORAGE_PERM = err("mailbox unavailable", CODE_SYS_PERM)
ERR_MESSAGE_GONE = err("message no longer available", CODE_SYS_PERM)
ERR_LOGIN_DEADLINE = err("too long without logging in")  # settings.pop3_login_deadline
ERR_ACCOUNT_DELETED = err("account deleted")  # tiermail user del (services/store/logins.py)

SASL_CONTINUE = b"+ " + CRLF  # RFC 5034 section 4: an empty challenge


def format_multiline(first: Reply, lines: Iterable[str | bytes]) -> bytes:
    """A complete multi-line response: first line, dot-stuffed lines, terminator."""
    parts = [first.encode()]
    for line in lines:
        raw = line.encode() if isinstance(line, str) else line
        if raw.startswith(b"."):
            raw = b"." + raw
        parts.append(raw + CRLF)
    parts.append(TERMINATOR)
    return b"".join(parts)


def parse_message_number(text: str) -> int | None:
    """A positive decimal message number (RFC 1939 section 5), or None."""
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return None
    number = int(text)
    return number if number > 0 else None


def parse_line_count(text: str) -> int | None:
    """TOP's non-negative line count (RFC 1939 section 7), or None. A count with more
    digits than any message has lines means the whole body, as a smaller large one does
    (the command line's length bounds the digits)."""
    if not text.isascii() or not text.isdigit():
        return None
    return int(text) if len(text) <= 10 else 10**10


_BARE_LF = re.compile(rb"(?<!\r)\n")


class DotStuffer:
    """Incremental multi-line body encoder (RFC 1939 section 3).

    Feed raw message bytes in chunks of any size; the output has every line that begins with
    "." prefixed with another ".", bare LF line ends turned into CRLF (messages arrive over
    SMTP with CRLF, but be robust), and `finish()` closes the last line and adds ".\\r\\n".
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._after_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._after_cr and chunk.startswith(b"\n"):
            out = b"\n" + _BARE_LF.sub(b"\r\n", chunk[1:])
        else:
            out = _BARE_LF.sub(b"\r\n", chunk)
        out = out.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        self._after_cr = out.endswith(b"\r")
        return out

    def finish(self) -> bytes:
        if self._after_cr:
            # A final lone CR: complete it into a line end.
            return b"\n" + TERMINATOR
        return TERMINATOR if self._at_line_start else CRLF + TERMINATOR


def stuff(data: bytes) -> bytes:
    """Whole-message form of DotStuffer: the encoded body including the terminator."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.finish()


def unstuff(data: bytes) -> bytes:
    """The inverse of `stuff` (what a client does): lines without the terminator, CRLF ends."""
    if not data.endswith(TERMINATOR):
        raise ValueError("missing terminator")
    body = data[: -len(TERMINATOR)]
    if not body:
        return b""
    lines = body.split(CRLF)
    if lines[-1] != b"":
        raise ValueError("body does not end with CRLF")
    out = [line[1:] if line.startswith(b".") else line for line in lines[:-1]]
    return CRLF.join(out) + CRLF


class TopExtractor:
    """Incremental TOP filter (RFC 1939 section 7): the header, the blank line after it and
    then at most `lines` lines of the body. Feed raw chunks, then `finish()`; `done` turns
    True once nothing more is needed, so the caller may stop reading the message.

    The header ends where IMAP's BODY[HEADER] ends (services/store/imap/protocol/mime.py,
    `_parse_header`): after a blank line, or before the first line that is neither a field
    nor a continuation, which is then the body's first line (found in review: a message
    without a blank line after its header, or with no header at all, was all header to TOP,
    so `TOP n 0` sent it whole); past MAX_HEADER_FIELDS fields, at the next blank line. A
    header line is held back only until its first octets say which it is, and each octet is
    looked at once (a long line that could still be a field name made it quadratic)."""

    def __init__(self, lines: int) -> None:
        self._remaining = lines
        self._in_header = True
        self._fields = 0  # field lines so far (continuations not counted)
        self._held = bytearray()  # a header line's start, until it is known what it is
        self._line = _LineStart.UNDECIDED  # what the current header line is
        self._phase = _Phase.START  # how far into its field name the scan is
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(chunk) and not self.done:
            newline = chunk.find(b"\n", pos)
            end = len(chunk) if newline == -1 else newline + 1
            out += self._line_part(chunk[pos:end], ends_line=newline != -1)
            pos = end
        return bytes(out)

    def finish(self) -> bytes:
        """At the end of the message: what is still held of its last line (one without a
        line end, which can then be no field: a body line)."""
        if self.done or not self._held:
            return b""
        held, self._held = bytes(self._held), bytearray()
        self.done = True
        return held if self._remaining > 0 or self._fields > MAX_HEADER_FIELDS else b""

    def _line_part(self, piece: bytes, ends_line: bool) -> bytes:
        """What to send of `piece`, part of one line (its end when `ends_line`)."""
        if not self._in_header:
            if ends_line:
                self._remaining -= 1
                self.done = self._remaining <= 0
            return piece
        if self._line is _LineStart.UNDECIDED:
            scanned = len(self._held)
            self._held += piece
            self._line = self._scan(scanned)
            if self._line is _LineStart.UNDECIDED:
                return b""
            piece, self._held = bytes(self._held), bytearray()
            if self._line is _LineStart.BODY:
                self._in_header = False
                if self._remaining == 0:
                    self.done = True
                    return b""
                return self._line_part(piece, ends_line)
        if ends_line:
            if self._line is _LineStart.BLANK:
                self._in_header = False
                self.done = self._remaining == 0
            self._line, self._phase = _LineStart.UNDECIDED, _Phase.START
        return piece

    def _scan(self, pos: int) -> _LineStart:
        """Read on in the held line from `pos`, as mime._parse_header decides: a field name
        of printable octets, optional blanks, a colon; a continuation after a field; a blank
        line; anything else is body."""
        held = self._held
        while pos < len(held):
            octet = held[pos]
            if self._phase is _Phase.START:
                if self._fields > MAX_HEADER_FIELDS:  # not read on: header to a blank line
                    return self._past_the_field_limit()
                if octet in b" \t":
                    return _LineStart.HEADER if self._fields else _LineStart.BODY
                if octet == 10:
                    return _LineStart.BLANK
                if octet == 13:
                    self._phase, pos = _Phase.CR, pos + 1
                elif _NAME_RUN.match(held, pos):
                    self._phase = _Phase.NAME  # read there, from this octet on
                else:
                    return _LineStart.BODY
            elif self._phase is _Phase.CR:
                return _LineStart.BLANK if octet == 10 else _LineStart.BODY
            else:
                run = (_NAME_RUN if self._phase is _Phase.NAME else _BLANK_RUN).match(held, pos)
                pos = run.end() if run else pos  # (to the end of what is held so far)
                if pos == len(held):
                    break
                if held[pos] in b" \t":
                    self._phase = _Phase.BLANKS
                    continue
                if held[pos] == ord(":"):
                    self._fields += 1
                    return _LineStart.HEADER
                return _LineStart.BODY
        return _LineStart.UNDECIDED


    def _past_the_field_limit(self) -> _LineStart:
        """A line after MAX_HEADER_FIELDS fields: header, unless it is the blank line."""
        if self._held[:1] == b"\n" or self._held[:2] == b"\r\n":
            return _LineStart.BLANK
        return _LineStart.UNDECIDED if self._held == b"\r" else _LineStart.HEADER


class _LineStart(enum.Enum):
    UNDECIDED = "not known yet"
    HEADER = "a field or a continuation"
    BLANK = "the blank line ending the header"
    BODY = "the body's first line"


class _Phase(enum.Enum):
    START = "nothing read"
    CR = "a CR: a blank line if LF follows"
    NAME = "in a field name"
    BLANKS = "in blanks after a field name"


_NAME_RUN = re.compile(rb"[!-9;-~]+")
_BLANK_RUN = re.compile(rb"[ \t]+")


def top(message: bytes, lines: int) -> bytes:
    """Whole-message form of TopExtractor."""
    extractor = TopExtractor(lines)
    return extractor.feed(message) + extractor.finish()


def decode_sasl_response(response: str, *, initial: bool) -> bytes | None:
    """The octets of a base64 client response (RFC 5034 4), None when it is no base64. The
    initial response on the AUTH line spells an empty one "=" (an empty line answers a
    challenge); what the octets must be is the mechanism's business (common/sasl.py)."""
    text = response.strip()
    if initial and text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def redact(line: bytes) -> str:
    """A command line fit for a DEBUG log: PASS and AUTH arguments replaced by ****."""
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    words = text.split(None, 1)  # any whitespace: "PASS<TAB>secret" is read as PASS too
    keyword, rest = (words + ["", ""])[:2]
    upper = keyword.upper()
    if upper == "PASS" and rest:
        return f"{keyword} ****"
    if upper == "AUTH" and rest:
        mechanism, *initial = rest.split(None, 1)
        return f"{keyword} {mechanism} ****" if initial else f"{keyword} {mechanism}"
    return text
