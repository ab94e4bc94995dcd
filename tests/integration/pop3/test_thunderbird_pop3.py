"""Thunderbird as a POP3 client (headless, driven as in tests/integration/thunderbird.py)
against the real server and MailDB: STLS with the certificate checked and plaintext login
refused before it, "leave messages on server" polls that fetch only what is new (UIDL),
then a poll that downloads and deletes. Nothing doubled, nothing missed, and no -ERR in
Thunderbird's POP3 log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.settings import Settings
from services.store.backends.maildb import MailDB
from tests.integration.pop3.conftest import ALICE, USERS, Pop3Stack, StartPop3
from tests.integration.thunderbird import THUNDERBIRD, Thunderbird
from tests.support import require_client


@pytest.fixture(autouse=True)
def _thunderbird_installed() -> None:
    require_client(THUNDERBIRD, "thunderbird")


@pytest.fixture
async def stack(start_pop3: StartPop3, settings: Settings, tmp_path: Path
                ) -> AsyncIterator[Pop3Stack]:
    store = MailDB(tmp_path / "mail", inline_max=Settings.store_inline_max)
    yield await start_pop3(store, settings.replace(allow_plaintext_auth=False))
    await store.close()


@pytest.fixture
async def thunderbird(stack: Pop3Stack, tmp_path: Path, tls_files: tuple[Path, Path]
                      ) -> AsyncIterator[Thunderbird]:
    client = Thunderbird(tmp_path / "thunderbird", port=stack.port, user=ALICE,
                         protocol="pop3", extra_prefs={"mailnews.pop3.loglevel": "All",
                                                  "devtools.console.stdout.chrome": True})
    await asyncio.to_thread(client.start)
    try:
        await asyncio.to_thread(client.trust_certificate, tls_files[0].read_text())
        await asyncio.to_thread(client.login, USERS[ALICE])
        yield client
    finally:
        await asyncio.to_thread(client.stop)


def message(number: int) -> bytes:
    return (f"From: carol@example.org\r\nTo: {ALICE}\r\nSubject: number {number}\r\n"
            f"Message-ID: <pop3-{number}@example.org>\r\n\r\n"
            f".a line with a leading dot\r\nbody {number}\r\n").encode()


async def test_thunderbird_keeps_then_fetches_and_deletes(
        stack: Pop3Stack, thunderbird: Thunderbird) -> None:
    for number in (1, 2, 3):
        await stack.deliver(ALICE, message(number))

    def poll(*, leave: bool) -> dict[str, dict[str, object]]:
        return thunderbird.step("getMail", leaveOnServer=leave)

    inbox = await asyncio.to_thread(poll, leave=True)
    assert set(inbox) == {"pop3-1@example.org", "pop3-2@example.org", "pop3-3@example.org"}
    assert len(await stack.store.list_messages(ALICE)) == 3  # left on the server

    await stack.deliver(ALICE, message(4))
    inbox = await asyncio.to_thread(poll, leave=True)
    assert sorted(entry["subject"] for entry in inbox.values()) == \
        ["number 1", "number 2", "number 3", "number 4"]  # only the new one was added
    await stack.wait_unlocked(ALICE)

    await stack.deliver(ALICE, message(5))
    inbox = await asyncio.to_thread(poll, leave=False)
    assert len(inbox) == 5
    await stack.wait_unlocked(ALICE)  # the deletions are committed at QUIT
    assert await stack.store.list_messages(ALICE) == []

    log = (thunderbird.root / "thunderbird.out").read_text(errors="replace")
    assert "S: +OK" in log, "Thunderbird's POP3 log is empty: the check below would pass"
    assert [line for line in log.splitlines() if "S: -ERR" in line] == []
