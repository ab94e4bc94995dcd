"""A real QRESYNC client, interimap (Debian package interimap), against the real server.

interimap keeps two IMAP accounts in step using only CONDSTORE and QRESYNC: it remembers
each mailbox's UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ, asks at SELECT (QRESYNC ...) for what
changed since, learns expunges from VANISHED, and writes flags with STORE (UNCHANGEDSINCE).
A server that gets any of that wrong shows up here as mail missing, doubled or with the wrong
flags on one side. Here both sides are accounts on the server under test: alice's as the
"local" one, bob's as the "remote" one, each over STARTTLS with the test certificate trusted.
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import subprocess
from pathlib import Path

import pytest

from services.store.backends.maildb import MailDB
from tests.integration.imap.clients import message, message_id_of, stored, unverified
from tests.integration.imap.conftest import ALICE, BOB, USERS, Deliver, ImapStack
from tests.support import require_client

INTERIMAP = "/usr/bin/interimap"
ALREADY_MADE_PARENT = re.compile(r"WARNING: Couldn't create mailbox \S+: NO \[ALREADYEXISTS\]")

# {mailbox: {Message-ID: (flags, bytes)}}: what a user sees, UIDs aside (they differ per side)
Contents = dict[str, dict[str, tuple[frozenset[str], bytes]]]


@pytest.fixture(autouse=True)
def _interimap_installed() -> None:
    require_client(INTERIMAP, "interimap")


class Interimap:
    """alice ("local") <-> bob ("remote"), the sync state in a database under `root`."""

    def __init__(self, stack: ImapStack, root: Path, cert: Path) -> None:
        self.config = root / "interimap.conf"
        sections = [f"database = {root / 'interimap.db'}\n"]
        for side, user in (("local", ALICE), ("remote", BOB)):
            sections.append(
                f"[{side}]\ntype = imap\nhost = localhost\nport = {stack.port}\n"
                f"STARTTLS = YES\nSSL_CAfile = {cert}\n"
                f"username = {user}\npassword = {USERS[user]}\n")
        self.config.write_text("\n".join(sections))

    async def run(self) -> str:
        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run([INTERIMAP, f"--config={self.config}"],
                                  capture_output=True, text=True, timeout=90)

        result = await asyncio.to_thread(run)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        # interimap warns when the two sides disagree in a way it cannot reconcile (a UID
        # it was told about that the server does not have, a MODSEQ going backwards, ...).
        # One warning is its own: it creates parents and children in no fixed order, and
        # CREATE "a/b" makes a missing "a" (RFC 3501 6.3.3), so a later CREATE "a" is NO.
        warnings = [line for line in output.splitlines() if "WARNING" in line
                    and not ALREADY_MADE_PARENT.search(line)]
        assert not warnings, output
        return output


async def contents(maildb: MailDB, user: str) -> Contents:
    out: Contents = {}
    for box in await maildb.list_mailboxes(user):
        out[box.name] = {message_id: (info.flags - {"\\Recent"}, data)
                         for message_id, (info, data)
                         in (await stored(maildb, user, box.name)).items()}
    return out


async def server_state(maildb: MailDB, user: str) -> dict[str, tuple[int, int, int]]:
    """Per mailbox: UIDNEXT, HIGHESTMODSEQ, messages. A run with nothing to do moves none."""
    state = {}
    for box in await maildb.list_mailboxes(user):
        status = await maildb.status(user, box.name)
        state[box.name] = (status.uidnext, status.highestmodseq, status.messages)
    return state


async def in_step(maildb: MailDB) -> Contents:
    alice, bob = await contents(maildb, ALICE), await contents(maildb, BOB)
    assert alice == bob
    return alice


async def assert_nothing_to_do(sync: Interimap, maildb: MailDB) -> None:
    before = (await server_state(maildb, ALICE), await server_state(maildb, BOB))
    await sync.run()
    assert (await server_state(maildb, ALICE), await server_state(maildb, BOB)) == before


async def test_qresync_two_way_sync_with_flags_moves_and_expunges(
        imap_server: ImapStack, deliver: Deliver, maildb: MailDB, tmp_path: Path,
        tls_files: tuple[Path, Path]) -> None:
    alice_mail = [message(f"alice {n}") for n in range(3)]
    bob_mail = [message(f"bob {n}", to=BOB) for n in range(2)]
    for data in alice_mail:
        await deliver(ALICE, data)
    for data in bob_mail:
        await deliver(BOB, data)
    await maildb.create_mailbox(ALICE, "Projects/2026")
    await deliver(ALICE, message("nested folder"), "Projects/2026")
    await maildb.create_mailbox(BOB, "Entwürfe")  # modified UTF-7 on the wire
    await deliver(BOB, message("umlaut folder", to=BOB), "Entwürfe")
    first = (await maildb.list_messages(ALICE))[0].uid
    await maildb.store_flags(ALICE, "INBOX", [first], "+", frozenset({"\\Flagged"}))

    sync = Interimap(imap_server, tmp_path, tls_files[0])

    # 1. the first run merges both accounts: every message on both sides, byte for byte
    await sync.run()
    merged = await in_step(maildb)
    assert {message_id_of(d) for d in alice_mail + bob_mail} == set(merged["INBOX"])
    assert merged["INBOX"][message_id_of(alice_mail[0])][0] == {"\\Flagged"}
    assert len(merged["Projects/2026"]) == 1 and len(merged["Entwürfe"]) == 1

    # 2. a second run finds nothing to do on either side
    await assert_nothing_to_do(sync, maildb)

    # 3. changes on both sides between runs: alice's by an IMAP client (flags with a
    #    keyword, a MOVE into a new folder), bob's in the store (expunge, a draft)
    def alice_changes() -> None:
        with imaplib.IMAP4("127.0.0.1", imap_server.port) as client:
            client.starttls(unverified())
            client.login(ALICE, USERS[ALICE])
            client.select("INBOX")
            for data, change in ((alice_mail[1], r"(\Seen $Label1)"),
                                 (bob_mail[0], r"(\Answered)")):
                typ, found = client.uid("SEARCH", "HEADER", "Message-ID",
                                        message_id_of(data))
                assert typ == "OK"
                assert client.uid("STORE", found[0], "+FLAGS", change)[0] == "OK"
            assert client.create("Archive/2026")[0] == "OK"
            typ, found = client.uid("SEARCH", "HEADER", "Message-ID",
                                    message_id_of(alice_mail[2]))
            assert client.uid("MOVE", found[0], "Archive/2026")[0] == "OK"

    await asyncio.to_thread(alice_changes)
    bob_inbox = await stored(maildb, BOB, "INBOX")
    await maildb.expunge(BOB, "INBOX", [bob_inbox[message_id_of(bob_mail[1])][0].uid])
    draft = message("draft", to=BOB)
    await maildb.append(BOB, "Drafts", draft, frozenset({"\\Draft"}))

    await sync.run()
    now = await in_step(maildb)
    assert set(now["INBOX"]) == {message_id_of(alice_mail[0]), message_id_of(alice_mail[1]),
                                 message_id_of(bob_mail[0])}
    assert now["INBOX"][message_id_of(alice_mail[1])][0] == {"\\Seen", "$Label1"}
    assert now["INBOX"][message_id_of(bob_mail[0])][0] == {"\\Answered"}
    assert set(now["Archive/2026"]) == {message_id_of(alice_mail[2])}
    assert now["Drafts"] == {message_id_of(draft): (frozenset({"\\Draft"}), draft)}

    # 4. and the state is stable again
    await assert_nothing_to_do(sync, maildb)
    assert await in_step(maildb) == now



async def test_a_flag_cleared_after_interimap_copied_the_message_stays_cleared(
        imap_server: ImapStack, deliver: Deliver, maildb: MailDB, tmp_path: Path,
        tls_files: tuple[Path, Path]) -> None:
    """interimap appends the copy into the selected mailbox and keeps the HIGHESTMODSEQ it
    was last told. Nothing told it the one its APPEND made, so its next run found its own
    copy "changed" on bob's side; with the flag cleared on alice's meanwhile it warned of a
    conflict and set both to the union: the user's unflag was undone."""
    data = message("flagged, then not")
    await deliver(ALICE, data)
    uid = (await maildb.list_messages(ALICE))[0].uid
    await maildb.store_flags(ALICE, "INBOX", [uid], "+", frozenset({"\\Flagged"}))
    sync = Interimap(imap_server, tmp_path, tls_files[0])
    await sync.run()
    assert (await in_step(maildb))["INBOX"][message_id_of(data)][0] == {"\\Flagged"}

    await maildb.store_flags(ALICE, "INBOX", [uid], "-", frozenset({"\\Flagged"}))
    await sync.run()  # no "Conflicting flag update" warning
    assert (await in_step(maildb))["INBOX"][message_id_of(data)][0] == frozenset()
