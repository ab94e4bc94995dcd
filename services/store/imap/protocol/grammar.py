"""IMAP command grammar (RFC 3501 section 9 and extensions): RawCommand -> typed Command. Pure.

Extensions parsed here: SASL-IR (RFC 4959), LITERAL+ (RFC 7888), UNSELECT (RFC 3691), IDLE
(RFC 2177), ENABLE (RFC 5161), COMPRESS (RFC 4978), ID (RFC 2971), NAMESPACE (RFC 2342),
QUOTA (RFC 9208), CONDSTORE/QRESYNC (RFC 7162), LIST-EXTENDED (RFC 5258), LIST-STATUS
(RFC 5819), SPECIAL-USE (RFC 6154), MOVE (RFC 6851), UIDPLUS's UID EXPUNGE (RFC 4315), ESEARCH
(RFC 4731), SORT and THREAD (RFC 5256), ESORT's RETURN (RFC 5267).

`parse_command` never raises: a malformed command becomes `ParseError(tag, text)` with a short
text the session sends after `tag BAD`. Not supported (ParseError): literal8 / BINARY
(RFC 3516), MULTIAPPEND (RFC 3502), SEARCHRES "$" (RFC 5182), UTF8=ACCEPT mailbox names
(RFC 6855: names must be modified UTF-7 ASCII).
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Callable
from typing import TypeVar

from services.store.imap.protocol import mutf7
from services.store.imap.protocol.command import (
    Append,
    Authenticate,
    Command,
    Compress,
    CopyMove,
    Enable,
    Fetch,
    FetchAtt,
    Id,
    ListArgs,
    Login,
    MailboxArg,
    ParseError,
    QresyncParams,
    QuotaRoot,
    Rename,
    Search,
    SearchKey,
    Section,
    Select,
    SequenceSet,
    Sort,
    Status,
    Store,
    Thread,
    UidExpunge,
)
from services.store.imap.protocol.mime import known_codec
from services.store.imap.protocol.parser import RawCommand
from services.store.imap.protocol.sequence import parse_sequence_set

T = TypeVar("T")

MAX_NUMBER = 2**32 - 1  # RFC 3501 section 9: number is an unsigned 32-bit integer
MAX_MODSEQ = 2**63 - 1  # RFC 7162 section 7: mod-sequence-value is a 63-bit integer
# Nesting of parenthesised SEARCH keys and NOT/OR chains: far beyond what clients send, low
# enough that a hostile command cannot exhaust the stack.
MAX_SEARCH_DEPTH = 64
# Keys in one search program: each is a pass over the mailbox, so thousands of them (one line
# holds 16,000) made one command cost seconds of the store's CPU (found in review). Far more
# than clients send (they put the UIDs they mean in one set).
MAX_SEARCH_KEYS = 1000
# Patterns in one LIST (RFC 5258): each is matched against every mailbox name, a character at
# a time; 8,000 in one line held the store for seconds (found in review). Clients send a few.
MAX_LIST_PATTERNS = 100
# Items in one FETCH: each header-fields item goes through the message's whole header again;
# 2,000 of them on one message with many header fields held the store for 3.6 s (found in
# review). Clients ask for a dozen (the field names of one item are not counted).
MAX_FETCH_ITEMS = 100

# RFC 3501 section 9 character classes (atom-specials, ASTRING-CHAR, list-char).
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
_ATOM_CHARS = frozenset(c for c in range(0x21, 0x7F) if c not in _ATOM_SPECIALS)
_ASTRING_CHARS = _ATOM_CHARS | {ord("]")}
_LIST_CHARS = _ASTRING_CHARS | {ord("%"), ord("*")}
_TAG_CHARS = _ASTRING_CHARS - {ord("+")}
_SEQUENCE_CHARS = frozenset(b"0123456789:,*$")
_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")
_DIGITS = frozenset(b"0123456789")
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")

SYSTEM_FLAGS = {
    f.upper(): f
    for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
}
SPECIAL_USE = {
    f.upper(): f
    for f in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
}
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
STATUS_ITEMS = frozenset(
    {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE",
     "DELETED", "DELETED-STORAGE", "APPENDLIMIT"}
)
LIST_SELECT_OPTIONS = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
LIST_RETURN_OPTIONS = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE"})
SEARCH_RETURN_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT"})
SORT_KEYS = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)
THREAD_ALGORITHMS = frozenset({"ORDEREDSUBJECT", "REFERENCES"})

# RFC 3501 section 6.4.5: the macros and what they stand for.
FETCH_MACROS = {
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
SIMPLE_FETCH_ATTS = frozenset(
    {"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
     "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID", "MODSEQ"}
)
SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})

SEARCH_FLAG_KEYS = frozenset(
    {"ALL", "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "NEW", "OLD", "RECENT", "SEEN",
     "UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED", "UNSEEN"}
)
SEARCH_STRING_KEYS = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
SEARCH_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
_SEARCH_KEYS_WITH_ARGUMENTS = SEARCH_STRING_KEYS | SEARCH_DATE_KEYS | {
    "KEYWORD", "UNKEYWORD", "LARGER", "SMALLER", "UID", "HEADER", "NOT", "OR", "MODSEQ"
}

# Charsets a SEARCH string is decoded with as UTF-8 (RFC 3501 6.4.4: US-ASCII and UTF-8 must be
# supported; 8-bit in an US-ASCII search is taken as UTF-8 rather than refused).
_UTF8_CHARSETS = frozenset({"US-ASCII", "UTF-8", "ASCII", "UTF8"})


def known_charset(name: str) -> bool:
    """Whether SEARCH/SORT/THREAD strings in `name` can be decoded (else `NO [BADCHARSET]`)."""
    if name.upper() in _UTF8_CHARSETS:
        return True
    codec = known_codec(name)  # None too for punycode & co, decoded in the event loop
    if codec is None:
        return False
    try:
        # LookupError for bytes-to-bytes codecs such as base64.
        b"\0\0\0\0".decode(codec, "ignore")
    except (LookupError, ValueError):
        return False
    return True


class _Syntax(Exception):
    """A syntax error inside the grammar; becomes ParseError at the edge, never escapes."""


class Cursor:
    """Reads RFC 3501 syntax elements from one RawCommand, left to right."""

    def __init__(self, raw: RawCommand) -> None:
        # Trailing spaces after the last token are tolerated (no token can end with a space).
        self.data = raw.line.rstrip(b" ")
        self.pos = 0
        self.literals = raw.literals
        self.next_literal = 0
        self.charset: str | None = None  # SEARCH strings are decoded with this

    # -- characters -------------------------------------------------------------------------

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    def peek_is(self, chars: bytes) -> bool:
        return self.data.startswith(chars, self.pos)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def expect(self, chars: bytes, what: str | None = None) -> None:
        if not self.data.startswith(chars, self.pos):
            raise _Syntax(f"expected {what or chars.decode()}")
        self.pos += len(chars)

    def sp(self) -> None:
        self.expect(b" ", "a space")

    def maybe(self, chars: bytes) -> bool:
        if self.data.startswith(chars, self.pos):
            self.pos += len(chars)
            return True
        return False

    def end(self) -> None:
        if not self.at_end():
            raise _Syntax("unexpected characters at the end of the command")

    def run(self, allowed: frozenset[int] | set[int]) -> bytes:
        start = self.pos
        data = self.data
        while self.pos < len(data) and data[self.pos] in allowed:
            self.pos += 1
        return data[start : self.pos]

    # -- atoms, numbers ---------------------------------------------------------------------

    def atom(self, what: str = "an atom") -> str:
        text = self.run(_ATOM_CHARS)
        if not text:
            raise _Syntax(f"expected {what}")
        return text.decode("ascii")

    def keyword(self, what: str = "a keyword") -> str:
        """An atom, upper-cased: command names, options, FETCH items, SEARCH keys."""
        return self.atom(what).upper()

    def name(self, what: str) -> str:
        """Letters, digits, "." and "-", upper-cased: FETCH item and section names."""
        text = self.run(_NAME_CHARS)
        if not text:
            raise _Syntax(f"expected {what}")
        return text.decode("ascii").upper()

    def number(self, limit: int = MAX_NUMBER, what: str = "a number") -> int:
        digits = self.run(_DIGITS)
        if not digits or len(digits) > 20 or int(digits) > limit:
            raise _Syntax(f"expected {what}")
        return int(digits)

    def nz_number(self, what: str = "a non-zero number") -> int:
        value = self.number(what=what)
        if value == 0:
            raise _Syntax(f"expected {what}")
        return value

    def modseq(self) -> int:
        return self.number(MAX_MODSEQ, "a mod-sequence value")

    # -- strings ----------------------------------------------------------------------------

    def string_bytes(self) -> bytes:
        if self.peek_is(b'"'):
            return self._quoted()
        if self.peek_is(b"{"):
            return self._literal()
        if self.peek_is(b"~{"):
            raise _Syntax("literal8 is not supported")
        raise _Syntax("expected a string")

    def _quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        data = self.data
        while True:
            char = self.peek()
            if char is None or char in (0x00, 0x0A, 0x0D):
                raise _Syntax("unterminated quoted string")
            self.pos += 1
            if char == 0x22:
                return bytes(out)
            if char == 0x5C:
                escaped = self.peek()
                if escaped not in (0x22, 0x5C):
                    raise _Syntax('only \\" and \\\\ may be escaped in a quoted string')
                self.pos += 1
                out.append(data[self.pos - 1])
            else:
                out.append(char)

    def _literal(self) -> bytes:
        self.expect(b"{")
        size = self.number(what="a literal length")
        self.maybe(b"+")
        self.expect(b"}\r\n", "a literal")
        if self.next_literal >= len(self.literals):
            raise _Syntax("missing literal data")
        value = self.literals[self.next_literal]
        if len(value) != size:
            raise _Syntax("literal length mismatch")
        self.next_literal += 1
        return value

    def astring_bytes(self) -> bytes:
        if self.peek_is(b'"') or self.peek_is(b"{") or self.peek_is(b"~{"):
            return self.string_bytes()
        text = self.run(_ASTRING_CHARS)
        if not text:
            raise _Syntax("expected a string")
        return text

    def astring(self) -> str:
        return _utf8(self.astring_bytes())

    def nil_or(self, read: Callable[[], str]) -> str | None:
        if self.is_word(b"NIL"):
            self.pos += 3
            return None
        return read()

    def is_word(self, word: bytes) -> bool:
        """`word` (any case) comes next and is not the start of a longer atom."""
        end = self.pos + len(word)
        if self.data[self.pos : end].upper() != word:
            return False
        return end >= len(self.data) or self.data[end] not in _ASTRING_CHARS

    def search_string(self) -> str:
        text = self._search_text(self.astring_bytes())
        # RFC 3501 9: no string holds NUL (CHAR8 is %x01-ff); the full-text index cannot
        # look for one, nor for half a surrogate pair (which UTF-7 can spell).
        if "\x00" in text:
            raise _Syntax("a search string may not hold NUL")
        if not text.isascii() and not _encodable(text):
            raise _Syntax("a search string may not hold a lone surrogate")
        return text

    def _search_text(self, raw: bytes) -> str:
        charset = (self.charset or "UTF-8").upper()
        if charset in _UTF8_CHARSETS:
            return _utf8(raw)
        if not known_charset(charset):
            # The session refuses unknown charsets (NO [BADCHARSET]) after looking at `charset`.
            return raw.decode("utf-8", "replace")
        try:
            return raw.decode(known_codec(charset) or "utf-8")
        except ValueError as exc:
            raise _Syntax(f"string is not valid {charset}") from exc

    # -- mailbox names ----------------------------------------------------------------------

    def mailbox(self) -> str:
        """RFC 3501 `mailbox`: astring, modified UTF-7 decoded, INBOX in any case -> INBOX."""
        name = _mailbox_name(self.astring_bytes())
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> str:
        """RFC 3501 `list-mailbox`: like astring but also "%" and "*"; no INBOX folding."""
        if self.peek_is(b'"') or self.peek_is(b"{"):
            return _mailbox_name(self.string_bytes())
        text = self.run(_LIST_CHARS)
        if not text:
            raise _Syntax("expected a mailbox pattern")
        return _mailbox_name(text)

    # -- lists, flags, sets -----------------------------------------------------------------

    def paren_list(self, item: Callable[[], T], empty_ok: bool = True) -> list[T]:
        self.expect(b"(")
        items: list[T] = []
        if self.maybe(b")"):
            if not empty_ok:
                raise _Syntax("empty list")
            return items
        items.append(item())
        while not self.maybe(b")"):
            self.sp()
            items.append(item())
        return items

    def flag(self) -> str:
        """RFC 3501 `flag`: system flags normalised to "\\Seen" etc., keywords as sent. Any
        other "\\" flag is refused: it is a flag-extension, reserved for future standards,
        which a server MUST NOT generate (RFC 3501 2.3.2), so it could never be stored."""
        if self.maybe(b"\\"):
            text = "\\" + self.atom("a flag")
            known = SYSTEM_FLAGS.get(text.upper())
            if known is None:
                raise _Syntax(f"unknown system flag {text}")
            return known
        return self.atom("a flag")

    def flag_list(self) -> tuple[str, ...]:
        return tuple(self.paren_list(self.flag))

    def sequence_set(self) -> SequenceSet:
        text = self.run(_SEQUENCE_CHARS)
        if not text:
            raise _Syntax("expected a sequence set")
        try:
            return parse_sequence_set(text.decode("ascii"))
        except ValueError as exc:
            raise _Syntax(str(exc)) from exc

    # -- dates ------------------------------------------------------------------------------

    def date(self) -> datetime.date:
        """RFC 3501 `date`: 1-Feb-1994, optionally quoted."""
        quoted = self.maybe(b'"')
        day = self._digits(1, 2, "a day")
        month = self._month()
        self.expect(b"-", "a date")
        year = self._digits(4, 4, "a year")
        if quoted:
            self.expect(b'"')
        return _make_date(year, month, day)

    def date_time(self) -> datetime.datetime:
        """RFC 3501 `date-time`: "17-Jul-1996 02:44:25 -0700"."""
        self.expect(b'"', "a date-time")
        self.maybe(b" ")  # date-day-fixed: " 1" or "01"
        day = self._digits(1, 2, "a day")
        month = self._month()
        self.expect(b"-", "a date")
        year = self._digits(4, 4, "a year")
        self.sp()
        hour = self._digits(2, 2, "hours")
        self.expect(b":", "a time")
        minute = self._digits(2, 2, "minutes")
        self.expect(b":", "a time")
        second = self._digits(2, 2, "seconds")
        self.sp()
        sign = -1 if self.maybe(b"-") else 1
        if sign == 1:
            self.expect(b"+", "a time zone")
        zone = self._digits(4, 4, "a time zone")
        self.expect(b'"')
        offset = datetime.timedelta(hours=zone // 100, minutes=zone % 100)
        if zone % 100 >= 60 or offset >= datetime.timedelta(hours=24):
            raise _Syntax("bad time zone")
        try:
            value = datetime.datetime(
                year, month, day, hour, minute, second,
                tzinfo=datetime.timezone(sign * offset),
            )
            # "01-Jan-0001 00:00:00 +0100" is before year 1 in UTC, which the store, SEARCH's
            # date keys and FETCH's INTERNALDATE all work in.
            value.astimezone(datetime.UTC)
        except (ValueError, OverflowError) as exc:
            raise _Syntax("bad date-time") from exc
        return value

    def _digits(self, least: int, most: int, what: str) -> int:
        digits = self.run(_DIGITS)
        if not least <= len(digits) <= most:
            raise _Syntax(f"expected {what}")
        return int(digits)

    def _month(self) -> int:
        self.expect(b"-", "a date")
        text = self.data[self.pos : self.pos + 3].decode("ascii", "replace").upper()
        if text not in MONTHS:
            raise _Syntax("bad month")
        self.pos += 3
        return MONTHS.index(text) + 1


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Syntax("string is not UTF-8") from exc


def _mailbox_name(raw: bytes) -> str:
    try:
        return mutf7.decode(raw.decode("ascii"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise _Syntax("mailbox name is not valid modified UTF-7") from exc


def _make_date(year: int, month: int, day: int) -> datetime.date:
    try:
        return datetime.date(year, month, day)
    except ValueError as exc:
        raise _Syntax("bad date") from exc


# -- commands ---------------------------------------------------------------------------------

Handler = Callable[[Cursor, bool], object]


def _no_args(c: Cursor, uid: bool) -> None:
    if not c.at_end():
        raise _Syntax("this command takes no arguments")


def _authenticate(c: Cursor, uid: bool) -> Authenticate:
    c.sp()
    mechanism = c.keyword("a SASL mechanism")
    if not c.maybe(b" "):
        return Authenticate(mechanism)
    if c.maybe(b"="):
        return Authenticate(mechanism, b"")
    text = c.run(_BASE64_CHARS)
    try:
        return Authenticate(mechanism, base64.b64decode(text, validate=True))
    except binascii.Error as exc:
        raise _Syntax("bad base64 in initial response") from exc


def _login(c: Cursor, uid: bool) -> Login:
    c.sp()
    user = c.astring_bytes()
    c.sp()
    password = c.astring_bytes()
    try:
        return Login(user.decode("utf-8"), password.decode("utf-8"))
    except UnicodeDecodeError:
        return Login(user.decode("utf-8", "replace"), "", readable=False)


def _select(c: Cursor, uid: bool) -> Select:
    c.sp()
    mailbox = c.mailbox()
    condstore = False
    qresync: QresyncParams | None = None
    if c.maybe(b" "):
        for param in c.paren_list(lambda: _select_param(c), empty_ok=False):
            if param == "CONDSTORE":
                condstore = True
            else:
                assert isinstance(param, QresyncParams)
                qresync = param
    return Select(mailbox, condstore, qresync)


def _select_param(c: Cursor) -> str | QresyncParams:
    name = c.keyword("a SELECT parameter")
    if name == "CONDSTORE":
        return name
    if name != "QRESYNC":
        raise _Syntax(f"unknown SELECT parameter {name}")
    c.sp()
    c.expect(b"(")
    uidvalidity = c.nz_number("a UIDVALIDITY")
    c.sp()
    modseq = c.modseq()
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None
    if c.maybe(b" "):
        if not c.peek_is(b"("):
            known_uids = c.sequence_set()
            if c.maybe(b" "):
                seq_match = _seq_match(c)
        else:
            seq_match = _seq_match(c)
    c.expect(b")")
    return QresyncParams(uidvalidity, modseq, known_uids, seq_match)


def _seq_match(c: Cursor) -> tuple[SequenceSet, SequenceSet]:
    c.expect(b"(")
    seqs = c.sequence_set()
    c.sp()
    uids = c.sequence_set()
    c.expect(b")")
    return seqs, uids


def _create(c: Cursor, uid: bool) -> MailboxArg:
    c.sp()
    mailbox = c.mailbox()
    special_use: tuple[str, ...] = ()
    if c.maybe(b" "):
        c.expect(b"(")
        if c.keyword("a CREATE parameter") != "USE":
            raise _Syntax("only the USE parameter of CREATE is supported")
        c.sp()
        special_use = tuple(c.paren_list(lambda: _use_attr(c)))
        c.expect(b")")
    return MailboxArg(mailbox, special_use)


def _use_attr(c: Cursor) -> str:
    c.expect(b"\\", "a special-use attribute")
    text = "\\" + c.atom("a special-use attribute")
    return SPECIAL_USE.get(text.upper(), text)


def _mailbox_arg(c: Cursor, uid: bool) -> MailboxArg:
    c.sp()
    return MailboxArg(c.mailbox())


def _rename(c: Cursor, uid: bool) -> Rename:
    c.sp()
    old = c.mailbox()
    c.sp()
    return Rename(old, c.mailbox())


def _list(c: Cursor, uid: bool) -> ListArgs:
    c.sp()
    select_options: frozenset[str] = frozenset()
    extended = c.peek_is(b"(")
    if extended:
        select_options = frozenset(c.paren_list(lambda: c.keyword("a LIST option")))
        unknown = select_options - LIST_SELECT_OPTIONS
        if unknown:
            raise _Syntax(f"unknown LIST selection option {min(unknown)}")
        if "RECURSIVEMATCH" in select_options and "SUBSCRIBED" not in select_options:
            # RFC 5258 3.1 and 6: it modifies a base option (SUBSCRIBED is ours); REMOTE and
            # SPECIAL-USE (RFC 6154 6) are independent options.
            raise _Syntax("RECURSIVEMATCH needs the SUBSCRIBED selection option")
        c.sp()
    reference = _mailbox_name(c.astring_bytes())
    c.sp()
    if c.peek_is(b"("):
        extended = True
        patterns = tuple(c.paren_list(c.list_mailbox, empty_ok=False))
        if len(patterns) > MAX_LIST_PATTERNS:
            raise _Syntax(f"more than {MAX_LIST_PATTERNS} mailbox patterns")
    else:
        patterns = (c.list_mailbox(),)
    return_options: set[str] = set()
    return_status: tuple[str, ...] = ()
    if c.maybe(b" "):
        extended = True
        if c.keyword("RETURN") != "RETURN":
            raise _Syntax("expected RETURN")
        c.sp()
        for option in c.paren_list(lambda: _list_return_option(c)):
            if isinstance(option, tuple):
                return_status = option
            else:
                return_options.add(option)
    return ListArgs(reference, patterns, select_options, frozenset(return_options), return_status,
                    extended)


def _list_return_option(c: Cursor) -> str | tuple[str, ...]:
    option = c.keyword("a LIST return option")
    if option == "STATUS":
        c.sp()
        return _status_items(c)
    if option not in LIST_RETURN_OPTIONS:
        raise _Syntax(f"unknown LIST return option {option}")
    return option


def _lsub(c: Cursor, uid: bool) -> ListArgs:
    c.sp()
    reference = _mailbox_name(c.astring_bytes())
    c.sp()
    return ListArgs(reference, (c.list_mailbox(),))


def _status(c: Cursor, uid: bool) -> Status:
    c.sp()
    mailbox = c.mailbox()
    c.sp()
    return Status(mailbox, _status_items(c))


def _status_items(c: Cursor) -> tuple[str, ...]:
    items = tuple(c.paren_list(lambda: c.keyword("a STATUS item"), False))
    for item in items:
        if item not in STATUS_ITEMS:
            raise _Syntax(f"unknown STATUS item {item}")
    return items


def _append(c: Cursor, uid: bool) -> Append:
    c.sp()
    mailbox = c.mailbox()
    c.sp()
    flags: tuple[str, ...] = ()
    date: datetime.datetime | None = None
    if c.peek_is(b"("):
        flags = c.flag_list()
        c.sp()
    if c.peek_is(b'"'):
        date = c.date_time()
        c.sp()
    if c.peek_is(b"~{"):
        raise _Syntax("literal8 (BINARY) is not supported")
    if not c.peek_is(b"{"):
        raise _Syntax("expected the message as a literal")
    message = c.string_bytes()
    if c.peek_is(b" "):
        raise _Syntax("MULTIAPPEND is not supported")
    return Append(mailbox, message, flags, date)


# -- SEARCH, SORT, THREAD ---------------------------------------------------------------------


def _search(c: Cursor, uid: bool) -> Search:
    c.sp()
    return_options = _search_return(c)
    charset: str | None = None
    if c.is_word(b"CHARSET"):
        c.pos += len(b"CHARSET")
        c.sp()
        charset = c.astring().upper()
        c.charset = charset
        c.sp()
    return Search(_search_program(c), charset, return_options)


def _search_return(c: Cursor) -> tuple[str, ...] | None:
    """RFC 4731 `search-return-opts` (also ESORT's); RETURN () means RETURN (ALL)."""
    if not c.is_word(b"RETURN"):
        return None
    c.pos += len(b"RETURN")
    c.sp()
    options = tuple(c.paren_list(lambda: c.keyword("a RETURN option")))
    for option in options:
        if option not in SEARCH_RETURN_OPTIONS:
            raise _Syntax(f"unsupported RETURN option {option}")
    c.sp()
    return options or ("ALL",)


def _search_program(c: Cursor) -> SearchKey:
    keys = [_search_key(c, 0)]
    while c.maybe(b" "):
        keys.append(_search_key(c, 0))
    if sum(map(_count_keys, keys)) > MAX_SEARCH_KEYS:
        raise _Syntax(f"more than {MAX_SEARCH_KEYS} search keys")
    return SearchKey("AND", children=tuple(keys))


def _count_keys(key: SearchKey) -> int:
    return 1 + sum(_count_keys(child) for child in key.children)


def _search_key(c: Cursor, depth: int) -> SearchKey:
    if depth > MAX_SEARCH_DEPTH:
        raise _Syntax("search program nested too deeply")
    if c.peek_is(b"("):
        children = c.paren_list(lambda: _search_key(c, depth + 1), empty_ok=False)
        return SearchKey("AND", children=tuple(children))
    char = c.peek()
    if char is not None and char in _SEQUENCE_CHARS:
        return SearchKey("SEQ", c.sequence_set())
    kind = c.keyword("a search key")
    if kind in SEARCH_FLAG_KEYS:
        return SearchKey(kind)
    if kind not in _SEARCH_KEYS_WITH_ARGUMENTS:
        raise _Syntax(f"unknown search key {kind}")
    c.sp()
    if kind in SEARCH_STRING_KEYS:
        return SearchKey(kind, c.search_string())
    if kind in SEARCH_DATE_KEYS:
        return SearchKey(kind, c.date())
    if kind in ("KEYWORD", "UNKEYWORD"):
        return SearchKey(kind, c.flag())
    if kind in ("LARGER", "SMALLER"):
        return SearchKey(kind, c.number())
    if kind == "UID":
        return SearchKey(kind, c.sequence_set())
    if kind == "HEADER":
        name = c.astring()
        c.sp()
        return SearchKey(kind, c.search_string(), name=name)
    if kind == "NOT":
        return SearchKey(kind, children=(_search_key(c, depth + 1),))
    if kind == "OR":
        first = _search_key(c, depth + 1)
        c.sp()
        return SearchKey(kind, children=(first, _search_key(c, depth + 1)))
    assert kind == "MODSEQ"
    return SearchKey(kind, _search_modseq(c))


def _search_modseq(c: Cursor) -> int:
    """RFC 7162 3.1.5: MODSEQ [entry-name entry-type-req] value; the entry is ignored, as
    per-flag mod-sequences are not kept (every entry has the message's MODSEQ)."""
    if c.peek_is(b'"'):
        c.string_bytes()
        c.sp()
        if c.keyword("an entry type") not in ("PRIV", "SHARED", "ALL"):
            raise _Syntax("bad MODSEQ entry type")
        c.sp()
    return c.modseq()


def _sort(c: Cursor, uid: bool) -> Sort:
    c.sp()
    return_options = _search_return(c)
    criteria = tuple(c.paren_list(lambda: c.keyword("a sort key"), empty_ok=False))
    _check_sort_criteria(criteria)
    c.sp()
    charset = c.astring().upper()
    c.charset = charset
    c.sp()
    return Sort(criteria, charset, _search_program(c), return_options)


def _check_sort_criteria(criteria: tuple[str, ...]) -> None:
    """RFC 5256: sort-criterion = ["REVERSE" SP] sort-key."""
    after_reverse = False
    for word in criteria:
        if word == "REVERSE" and not after_reverse:
            after_reverse = True
        elif word in SORT_KEYS:
            after_reverse = False
        else:
            raise _Syntax(f"bad sort criterion {word}")
    if after_reverse:
        raise _Syntax("REVERSE needs a sort key")


def _thread(c: Cursor, uid: bool) -> Thread:
    c.sp()
    algorithm = c.keyword("a threading algorithm")
    if algorithm not in THREAD_ALGORITHMS:
        raise _Syntax(f"unsupported threading algorithm {algorithm}")
    c.sp()
    charset = c.astring().upper()
    c.charset = charset
    c.sp()
    return Thread(algorithm, charset, _search_program(c))


# -- FETCH, STORE, COPY, MOVE, UID EXPUNGE ----------------------------------------------------


def _fetch(c: Cursor, uid: bool) -> Fetch:
    c.sp()
    sequence = c.sequence_set()
    c.sp()
    if c.peek_is(b"("):
        atts = tuple(c.paren_list(lambda: _fetch_att(c), empty_ok=False))
        if len(atts) > MAX_FETCH_ITEMS:
            raise _Syntax(f"more than {MAX_FETCH_ITEMS} FETCH items")
    else:
        start = c.pos
        word = c.name("a FETCH item")
        if word in FETCH_MACROS and (c.at_end() or c.peek_is(b" ")):
            atts = tuple(FetchAtt(name) for name in FETCH_MACROS[word])
        else:
            c.pos = start
            atts = (_fetch_att(c),)
    changedsince: int | None = None
    vanished = False
    if c.maybe(b" "):
        for modifier in c.paren_list(lambda: _fetch_modifier(c), empty_ok=False):
            if modifier == "VANISHED":
                vanished = True
            else:
                assert isinstance(modifier, int)
                changedsince = modifier
    if vanished and not (uid and changedsince is not None):
        raise _Syntax("VANISHED needs UID FETCH and CHANGEDSINCE")  # RFC 7162 3.2.6
    return Fetch(sequence, atts, changedsince, vanished)


def _fetch_modifier(c: Cursor) -> str | int:
    name = c.keyword("a FETCH modifier")
    if name == "VANISHED":
        return name
    if name != "CHANGEDSINCE":
        raise _Syntax(f"unknown FETCH modifier {name}")
    c.sp()
    return c.modseq()


def _fetch_att(c: Cursor) -> FetchAtt:
    name = c.name("a FETCH item")
    if name in ("BODY", "BODY.PEEK") and c.peek_is(b"["):
        section = _section(c)
        partial = _partial(c) if c.peek_is(b"<") else None
        return FetchAtt("BODY[]", section, name == "BODY.PEEK", partial)
    if name in SIMPLE_FETCH_ATTS:
        return FetchAtt(name)
    if name.startswith("BINARY"):
        raise _Syntax("BINARY is not supported")
    raise _Syntax(f"unknown FETCH item {name}")


def _section(c: Cursor) -> Section:
    """RFC 3501 `section`: "[" [section-spec] "]"."""
    c.expect(b"[")
    if c.maybe(b"]"):
        return Section()
    words = c.name("a section").split(".")
    if "" in words:
        raise _Syntax("bad section")
    parts: list[int] = []
    while words and words[0].isdigit():
        part = words.pop(0)
        if part.startswith("0") or len(part) > 10 or int(part) > MAX_NUMBER:
            raise _Syntax("bad section part number")
        parts.append(int(part))
    text = ".".join(words) or None
    if text is not None and (text not in SECTION_TEXTS or (text == "MIME" and not parts)):
        raise _Syntax("bad section")
    fields: tuple[str, ...] = ()
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        c.maybe(b" ")
        fields = tuple(c.paren_list(lambda: _header_field_name(c), empty_ok=False))
    c.expect(b"]")
    return Section(tuple(parts), text, fields)


def _header_field_name(c: Cursor) -> str:
    # The response echoes the name (RFC 3501 7.4.2), and no string holds NUL (CHAR8 is
    # %x01-ff, RFC 3501 9): a name with one could only be answered with an invalid literal.
    name = c.astring().upper()
    if "\x00" in name:
        raise _Syntax("a header field name may not hold NUL")
    return name


def _partial(c: Cursor) -> tuple[int, int]:
    c.expect(b"<")
    origin = c.number()
    c.expect(b".", "a partial range")
    count = c.nz_number("a partial length")
    c.expect(b">")
    return origin, count


def _store(c: Cursor, uid: bool) -> Store:
    c.sp()
    sequence = c.sequence_set()
    c.sp()
    unchangedsince: int | None = None
    if c.peek_is(b"("):
        c.expect(b"(")
        if c.keyword("a STORE modifier") != "UNCHANGEDSINCE":
            raise _Syntax("unknown STORE modifier")
        c.sp()
        unchangedsince = c.modseq()
        c.expect(b")")
        c.sp()
    mode = "+" if c.maybe(b"+") else "-" if c.maybe(b"-") else ""
    item = c.name("FLAGS")
    if item not in ("FLAGS", "FLAGS.SILENT"):
        raise _Syntax("expected FLAGS or FLAGS.SILENT")
    c.sp()
    if c.peek_is(b"("):
        flags = c.flag_list()
    else:
        single = [c.flag()]
        while c.maybe(b" "):
            single.append(c.flag())
        flags = tuple(single)
    return Store(sequence, mode, item == "FLAGS.SILENT", flags, unchangedsince)


def _copy_move(c: Cursor, uid: bool) -> CopyMove:
    c.sp()
    sequence = c.sequence_set()
    c.sp()
    return CopyMove(sequence, c.mailbox())


def _expunge(c: Cursor, uid: bool) -> UidExpunge | None:
    if not uid:
        _no_args(c, uid)
        return None
    c.sp()
    return UidExpunge(c.sequence_set())


# -- ENABLE, ID, quota ------------------------------------------------------------------------


def _enable(c: Cursor, uid: bool) -> Enable:
    capabilities = []
    while c.maybe(b" "):
        capabilities.append(c.keyword("a capability"))
    if not capabilities:
        raise _Syntax("ENABLE needs a capability")
    return Enable(tuple(capabilities))


def _compress(c: Cursor, uid: bool) -> Compress:
    c.sp()
    return Compress(c.keyword("a compression mechanism"))


def _id(c: Cursor, uid: bool) -> Id:
    c.sp()
    if c.is_word(b"NIL"):
        c.pos += 3
        return Id(None)
    params: dict[str, str | None] = {}

    def pair() -> None:
        key = c.astring()
        c.sp()
        params[key] = c.nil_or(c.astring)

    c.paren_list(pair)
    return Id(params)


def _getquota(c: Cursor, uid: bool) -> QuotaRoot:
    c.sp()
    return QuotaRoot(c.astring())


def _setquota(c: Cursor, uid: bool) -> QuotaRoot:
    """RFC 9208 4.1.4 `setquota`: a quota root and a list of resource limits, read only to
    tell a well-formed SETQUOTA (answered NO) from a malformed one (BAD)."""
    root = _getquota(c, uid)
    c.sp()
    c.paren_list(lambda: _resource_limit(c))
    return root


def _resource_limit(c: Cursor) -> None:
    c.atom("a resource name")
    c.sp()
    c.number(what="a resource limit")


_NO_ARGS = ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "IDLE",
            "NAMESPACE")

COMMANDS: dict[str, Handler] = {
    **{name: _no_args for name in _NO_ARGS},
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "SELECT": _select,
    "EXAMINE": _select,
    "CREATE": _create,
    "DELETE": _mailbox_arg,
    "SUBSCRIBE": _mailbox_arg,
    "UNSUBSCRIBE": _mailbox_arg,
    "GETQUOTAROOT": _mailbox_arg,
    "RENAME": _rename,
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
    "EXPUNGE": _expunge,
    "SEARCH": _search,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy_move,
    "MOVE": _copy_move,
    "SORT": _sort,
    "THREAD": _thread,
    "ENABLE": _enable,
    "COMPRESS": _compress,
    "ID": _id,
    "GETQUOTA": _getquota,
    "SETQUOTA": _setquota,
}
UID_COMMANDS = frozenset({"FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE", "SORT", "THREAD"})


def announces_appended_message(command: bytes) -> bool:
    """Whether the synchronizing literal ending `command` (a command's text so far, as
    `LiteralWanted` has it) is the message of an APPEND, not its mailbox name: something
    precedes it after `APPEND`. Flags and date-time are never literals (RFC 3501 9)."""
    tag, space, rest = command.partition(b" ")
    name, space, arguments = rest.partition(b" ")
    if not tag or not space or name.upper() != b"APPEND":
        return False
    return bool(arguments[:arguments.rfind(b"{")].strip())


def parse_command(raw: RawCommand) -> Command | ParseError:
    """Parse one framed command. Never raises: syntax errors come back as ParseError."""
    c = Cursor(raw)
    tag_bytes = c.run(_TAG_CHARS)
    if not tag_bytes or not (c.at_end() or c.peek_is(b" ")):
        return ParseError("*", "missing or invalid tag")
    tag = tag_bytes.decode("ascii")
    if c.at_end():
        return ParseError(tag, "missing command name")
    try:
        c.sp()
        name = c.keyword("a command name")
        uid = False
        if name == "UID":
            c.sp()
            uid = True
            name = c.keyword("a command name")
            if name not in UID_COMMANDS:
                return ParseError(tag, f"UID {name} is not a UID command")
        handler = COMMANDS.get(name)
        if handler is None:
            return ParseError(tag, "unknown command")
        args = handler(c, uid)
        c.end()
        if c.next_literal != len(c.literals):
            raise _Syntax("unexpected literal")
        return Command(tag, name, args, uid)
    except _Syntax as exc:
        return ParseError(tag, str(exc))
