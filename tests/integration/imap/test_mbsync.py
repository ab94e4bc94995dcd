"""A real sync client, isync's mbsync (Debian package isync), against the real server: a full
two-way sync, a second run that changes nothing, flags and deletions travelling both ways.

mbsync talks STARTTLS with the test certificate pinned through CertificateFile, logs in with
LOGIN or PLAIN, and keeps its sync state inside the local Maildir (SyncState *).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.store.backends.maildb import MailDB
from tests.integration.imap.clients import message, message_id_of, stored
from tests.integration.imap.conftest import ALICE, USERS, Deliver, ImapStack
from tests.support import require_client

MBSYNC = "/usr/bin/mbsync"
MAILDIR_NAME = re.compile(r"^(?P<base>[^:]+)(?::2,(?P<flags>[A-Za-z]*))?$")
IMAP_FLAG = {"S": "\\Seen", "F": "\\Flagged", "R": "\\Answered", "D": "\\Draft",
             "T": "\\Deleted"}



@pytest.fixture(autouse=True)
def _mbsync_installed() -> None:
    require_client(MBSYNC, "isync")


@dataclass(frozen=True)
class Local:
    path: Path
    flags: frozenset[str]


class Sync:
    """One account's mbsync set-up in a temporary directory."""

    def __init__(self, stack: ImapStack, root: Path, mechanism: str = "LOGIN") -> None:
        self.maildir = root / "Mail"
        self.maildir.mkdir()
        self.config = root / "mbsyncrc"
        cert = stack.settings.tls_cert_path
        self.config.write_text(
            f"IMAPAccount tiermail\n"
            f"Host localhost\nPort {stack.port}\n"  # the certificate names localhost

            f"User {ALICE}\nPass \"{USERS[ALICE]}\"\n"
            f"SSLType STARTTLS\nCertificateFile {cert}\n"
            f"AuthMechs {mechanism}\n"
            f"Timeout 20\n\n"
            f"IMAPStore remote\nAccount tiermail\n\n"
            f"MaildirStore local\nPath {self.maildir}/\nInbox {self.maildir}/INBOX\n"
            f"SubFolders Verbatim\n\n"
            f"Channel everything\nFar :remote:\nNear :local:\nPatterns *\n"
            f"Create Both\nExpunge Both\nSyncState *\n")

    async def run(self) -> str:
        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run([MBSYNC, "-V", "-c", str(self.config), "-a"],
                                  capture_output=True, text=True, timeout=90)

        result = await asyncio.to_thread(run)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        return output

    def folder(self, name: str) -> Path:
        return self.maildir / name

    def messages(self, name: str) -> dict[str, Local]:
        """Message-ID -> the local file and its Maildir flags, for one local folder."""
        out: dict[str, Local] = {}
        for sub in ("new", "cur"):
            for path in sorted((self.folder(name) / sub).glob("*")):
                match = MAILDIR_NAME.match(path.name)
                assert match, path
                flags = frozenset(IMAP_FLAG[c] for c in match.group("flags") or ""
                                  if c in IMAP_FLAG)
                out[message_id_of(path.read_bytes())] = Local(path, flags)
        return out

    def snapshot(self) -> set[str]:
        return {str(p.relative_to(self.maildir)) for p in self.maildir.rglob("*")
                if p.is_file() and not p.name.startswith(".mbsync")}


def normalised(data: bytes) -> bytes:
    """What mbsync itself changes: it marks what it uploads with an X-TUID header (isync's
    way to find the new UID) and keeps local files with LF line ends."""
    return re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", data.replace(b"\r\n", b"\n"))


def make_local_folder(root: Path, name: str) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / name / sub).mkdir(parents=True, exist_ok=True)
    return root / name


def drop_local(folder: Path, data: bytes, unique: str) -> Path:
    path = folder / "new" / f"1700000000.{unique}.laptop"
    path.write_bytes(data)
    return path


async def server_messages(maildb: MailDB, mailbox: str) -> dict[str, tuple[int, frozenset[str]]]:
    """Message-ID -> (UID, flags) on the server."""
    return {message_id: (info.uid, info.flags - {"\\Recent"})
            for message_id, (info, _) in (await stored(maildb, ALICE, mailbox)).items()}


async def server_bodies(maildb: MailDB, mailbox: str) -> dict[str, bytes]:
    return {message_id: data
            for message_id, (_, data) in (await stored(maildb, ALICE, mailbox)).items()}


async def server_state(maildb: MailDB) -> dict[str, object]:
    state: dict[str, object] = {}
    for box in await maildb.list_mailboxes(ALICE):
        status = await maildb.status(ALICE, box.name)
        state[box.name] = (status.uidnext, status.highestmodseq,
                           await server_messages(maildb, box.name))
    return state


async def test_two_way_sync_idempotence_flags_and_deletions(
        imap_server: ImapStack, deliver: Deliver, maildb: MailDB, tmp_path: Path) -> None:
    server_ids = []
    for n in range(3):
        data = message(f"server {n}")
        server_ids.append(message_id_of(data))
        await deliver(ALICE, data)
    await maildb.create_mailbox(ALICE, "Projects/2026")
    archived, nested = message("archived"), message("nested folder")
    await deliver(ALICE, archived, "Archive")
    await deliver(ALICE, nested, "Projects/2026")
    first_uid = (await maildb.list_messages(ALICE))[0].uid
    await maildb.store_flags(ALICE, "INBOX", [first_uid], "+", frozenset({"\\Flagged"}))

    sync = Sync(imap_server, tmp_path)
    inbox = make_local_folder(sync.maildir, "INBOX")
    laptop = make_local_folder(sync.maildir, "FromLaptop")
    local_new, laptop_new = message("written offline"), message("laptop folder")
    drop_local(inbox, local_new, "a")
    drop_local(laptop, laptop_new, "b")

    # 1. full two-way sync
    await sync.run()
    local_inbox = sync.messages("INBOX")
    assert set(local_inbox) == {*server_ids, message_id_of(local_new)}
    assert local_inbox[server_ids[0]].flags == {"\\Flagged"}
    assert set(sync.messages("Archive")) == {message_id_of(archived)}
    assert set(sync.messages("Projects/2026")) == {message_id_of(nested)}
    on_server = await server_messages(maildb, "INBOX")
    assert set(on_server) == set(local_inbox)
    assert set(await server_messages(maildb, "FromLaptop")) == {message_id_of(laptop_new)}
    bodies = await server_bodies(maildb, "INBOX")
    for message_id, local in local_inbox.items():  # the bytes travel unchanged both ways
        assert normalised(local.path.read_bytes()) == normalised(bodies[message_id])

    # 2. a second run is a no-op on both sides
    files, state = sync.snapshot(), await server_state(maildb)
    await sync.run()
    assert sync.snapshot() == files  # no file added, removed or renamed (flags)
    assert await server_state(maildb) == state  # no append, flag change (MODSEQ) or expunge

    # 3. flags both ways: local Seen -> server; server Flagged -> local
    target = sync.messages("INBOX")[server_ids[1]].path
    base = MAILDIR_NAME.match(target.name).group("base")
    target.rename(target.parent.parent / "cur" / f"{base}:2,S")
    other_uid = (await server_messages(maildb, "INBOX"))[server_ids[2]][0]
    await maildb.store_flags(ALICE, "INBOX", [other_uid], "+", frozenset({"\\Flagged"}))
    await sync.run()
    assert "\\Seen" in (await server_messages(maildb, "INBOX"))[server_ids[1]][1]
    assert "\\Flagged" in sync.messages("INBOX")[server_ids[2]].flags

    # 4. deletions both ways
    sync.messages("INBOX")[server_ids[1]].path.unlink()
    gone_uid = (await server_messages(maildb, "INBOX"))[server_ids[0]][0]
    await maildb.expunge(ALICE, "INBOX", [gone_uid])
    await sync.run()
    remaining = {server_ids[2], message_id_of(local_new)}
    assert set(await server_messages(maildb, "INBOX")) == remaining
    assert set(sync.messages("INBOX")) == remaining

    # and the state is stable again
    files, state = sync.snapshot(), await server_state(maildb)
    await sync.run()
    assert sync.snapshot() == files and await server_state(maildb) == state


async def test_plain_mechanism_and_new_mail_after_first_sync(
        imap_server: ImapStack, deliver: Deliver, maildb: MailDB, tmp_path: Path) -> None:
    sync = Sync(imap_server, tmp_path, mechanism="PLAIN")
    await sync.run()
    assert sync.messages("INBOX") == {}
    later = message("arrived later")
    await deliver(ALICE, later)
    await sync.run()
    assert set(sync.messages("INBOX")) == {message_id_of(later)}
