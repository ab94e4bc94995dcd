"""The one typed interface through which every protocol and the queue consumer reach mailboxes.

Expressed in users, mailbox names, UIDs, flags and MODSEQ. POP3, IMAP (a later issue) and the
delivery consumer use only this; the storage backend (services/store/backends/maildb.py)
implements it. Errors are protocol-neutral: each protocol maps them to replies in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol

INBOX = "INBOX"


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
