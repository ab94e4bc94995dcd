"""\\Recent is shown to exactly one read-write session (RFC 3501 2.3.2: "this session is the
first session to have been notified about this message"), also when mail arrives while a
session is reading the mailbox, and when the session leaves by CLOSE before it was told.

The store is the real MailDB with one hook: a delivery slipped in right after a chosen read
returns, deterministically in the window the model test (test_concurrency_model.py) hits only
by chance. Each of these lost a message's \\Recent for every session before the claim was
bounded by what the session had read, and before CLOSE stopped claiming.
"""

from __future__ import annotations

import re
import time

import pytest

from common.ids import new_queue_id
from services.store.backends.maildb import MailDB
from services.store.backends.snapshots import Snapshot
from services.store.mailbox import Changes, Delivery
from tests.integration.imap.clients import Raw, Server, in_thread, message
from tests.integration.imap.conftest import ALICE, Deliver, ImapStack

FETCHED = re.compile(rb"^\* \d+ FETCH \(UID (\d+) FLAGS \(([^)]*)\)\)$")


class DeliveryAfterRead(MailDB):
    """MailDB that delivers one message to ALICE's INBOX right after the read named by
    `armed` returns, before the caller goes on."""

    armed: str | None = None

    async def changes_since(self, user: str, mailbox: str, modseq: int) -> Changes:
        changes = await super().changes_since(user, mailbox, modseq)
        await self._slip_in("changes_since")
        return changes

    async def snapshot(self, user: str, mailbox: str = "INBOX") -> Snapshot:
        snapshot = await super().snapshot(user, mailbox)
        await self._slip_in("snapshot")
        return snapshot

    async def _slip_in(self, read: str) -> None:
        if self.armed == read:
            self.armed = None
            await self.deliver([Delivery(new_queue_id(), ALICE, message("slipped in"),
                                         time.time())])


@pytest.fixture
def maildb_class() -> type[MailDB]:
    return DeliveryAfterRead


def recent_uids(raw: Raw) -> set[int]:
    reply = raw.ok("FETCH 1:* (UID FLAGS)")
    return {int(m.group(1)) for line in reply.untagged if (m := FETCHED.match(line))
            and b"\\Recent" in m.group(2).split()}


async def test_mail_arriving_during_a_sync_stays_recent(imap_server: ImapStack,
                                                        maildb: DeliveryAfterRead,
                                                        deliver: Deliver) -> None:
    await deliver(ALICE, message("first"))

    def dialog() -> None:
        server = Server.of(imap_server)
        raw, other = server.raw(ALICE), server.raw(ALICE)
        raw.ok("SELECT INBOX")
        append(other, "second")
        maildb.armed = "changes_since"  # UID 3 arrives after the NOOP's read of UID 2
        raw.ok("NOOP")
        raw.ok("NOOP")  # told of UID 3
        assert recent_uids(raw) == {1, 2, 3}
        raw.close()
        other.close()

    await in_thread(dialog)


async def test_mail_arriving_during_select_stays_recent(imap_server: ImapStack,
                                                        maildb: DeliveryAfterRead,
                                                        deliver: Deliver) -> None:
    await deliver(ALICE, message("first"))

    def dialog() -> None:
        raw = Server.of(imap_server).raw(ALICE)
        maildb.armed = "snapshot"  # UID 2 arrives after SELECT read the message list
        reply = raw.ok("SELECT INBOX")
        assert b"* 1 EXISTS" in reply.untagged, reply
        raw.ok("NOOP")  # told of UID 2
        assert recent_uids(raw) == {1, 2}
        raw.close()

    await in_thread(dialog)


async def test_close_leaves_unannounced_mail_recent(imap_server: ImapStack,
                                                    deliver: Deliver) -> None:
    """RFC 3501 6.4.2 CLOSE: mail that arrived after the session's last command was never
    shown to it, so the next session gets it as \\Recent."""
    await deliver(ALICE, message("first"))

    def dialog() -> None:
        server = Server.of(imap_server)
        closing, later = server.raw(ALICE), server.raw(ALICE)
        closing.ok("SELECT INBOX")
        append(later, "second")
        closing.ok("CLOSE")
        reply = later.ok("SELECT INBOX")
        assert b"* 1 RECENT" in reply.untagged, reply
        assert recent_uids(later) == {2}
        closing.close()
        later.close()

    await in_thread(dialog)


def append(raw: Raw, subject: str) -> None:
    reply = raw.literal_command(b"APPEND INBOX ()", message(subject), plus=True)
    assert reply.status == "OK", reply


async def test_examine_during_delivery_shows_claimed_mail_as_not_recent(
        imap_server: ImapStack, maildb: DeliveryAfterRead, deliver: Deliver) -> None:
    """EXAMINE shows \\Recent without claiming it (RFC 3501 6.3.2), for the messages no
    read-write session has claimed: mail that arrives while it reads the mailbox does not
    make an already claimed message look recent."""
    await deliver(ALICE, message("first"))

    def dialog() -> None:
        server = Server.of(imap_server)
        selecting, examining = server.raw(ALICE), server.raw(ALICE)
        selecting.ok("SELECT INBOX")  # claims UID 1
        maildb.armed = "snapshot"  # UID 2 arrives after EXAMINE read the message list
        reply = examining.ok("EXAMINE INBOX")
        assert b"* 1 EXISTS" in reply.untagged, reply
        assert b"* 0 RECENT" in reply.untagged, reply
        assert recent_uids(examining) == {2}  # told of it after the EXAMINE: unclaimed
        selecting.close()
        examining.close()

    await in_thread(dialog)


async def test_examine_shows_new_mail_recent_without_claiming_it(
        imap_server: ImapStack, deliver: Deliver) -> None:
    """RFC 3501 2.3.2: \\Recent is for the first session notified of a message; a read-only
    one is shown it too and leaves it for the next read-write session."""
    await deliver(ALICE, message("first"))

    def dialog() -> None:
        server = Server.of(imap_server)
        selecting, examining = server.raw(ALICE), server.raw(ALICE)
        selecting.ok("SELECT INBOX")  # claims UID 1
        examining.ok("EXAMINE INBOX")
        selecting.ok("CLOSE")
        append(selecting, "second")
        reply = examining.ok("NOOP")
        assert reply.untagged[-2:] == [b"* 2 EXISTS", b"* 1 RECENT"], reply
        assert recent_uids(examining) == {2}
        reply = selecting.ok("SELECT INBOX")
        assert b"* 1 RECENT" in reply.untagged, reply
        assert recent_uids(selecting) == {2}
        selecting.close()
        examining.close()

    await in_thread(dialog)
