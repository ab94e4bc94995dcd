"""IMAP end to end, as a user and an operator meet it: real `tiermail filter` and `tiermail
store` processes, the real RabbitMQ and Redis, smtplib on one side and imapclient on the other.

Mail sent over SMTP wakes an IDLEing client and arrives byte for byte; the standard folders
exist for a new account; TLS on both IMAP ports; a quota set with the CLI is enforced on
APPEND and, once the account is full, at RCPT (452 4.2.2) so the mail waits at the sender.
"""

from __future__ import annotations

import functools
import poplib
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from common.settings import Settings
from tests.support import TierProcess, run_cli, wait_until

PASSWORD = "correct horse"
ALICE = "alice@example.org"


def tiermail(settings: Settings, *args: str, stdin: str = "") -> None:
    result = run_cli(settings, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Stack:
    settings: Settings
    store: TierProcess
    filter: TierProcess

    def imap(self) -> IMAPClient:
        client = IMAPClient("127.0.0.1", self.settings.imap_port, ssl=False, timeout=30)
        client.login(ALICE, PASSWORD)
        return client


@pytest.fixture
def stack(settings: Settings, run_tier: Callable[..., TierProcess]) -> Iterator[Stack]:
    tiermail(settings, "domain", "add", "example.org")
    tiermail(settings, "user", "add", ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    store = run_tier(settings, "store")
    store.wait_for_port(settings.imap_port)
    store.wait_for_port(settings.imaps_port)
    smtp = run_tier(settings, "filter")
    smtp.wait_for_port(settings.smtp_port)
    yield Stack(settings, store, smtp)


def message(subject: str) -> bytes:
    return (f"From: Sender <sender@example.net>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@client.example.net>\r\n\r\n"
            f"Hello over IMAP.\r\n").encode()


def send(settings: Settings, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=60) as smtp:
        smtp.sendmail("sender@example.net", [ALICE], data)


def test_smtp_to_idle_to_fetch(stack: Stack) -> None:
    client = stack.imap()
    folders = {name: set(flags) for flags, _, name in client.list_folders()}
    assert {"INBOX", "Drafts", "Sent", "Junk", "Trash", "Archive"} <= set(folders)
    assert b"\\Junk" in folders["Junk"]
    client.select_folder("INBOX")
    client.idle()
    data = message("wake up")
    send(stack.settings, data)
    deadline = time.monotonic() + 30
    seen: list[object] = []
    while not any(isinstance(r, tuple) and r[1:2] == (b"EXISTS",) for r in seen):
        assert time.monotonic() < deadline, f"IDLE never reported the delivery: {seen}"
        seen += client.idle_check(timeout=1)
    client.idle_done()
    (uid,) = client.search()
    stored = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    assert stored.endswith(data)  # only trace headers were put on top
    assert b"Received: " in stored[: len(stored) - len(data)]
    client.logout()


def test_a_message_appended_without_a_final_line_end_in_imap_and_pop3(stack: Stack) -> None:
    """IMAP keeps the octets the client stored (RFC822.SIZE and BODY[] as APPENDed: what
    Dovecot does, and what imapsync compares); POP3 ends the last line before its terminator
    and says so in its sizes (RFC 1939 LIST: the exact size). POP3 said 2 octets less than
    RETR sent."""
    stored = message("no line end").rstrip(b"\r\n")
    client = stack.imap()
    client.append("INBOX", stored)
    client.select_folder("INBOX")
    [data] = client.fetch(client.search(), ["RFC822.SIZE", "BODY.PEEK[]"]).values()
    assert (data[b"RFC822.SIZE"], data[b"BODY[]"]) == (len(stored), stored)
    client.logout()

    pop = poplib.POP3("127.0.0.1", stack.settings.pop3_port, timeout=30)
    try:
        pop.user(ALICE)
        pop.pass_(PASSWORD)
        _, lines, _ = pop.retr(1)
        sent = b"".join(line + b"\r\n" for line in lines)
        assert sent == stored + b"\r\n"
        assert pop.list()[1] == [f"1 {len(sent)}".encode()]
        assert pop.stat() == (1, len(sent))
    finally:
        pop.quit()


def test_starttls_and_imaps_on_the_real_store(stack: Stack) -> None:
    plain = IMAPClient("127.0.0.1", stack.settings.imap_port, ssl=False, timeout=30)
    plain.starttls(unverified())
    plain.login(ALICE, PASSWORD)
    plain.logout()
    tls = IMAPClient("127.0.0.1", stack.settings.imaps_port, ssl=True,
                     ssl_context=unverified(), timeout=30)
    tls.login(ALICE, PASSWORD)
    assert tls.select_folder("INBOX")[b"EXISTS"] == 0
    tls.logout()


def test_the_real_stores_tls_ports_take_many_clients_at_once(stack: Stack) -> None:
    """The store process runs on uvloop, where a handshake made after the connection was
    handed to a stream lost a ClientHello sent at once (uvloop starts reading after
    connection_made even when it paused): clients saw an EOF now and then under load.
    Clients that connect at once and speak TLS at once all get their greeting."""
    settings = stack.settings

    def imaps() -> None:
        client = IMAPClient("127.0.0.1", settings.imaps_port, ssl=True,
                            ssl_context=unverified(), timeout=30)
        client.logout()

    def pop3s() -> None:
        poplib.POP3_SSL("127.0.0.1", settings.pop3s_port, context=unverified(),
                        timeout=30).quit()

    with ThreadPoolExecutor(max_workers=20) as pool:
        done = [pool.submit(client) for client in (imaps, pop3s) for _ in range(40)]
        for future in done:
            future.result()


def test_silent_tls_connections_hold_places_on_the_real_store(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Counted from the accept on the real store too: two connections that never start their
    handshake fill a limit of two, and the third client reads its refusal over TLS."""
    settings = settings.replace(imap_max_connections_per_ip=2, pop3_max_connections_per_ip=2,
                                rate_limit_exempt="")
    store = run_tier(settings, "store")
    # Not wait_for_port: its probe would itself hold a place until the store saw it go.
    wait_until(lambda: "event=started" in store.output(), timeout=60, what="the store up")
    for port in (settings.imaps_port, settings.pop3s_port):
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            wait_until(functools.partial(_refused_over_tls, port), timeout=30, interval=0.1,
                       what=f"a third connection to {port} refused")
        finally:
            for sock in silent:
                sock.close()
        wait_until(functools.partial(_served_over_tls, port), timeout=30, interval=0.1,
                   what=f"the places on {port} freed")


def _tls_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            unverified().wrap_socket(raw) as tls:
        return tls.recv(512)


def _refused_over_tls(port: int) -> bool:
    """Whether a TLS client of `port` reads a refusal (IMAP's BYE, POP3's -ERR) as its
    greeting."""
    return _tls_greeting(port).startswith((b"* BYE", b"-ERR"))


def _served_over_tls(port: int) -> bool:
    return _tls_greeting(port).startswith((b"* OK", b"+OK"))


def test_a_mailbox_that_delivery_fills_gets_452_at_rcpt(stack: Stack) -> None:
    """The store publishes the usage each delivery adds (its quota publisher listens to the
    mail store): once mail has filled a mailbox, the filters refuse more at RCPT, without a
    restart or a quota command in between."""
    tiermail(stack.settings, "user", "quota", ALICE, "8K")
    with smtplib.SMTP("127.0.0.1", stack.settings.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("sender@example.net")  # no SIZE: nothing to refuse it by before DATA
        assert smtp.rcpt(ALICE)[0] == 250
        assert smtp.data(message("large") + (b"x" * 70 + b"\r\n") * 130)[0] == 250

    def rcpt() -> int:
        with smtplib.SMTP("127.0.0.1", stack.settings.smtp_port, timeout=60) as smtp:
            smtp.ehlo("client.example.net")
            smtp.mail("sender@example.net")
            code = smtp.rcpt(ALICE)[0]
            smtp.rset()
        return code

    wait_until(lambda: rcpt() == 452, timeout=30, interval=0.2, what="452 at RCPT once full")


def test_quota_from_the_cli_on_append_and_at_rcpt(stack: Stack) -> None:
    tiermail(stack.settings, "user", "quota", ALICE, "8K")
    client = stack.imap()
    quota_roots = client.get_quota_root("INBOX")
    assert any(q.resource.upper() == "STORAGE" and q.limit == 8 for q in quota_roots[1])
    filler = message("filler") + b"x" * 2000 + b"\r\n"
    with pytest.raises(IMAPClientError, match="OVERQUOTA"):
        for _ in range(10):  # 8 KiB cannot take ten of these
            client.append("INBOX", filler)
    client.logout()

    def rcpt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", stack.settings.smtp_port, timeout=60) as smtp:
            smtp.ehlo("client.example.net")
            smtp.mail("sender@example.net")
            code, reply = smtp.rcpt(ALICE)
            smtp.rset()
        return code, reply

    assert rcpt()[0] == 250  # APPEND kept the usage below the limit: not full yet
    # "Full" is usage >= limit: the operator lowers the quota below what is stored
    tiermail(stack.settings, "user", "quota", ALICE, "1K")
    wait_until(lambda: rcpt()[:1] == (452,) and b"4.2.2" in rcpt()[1], timeout=30,
               interval=0.2, what="452 4.2.2 at RCPT")
    tiermail(stack.settings, "user", "quota", ALICE, "0")  # unlimited again
    wait_until(lambda: rcpt()[0] == 250, timeout=30, interval=0.2, what="250 at RCPT again")
