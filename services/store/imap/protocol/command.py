"""Typed IMAP commands: what `grammar.parse_command` produces and the session consumes.

One dataclass per argument shape. Strings are already unquoted and decoded: mailbox names are
Unicode (modified UTF-7 decoded, RFC 3501 5.1.3), "INBOX" in any case is normalised to "INBOX",
flags keep their case as sent (system flags are normalised to "\\Seen" etc.).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

# A sequence-set bound: a number, or None for "*" (the largest number in use).
Bound = int | None


@dataclass(frozen=True)
class SequenceSet:
    """RFC 3501 sequence-set: ranges as written (a:b may have a > b); `$` is not supported.

    `ranges` holds (low, high) pairs with None for "*". `sequence.py` resolves one against a
    mailbox (`select_seqs`, `select_uids`) and formats it (`format_sequence_set`)."""

    ranges: tuple[tuple[Bound, Bound], ...]


@dataclass(frozen=True)
class Section:
    """BODY[<section>]: part numbers, then optionally one of HEADER, HEADER.FIELDS,
    HEADER.FIELDS.NOT, TEXT or MIME (RFC 3501 6.4.5)."""

    part: tuple[int, ...] = ()
    text: str | None = None  # "HEADER" | "HEADER.FIELDS" | "HEADER.FIELDS.NOT" | "TEXT" | "MIME"
    fields: tuple[str, ...] = ()  # upper-cased header names for HEADER.FIELDS(.NOT)


@dataclass(frozen=True)
class FetchAtt:
    """One FETCH data item. Macros (ALL, FAST, FULL) are expanded by the grammar.

    name: "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "RFC822.SIZE",
    "ENVELOPE", "BODY" (structure, no section), "BODYSTRUCTURE", "UID", "MODSEQ",
    "BODY[]" (with `section`, `peek`, `partial`), "BINARY[]"/"BINARY.SIZE[]" are not supported.
    """

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None  # <origin.count>


@dataclass(frozen=True)
class SearchKey:
    """A node of a SEARCH program (RFC 3501 6.4.4, RFC 7162 3.1.5 MODSEQ).

    kind is the upper-case key name: "ALL", "ANSWERED", "BCC", "BEFORE", "BODY", "CC",
    "DELETED", "DRAFT", "FLAGGED", "FROM", "HEADER", "KEYWORD", "LARGER", "NEW", "NOT", "OLD",
    "ON", "OR", "RECENT", "SEEN", "SENTBEFORE", "SENTON", "SENTSINCE", "SINCE", "SMALLER",
    "SUBJECT", "TEXT", "TO", "UID", "UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED",
    "UNKEYWORD", "UNSEEN", "MODSEQ", plus "SEQ" (a bare sequence set) and "AND" (a
    parenthesised list or the implicit top-level conjunction).
    """

    kind: str
    # str for string keys (HEADER: the value; field name in `name`), int for LARGER/SMALLER/
    # MODSEQ, datetime.date for date keys, SequenceSet for SEQ/UID, flag for (UN)KEYWORD.
    value: str | int | datetime.date | SequenceSet | None = None
    name: str | None = None  # HEADER's field name
    children: tuple[SearchKey, ...] = ()  # NOT: 1, OR: 2, AND: n

    def contains(self, kind: str) -> bool:
        """Whether this key or one inside it is of `kind` ("MODSEQ", "SEQ", ...)."""
        return self.kind == kind or any(child.contains(kind) for child in self.children)


@dataclass(frozen=True)
class Command:
    """Every command: tag, upper-case name, and its parsed arguments (`args`, one of the
    classes below, or None for commands without arguments). `uid` is True for UID FETCH etc.
    (name is then the inner command: "FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE")."""

    tag: str
    name: str
    args: object = None
    uid: bool = False


@dataclass(frozen=True)
class Login:
    user: str
    password: str
    # Both read as UTF-8: a literal may hold any octets but NUL (RFC 9051 4.3), and one
    # that is not UTF-8 can match no account; the login fails (not BAD: found in review).
    readable: bool = True


@dataclass(frozen=True)
class Authenticate:
    mechanism: str  # upper case
    initial: bytes | None = None  # SASL-IR initial response, base64-decoded ("=" -> b"")


@dataclass(frozen=True)
class QresyncParams:
    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None  # (known seqs, known uids)


@dataclass(frozen=True)
class Select:
    """SELECT and EXAMINE (command name tells which)."""

    mailbox: str
    condstore: bool = False
    qresync: QresyncParams | None = None


@dataclass(frozen=True)
class MailboxArg:
    """CREATE, DELETE, SUBSCRIBE, UNSUBSCRIBE, GETQUOTAROOT."""

    mailbox: str
    special_use: tuple[str, ...] = ()  # CREATE (USE (\Junk)) of RFC 6154, if given


@dataclass(frozen=True)
class Rename:
    old: str
    new: str


@dataclass(frozen=True)
class ListArgs:
    """LIST / LSUB, including RFC 5258 LIST-EXTENDED and RFC 5819 LIST-STATUS.

    reference and patterns are as sent (patterns decoded from modified UTF-7)."""

    reference: str
    patterns: tuple[str, ...]
    select_options: frozenset[str] = frozenset()  # SUBSCRIBED, REMOTE, RECURSIVEMATCH, SPECIAL-USE
    return_options: frozenset[str] = frozenset()  # SUBSCRIBED, CHILDREN, SPECIAL-USE
    return_status: tuple[str, ...] = ()  # STATUS items requested by RETURN (STATUS (...))
    # RFC 5258 3: the extended syntax (selection options, a list of patterns or RETURN, even
    # empty ones as in "LIST () "" %"): the client reads its attributes, \NonExistent too.
    extended: bool = False


@dataclass(frozen=True)
class Status:
    mailbox: str
    items: tuple[str, ...]  # MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ SIZE


@dataclass(frozen=True)
class Append:
    """APPEND (RFC 3501 6.3.11); one message (MULTIAPPEND is not advertised)."""

    mailbox: str
    message: bytes
    flags: tuple[str, ...] = ()
    date: datetime.datetime | None = None  # timezone-aware


@dataclass(frozen=True)
class Search:
    """SEARCH / UID SEARCH, with RFC 4731 ESEARCH RETURN options."""

    key: SearchKey  # kind "AND" at the top
    charset: str | None = None
    return_options: tuple[str, ...] | None = None  # None: classic SEARCH response


@dataclass(frozen=True)
class Fetch:
    sequence: SequenceSet
    atts: tuple[FetchAtt, ...]
    changedsince: int | None = None  # RFC 7162 CHANGEDSINCE
    vanished: bool = False  # RFC 7162 VANISHED modifier (UID FETCH only)


@dataclass(frozen=True)
class Store:
    sequence: SequenceSet
    mode: str  # "+", "-" or "" (replace)
    silent: bool
    flags: tuple[str, ...]
    unchangedsince: int | None = None  # RFC 7162 UNCHANGEDSINCE


@dataclass(frozen=True)
class CopyMove:
    """COPY and MOVE (RFC 6851)."""

    sequence: SequenceSet
    mailbox: str


@dataclass(frozen=True)
class UidExpunge:
    sequence: SequenceSet


@dataclass(frozen=True)
class Enable:
    capabilities: tuple[str, ...]  # upper case


@dataclass(frozen=True)
class Compress:
    """COMPRESS (RFC 4978): the mechanism, upper case."""

    mechanism: str


@dataclass(frozen=True)
class Id:
    params: dict[str, str | None] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Sort:
    """SORT (RFC 5256): criteria like ("REVERSE", "DATE") flattened as sent, upper case."""

    criteria: tuple[str, ...]
    charset: str
    key: SearchKey
    return_options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Thread:
    algorithm: str  # "REFERENCES" or "ORDEREDSUBJECT"
    charset: str
    key: SearchKey


@dataclass(frozen=True)
class QuotaRoot:
    """GETQUOTA (RFC 9208): the quota root name."""

    root: str


@dataclass(frozen=True)
class ParseError:
    """Returned (not raised) by the grammar for a syntactically wrong command: the session
    answers `<tag> BAD <text>` (tag "*" when no tag could be read)."""

    tag: str
    text: str
