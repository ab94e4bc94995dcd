"""The one typed interface through which every protocol and the queue consumer reach mailboxes.

Expressed in users, mailbox names, UIDs, flags and MODSEQ. POP3, IMAP (a later issue) and the
delivery consumer use only this; the storage backend (services/store/backends/maildb.py)
implements it. Errors are protocol-neutral: each protocol maps them to replies in one place.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple, Protocol

INBOX = "INBOX"
DRAFTS, SENT, JUNK, TRASH, ARCHIVE = "Drafts", "Sent", "Junk", "Trash", "Archive"

# The folders every account has, with their RFC 6154 special-use attributes (INBOX has none:
# it is special by name, RFC 3501 5.1). Created together with the account's index; delivery
# into one of them also creates it if it is missing (an index from before they existed).
SPECIAL_USE: dict[str, str] = {
    DRAFTS: "\\Drafts",
    SENT: "\\Sent",
    JUNK: "\\Junk",
    TRASH: "\\Trash",
    ARCHIVE: "\\Archive",
}
STANDARD_MAILBOXES: tuple[str, ...] = (INBOX, *SPECIAL_USE)


class StorageError(Exception):
    """Base of every storage failure a protocol may have to report."""


class OutOfSpace(StorageError):
    """The store's file system is full (or its disk quota spent): a temporary failure, not
    the fault of the message or the command."""


class NoSuchUser(StorageError):
    pass


class NoSuchMailbox(StorageError):
    pass


class MailboxReplaced(NoSuchMailbox):
    """The mailbox now under the name is not the one meant (its UIDVALIDITY differs): the
    one meant was renamed or deleted meanwhile, perhaps with a new one made in its place."""


class NoSuchMessage(StorageError):
    pass


class MailboxExists(StorageError):
    pass


class InvalidMailboxName(StorageError):
    """Empty, too long, a NUL or control character, a leading/trailing or doubled delimiter,
    or a "." / ".." component: never reaches the file system anyway (names live in the index),
    but refused so every client sees the same rules."""


class CannotDelete(StorageError):
    """INBOX, or a mailbox with children that has the \\Noselect semantics we do not keep."""


class TooManyMailboxes(StorageError):
    """A CREATE or RENAME would give the account more mailboxes (a SUBSCRIBE more
    subscriptions) than the limit it was given."""


class OverQuota(StorageError):
    """An APPEND/COPY/MOVE would take the account over its storage quota (RFC 9208)."""


@dataclass(frozen=True)
class MailboxStatus:
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int


@dataclass(frozen=True)
class MailboxInfo:
    name: str
    special_use: str | None  # RFC 6154 attribute such as "\\Junk", or None
    subscribed: bool = False
    # Names a mailbox across renames (never reused); not part of the comparison.
    uidvalidity: int = field(default=0, compare=False)


HIERARCHY_DELIMITER = "/"


def line_end_padding(body: bytes) -> int:
    """Octets a message grows by when every line of it ends with CRLF: a bare LF becomes
    CRLF, and a last line without its line end gets one (a lone CR at the end, its LF).

    Sizes (MessageInfo.size, IMAP RFC822.SIZE, quota) are the stored octets; POP3 must send
    every line ending with CRLF before its terminating "." (RFC 1939 3), and its LIST and
    STAT sizes are those of what RETR sends (RFC 1939 5, 7), so it adds this. Delivered mail
    has only CRLF line ends (the filter refuses bare ones); APPEND turns bare LFs into CRLF
    but keeps a message that lacks a final line end as it came, as Dovecot does, so that an
    IMAP client (or imapsync) sees the octets it stored."""
    if not body or body.endswith(b"\n"):
        end = 0
    elif body.endswith(b"\r"):
        end = 1
    else:
        end = 2
    return body.count(b"\n") - body.count(b"\r\n") + end


def in_known_spelling(flags: Iterable[str], keywords: Collection[str]) -> frozenset[str]:
    """Each keyword as the mailbox already spells it: RFC 3501 9 makes alphabetic characters
    case-insensitive unless noted, and SEARCH KEYWORD matches so; storing "junk" beside
    "Junk" would make two flags of one, and -FLAGS (JUNK) would take neither away. A spelling
    the mailbox has is kept (one from before this rule may hold two); a new keyword written
    twice in one command takes its first spelling."""
    known: dict[str, str] = {}
    for keyword in sorted(keywords):  # sorted: the same choice in every process
        known.setdefault(keyword.lower(), keyword)
    return frozenset(flag if flag.startswith("\\") or flag in keywords
                     else known.setdefault(flag.lower(), flag) for flag in flags)


def every_spelling(flags: Iterable[str], keywords: Iterable[str]) -> frozenset[str]:
    """What -FLAGS takes away: the flags, and every spelling the mailbox has of each keyword."""
    given = frozenset(flags)
    lowered = {flag.lower() for flag in given if not flag.startswith("\\")}
    return given | {keyword for keyword in keywords if keyword.lower() in lowered}


class MessageInfo(NamedTuple):
    """One message's index row. A NamedTuple, not a dataclass: SELECT builds 100,000 of them,
    and a tuple is built about three times faster than a frozen dataclass."""

    uid: int
    guid: str  # globally unique, stable for the life of the message (POP3 UIDL uses it)
    size: int  # octets of the stored message, exactly as delivered
    internaldate: float  # epoch seconds the store received it
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True)
class Delivery:
    """One copy of one queued message for one local mailbox owner: `head` (the trace fields
    the store adds for this owner) and then `body`, kept apart so that the copies of one
    message share its body (a 20 MB message to 60 mailboxes held 60 copies of it)."""

    queue_id: str
    user: str
    body: bytes
    received_at: float
    mailbox: str = INBOX
    head: bytes = b""

    @property
    def size(self) -> int:
        return len(self.head) + len(self.body)

    def data(self) -> bytes:
        """The whole message (a copy, when it has a head: for small messages only)."""
        return self.head + self.body if self.head else self.body

    def padding(self) -> int:
        """`line_end_padding` of the whole message: its end decides."""
        return line_end_padding(self.body if self.body else self.head)


@dataclass(frozen=True)
class AppendResult:
    uidvalidity: int
    uid: int


@dataclass(frozen=True)
class CopyResult:
    """UIDPLUS COPYUID/MOVE data: source UIDs and the new UIDs, pairwise in source order."""

    uidvalidity: int  # of the destination
    source_uids: list[int]
    dest_uids: list[int]


@dataclass(frozen=True)
class FlagsResult:
    """After a flag change: the messages whose flags changed (with new flags and MODSEQ), and
    the UIDs refused because their MODSEQ exceeded UNCHANGEDSINCE (RFC 7162 3.1.3)."""

    changed: list[MessageInfo]
    modified: list[int]


@dataclass(frozen=True)
class Changes:
    """What happened in a mailbox after a MODSEQ: messages added or whose flags changed
    (their current state), and UIDs expunged. `status` is the mailbox's state at the same
    instant, so a session can move its high-water mark to status.highestmodseq."""

    status: MailboxStatus
    changed: list[MessageInfo]
    expunged: list[int]


@dataclass(frozen=True)
class ChangeEvent:
    """Emitted after every committed change, in the event loop, to `MailDB` listeners.

    kind: "deliver", "append", "flags", "expunge", "copy", "move", "mailbox" (create, delete,
    rename, subscribe). For copy/move, `source` is the source mailbox and `guids` the stored
    message ids of the new copies (so spam learning can read them); `mailbox` is the one that
    changed (the destination for copy/move). A move also emits an "expunge" event for its
    source; deliver and append carry the new messages' guids too; a rename carries the old
    name as `source`. A "flags" event carries the changed messages (new flags and MODSEQ)
    and the mailbox's status after the change. One write call is one version bump, however
    many events it emits."""

    user: str
    kind: str
    mailbox: str
    source: str | None = None
    guids: tuple[str, ...] = ()
    changed: tuple[MessageInfo, ...] = ()
    status: MailboxStatus | None = None


class MailStore(Protocol):
    async def deliver(self, deliveries: list[Delivery]) -> list[bool]:
        """Store every delivery durably; return, per delivery, True if newly stored and False if
        it had already been stored (same queue_id and user: a redelivery). Returns only after
        message files, their directories and the index transaction are on disk."""
        ...

    async def status(self, user: str, mailbox: str = INBOX) -> MailboxStatus: ...

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        """Every mailbox of the user, INBOX first, then by name (the standard folders exist
        for every account, even one that never received mail)."""
        ...

    async def list_messages(self, user: str, mailbox: str = INBOX) -> list[MessageInfo]:
        """All messages of a mailbox in ascending UID order."""
        ...

    def open_message(self, user: str, guid: str) -> BinaryIO:
        """The stored bytes of a message as a binary file object (an open file, or BytesIO for
        a body kept in the index); opening and reading it is blocking I/O, so callers use a
        thread."""
        ...

    async def line_end_padding(self, user: str, mailbox: str = INBOX) -> dict[int, int]:
        """UID -> `line_end_padding` of the mailbox's messages whose lines do not all end with
        CRLF (only those: nearly every message's is 0), for POP3's sizes."""
        ...

    async def expunge(self, user: str, mailbox: str, uids: list[int]) -> list[int]:
        """Remove messages for good (index and inline bodies first, durably; files
        afterwards); returns the UIDs that existed and are now gone, ascending."""
        ...

    async def expunge_by_guid(self, user: str, mailbox: str, guids: list[str]) -> list[str]:
        """`expunge` of the messages of `mailbox` with these GUIDs, whatever their UIDs are
        now (POP3's deletions: a message IMAP moved has a new UID); the GUIDs gone."""
        ...

    # IMAP (issue 4). Mailbox names use HIERARCHY_DELIMITER; "INBOX" is case-insensitive and
    # always spelled "INBOX" here.

    async def create_mailbox(self, user: str, name: str, special_use: str | None = None, *,
                             max_mailboxes: int | None = None) -> None:
        """Create `name` and any missing parents (RFC 3501 6.3.3). MailboxExists if present;
        TooManyMailboxes if the account would have more than `max_mailboxes` (None: no
        limit)."""
        ...

    async def delete_mailbox(self, user: str, name: str) -> None:
        """Delete a mailbox and its messages; its children keep existing (their parent then
        only exists as a name: LIST shows it \\Noselect, an extended LIST \\NonExistent).
        CannotDelete for INBOX; NoSuchMailbox if absent."""
        ...

    async def rename_mailbox(self, user: str, old: str, new: str, *,
                             max_mailboxes: int | None = None) -> None:
        """Rename with its children (RFC 3501 6.3.5), also a parent that only exists as a
        name (its children move, and it stays only a name). Renaming INBOX moves its
        messages to a new mailbox `new` and leaves INBOX empty. UIDVALIDITY of renamed
        mailboxes is kept. TooManyMailboxes if the parents it creates (and for INBOX, `new`)
        would give the account more than `max_mailboxes` (None: no limit)."""
        ...

    async def set_subscribed(self, user: str, name: str, subscribed: bool, *,
                             max_subscriptions: int | None = None) -> None:
        """Subscriptions are names: a subscription may outlive its mailbox (RFC 3501 6.3.6).
        TooManyMailboxes if a new one would make more than `max_subscriptions` (None: no
        limit)."""
        ...

    async def subscriptions(self, user: str) -> list[str]: ...

    async def append(self, user: str, mailbox: str, body: bytes, flags: frozenset[str],
                     internaldate: float | None = None,
                     quota: int | None = None) -> AppendResult:
        """Store one message durably (as `deliver` does). OverQuota if usage plus the message
        would exceed `quota` octets (None: no limit). System flags are stored in their
        canonical case, keywords as given; \\Recent is never stored (it is per session)."""
        ...

    async def store_flags(self, user: str, mailbox: str, uids: list[int], mode: str,
                          flags: frozenset[str],
                          unchangedsince: int | None = None) -> FlagsResult:
        """mode "+" adds, "-" removes, "" replaces. Each message whose flags actually change
        gets a new MODSEQ (one per call). Unknown UIDs are ignored. System flags match in any
        case; keywords are case-preserving and matched exactly."""
        ...

    async def copy(self, user: str, source: str, uids: list[int], dest: str,
                   quota: int | None = None) -> CopyResult:
        """Copy messages (same bytes, new GUIDs, flags kept, new UIDs in dest); OverQuota.
        MailDB makes each copy of a file a hard link of it (no bytes written), and copies an
        inline body inside the index."""
        ...

    async def move(self, user: str, source: str, uids: list[int], dest: str) -> CopyResult:
        """Copy then expunge in one transaction (RFC 6851): never both or neither visible."""
        ...

    async def changes_since(self, user: str, mailbox: str, modseq: int) -> Changes: ...

    async def fetch_infos(self, user: str, mailbox: str, uids: list[int]) -> list[MessageInfo]:
        """Current info of the given UIDs that still exist, ascending."""
        ...

    async def claim_recent(self, user: str, mailbox: str, upto: int) -> int:
        """For a read-write session: the lowest UID that is \\Recent for it (RFC 3501 2.3.2)
        among those below `upto`, the uidnext of what it has read; later sessions no longer
        see those messages as recent (newer ones stay for the first session told of them)."""
        ...

    async def make_durable(self, user: str) -> None:
        """Return once every change committed so far to the user's mailboxes is on disk,
        also those committed without waiting for it (flags, \\Recent): IMAP CHECK."""
        ...

    async def usage(self, user: str) -> int:
        """Octets stored for the user in all mailboxes (for QUOTA)."""
        ...

    async def close(self) -> None: ...
