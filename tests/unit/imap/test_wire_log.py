"""The IMAP server's DEBUG wire log (services/store/imap/server.py): no credentials in it."""

from __future__ import annotations

import pytest

from services.store.imap.server import _loggable


@pytest.mark.parametrize(("line", "logged"), [
    (b"a1 LOGIN alice secret\r\n", "a1 LOGIN ****"),
    (b"a1 login\talice\tsecret\r\n", "a1 login ****"),
    (b"a2 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n", "a2 AUTHENTICATE ****"),
    (b"a3 SELECT INBOX\r\n", "a3 SELECT INBOX"),
    (b"a4 LOGIN {5}\r\n", "a4 LOGIN ****"),
])
def test_credentials_never_reach_the_wire_log(line: bytes, logged: str) -> None:
    assert _loggable(line) == logged
