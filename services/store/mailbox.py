"""The one typed interface through which every protocol and the queue consumer reach mailboxes.

Expressed in users, mailbox names, UIDs, flags and MODSEQ. POP3, IMAP (a later issue) and the
delivery consumer use only this; the storage backend (services/store/backends/maildb.py)
implements it. Errors are protocol-neutral: each protocol maps them to replies in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol

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


class NoSuchUser(StorageError):
    pass


class NoSuchMailbox(StorageError):
    pass


class NoSuchMessage(StorageError):
    pass


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


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    guid: str  # globally unique, stable for the life of the message (POP3 UIDL uses it)
    size: int  # octets of the stored message, exactly as delivered
    internaldate: float  # epoch seconds the store received it
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True)
class Delivery:
    """One copy of one queued message for one local mailbox owner."""

    queue_id: str
    user: str
    body: bytes
    received_at: float
    mailbox: str = INBOX


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
        """The stored bytes of a message (a plain file object; reading it is blocking I/O)."""
        ...

    async def expunge(self, user: str, mailbox: str, uids: list[int]) -> None:
        """Remove messages for good (index first, durably; files afterwards)."""
        ...

    async def close(self) -> None: ...
