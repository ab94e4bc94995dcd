"""Smoke tests of the IMAP server with imaplib/imapclient against the in-process server: one
pass through the everyday commands, IDLE, STARTTLS/IMAPS and LOGINDISABLED, plus the two
byte-level rules the session's sequence map exists for. The broad conversation tests are in
the other test_*.py files here."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import socket
import ssl
import threading
import time
from typing import BinaryIO

import pytest
from imapclient import IMAPClient

from common.settings import Settings
from services.store import listening as listening_module
from services.store.imap import responses as r
from services.store.listening import SessionEndingServer
from services.store.mailbox import INBOX
from tests.integration.imap.conftest import (
    ALICE,
    USERS,
    Deliver,
    ImapStack,
    StartImap,
    client_tls_context,
)

MSG = (b"From: Carol <carol@example.org>\r\nTo: alice@example.test\r\n"
       b"Subject: smoke\r\nMessage-ID: <s1@example.org>\r\n\r\nHello smoke test.\r\n")


def login(port: int) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    client.login(ALICE, USERS[ALICE])
    return client


async def test_login_select_fetch_store_search_append(imap_server: ImapStack,
                                                      deliver: Deliver) -> None:
    await deliver(ALICE, MSG)

    def dialog() -> bytes:
        client = login(imap_server.port)
        assert client.select(INBOX) == ("OK", [b"1"])
        typ, data = client.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        assert data[0][1] == b"Subject: smoke\r\n\r\n"
        assert b"\\Seen" not in data[0][0]
        typ, data = client.fetch("1", "(BODY[TEXT])")  # not PEEK: sets \Seen
        assert data[0][1] == b"Hello smoke test.\r\n"
        assert b"\\Seen" in data[1]
        typ, data = client.store("1", "+FLAGS", "(\\Flagged)")
        assert typ == "OK" and b"\\Flagged" in data[0] and b"\\Seen" in data[0]
        assert client.search(None, "FLAGGED", "SUBJECT", "smoke") == ("OK", [b"1"])
        assert client.search(None, "UNSEEN") == ("OK", [b""])
        typ, data = client.append(INBOX, "(\\Draft)", None, b"Subject: two\r\n\r\nsecond\r\n")
        assert typ == "OK" and b"APPENDUID" in data[0]
        typ, data = client.uid("SEARCH", "DRAFT")
        client.logout()
        return bytes(data[0])

    appended_uid = await asyncio.to_thread(dialog)
    messages = await imap_server.maildb.list_messages(ALICE, INBOX)
    assert [m.uid for m in messages] == [1, int(appended_uid)]
    assert messages[0].flags == {"\\Seen", "\\Flagged"}
    assert messages[1].flags == {"\\Draft"}


async def test_idle_sees_a_delivery(imap_server: ImapStack, deliver: Deliver) -> None:
    client = await asyncio.to_thread(IMAPClient, "127.0.0.1", imap_server.port, ssl=False,
                                     timeout=10)
    await asyncio.to_thread(client.login, ALICE, USERS[ALICE])
    await asyncio.to_thread(client.select_folder, INBOX)
    await asyncio.to_thread(client.idle)
    await deliver(ALICE, MSG)
    responses = await asyncio.to_thread(client.idle_check, 10)
    await asyncio.to_thread(client.idle_done)
    await asyncio.to_thread(client.logout)
    assert (1, b"EXISTS") in responses


async def test_starttls_and_imaps(imap_server: ImapStack) -> None:
    def dialog() -> None:
        client = imaplib.IMAP4("127.0.0.1", imap_server.port, timeout=10)
        assert "STARTTLS" in client.capabilities
        client.starttls(client_tls_context())
        assert "STARTTLS" not in client.capabilities
        assert client.login(ALICE, USERS[ALICE])[0] == "OK"
        client.logout()
        secure = imaplib.IMAP4_SSL("127.0.0.1", imap_server.tls_port,
                                   ssl_context=client_tls_context(), timeout=10)
        assert secure.login(ALICE, USERS[ALICE])[0] == "OK"
        secure.logout()

    await asyncio.to_thread(dialog)


async def test_logindisabled_until_tls(start_imap: StartImap, settings: Settings) -> None:
    stack = await start_imap(settings.replace(allow_plaintext_auth=False))

    def dialog() -> None:
        client = imaplib.IMAP4("127.0.0.1", stack.port, timeout=10)
        assert "LOGINDISABLED" in client.capabilities
        assert "AUTH=PLAIN" not in client.capabilities
        try:
            client.login(ALICE, USERS[ALICE])
        except imaplib.IMAP4.error as exc:
            assert r.NO_PRIVACY_REQUIRED.code is not None
            assert r.NO_PRIVACY_REQUIRED.code in str(exc)
        else:
            raise AssertionError("LOGIN accepted without TLS")
        client.starttls(client_tls_context())
        assert "LOGINDISABLED" not in client.capabilities
        assert "AUTH=PLAIN" in client.capabilities
        assert client.login(ALICE, USERS[ALICE])[0] == "OK"
        client.logout()

    await asyncio.to_thread(dialog)


async def test_a_client_sending_without_end_does_not_hold_the_shutdown(
        imap_server: ImapStack) -> None:
    """After the shutdown BYE the store's close lingers for the client's input, for
    LINGER_SECONDS (2 s): a client that trickles NOOPs without end (800 octets a second,
    which the 1 MiB cap alone would let go on for 20 minutes) does not hold the shutdown,
    still reads the BYE, and its session task is over once the server is closed."""
    raw = await asyncio.to_thread(Raw, imap_server.port)
    await asyncio.to_thread(raw.command, b"a LOGIN " + ALICE.encode() + b' "alice secret"')
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):  # refused once the store has closed
            while not stop.is_set():
                raw.sock.sendall(b"n NOOP\r\n")
                time.sleep(0.01)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        for server in imap_server.servers:
            server.close()
        for server in imap_server.servers:
            await asyncio.wait_for(server.wait_closed(), 10)
    finally:
        stop.set()
        await asyncio.to_thread(sender.join)
    assert all(server.sessions == 0 for server in imap_server.servers
               if isinstance(server, SessionEndingServer))
    lines = await asyncio.to_thread(raw.rest)
    assert lines[-1] == r.BYE_SHUTDOWN.untagged(), lines[-3:]
    raw.close()


async def test_after_logout_the_client_sees_the_close_at_once(
        imap_server: ImapStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """After LOGOUT the store half-closes the connection at once, so a client that waits
    for the close (and sends nothing more) gets it straight away, not after the linger
    (LINGER_SECONDS, 60 s here; the reads here give up after 10 s)."""
    monkeypatch.setattr(listening_module, "LINGER_SECONDS", 60.0)

    def dialog() -> None:
        raw = Raw(imap_server.port)
        lines = raw.command(b"a LOGOUT")
        assert lines == [r.BYE_LOGOUT.untagged(), b"a OK LOGOUT completed\r\n"], lines
        assert raw.file.readline() == b""  # a TimeoutError if the store waited
        raw.close()

    await asyncio.to_thread(dialog)


async def test_a_shutdown_cuts_a_connection_still_lingering_after_logout(
        imap_server: ImapStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that said its last words lingers for the client's close (LINGER_SECONDS, 60
    s here); a shutdown meanwhile aborts the connection rather than closing it politely: the
    client has had all we had to say, and the store is going away. On IMAPS (no half-close
    there, so it lingers with TLS still open) the client sees the connection end without the
    TLS close_notify that a polite close sends (and then waits for the client to answer)."""
    monkeypatch.setattr(listening_module, "LINGER_SECONDS", 60.0)

    def logged_out() -> tuple[ssl.SSLSocket, BinaryIO]:
        sock = socket.create_connection(("127.0.0.1", imap_server.tls_port), timeout=30)
        tls = client_tls_context().wrap_socket(sock, server_hostname="mx.test.invalid",
                                               suppress_ragged_eofs=False)
        file = tls.makefile("rb")
        assert file.readline().startswith(b"* OK")
        tls.sendall(b"a LOGOUT\r\n")
        assert file.readline() == r.BYE_LOGOUT.untagged()
        assert file.readline() == b"a OK LOGOUT completed\r\n"  # lingering from here on
        return tls, file

    tls, file = await asyncio.to_thread(logged_out)
    try:
        for server in imap_server.servers:
            server.close()
        for server in imap_server.servers:
            await asyncio.wait_for(server.wait_closed(), 30)
        with pytest.raises(ssl.SSLEOFError):  # b"" after a close_notify
            await asyncio.to_thread(file.read)
    finally:
        file.close()
        tls.close()


class Raw:
    """Byte-level dialog for what imaplib hides (pending EXPUNGEs, refused literals)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        assert self.file.readline().startswith(b"* OK")

    def command(self, line: bytes) -> list[bytes]:
        """Send a tagged line; every response line up to the tagged one."""
        tag = line.split(b" ", 1)[0]
        self.sock.sendall(line + b"\r\n")
        lines = []
        while True:
            response = self.file.readline()
            assert response, "connection closed"
            lines.append(response)
            if response.startswith(tag + b" "):
                return lines

    def rest(self) -> list[bytes]:
        """Every line until the server's close (or its reset)."""
        lines = []
        with contextlib.suppress(ConnectionResetError):
            while line := self.file.readline():
                lines.append(line)
        return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


async def test_expunge_waits_for_a_command_that_may_announce_it(
        imap_server: ImapStack, deliver: Deliver) -> None:
    """RFC 3501 7.4.1: another session's expunge is not announced during FETCH (sequence
    numbers stay put), but is after NOOP."""
    for _ in range(3):
        await deliver(ALICE, MSG)

    def dialog() -> None:
        watcher = Raw(imap_server.port)
        watcher.command(b"a LOGIN " + ALICE.encode() + b' "alice secret"')
        watcher.command(b"b SELECT INBOX")
        other = login(imap_server.port)
        other.select(INBOX)
        other.store("2", "+FLAGS", "\\Deleted")
        other.expunge()
        other.logout()
        during_fetch = watcher.command(b"c FETCH 1:3 (UID)")
        assert not any(b"EXPUNGE" in line for line in during_fetch)
        assert b"* 3 FETCH (UID 3)\r\n" in during_fetch  # numbering unchanged
        after_noop = watcher.command(b"d NOOP")
        assert after_noop[0] == b"* 2 EXPUNGE\r\n"
        assert watcher.command(b"e FETCH 2 (UID)")[0] == b"* 2 FETCH (UID 3)\r\n"
        watcher.close()

    await asyncio.to_thread(dialog)


async def test_oversized_literal_refused_before_it_is_sent(start_imap: StartImap,
                                                           settings: Settings) -> None:
    stack = await start_imap(settings.replace(imap_max_literal=1000))

    def dialog() -> None:
        raw = Raw(stack.port)
        raw.command(b"a LOGIN " + ALICE.encode() + b' "alice secret"')
        refused = raw.command(b"b APPEND INBOX {1001}")
        assert refused == [b"b NO [TOOBIG] Literal larger than the server accepts\r\n"]
        assert raw.command(b"c NOOP") == [b"c OK Completed\r\n"]  # still in step
        raw.close()

    await asyncio.to_thread(dialog)


async def test_shutdown_says_bye_to_open_sessions(imap_server: ImapStack) -> None:
    raw = await asyncio.to_thread(Raw, imap_server.port)
    await asyncio.to_thread(raw.command, b"a LOGIN " + ALICE.encode() + b' "alice secret"')
    for server in imap_server.servers:
        server.close()
    for server in imap_server.servers:
        await asyncio.wait_for(server.wait_closed(), 10)
    assert await asyncio.to_thread(raw.file.readline) == r.BYE_SHUTDOWN.untagged()
    assert await asyncio.to_thread(raw.file.readline) == b""  # and the connection is closed
    raw.close()
