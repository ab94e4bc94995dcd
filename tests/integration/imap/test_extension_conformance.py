"""RFC checklist items of the IMAP extensions that the conversation tests elsewhere leave out
(docs/imap-conformance.md, "Extensions", names the test of every item)."""

from __future__ import annotations

import re

import pytest

from common.settings import Settings
from services.store.backends.maildb import MailDB
from services.store.imap import responses as r
from services.store.mailbox import MailboxInfo
from tests.integration.imap.clients import Server, expand, in_thread, message
from tests.integration.imap.conftest import ALICE, Deliver, ImapStack, StartImap

SMALL_LITERAL = 4096


class DeletionAfterListing(MailDB):
    """The real MailDB, with one hook: the mailbox named by `armed` is deleted right after
    the account's mailboxes are next listed, as another session could do at that moment."""

    armed: str | None = None

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        listed = await super().list_mailboxes(user)
        if self.armed is not None:
            name, self.armed = self.armed, None
            await self.delete_mailbox(user, name)
        return listed


@pytest.fixture
def maildb_class() -> type[MailDB]:
    return DeletionAfterListing


def capabilities(raw_line: bytes) -> set[bytes]:
    return set(raw_line.upper().split()[2:])


async def test_every_implemented_extension_clients_use_is_advertised(
        imap_server: ImapStack, deliver: Deliver, maildb: MailDB) -> None:
    """SORT (DISPLAYFROM) and STATUS (SIZE) work, so SORT=DISPLAY (RFC 5957 4) and
    STATUS=SIZE (RFC 8438 2) are advertised: clients look for them before they use them.
    SETQUOTA is not offered (no QUOTASET, RFC 9208 3.2); an RFC 2087 client that sends it
    anyway gets NO [NOPERM] (RFC 2087 4.1: "can't set that data"), a malformed one BAD."""
    await deliver(ALICE, message("one", sender="Zed <zed@example.org>"))
    await deliver(ALICE, message("two", sender="Amy <amy@example.org>"))
    server = Server.of(imap_server)
    size = sum(info.size for info in await maildb.list_messages(ALICE))

    def dialog() -> None:
        raw = server.raw(ALICE)
        caps = capabilities(raw.ok("CAPABILITY").lines(b"CAPABILITY")[0])
        assert {b"SORT=DISPLAY", b"STATUS=SIZE"} <= caps, caps
        assert b"QUOTASET" not in caps
        raw.ok("SELECT INBOX")
        assert raw.ok("SORT (DISPLAYFROM) UTF-8 ALL").lines(b"SORT") == [b"* SORT 2 1"]
        status = raw.ok("STATUS INBOX (SIZE)").lines(b"STATUS")
        assert status == [f"* STATUS INBOX (SIZE {size})".encode()]
        refused = raw.command('SETQUOTA "" (STORAGE 10)')
        assert (refused.status, refused.code) == ("NO", b"NOPERM"), refused
        assert raw.command('SETQUOTA "" (STORAGE)').status == "BAD"
        assert raw.command('SETQUOTA ""').status == "BAD"
        raw.ok("NOOP")
        raw.close()

    await in_thread(dialog)


async def test_status_appendlimit_is_the_advertised_limit(imap_server: ImapStack) -> None:
    """RFC 7889 3.1 and 3.2 (a MUST): STATUS (APPENDLIMIT), also in LIST-STATUS, gives the limit
    APPENDLIMIT= announces (clients such as Mulberry ask for it per mailbox)."""
    server = Server.of(imap_server)
    limit = imap_server.settings.imap_max_literal

    def dialog() -> None:
        raw = server.raw(ALICE)
        caps = capabilities(raw.ok("CAPABILITY").lines(b"CAPABILITY")[0])
        assert f"APPENDLIMIT={limit}".encode() in caps
        expected = f"* STATUS INBOX (APPENDLIMIT {limit})".encode()
        assert raw.ok("STATUS INBOX (APPENDLIMIT)").lines(b"STATUS") == [expected]
        listed = raw.ok('LIST "" INBOX RETURN (STATUS (APPENDLIMIT))').lines(b"STATUS")
        assert listed == [expected]
        raw.close()

    await in_thread(dialog)


async def test_id_takes_the_largest_request_rfc_2971_allows(imap_server: ImapStack) -> None:
    """RFC 2971 3.3: up to 30 pairs, fields of 30 octets and values of 1024, NIL values, an
    empty list and NIL: all answered with the server's ID, before login as after it."""
    server = Server.of(imap_server)
    pairs = " ".join(f'"{f"field{n:02d}".ljust(30, "f")}" "{"v" * 1024}"' for n in range(29))
    largest = f'ID ({pairs} "os" NIL)'

    def dialog() -> None:
        raw = server.raw()
        for command in (largest, "ID ()", "ID NIL"):
            assert len(raw.ok(command).lines(b"ID")) == 1, command
        raw.ok(f'LOGIN "{ALICE}" "{server.users[ALICE]}"')
        assert len(raw.ok(largest).lines(b"ID")) == 1
        raw.close()

    await in_thread(dialog)


async def test_nonsynchronizing_literal_over_the_limit_is_read_and_refused(
        start_imap: StartImap, settings: Settings, maildb: MailDB) -> None:
    """RFC 7888 4: a {n+} literal larger than the server takes is read and the command is
    refused (here NO [TOOBIG], RFC 7889); the next pipelined command is still in step."""
    server = Server.of(await start_imap(settings.replace(imap_max_literal=SMALL_LITERAL)))
    big = message("big", "x" * 70 + "\r\n" + ("y" * 70 + "\r\n") * 100)
    assert len(big) > SMALL_LITERAL

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.send(b"a1 APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\na2 NOOP\r\n")
        refused = raw.reply("a1")
        assert refused.status == "NO" and refused.code == b"TOOBIG", refused
        assert raw.reply("a2").status == "OK"
        raw.close()

    await in_thread(dialog)
    assert await maildb.list_messages(ALICE) == []


async def test_move_to_the_same_mailbox_gives_the_message_a_new_uid(
        imap_server: ImapStack, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 6851 does not forbid it: the message is copied under a new UID (COPYUID in an
    untagged OK first) and the original expunged."""
    await deliver(ALICE, message("one"))
    old = [m.uid for m in await maildb.list_messages(ALICE)]
    server = Server.of(imap_server)
    new: list[int] = []

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        reply = raw.ok("MOVE 1 INBOX")
        assert reply.untagged[0].startswith(b"* OK [COPYUID "), reply
        found = re.search(rb"\[COPYUID \d+ (\S+) (\S+)\]", reply.untagged[0])
        assert found and expand(found.group(1)) == old
        new.extend(expand(found.group(2)))
        assert reply.lines(b"EXPUNGE") == [b"* 1 EXPUNGE"]
        raw.close()

    await in_thread(dialog)
    assert [m.uid for m in await maildb.list_messages(ALICE)] == new
    assert new[0] > old[0]


async def test_list_status_leaves_out_names_without_a_mailbox(
        imap_server: ImapStack, maildb: MailDB) -> None:
    """RFC 5819 2: STATUS follows each listed mailbox that can be selected; a subscribed
    name without a mailbox (\\NonExistent) and a parent that is only a name get none."""
    await maildb.create_mailbox(ALICE, "Club/News")
    await maildb.delete_mailbox(ALICE, "Club")
    await maildb.set_subscribed(ALICE, "Gone", True)
    await maildb.set_subscribed(ALICE, "Club/News", True)
    server = Server.of(imap_server)

    def dialog() -> None:
        raw = server.raw(ALICE)
        for command, nameonly in (
                ('LIST (SUBSCRIBED) "" "*" RETURN (STATUS (MESSAGES))', b"Gone"),
                ('LIST "" "*" RETURN (STATUS (MESSAGES))', b"Club")):
            reply = raw.ok(command)
            listed = {entry[3] for entry in reply.parsed(b"LIST")}
            with_status = {entry[1] for entry in reply.parsed(b"STATUS")}
            assert nameonly in listed and b"Club/News" in with_status, reply
            assert with_status == listed - {b"Gone", b"Club"}, reply
        # REMOTE (RFC 5258 3.1): there are no remote mailboxes, so it changes nothing
        assert raw.ok('LIST (REMOTE) "" "%"').untagged == raw.ok('LIST () "" "%"').untagged
        raw.close()

    await in_thread(dialog)


async def test_list_status_of_a_mailbox_deleted_meanwhile_says_it_cannot_be_selected(
        imap_server: ImapStack, maildb: DeletionAfterListing) -> None:
    """RFC 5819 2: when STATUS fails because the mailbox can no longer be selected (here:
    deleted between LIST reading the names and asking for its STATUS), no STATUS is sent
    and the LIST response must say \\Noselect (\\NonExistent implies it, RFC 5258 3)."""
    await maildb.create_mailbox(ALICE, "Doomed")
    server = Server.of(imap_server)

    def dialog() -> None:
        raw = server.raw(ALICE)
        maildb.armed = "Doomed"
        reply = raw.ok('LIST "" "*" RETURN (STATUS (MESSAGES))')
        assert maildb.armed is None
        assert b'* LIST (\\NonExistent \\HasNoChildren) "/" Doomed' in reply.untagged, reply
        assert b"Doomed" not in {entry[1] for entry in reply.parsed(b"STATUS")}
        assert b"* STATUS INBOX (MESSAGES 0)" in reply.untagged
        raw.close()

    await in_thread(dialog)


async def test_an_extended_list_does_not_read_an_empty_pattern_as_the_delimiter_request(
        imap_server: ImapStack) -> None:
    """RFC 5258 3: only the RFC 3501 LIST reads "" as "tell me the delimiter"; an extended
    LIST (selection options, RETURN, a list of patterns) must not, and ignores "" when
    matching (also after a reference that names a mailbox)."""
    server = Server.of(imap_server)

    def dialog() -> None:
        raw = server.raw(ALICE)
        assert raw.ok('LIST "" ""').untagged == [b'* LIST (\\Noselect) "/" ""']
        for command in ('LIST () "" ""', 'LIST "" "" RETURN (CHILDREN)', 'LIST "" ("")',
                        'LIST () "INBOX" ""'):
            assert raw.ok(command).untagged == [], command
        assert raw.ok('LIST "" ("" "INBOX")').untagged == [b'* LIST (\\HasNoChildren) "/" INBOX']
        raw.close()

    await in_thread(dialog)


async def test_recursivematch_lists_a_parent_only_for_children_it_does_not_list(
        imap_server: ImapStack, maildb: MailDB) -> None:
    """RFC 5258 3.5: a parent that is not subscribed is listed for its CHILDINFO only when
    a subscribed child of it is not listed itself: with "%" (the child does not match) it
    is, with "*" (the child is listed) it is not."""
    await maildb.create_mailbox(ALICE, "Lists/python")
    await maildb.set_subscribed(ALICE, "Lists/python", True)
    server = Server.of(imap_server)

    def dialog() -> None:
        raw = server.raw(ALICE)
        top = raw.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"').lines(b"LIST")
        assert b'* LIST (\\HasChildren) "/" Lists ("CHILDINFO" ("SUBSCRIBED"))' in top, top
        every = raw.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "*"').lines(b"LIST")
        assert b'* LIST (\\HasNoChildren \\Subscribed) "/" Lists/python' in every, every
        assert not [line for line in every if b'"/" Lists ' in line], every
        raw.close()

    await in_thread(dialog)


async def test_sasl_ir_empty_initial_response_is_taken_from_the_command_line(
        imap_server: ImapStack) -> None:
    """RFC 4959 3: "=" is an initial response of no octets; the server must not send a
    continuation for it. Empty is no valid PLAIN message (RFC 4616 2), so the authentication
    fails: NO, as for wrong credentials (RFC 3501 6.2.2 keeps BAD for bad base64 and "*")."""
    server = Server.of(imap_server)

    def dialog() -> None:
        raw = server.raw()
        raw.send(b"s1 AUTHENTICATE PLAIN =\r\n")
        answer = raw.response()
        assert answer + b"\r\n" == r.NO_AUTH_FAILED.tagged("s1"), answer
        raw.ok(f'LOGIN "{ALICE}" "{server.users[ALICE]}"')
        raw.close()

    await in_thread(dialog)


async def test_create_special_use_creates_with_the_attribute_or_not_at_all(
        imap_server: ImapStack, maildb: MailDB) -> None:
    """RFC 6154 3: CREATE ... (USE (\\attr)) gives the new mailbox that attribute in LIST;
    one the server cannot assign is refused with NO [USEATTR] and nothing is created."""
    server = Server.of(imap_server)

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("CREATE Old/Mail (USE (\\Archive))")
        for refused in ("CREATE Bogus (USE (\\Bogus))", "CREATE Virtual (USE (\\All))",
                        "CREATE Both (USE (\\Junk \\Trash))"):
            reply = raw.command(refused)
            assert reply.status == "NO" and reply.code == b"USEATTR", (refused, reply)
        listed = raw.ok('LIST "" "*" RETURN (SPECIAL-USE)').parsed(b"LIST")
        flags = {entry[3]: {f.lower() for f in entry[1]} for entry in listed}
        assert b"\\archive" in flags[b"Old/Mail"]
        assert not {b"Bogus", b"Virtual", b"Both"} & set(flags)
        raw.close()

    await in_thread(dialog)
    names = {info.name for info in await maildb.list_mailboxes(ALICE)}
    assert "Old/Mail" in names and not {"Bogus", "Virtual", "Both"} & names
