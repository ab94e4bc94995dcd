"""RFC 3501 requirements the other conversation tests do not already cover, one test per
requirement (docs/imap-conformance.md lists each requirement with the test that checks it).
The real server, a real MailDB, byte-level or imaplib clients.
"""

from __future__ import annotations

import pytest

from services.store.backends.maildb import MailDB
from tests.integration.imap.clients import Server, in_thread, message
from tests.integration.imap.conftest import ALICE, Deliver, ImapStack


@pytest.fixture
def server(imap_server: ImapStack) -> Server:
    return Server.of(imap_server)


async def test_keywords_are_case_insensitive_in_store_as_in_search(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """A keyword is one flag however the client spells it (RFC 3501 9: the case of a
    flag-keyword atom is ignored, as SEARCH KEYWORD already did): -FLAGS (JUNK) takes away
    "Junk", +FLAGS (junk) adds no second spelling, APPEND reuses the mailbox's spelling."""
    for n in range(2):
        await deliver(ALICE, message(f"m{n}"))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        raw.ok("STORE 1 +FLAGS (Junk)")
        assert raw.ok("SEARCH KEYWORD JUNK").untagged == [b"* SEARCH 1"]
        added = raw.ok("STORE 2 +FLAGS (junk)")
        assert added.untagged == [b"* 2 FETCH (FLAGS (\\Recent Junk))"]  # no FLAGS: nothing new
        removed = raw.ok("STORE 1 -FLAGS (JUNK)")
        assert removed.untagged == [b"* 1 FETCH (FLAGS (\\Recent))"]
        raw.literal_command(b"APPEND INBOX (jUNK)", message("appended"))
        raw.close()

    await in_thread(dialog)
    flags = [info.flags for info in await maildb.list_messages(ALICE)]
    assert flags == [frozenset(), frozenset({"Junk"}), frozenset({"Junk"})]

