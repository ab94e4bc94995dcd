"""A real POP3 client, fetchmail (Debian package fetchmail), against the real server and
MailDB: STLS with the test certificate checked, UIDL-based "keep" polling that fetches only
what is new, and a polling run that deletes what it fetched (DELE, committed at QUIT).

fetchmail hands each message to an MDA (here: a file per message) after undoing POP3's dot
stuffing and turning CRLF into LF; with `invisible` it adds no Received header of its own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.settings import Settings
from services.store.backends.maildb import MailDB
from tests.integration.pop3.conftest import ALICE, USERS, Pop3Stack, StartPop3
from tests.support import require_client

FETCHMAIL = "/usr/bin/fetchmail"
DOTS = (b"From: carol@example.org\r\nTo: alice@example.test\r\nSubject: dots\r\n\r\n"
        b".leading dot\r\n..two dots\r\n.\r\nlast line\r\n")


@pytest.fixture(autouse=True)
def _fetchmail_installed() -> None:
    require_client(FETCHMAIL, "fetchmail")


@pytest.fixture
async def maildb_pop3(start_pop3: StartPop3, tmp_path: Path) -> AsyncIterator[Pop3Stack]:
    store = MailDB(tmp_path / "mail", inline_max=Settings.store_inline_max)
    yield await start_pop3(store)
    await store.close()


class Fetchmail:
    """alice's maildrop polled into `inbox`, one file per message."""

    def __init__(self, stack: Pop3Stack, root: Path, cert: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.inbox.mkdir()
        self.stack = stack
        self.cert = cert

    async def poll(self, *, keep: bool) -> str:
        rc = self.root / "fetchmailrc"
        rc.write_text(
            f"set no syslog\nset idfile {self.root / 'ids'}\nset invisible\n"
            f"poll 127.0.0.1 service {self.stack.port} protocol POP3 uidl\n"
            f"  user \"{ALICE}\" password \"{USERS[ALICE]}\" is root here\n"
            f"  sslproto 'tls1.2+' sslcertck sslcertfile {self.cert}\n"
            f"  sslcommonname localhost\n"
            f"  {'keep' if keep else 'nokeep fetchall'}\n"
            f"  mda \"/bin/sh -c 'cat > $(mktemp {self.inbox}/msg.XXXXXX)'\"\n")
        rc.chmod(0o600)

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run([FETCHMAIL, "-v", "-f", str(rc)], capture_output=True,
                                  text=True, timeout=60,
                                  env={**os.environ, "FETCHMAILHOME": str(self.root)})

        result = await asyncio.to_thread(run)
        output = result.stdout + result.stderr
        assert result.returncode in (0, 1), output  # 1: no new mail
        assert "STLS" in output, output  # the session went over TLS
        return output

    def fetched(self) -> list[bytes]:
        return sorted(path.read_bytes() for path in self.inbox.iterdir())


def as_delivered(data: bytes) -> bytes:
    """What the MDA gets: the message with LF line ends."""
    return data.replace(b"\r\n", b"\n")


async def test_keep_polls_fetch_only_new_mail_then_a_deleting_poll_empties_the_drop(
        maildb_pop3: Pop3Stack, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    stack = maildb_pop3
    first = [DOTS, b"Subject: two\r\n\r\nsecond\r\n"]
    for data in first:
        await stack.deliver(ALICE, data)
    client = Fetchmail(stack, tmp_path, tls_files[0])

    await client.poll(keep=True)
    assert client.fetched() == sorted(as_delivered(d) for d in first)  # dot stuffing undone
    await stack.wait_unlocked(ALICE)

    later = b"Subject: three\r\n\r\narrived between polls\r\n"
    await stack.deliver(ALICE, later)
    await client.poll(keep=True)  # UIDL: only the new one (the others are kept, and known)
    assert client.fetched() == sorted(as_delivered(d) for d in [*first, later])
    await stack.wait_unlocked(ALICE)
    assert len(await stack.store.list_messages(ALICE)) == 3

    for path in client.inbox.iterdir():
        path.unlink()
    await client.poll(keep=False)  # everything again, each deleted at QUIT
    assert client.fetched() == sorted(as_delivered(d) for d in [*first, later])
    await stack.wait_unlocked(ALICE)
    assert await stack.store.list_messages(ALICE) == []
