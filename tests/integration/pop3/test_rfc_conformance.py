"""RFC requirements without a conversation test elsewhere (docs/pop3-conformance.md lists
each requirement and its test): the real server, poplib and raw sockets, both stores."""

from __future__ import annotations

import asyncio
import poplib
import re

from common.settings import Settings
from services.store.mailbox import INBOX
from services.store.pop3 import protocol as p
from tests.integration.pop3.conftest import ALICE, USERS, Pop3Stack
from tests.integration.pop3.test_conversation import (
    MSG1,
    MSG2,
    Raw,
    connect,
    login,
    plain,
    unverified,
    wire,
)

# RFC 1939 section 7: "one to 70 characters in the range 0x21 to 0x7E".
UNIQUE_ID = re.compile(rb"[\x21-\x7e]{1,70}")


async def test_capa_lists_the_same_capabilities_in_both_states(pop3: Pop3Stack) -> None:
    """RFC 2449 section 5: "Capabilities available in the AUTHORIZATION state MUST be
    announced in both states"; USER and SASL (6.2, 6.3) and STLS (RFC 2595 section 4) are
    announced in both, though their commands are valid in AUTHORIZATION only. TRANSACTION
    used to leave out USER, SASL and STLS."""
    def capabilities_before_and_after_login(client: poplib.POP3
                                            ) -> tuple[dict[str, list[str]], ...]:
        before = client.capa()
        client.user(ALICE)
        client.pass_(USERS[ALICE])
        after = client.capa()
        client.quit()
        return before, after

    def plain_port() -> tuple[dict[str, list[str]], ...]:
        return capabilities_before_and_after_login(connect(pop3.port))

    def pop3s() -> tuple[dict[str, list[str]], ...]:
        return capabilities_before_and_after_login(
            poplib.POP3_SSL("127.0.0.1", pop3.tls_port, context=unverified(), timeout=30))

    before, after = await asyncio.to_thread(plain_port)
    assert before == after
    assert {"USER", "SASL", "STLS", "TOP", "UIDL", "RESP-CODES", "PIPELINING",
            "AUTH-RESP-CODE"} <= set(after)
    await pop3.wait_unlocked(ALICE)
    before, after = await asyncio.to_thread(pop3s)
    assert before == after
    assert "STLS" not in after and after["SASL"] == ["PLAIN"]


async def test_quit_in_authorization_ends_the_session_without_update(pop3: Pop3Stack) -> None:
    """RFC 1939 section 4: QUIT before login answers +OK and closes; nothing is locked."""
    raw = await Raw.open(pop3.port)
    await raw.send(f"USER {ALICE}\r\n".encode())
    assert await raw.send(b"QUIT\r\n") == p.OK_BYE.encode()
    assert await raw.closed()
    await raw.close()
    assert not pop3.locks.held(ALICE)


async def test_empty_maildrop_listings(pop3: Pop3Stack) -> None:
    """RFC 1939 sections 5 and 7: STAT, LIST and UIDL of an empty maildrop: counts of 0
    and multi-line responses with no lines; any message number is -ERR."""
    raw = await Raw.open(pop3.port)
    await raw.send(f"USER {ALICE}\r\n".encode())
    await raw.send(f"PASS {USERS[ALICE]}\r\n".encode())
    assert await raw.send(b"STAT\r\n") == b"+OK 0 0\r\n"
    assert await raw.send(b"LIST\r\n") == p.OK_LIST_ALL.format(count=0, octets=0).encode()
    assert await raw.line() == b".\r\n"
    assert await raw.send(b"UIDL\r\n") == p.OK_UIDL_ALL.encode()
    assert await raw.line() == b".\r\n"
    for command in (b"LIST 1", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"DELE 1"):
        assert await raw.send(command + b"\r\n") == p.ERR_NO_SUCH_MESSAGE.encode(), command
    await raw.send(b"QUIT\r\n")
    await raw.close()


async def test_unique_ids_are_1_to_70_visible_characters(pop3: Pop3Stack) -> None:
    """RFC 1939 section 7 (UIDL): each unique-id is 1 to 70 octets in 0x21-0x7E, and
    distinct within the maildrop."""
    for body in (MSG1, MSG2, MSG2):
        await pop3.deliver(ALICE, body)

    def listing() -> list[bytes]:
        client = login(pop3.port)
        _, lines, _ = client.uidl()
        client.quit()
        return [line.split(b" ", 1)[1] for line in lines]

    ids = await asyncio.to_thread(listing)
    assert len(ids) == 3 == len(set(ids))
    assert all(UNIQUE_ID.fullmatch(unique_id) for unique_id in ids), ids


async def test_auth_plain_while_the_maildrop_is_locked(pop3: Pop3Stack) -> None:
    """RFC 2449 section 8.1.1: [IN-USE] answers AUTH as it answers PASS."""
    first = await asyncio.to_thread(login, pop3.port)
    raw = await Raw.open(pop3.port)
    reply = await raw.send(b"AUTH PLAIN " + plain("", ALICE, USERS[ALICE]) + b"\r\n")
    assert reply == p.ERR_IN_USE.encode()
    await raw.send(b"QUIT\r\n")
    await raw.close()
    await asyncio.to_thread(first.quit)


async def test_sasl_lines_at_their_limits(pop3: Pop3Stack) -> None:
    """RFC 5034 section 4: a client response may be longer than RFC 2449's 255 octets, and a
    server must take the largest its mechanisms produce (PLAIN: three fields of 255 octets,
    RFC 4616 section 2, 1,024 octets of base64); the AUTH command itself, initial response
    included, stays within 255 octets (the client sends no initial response that would
    not fit). "=" is an empty initial response: not a PLAIN message, so the login fails
    (only as an initial response: after "+ " it is no base64). "*" cancels."""
    raw = await Raw.open(pop3.port)
    longest = plain("a" * 255, "b" * 255, "c" * 255)
    assert len(longest) == 1024
    assert await raw.send(b"AUTH PLAIN\r\n") == p.SASL_CONTINUE
    # The authzid is someone else: refused as credentials, not as an overlong line.
    assert await raw.send(longest + b"\r\n") == p.ERR_AUTH_FAILED.encode()
    reply = await raw.send(b"AUTH PLAIN " + longest + b"\r\n")
    assert reply == p.ERR_BAD_SYNTAX.format(reason="command line too long").encode()
    assert await raw.send(b"AUTH PLAIN =\r\n") == p.ERR_AUTH_FAILED.encode()
    assert await raw.send(b"AUTH PLAIN\r\n") == p.SASL_CONTINUE
    assert await raw.send(b"=\r\n") == p.ERR_AUTH_MALFORMED.encode()
    assert await raw.send(b"AUTH PLAIN\r\n") == p.SASL_CONTINUE
    assert await raw.send(b"*\r\n") == p.ERR_AUTH_CANCELLED.encode()
    # A padded, valid response right at the 255-octet limit still logs in.
    initial = b"AUTH PLAIN " + plain("", ALICE, USERS[ALICE])
    assert len(initial) + 2 <= p.MAX_COMMAND_LINE
    assert (await raw.send(initial + b"\r\n")).startswith(b"+OK")
    await raw.send(b"QUIT\r\n")
    await raw.close()


async def test_stls_forgets_what_came_before_it(pop3: Pop3Stack) -> None:
    """RFC 2595 section 4: after STLS the session is in AUTHORIZATION as new; a USER sent
    in the clear is not completed by a PASS sent under TLS."""
    def dialog() -> None:
        client = connect(pop3.port)
        client.user(ALICE)
        client.stls(unverified())
        try:
            client.pass_(USERS[ALICE])
        except poplib.error_proto as refused:
            assert refused.args[0] == wire(p.ERR_NEED_USER)
        else:
            raise AssertionError("PASS completed a USER sent before STLS")
        try:
            client.stat()
        except poplib.error_proto as refused:
            assert refused.args[0] == wire(p.ERR_WRONG_STATE)
        client.user(ALICE)
        assert client.pass_(USERS[ALICE]).startswith(b"+OK")
        client.quit()

    await asyncio.to_thread(dialog)


async def test_pass_only_immediately_after_user(pop3: Pop3Stack) -> None:
    """RFC 1939 section 7: PASS "may only be given in the AUTHORIZATION state immediately
    after a successful USER command". Any command between them, a bad one included, forgets
    the name; USER again starts over."""
    raw = await Raw.open(pop3.port)
    for between in ([b"CAPA"], [b"AUTH PLAIN", b"*"], [b"NOSUCH"], [b""]):
        assert (await raw.send(f"USER {ALICE}\r\n".encode())).startswith(b"+OK")
        for line in between:
            reply = await raw.send(line + b"\r\n")
            if line == b"CAPA":
                assert reply == p.OK_CAPA.encode()
                await raw.multiline()
        assert await raw.send(f"PASS {USERS[ALICE]}\r\n".encode()) == \
            p.ERR_NEED_USER.encode(), between
    assert (await raw.send(f"USER {ALICE}\r\n".encode())).startswith(b"+OK")
    assert (await raw.send(f"PASS {USERS[ALICE]}\r\n".encode())).startswith(b"+OK")
    await raw.send(b"QUIT\r\n")
    await raw.close()


async def test_quit_counts_what_the_maildrop_holds_after_update(pop3: Pop3Stack) -> None:
    """The "(N messages left)" of QUIT is the maildrop after UPDATE, not the session's
    snapshot less its deletions: mail that came during the session is left too."""
    await pop3.deliver(ALICE, MSG1)
    await pop3.deliver(ALICE, MSG2)
    raw = await Raw.open(pop3.port)
    await raw.send(f"USER {ALICE}\r\n".encode())
    await raw.send(f"PASS {USERS[ALICE]}\r\n".encode())
    assert await raw.send(b"DELE 1\r\n") == p.OK_DELE.format(number=1).encode()
    await pop3.deliver(ALICE, MSG1)
    await pop3.deliver(ALICE, MSG1)
    assert await raw.send(b"QUIT\r\n") == p.OK_BYE_UPDATED.format(count=3).encode()
    await raw.close()


async def test_pipelined_retrieval_and_deletion_in_order(pop3: Pop3Stack) -> None:
    """RFC 2449 section 6.6: with PIPELINING the server processes each command in turn;
    multi-line responses (RETR, TOP, LIST) come whole and in order, and the QUIT at the end
    commits the DELE sent in the same burst."""
    await pop3.deliver(ALICE, MSG1)
    await pop3.deliver(ALICE, MSG2)
    raw = await Raw.open(pop3.port)
    burst = (f"USER {ALICE}\r\nPASS {USERS[ALICE]}\r\nRETR 1\r\nTOP 2 0\r\nDELE 1\r\n"
             "LIST\r\nUIDL 1\r\nQUIT\r\n")
    raw.writer.write(burst.encode())
    assert await raw.line() == p.OK_USER.encode()
    assert (await raw.line()).startswith(b"+OK")
    assert await raw.line() == p.OK_RETR.format(size=len(MSG1)).encode()
    assert await raw.multiline() == p.stuff(MSG1)
    assert await raw.line() == p.OK_TOP.encode()
    assert await raw.multiline() == p.stuff(MSG2.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert await raw.line() == p.OK_DELE.format(number=1).encode()
    assert await raw.multiline() == p.format_multiline(
        p.OK_LIST_ALL.format(count=1, octets=len(MSG2)), [f"2 {len(MSG2)}"])
    assert await raw.line() == p.ERR_DELETED.format(number=1).encode()
    assert await raw.line() == p.OK_BYE_UPDATED.format(count=1).encode()
    assert await raw.closed()
    await raw.close()
    await pop3.wait_unlocked(ALICE)
    assert len(await pop3.store.list_messages(ALICE, INBOX)) == 1


async def test_reply_first_lines_fit_512_octets(pop3: Pop3Stack) -> None:
    """RFC 2449 section 4 (RFC 1939 section 3): a response's first line is at most 512
    octets with its CRLF, even when the client's argument was long."""
    raw = await Raw.open(pop3.port)
    long_user = "u" * 200 + "@" + "d" * 40 + ".test"
    for line in (f"USER {long_user}", "X" * 250, "RETR " + "9" * 249, f"PASS {'p' * 249}"):
        reply = await raw.send(line.encode() + b"\r\n")
        assert reply.startswith((b"+OK", b"-ERR")) and len(reply) <= 512, reply
    await raw.close()


def test_named_replies_fit_512_octets() -> None:
    """Every reply constant, formatted with the longest values it can carry (a 254-octet
    address, 20-digit counts), stays within RFC 2449's 512 octets."""
    values = {"user": "u" * 254, "count": 10**20, "octets": 10**20, "number": 10**20,
              "size": 10**20, "uid": "x" * 70, "reason": "command line too long"}
    replies = [value for value in vars(p).values() if isinstance(value, p.Reply)]
    assert len(replies) > 30
    for reply in replies:
        assert len(reply.format(**values).encode()) <= 512, reply


async def test_commands_up_to_255_octets_are_read_whatever_their_argument_lengths(
        pop3: Pop3Stack) -> None:
    """RFC 2449 section 4: a server with CAPA "MUST support commands up to 255 octets",
    which lifts RFC 1939's 40 characters per argument. A TOP line count of 200 digits (the
    whole message) was refused as "argument too long"."""
    await pop3.deliver(ALICE, MSG2)
    raw = await Raw.open(pop3.port)
    await raw.send(f"USER {ALICE}\r\n".encode())
    await raw.send(f"PASS {USERS[ALICE]}\r\n".encode())
    command = b"TOP 1 " + b"9" * 200 + b"\r\n"
    assert len(command) <= p.MAX_COMMAND_LINE
    assert await raw.send(command) == p.OK_TOP.encode()
    assert await raw.multiline() == p.stuff(MSG2)
    assert await raw.send(b"LIST " + b"0" * 60 + b"1\r\n") == p.ERR_BAD_NUMBER.encode()
    await raw.send(b"QUIT\r\n")
    await raw.close()


def test_default_autologout_is_at_least_10_minutes() -> None:
    """RFC 1939 section 3: an inactivity autologout timer "MUST be of at least 10 minutes'
    duration" (TIERMAIL_POP3_TIMEOUT; operators may set less, tests do)."""
    assert Settings().pop3_timeout >= 600


async def test_a_message_expunged_elsewhere_is_a_permanent_error(pop3: Pop3Stack) -> None:
    """RFC 3206 section 4: [SYS/PERM] for a failure that will not go away by retrying: a
    message expunged over IMAP after the POP3 session numbered it. The session goes on, and
    its QUIT commits the deletions, the vanished message's included."""
    await pop3.deliver(ALICE, MSG1)
    await pop3.deliver(ALICE, MSG2)
    raw = await Raw.open(pop3.port)
    await raw.send(f"USER {ALICE}\r\n".encode())
    await raw.send(f"PASS {USERS[ALICE]}\r\n".encode())
    first, _ = await pop3.store.list_messages(ALICE, INBOX)
    await pop3.store.expunge(ALICE, INBOX, [first.uid])
    for command in (b"RETR 1", b"TOP 1 0"):
        reply = await raw.send(command + b"\r\n")
        assert reply == p.ERR_MESSAGE_GONE.encode() and b"[SYS/PERM]" in reply, command
    for number in (1, 2):  # deleting the one that is gone is no error either
        assert await raw.send(f"DELE {number}\r\n".encode()) == \
            p.OK_DELE.format(number=number).encode()
    assert await raw.send(b"QUIT\r\n") == p.OK_BYE_UPDATED.format(count=0).encode()
    await raw.close()
    await pop3.wait_unlocked(ALICE)
    assert await pop3.store.list_messages(ALICE, INBOX) == []
