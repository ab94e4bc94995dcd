"""An in-memory MailStore for protocol tests (the real one is services/store/backends/maildb.py)."""

from __future__ import annotations

import io
import uuid
from typing import BinaryIO

from services.store.mailbox import (
    INBOX,
    Delivery,
    MailboxInfo,
    MailboxStatus,
    MessageInfo,
    NoSuchMailbox,
    NoSuchMessage,
    line_end_padding,
)


class FakeMailStore:
    """Implements the MailStore protocol with dicts; redeliveries are detected by queue id."""

    def __init__(self) -> None:
        self._messages: dict[str, list[MessageInfo]] = {}
        self._bodies: dict[tuple[str, str], bytes] = {}
        self._delivered: set[tuple[str, str]] = set()
        self._uidnext: dict[str, int] = {}
        self.expunge_calls: list[tuple[str, str, list[int]]] = []

    async def deliver(self, deliveries: list[Delivery]) -> list[bool]:
        results = []
        for d in deliveries:
            if d.mailbox != INBOX:
                raise NoSuchMailbox(d.mailbox)
            key = (d.user, d.queue_id)
            if key in self._delivered:
                results.append(False)
                continue
            self._delivered.add(key)
            uid = self._uidnext.get(d.user, 1)
            self._uidnext[d.user] = uid + 1
            guid = uuid.uuid4().hex
            self._bodies[(d.user, guid)] = d.body
            info = MessageInfo(uid, guid, len(d.body), d.received_at, frozenset(), uid)
            self._messages.setdefault(d.user, []).append(info)
            results.append(True)
        return results

    async def status(self, user: str, mailbox: str = INBOX) -> MailboxStatus:
        if mailbox != INBOX:
            raise NoSuchMailbox(mailbox)
        messages = self._messages.get(user, [])
        uidnext = self._uidnext.get(user, 1)
        return MailboxStatus(mailbox, 1, uidnext, uidnext - 1, len(messages))

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        return [MailboxInfo(INBOX, None)]  # enough for POP3, which sees INBOX only

    async def list_messages(self, user: str, mailbox: str = INBOX) -> list[MessageInfo]:
        if mailbox != INBOX:
            raise NoSuchMailbox(mailbox)
        return list(self._messages.get(user, []))

    async def line_end_padding(self, user: str, mailbox: str = INBOX) -> dict[int, int]:
        padding = {info.uid: line_end_padding(self._bodies[(user, info.guid)])
                   for info in await self.list_messages(user, mailbox)}
        return {uid: octets for uid, octets in padding.items() if octets}

    def open_message(self, user: str, guid: str) -> BinaryIO:
        try:
            return io.BytesIO(self._bodies[(user, guid)])
        except KeyError:
            raise NoSuchMessage(guid) from None

    async def expunge(self, user: str, mailbox: str, uids: list[int]) -> None:
        self.expunge_calls.append((user, mailbox, list(uids)))
        gone = set(uids)
        kept = []
        for info in self._messages.get(user, []):
            if info.uid in gone:
                self._bodies.pop((user, info.guid), None)
            else:
                kept.append(info)
        self._messages[user] = kept

    async def expunge_by_guid(self, user: str, mailbox: str, guids: list[str]) -> list[str]:
        gone = [info for info in self._messages.get(user, []) if info.guid in set(guids)]
        await self.expunge(user, mailbox, [info.uid for info in gone])
        return [info.guid for info in gone]

    async def close(self) -> None:
        pass
