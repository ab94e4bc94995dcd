"""`tiermail user del` ends the deleted account's IMAP and POP3 sessions in the running store
(services/store/logins.py), as Dovecot's `doveadm kick` would: the real `tiermail store`
process, the real CLI, Redis and RabbitMQ, and imaplib, imapclient and poplib as clients."""

from __future__ import annotations

import imaplib
import poplib
import socket
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from imapclient import IMAPClient

from common.settings import Settings
from services.store.backends.maildb import store_user_path
from services.store.imap import responses as r
from services.store.pop3 import protocol as p
from tests.integration.store.helpers import stored_count
from tests.support import TierProcess, free_port, run_cli, wait_until

ALICE, BOB = "alice@example.org", "bob@example.org"
PASSWORDS = {ALICE: "alice pw", BOB: "bob pw"}
TIMEOUT = 30  # seconds any client waits for the store
BYE_ACCOUNT_DELETED = r.BYE_ACCOUNT_DELETED.untagged()
ERR_ACCOUNT_DELETED = p.ERR_ACCOUNT_DELETED.encode()


def tiermail(settings: Settings, *args: str, stdin: str = "") -> str:
    result = run_cli(settings, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stderr


def message(number: int, padding: int = 0) -> bytes:
    return (f"From: someone@example.net\r\nSubject: message {number}\r\n\r\nhello\r\n"
            + "x" * 76 * (padding // 78) + "\r\n").encode()


@dataclass
class Store:
    settings: Settings
    process: TierProcess

    def imap(self, user: str, mailbox: str | None = "INBOX", password: str | None = None
             ) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.settings.imap_port, timeout=TIMEOUT)
        client.login(user, password or PASSWORDS[user])
        if mailbox is not None:
            assert client.select(mailbox)[0] == "OK"
        return client

    def pop3(self, user: str) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.settings.pop3_port, timeout=TIMEOUT)
        client.user(user)
        client.pass_(PASSWORDS[user])
        return client

    def append(self, user: str, *messages: bytes) -> None:
        client = self.imap(user, mailbox=None)
        for data in messages:
            assert client.append("INBOX", "", None, data)[0] == "OK"
        client.logout()


def start_store(settings: Settings, run_tier: Callable[..., TierProcess]) -> Store:
    tiermail(settings, "domain", "add", "example.org")
    for user, password in PASSWORDS.items():
        tiermail(settings, "user", "add", user, "--password-stdin", stdin=password + "\n")
    process = run_tier(settings, "store")
    process.wait_for_port(settings.pop3_port)
    process.wait_for_port(settings.imap_port)  # IMAP starts listening after POP3
    return Store(settings, process)


@pytest.fixture
def store(settings: Settings, run_tier: Callable[..., TierProcess]) -> Iterator[Store]:
    yield start_store(settings, run_tier)


def read_to_end(client: imaplib.IMAP4 | poplib.POP3) -> bytes:
    """Everything the store still sends, up to its close (bounded by the socket timeout)."""
    sock = client.sock
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def assert_imap_bye(client: imaplib.IMAP4) -> None:
    """The store's last words to a session between commands: BYE, then the close."""
    assert client.readline() == BYE_ACCOUNT_DELETED
    assert client.readline() == b""


def test_deleting_an_account_ends_its_sessions_and_no_one_elses(store: Store) -> None:
    store.append(ALICE, message(1), message(2))
    store.append(BOB, message(3))
    selected = store.imap(ALICE)
    idling = IMAPClient("127.0.0.1", store.settings.imap_port, ssl=False, timeout=TIMEOUT)
    idling.login(ALICE, PASSWORDS[ALICE])
    idling.select_folder("INBOX")
    idling.idle()
    pop = store.pop3(ALICE)
    assert pop.stat()[0] == 2
    pop.dele(1)  # never committed: the session ends without UPDATE
    bob_imap, bob_pop = store.imap(BOB), store.pop3(BOB)

    tiermail(store.settings, "user", "del", ALICE)

    assert_imap_bye(selected)
    responses = idling.idle_check(timeout=TIMEOUT)
    assert responses == [(b"BYE", b"Account", b"deleted")]  # imapclient splits the words
    assert idling.socket().recv(100) == b""
    assert pop.file.readline() == ERR_ACCOUNT_DELETED
    assert pop.file.readline() == b""
    assert stored_count(store.settings.store_dir, [ALICE]) == 2  # the DELE was not committed

    # Bob's sessions go on as before.
    assert bob_imap.noop()[0] == "OK"
    assert bob_imap.uid("SEARCH", "ALL") == ("OK", [b"1"])
    assert bob_pop.stat()[0] == 1
    bob_imap.logout()
    bob_pop.quit()

    # And a new login for the deleted account fails, as before.
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        store.imap(ALICE)
    with pytest.raises(poplib.error_proto, match="AUTH"):
        store.pop3(ALICE)
    assert store.process.output().count("session ended: account deleted") == 3


def test_a_response_being_written_is_finished_before_the_bye(store: Store) -> None:
    """A FETCH whose client has stopped reading is under way when the account is deleted:
    the whole response and its completion come first, then the BYE. (The message is larger
    than the kernel can hold for the client, 4 MiB of send buffer at most and the client's
    small receive buffer: the store is still writing when the session is ended.)"""
    received, response = deleted_during_a_large_fetch(store)
    assert received[:len(response)] == response
    assert received[len(response):] == BYE_ACCOUNT_DELETED


def deleted_during_a_large_fetch(store: Store, pipelined: bytes = b"") -> tuple[bytes, bytes]:
    """ALICE's FETCH of an 8 MiB message, by a client that reads nothing until the account
    is deleted (its receive buffer small, `pipelined` sent behind the FETCH): all it read
    then, and the FETCH response with its completion that this must begin with."""
    body = message(1, padding=8 * 1024 * 1024)
    store.append(ALICE, body)
    client = store.imap(ALICE)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.send(b"f1 UID FETCH 1 (BODY.PEEK[])\r\n" + pipelined)

    tiermail(store.settings, "user", "del", ALICE)
    wait_until(lambda: "account deleted: ending its 1 session" in store.process.output(),
               what="the store to end the session")

    response = (b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(body) + body + b")\r\n"
                + r.OK_DONE.tagged("f1"))
    return read_to_end(client), response


def mailbox_names(settings: Settings, user: str) -> set[str]:
    """The user's mailboxes, read straight from the index file."""
    index = store_user_path(settings.store_dir, user) / "index.sqlite"
    conn = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM mailbox")}
    finally:
        conn.close()


def test_a_command_pipelined_behind_the_last_response_is_not_run(store: Store) -> None:
    """A client pipelined a CREATE behind a FETCH that is under way when its account is
    deleted: it gets the FETCH response and then the BYE, and the CREATE is never run (no
    reply to it, no mailbox made for an account that no longer exists)."""
    received, response = deleted_during_a_large_fetch(store, pipelined=b"z CREATE x\r\n")
    assert received[:len(response)] == response
    assert received[len(response):] == BYE_ACCOUNT_DELETED
    assert "x" not in mailbox_names(store.settings, ALICE)


def test_a_changed_password_ends_no_session(store: Store) -> None:
    """`user passwd` leaves open sessions alone (as Dovecot does); the next login needs the
    new password. A deletion afterwards shows the store has looked at the accounts since."""
    alice_imap, alice_pop = store.imap(ALICE), store.pop3(ALICE)
    bob_imap = store.imap(BOB)

    tiermail(store.settings, "user", "passwd", ALICE, "--password-stdin", stdin="new pw\n")
    tiermail(store.settings, "user", "del", BOB)
    assert_imap_bye(bob_imap)

    assert alice_imap.noop()[0] == "OK"
    assert alice_pop.noop().startswith(b"+OK")
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        store.imap(ALICE)
    store.imap(ALICE, password="new pw").logout()
    alice_imap.logout()
    alice_pop.quit()


def test_without_redis_a_deletion_is_still_noticed(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Redis is down: logins work without it, the CLI warns that Redis was not updated, and
    the store notices the deletion by looking at the account database on its clock."""
    store = start_store(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/9"),
                        run_tier)
    selected = store.imap(ALICE)
    pop = store.pop3(ALICE)
    bob = store.imap(BOB)

    warning = tiermail(store.settings, "user", "del", ALICE)
    assert "the Redis directory was not updated" in warning

    assert_imap_bye(selected)
    assert pop.file.readline() == ERR_ACCOUNT_DELETED
    assert bob.noop()[0] == "OK"
    bob.logout()
