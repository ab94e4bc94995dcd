"""Every RFC 3501 command over the wire, with imaplib (raw strings) and imapclient (parsed
responses), against the real server on a real MailDB; side effects are checked through a
second session or the MailDB itself.
"""

from __future__ import annotations

import base64
import datetime
import imaplib
from typing import Any

import pytest
from imapclient.exceptions import IMAPClientError

from common.passwords import hash_password
from services.store.backends.maildb import MailDB
from tests.integration.imap.clients import (
    Server,
    in_thread,
    message,
    quote,
    unverified,
)
from tests.integration.imap.conftest import ALICE, BOB, USERS, Deliver, ImapStack

UTC = datetime.UTC
STANDARD_FLAGS = {b"\\Answered", b"\\Flagged", b"\\Deleted", b"\\Seen", b"\\Draft"}
AFTER_LOGIN = {"IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "ID", "ENABLE", "CONDSTORE",
               "QRESYNC", "UNSELECT", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS", "ESEARCH",
               "SPECIAL-USE", "QUOTA", "SORT"}

NESTED = (
    b'From: "Ann Example" <ann@example.org>\r\n'
    b'To: alice@example.test, "Bob" <bob@example.test>\r\n'
    b"Cc: carol@example.org\r\n"
    b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?= nested\r\n"
    b"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
    b"Message-ID: <nested@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n'
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"plain body\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>html body</p>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: dave@example.org\r\n"
    b"Subject: forwarded\r\n"
    b"Message-ID: <inner@example.org>\r\n"
    b"\r\n"
    b"forwarded body\r\n"
    b"--outer\r\n"
    b'Content-Type: application/octet-stream; name="data.bin"\r\n'
    b'Content-Disposition: attachment; filename="data.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAw==\r\n"
    b"--outer--\r\n"
)
NESTED_HEADER = NESTED[:NESTED.index(b"\r\n\r\n") + 4]


@pytest.fixture
def server(imap_server: ImapStack) -> Server:
    return Server.of(imap_server)


def low(value: Any) -> Any:
    """Body structures compared without regard to the case servers may choose."""
    if isinstance(value, bytes):
        return value.lower()
    if isinstance(value, tuple | list):
        return tuple(low(v) for v in value)
    return value


def item(response: dict[bytes, Any], prefix: bytes) -> Any:
    """The one FETCH item whose name starts with `prefix` (names echo the server's spelling)."""
    found = [v for k, v in response.items() if k.upper().startswith(prefix.upper())]
    assert len(found) == 1, (prefix, list(response))
    return found[0]


# Non-authenticated state


async def test_capability_noop_logout(server: Server) -> None:
    def dialog() -> None:
        raw = server.raw()
        assert raw.greeting.startswith(b"* OK")
        before = raw.ok("CAPABILITY").lines(b"CAPABILITY")
        assert len(before) == 1
        caps = set(before[0].upper().split()[2:])
        assert {b"IMAP4REV1", b"STARTTLS", b"AUTH=PLAIN", b"SASL-IR"} <= caps
        assert b"LOGINDISABLED" not in caps  # the fixture allows plaintext logins
        assert caps & {b"LITERAL+", b"LITERAL-"}
        assert raw.ok("NOOP").status == "OK"
        bye = raw.command("LOGOUT")
        assert bye.status == "OK"
        assert any(line.startswith(b"* BYE") for line in bye.untagged)
        assert raw.closed()

        parsed = server.client(ALICE)
        after = {c.decode().upper() for c in parsed.capabilities()}
        assert after >= AFTER_LOGIN, AFTER_LOGIN - after
        assert any(c.startswith("THREAD=") for c in after)
        parsed.logout()
        client = server.imaplib(ALICE)
        assert client.noop()[0] == "OK"
        assert client.logout()[0] == "BYE"

    await in_thread(dialog)


async def test_commands_need_authentication(server: Server) -> None:
    def dialog() -> None:
        raw = server.raw()
        for command in ("SELECT INBOX", "LIST \"\" *", "FETCH 1 FLAGS", "CREATE X"):
            assert raw.command(command).status in ("BAD", "NO"), command
        raw.close()

    await in_thread(dialog)


async def test_starttls_then_login(server: Server) -> None:
    def dialog() -> None:
        client = server.imaplib(None)
        assert "STARTTLS" in client.capabilities
        assert client.starttls(unverified())[0] == "OK"
        assert "STARTTLS" not in client.capabilities  # imaplib asked again after the handshake
        assert client.login(ALICE, USERS[ALICE])[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        client.logout()

        raw = server.raw()
        raw.starttls()
        assert raw.command("STARTTLS").status in ("BAD", "NO")  # no second handshake
        raw.ok(f'LOGIN "{ALICE}" "{USERS[ALICE]}"')
        raw.close()

    await in_thread(dialog)


async def test_implicit_tls_port(server: Server) -> None:
    def dialog() -> None:
        client = imaplib.IMAP4_SSL("127.0.0.1", server.tls_port, ssl_context=unverified(),
                                   timeout=10)
        assert "STARTTLS" not in client.capabilities
        client.login(BOB, USERS[BOB])
        assert client.select("INBOX")[0] == "OK"
        client.logout()

    await in_thread(dialog)


def plain(authzid: str, user: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


async def test_authenticate_plain(server: Server) -> None:
    def dialog() -> None:
        client = server.imaplib(None)
        typ, _ = client.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{USERS[ALICE]}".encode())
        assert typ == "OK" and client.state == "AUTH"
        client.logout()

        raw = server.raw()  # SASL-IR (RFC 4959): the response on the command line
        reply = raw.command(b"AUTHENTICATE PLAIN " + plain("", BOB, USERS[BOB]))
        assert reply.status == "OK", reply
        assert raw.ok("SELECT INBOX").status == "OK"
        raw.close()

        raw = server.raw()
        assert raw.command(b"AUTHENTICATE PLAIN " + plain("", BOB, "wrong")).status == "NO"
        # authorization as another user is refused even with the right password
        assert raw.command(b"AUTHENTICATE PLAIN " + plain(ALICE, BOB, USERS[BOB])).status == "NO"
        raw.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert raw.response().startswith(b"+")
        raw.send(b"*\r\n")  # the client cancels (RFC 3501 6.2.2)
        cancelled = raw.reply("a1")
        assert cancelled.status == "BAD" and cancelled.text == b"Authentication cancelled"
        malformed = raw.command(b"AUTHENTICATE PLAIN !!notbase64")
        assert malformed.status == "BAD" and malformed.text != b"Authentication cancelled"
        assert raw.command(b"AUTHENTICATE CRAM-MD5").status in ("BAD", "NO")
        assert raw.command("SELECT INBOX").status in ("BAD", "NO")  # not authenticated
        raw.ok(b"AUTHENTICATE PLAIN " + plain(BOB, BOB, USERS[BOB]))
        raw.close()

    await in_thread(dialog)


async def test_a_password_with_quotes_backslashes_and_non_ascii_logs_in_every_way(
        imap_server: ImapStack) -> None:
    """RFC 3501 4.3: a quoted string escapes only `"` and `\\`; a literal carries any octets
    (UTF-8 here, RFC 6855 not needed for a password); PLAIN carries UTF-8 (RFC 4616 2). The
    user name is matched in any case."""
    password = 'q"uo\\te p\u00e4ss w\u00f6rd'
    imap_server.accounts.add_user("odd@example.test", hash_password(password))
    server = Server.of(imap_server)

    def dialog() -> None:
        for login in (
                lambda raw: raw.command(b"LOGIN ODD@example.test " + quote(password).encode()),
                lambda raw: raw.literal_command(b"LOGIN odd@example.test", password.encode()),
                lambda raw: raw.command(b"AUTHENTICATE PLAIN " + plain(
                    "odd@example.test", "Odd@Example.test", password))):
            raw = server.raw()
            assert login(raw).status == "OK"
            raw.close()

    await in_thread(dialog)


# RFC 3501 6.2.2: BAD for undecodable base64 and the cancel; what decodes but is no PLAIN
# message (RFC 4616 2; "=" is an empty one, RFC 4959 3) fails as wrong credentials do.
PLAIN_REFUSALS = [
    ("initial", b"=", "NO"),
    ("continuation", b"", "NO"),
    ("initial", base64.b64encode(b"alice@example.test\0alice secret"), "NO"),  # one NUL
    ("initial", base64.b64encode(b"\0alice@example.test\0alice\0secret"), "NO"),  # three
    ("initial", base64.b64encode(b"\0alice@example.test\0\xff"), "NO"),  # not UTF-8
    ("initial", base64.b64encode(b"\0\0alice secret"), "NO"),  # no authcid
    ("initial", base64.b64encode(b"\0alice@example.test\0"), "NO"),  # no password
    ("continuation", b"=", "BAD"),  # "=" means empty only as an initial response
    ("continuation", b"!!notbase64", "BAD"),
    ("continuation", b"AGFsaWNlAHg", "BAD"),  # unpadded
    ("continuation", b"*", "BAD"),  # the client cancels
]


@pytest.mark.parametrize(("how", "response", "status"), PLAIN_REFUSALS)
async def test_authenticate_plain_refusals(server: Server, how: str, response: bytes,
                                           status: str) -> None:
    def dialog() -> None:
        raw = server.raw()
        if how == "initial":
            reply = raw.command(b"AUTHENTICATE PLAIN " + response)
        else:
            raw.send(b"a1 AUTHENTICATE PLAIN\r\n")
            assert raw.response() == b"+ "
            raw.send(response + b"\r\n")
            reply = raw.reply("a1")
        assert reply.status == status, reply
        if status == "NO":
            assert reply.code == b"AUTHENTICATIONFAILED", reply
        raw.ok(f'LOGIN "{ALICE}" "{USERS[ALICE]}"')  # the session goes on
        raw.close()

    await in_thread(dialog)


async def test_login_failures_then_success(server: Server) -> None:
    def dialog() -> None:
        client = server.imaplib(None)
        for user, password in ((ALICE, "wrong"), ("nobody@example.test", "x")):
            with pytest.raises(imaplib.IMAP4.error) as failure:
                client.login(user, password)
            assert "AUTHENTICATIONFAILED" in str(failure.value)  # RFC 5530, no hint which part
        # A literal may hold any octet but NUL (RFC 9051 4.3): a password that is not UTF-8
        # is a failed login, not BAD (found in review).
        raw = server.raw()
        for reply in (raw.literal_command(b"LOGIN " + ALICE.encode(), b"\xff\xfe\xfd"),
                      raw.literal_command(b"LOGIN", b"\xffx@example.test", tail=b" x")):
            assert (reply.status, reply.code) == ("NO", b"AUTHENTICATIONFAILED"), reply
        raw.close()
        assert client.login(ALICE, USERS[ALICE])[0] == "OK"
        raw = server.raw(ALICE)
        assert raw.command(f'LOGIN "{ALICE}" "{USERS[ALICE]}"').status == "BAD"  # already in
        raw.close()
        client.logout()

    await in_thread(dialog)


# SELECT / EXAMINE


async def test_select_and_examine_responses(server: Server, deliver: Deliver,
                                            maildb: MailDB) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))
    status = await maildb.status(ALICE)

    def dialog() -> None:
        first = server.client(ALICE)
        examined = first.select_folder("INBOX", readonly=True)
        assert examined[b"EXISTS"] == 3
        assert examined[b"RECENT"] == 3  # shown, not claimed
        assert b"READ-ONLY" in examined
        with pytest.raises(IMAPClientError):
            first.add_flags([1], [b"\\Seen"])  # STORE in an EXAMINEd mailbox: NO

        selected = first.select_folder("INBOX")
        assert selected[b"EXISTS"] == 3
        assert selected[b"RECENT"] == 3  # EXAMINE took no \Recent away
        assert selected[b"READ-WRITE"] is True
        assert set(selected[b"FLAGS"]) >= STANDARD_FLAGS
        assert STANDARD_FLAGS | {b"\\*"} <= set(selected[b"PERMANENTFLAGS"])
        assert selected[b"UIDVALIDITY"] == status.uidvalidity
        assert selected[b"UIDNEXT"] == status.uidnext
        assert selected[b"HIGHESTMODSEQ"] == status.highestmodseq
        flags = first.get_flags(first.search("ALL"))
        assert all(b"\\Recent" in f for f in flags.values())

        second = server.client(ALICE)
        assert second.select_folder("INBOX", readonly=True)[b"RECENT"] == 0  # claimed now
        assert second.select_folder("INBOX")[b"RECENT"] == 0  # \Recent is one session's
        assert not any(b"\\Recent" in f for f in second.get_flags(second.search()).values())

        raw = server.raw(ALICE)
        reply = raw.ok("SELECT INBOX")
        assert b"[READ-WRITE]" in reply.text
        assert any(b"[UNSEEN 1]" in line for line in reply.untagged)  # first unseen
        assert raw.ok("EXAMINE INBOX").text.startswith(b"[READ-ONLY]")
        assert raw.command("SELECT Nonexistent").status == "NO"
        # a failed SELECT leaves no mailbox selected (RFC 3501 6.3.1)
        assert raw.command("FETCH 1 FLAGS").status in ("BAD", "NO")
        raw.close()
        first.logout()
        second.logout()

    await in_thread(dialog)


# Mailbox management


async def test_create_nested_and_refusals(server: Server, maildb: MailDB) -> None:
    def dialog() -> None:
        client = server.client(ALICE)
        client.create_folder("Projects/2026/Q1")
        names = {name for _, _, name in client.list_folders()}
        assert {"Projects", "Projects/2026", "Projects/2026/Q1"} <= names
        client.create_folder("Plans/")  # trailing delimiter: intends to hold children
        assert client.folder_exists("Plans")
        for existing in ("Projects/2026/Q1", "INBOX", "inbox"):
            with pytest.raises(IMAPClientError):
                client.create_folder(existing)
        raw = server.raw(ALICE)
        assert b"ALREADYEXISTS" in raw.command('CREATE "Projects"').text
        raw.close()
        client.logout()

    await in_thread(dialog)
    names = {box.name for box in await maildb.list_mailboxes(ALICE)}
    assert {"Projects", "Projects/2026", "Projects/2026/Q1", "Plans"} <= names


async def test_delete(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for name in ("Old", "Parent/Child"):
        await maildb.create_mailbox(ALICE, name)
    await deliver(ALICE, message("in old"), "Old")

    def dialog() -> None:
        client = server.client(ALICE)
        client.delete_folder("Old")
        assert not client.folder_exists("Old")
        raw = server.raw(ALICE)
        assert b"NONEXISTENT" in raw.command("DELETE Old").text
        assert raw.command("DELETE INBOX").status == "NO"
        # A parent with children: its messages go, the name stays as \Noselect.
        raw.ok("DELETE Parent")
        listed = raw.ok('LIST "" "Parent"').lines(b"LIST")
        assert len(listed) == 1 and b"\\Noselect" in listed[0]
        assert raw.command("DELETE Parent").status == "NO"  # \Noselect with children
        assert raw.command("SELECT Parent").status == "NO"
        assert client.folder_exists("Parent/Child")
        raw.close()
        client.logout()

    await in_thread(dialog)
    names = {box.name for box in await maildb.list_mailboxes(ALICE)}
    assert "Old" not in names and "Parent/Child" in names


async def test_delete_of_the_selected_mailbox_spelled_with_inbox_in_another_case(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    await maildb.create_mailbox(ALICE, "INBOX/Old")
    await deliver(ALICE, message("old"), "INBOX/Old")

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX/Old")
        # "inbox/Old" names the selected mailbox (RFC 3501 5.1): the session's own DELETE
        # succeeds and closes it, instead of being reported as a deletion by someone else.
        deleted = raw.command("DELETE inbox/Old")
        assert deleted.status == "OK", deleted
        assert deleted.untagged == [b"* OK [CLOSED] Previous mailbox closed"]
        assert raw.command("NOOP").status == "OK"
        raw.close()

    await in_thread(dialog)
    assert "INBOX/Old" not in {box.name for box in await maildb.list_mailboxes(ALICE)}


async def test_rename_with_children_keeps_uidvalidity(server: Server, deliver: Deliver,
                                                      maildb: MailDB) -> None:
    await maildb.create_mailbox(ALICE, "Work/Sub")
    await deliver(ALICE, message("in sub"), "Work/Sub")
    before = await maildb.status(ALICE, "Work/Sub")

    def dialog() -> None:
        client = server.client(ALICE)
        client.rename_folder("Work", "Job")
        names = {name for _, _, name in client.list_folders()}
        assert {"Job", "Job/Sub"} <= names and not {"Work", "Work/Sub"} & names
        status = client.folder_status("Job/Sub", ["MESSAGES", "UIDVALIDITY"])
        assert status == {b"MESSAGES": 1, b"UIDVALIDITY": before.uidvalidity}
        for old, new in (("Nothing", "Else"), ("Job", "Drafts"), ("Job", "INBOX")):
            with pytest.raises(IMAPClientError):
                client.rename_folder(old, new)
        client.logout()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE, "Job/Sub")) == 1


async def test_rename_of_a_parent_that_is_only_a_name_takes_its_children(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 3501 6.3.5: renaming a name with inferiors renames them, also when the name's own
    mailbox was deleted (6.3.4) and only its children keep it in LIST, as \\Noselect. The
    children keep UIDVALIDITY, UIDs and messages, as in any hierarchy rename; the name itself
    stays only a name, as Dovecot keeps it."""
    for name in ("a/b/deep", "Spare/b"):
        await maildb.create_mailbox(ALICE, name)
    await maildb.delete_mailbox(ALICE, "Spare")
    for n in range(2):
        await deliver(ALICE, message(f"in b {n}"), "a/b")
    await deliver(ALICE, message("in deep"), "a/b/deep")
    for name in ("a", "a/b"):
        await maildb.set_subscribed(ALICE, name, True)
    before = {name: await maildb.status(ALICE, name) for name in ("a/b", "a/b/deep")}
    guids = {name: [m.guid for m in await maildb.list_messages(ALICE, name)]
             for name in before}

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("DELETE a")
        watcher = server.raw(ALICE)
        watcher.ok("SELECT a/b")
        renamed = raw.command("RENAME a c")
        assert renamed.status == "OK", renamed
        listed = {entry[-1]: {f.lower() for f in entry[1]}
                  for entry in raw.ok('LIST "" "*"').parsed(b"LIST")}
        assert not {b"a", b"a/b", b"a/b/deep"} & set(listed)
        assert listed[b"c"] == {b"\\noselect", b"\\haschildren"}  # still only a name
        assert listed[b"c/b"] == {b"\\haschildren"}
        assert listed[b"c/b/deep"] == {b"\\hasnochildren"}
        assert raw.command("SELECT c").status == "NO"
        for old, new in (("a/b", "c/b"), ("a/b/deep", "c/b/deep")):
            status = raw.ok(f'STATUS "{new}" (MESSAGES UIDNEXT UIDVALIDITY)').parsed(b"STATUS")
            values = dict(zip(status[0][2][::2], status[0][2][1::2], strict=True))
            assert values == {b"MESSAGES": before[old].messages,
                              b"UIDNEXT": before[old].uidnext,
                              b"UIDVALIDITY": before[old].uidvalidity}
        lsub = {entry[-1] for entry in raw.ok('LSUB "" "*"').parsed(b"LSUB")}
        assert {b"c", b"c/b"} <= lsub and not {b"a", b"a/b"} & lsub
        # The session that had a/b selected goes on in c/b, with the same UIDs.
        fetched = watcher.ok("UID FETCH 1:* (FLAGS)").lines(b"FETCH")
        assert len(fetched) == 2
        watcher.close()
        assert b"NONEXISTENT" in raw.command("RENAME a x").code
        for taken in ("Drafts", "Spare"):  # a mailbox; only a name, but c/b is Spare/b
            assert b"ALREADYEXISTS" in raw.command(f"RENAME c {taken}").code, taken
        raw.close()

    await in_thread(dialog)
    for old, new in (("a/b", "c/b"), ("a/b/deep", "c/b/deep")):
        assert [m.guid for m in await maildb.list_messages(ALICE, new)] == guids[old]
    names = {box.name for box in await maildb.list_mailboxes(ALICE)}
    assert "c" not in names and not {n for n in names if n == "a" or n.startswith("a/")}


async def test_rename_inbox_moves_its_messages(server: Server, deliver: Deliver,
                                               maildb: MailDB) -> None:
    await deliver(ALICE, message("one"))
    await deliver(ALICE, message("two"))

    def dialog() -> None:
        client = server.client(ALICE)
        client.rename_folder("INBOX", "Old Inbox")
        assert client.folder_status("INBOX", ["MESSAGES"])[b"MESSAGES"] == 0
        assert client.folder_status("Old Inbox", ["MESSAGES"])[b"MESSAGES"] == 2
        client.logout()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE, "Old Inbox")) == 2
    assert await maildb.list_messages(ALICE, "INBOX") == []


async def test_a_trailing_delimiter_means_something_only_to_create(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 3501 6.3.3: "CREATE foo/" creates foo. No mailbox is named with a trailing "/",
    so every other command refuses such a name with [CANNOT], as Dovecot does, instead of
    answering [NONEXISTENT], or [TRYCREATE] to an APPEND, COPY or MOVE whose CREATE then
    makes the mailbox without the "/" and whose retry fails again."""
    await maildb.create_mailbox(ALICE, "INBOX/Old")
    await deliver(ALICE, message("old"), "INBOX/Old")
    mailboxes = await maildb.list_mailboxes(ALICE)
    subscriptions = await maildb.subscriptions(ALICE)

    def dialog() -> None:
        raw = server.raw(ALICE)
        refused = [raw.command(command) for command in (
            'SELECT "INBOX/Old/"', 'EXAMINE "INBOX/Old/"', 'STATUS "INBOX/Old/" (MESSAGES)',
            'DELETE "INBOX/Old/"', 'RENAME "INBOX/Old/" "Newer"', 'RENAME "INBOX/Old" "Newer/"',
            'SUBSCRIBE "INBOX/Old/"', 'UNSUBSCRIBE "INBOX/Old/"', 'SELECT "inbox/"',
            'CREATE "Twice//"', 'CREATE "/"')]
        refused.append(raw.literal_command(b'APPEND "INBOX/Old/"', message("new"), plus=True))
        raw.ok('SELECT "INBOX/Old"')
        refused += [raw.command(command) for command in (
            'COPY 1 "Trash/"', 'MOVE 1 "Trash/"', 'UID COPY 1 "Nowhere/"')]
        for reply in refused:
            assert (reply.status, reply.code) == ("NO", b"CANNOT"), reply
        assert raw.ok('FETCH 1 (FLAGS)').lines(b"FETCH")  # still selected, still there
        raw.ok('CREATE "Plans/"')
        raw.close()

    await in_thread(dialog)
    names = [box.name for box in await maildb.list_mailboxes(ALICE)]
    assert sorted(names) == sorted([box.name for box in mailboxes] + ["Plans"])
    assert len(await maildb.list_messages(ALICE, "INBOX/Old")) == 1
    assert await maildb.list_messages(ALICE, "Trash") == []
    assert await maildb.subscriptions(ALICE) == subscriptions


EMPTY_LEVELS = ["a//b", "/a", "a/", "//", "INBOX//x", "Plans//"]


async def test_names_with_an_empty_level_are_invalid_to_every_command(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """A name with an empty hierarchy level ("a//b", "/a"; "a/" outside CREATE) is refused
    with [CANNOT] by every command, as Dovecot does ("Invalid mailbox name: Has adjacent
    hierarchy separators"): CREATE makes nothing of it (not even the parent "a"), RENAME
    moves nothing, and SELECT or STATUS say the name is wrong rather than [NONEXISTENT]
    (which stays the answer for a mailbox that simply does not exist). CREATE "Plans/"
    creates "Plans" (RFC 3501 6.3.3)."""
    await deliver(ALICE, message("one"))
    mailboxes = sorted(box.name for box in await maildb.list_mailboxes(ALICE))
    subscriptions = await maildb.subscriptions(ALICE)

    def dialog() -> None:
        client = server.imaplib(ALICE)
        for name in EMPTY_LEVELS:
            quoted = quote(name)
            replies = [
                client.rename("Archive", quoted), client.rename(quoted, "Elsewhere"),
                client.select(quoted), client.select(quoted, readonly=True),
                client.status(quoted, "(MESSAGES)"), client.delete(quoted),
                client.subscribe(quoted), client.unsubscribe(quoted),
                client.append(quoted, "", None, message("x"))]
            if name not in ("a/", "//"):  # CREATE "a/" creates "a" (RFC 3501 6.3.3)
                replies.append(client.create(quoted))
            for typ, data in replies:
                assert (typ, data[-1][:8]) == ("NO", b"[CANNOT]"), (name, data)
        client.select("INBOX")
        for name in EMPTY_LEVELS:
            typ, data = client.copy("1", quote(name))
            assert (typ, data[0][:8]) == ("NO", b"[CANNOT]"), (name, data)
        typ, data = client.create(quote("//"))
        assert (typ, data[0][:8]) == ("NO", b"[CANNOT]"), data
        for name in ("Nowhere", "Nowhere/x"):  # valid names, no such mailbox
            typ, data = client.select(quote(name))
            assert (typ, data[0][:13]) == ("NO", b"[NONEXISTENT]"), (name, data)
        assert client.create(quote("Plans/"))[0] == "OK"
        assert client.select(quote("Plans"))[0] == "OK"
        for pattern in ("a//*", "/*", "Plans/", "*//*"):
            typ, data = client.list('""', quote(pattern))
            assert typ == "OK" and data == [None], (pattern, data)
        client.logout()

    await in_thread(dialog)
    after = sorted(box.name for box in await maildb.list_mailboxes(ALICE))
    assert after == sorted([*mailboxes, "Plans"])
    assert await maildb.subscriptions(ALICE) == subscriptions
    assert len(await maildb.list_messages(ALICE, "INBOX")) == 1


async def test_every_listed_name_selects_unless_listed_as_not_selectable(
        server: Server, maildb: MailDB) -> None:
    """LIST shows no name SELECT cannot open, but the \\Noselect parents (a parent that is
    only a name: its mailbox deleted, or never made), which SELECT answers [NONEXISTENT];
    whatever the client made of names with trailing and doubled delimiters."""
    def dialog() -> None:
        client = server.imaplib(ALICE)
        client.create(quote("Work/"))
        client.create(quote("Work//Old"))
        client.create(quote("Work/Old/2019"))
        client.delete(quote("Work/Old"))
        client.rename(quote("Work"), quote("Job/"))
        client.rename(quote("Work"), quote("Job"))
        client.create(quote("/Root"))
        client.create(quote("Top/Mid/Leaf/"))
        typ, listed = client.list('""', "*")
        assert typ == "OK"
        selectable, noselect = [], []
        for line in listed:
            assert isinstance(line, bytes)
            flags, _, name = line.decode().partition(') "/" ')
            (noselect if "\\Noselect" in flags else selectable).append(name.strip('"'))
        for name in selectable:
            assert client.select(quote(name))[0] == "OK", name
        for name in noselect:
            typ, data = client.select(quote(name))
            assert (typ, data[0][:13]) == ("NO", b"[NONEXISTENT]"), (name, data)
        client.logout()
        return selectable, noselect

    selectable, noselect = await in_thread(dialog)
    assert {"Job", "Job/Old/2019", "Top/Mid/Leaf"} <= set(selectable)
    assert set(noselect) == {"Job/Old"}
    assert not any(name.startswith("/") or "//" in name or name.endswith("/")
                   for name in [*selectable, *noselect])
    stored = {box.name for box in await maildb.list_mailboxes(ALICE)}
    assert stored == set(selectable)


async def test_subscribe_unsubscribe_lsub(server: Server, maildb: MailDB) -> None:
    await maildb.create_mailbox(ALICE, "Lists/python")

    def dialog() -> None:
        client = server.client(ALICE)
        client.subscribe_folder("Lists/python")
        client.subscribe_folder("INBOX")
        subscribed = {name for _, _, name in client.list_sub_folders()}
        assert {"Lists/python", "INBOX"} <= subscribed
        assert "Lists" not in subscribed
        raw = server.raw(ALICE)
        percent = raw.ok('LSUB "" "Lists/%"').parsed(b"LSUB")
        assert [entry[-1] for entry in percent] == [b"Lists/python"]
        raw.close()
        client.unsubscribe_folder("Lists/python")
        assert "Lists/python" not in {n for _, _, n in client.list_sub_folders()}
        client.logout()

    await in_thread(dialog)
    # New accounts start subscribed to INBOX and the special-use folders.
    assert await maildb.subscriptions(ALICE) == ["INBOX", "Archive", "Drafts", "Junk", "Sent",
                                                 "Trash"]


async def test_list_patterns_special_use_and_children(server: Server, maildb: MailDB) -> None:
    for name in ("A/B/C", "AB", "INBOX/Sub", "Inboxes"):
        await maildb.create_mailbox(ALICE, name)

    def dialog() -> None:
        client = server.client(ALICE)
        listing = {name: set(flags) for flags, delimiter, name in client.list_folders()}
        assert {"INBOX", "Drafts", "Sent", "Junk", "Trash", "Archive", "A", "A/B", "A/B/C",
                "AB", "INBOX/Sub", "Inboxes"} == set(listing)
        for name, attribute in (("Drafts", b"\\Drafts"), ("Sent", b"\\Sent"),
                                ("Junk", b"\\Junk"), ("Trash", b"\\Trash"),
                                ("Archive", b"\\Archive")):
            assert attribute in listing[name], (name, listing[name])
        assert b"\\HasChildren" in listing["A"] and b"\\HasChildren" in listing["A/B"]
        assert b"\\HasNoChildren" in listing["A/B/C"] and b"\\HasNoChildren" in listing["AB"]
        assert all(delimiter == b"/" for _, delimiter, _ in client.list_folders())

        def names(reference: str, pattern: str) -> set[str]:
            return {n for _, _, n in client.list_folders(reference, pattern)}

        assert names("", "%") == {"INBOX", "Drafts", "Sent", "Junk", "Trash", "Archive", "A",
                                  "AB", "Inboxes"}
        assert names("", "A/%") == {"A/B"}
        assert names("", "A*") == {"A", "A/B", "A/B/C", "AB", "Archive"}
        assert names("A/", "%") == {"A/B"}  # the reference is prefixed to the pattern
        assert names("A", "/%") == {"A/B"}  # also without a delimiter at its end
        assert names("", "inbox") == {"INBOX"}  # INBOX in any case
        assert names("", "inbox/%") == {"INBOX/Sub"}
        assert names("", "*b*") == {"INBOX", "INBOX/Sub", "Inboxes"}  # INBOX holds a b
        assert names("", "inboxes") == set()  # other names keep their case
        assert names("", "Nothing*") == set()
        raw = server.raw(ALICE)
        root = raw.ok('LIST "" ""').lines(b"LIST")  # the hierarchy delimiter and root
        assert root == [b'* LIST (\\Noselect) "/" ""']
        raw.close()
        client.logout()

    await in_thread(dialog)


async def test_list_extended_and_list_status(server: Server, deliver: Deliver,
                                             maildb: MailDB) -> None:
    await maildb.create_mailbox(ALICE, "Club/News")
    await maildb.set_subscribed(ALICE, "Club/News", True)
    await maildb.set_subscribed(ALICE, "Gone", True)  # a subscription without a mailbox
    await deliver(ALICE, message("a"))
    await deliver(ALICE, message("b"), "Club/News")

    def dialog() -> None:
        raw = server.raw(ALICE)
        subscribed = raw.ok('LIST (SUBSCRIBED) "" "*"').parsed(b"LIST")
        by_name = {entry[-1]: {f.lower() for f in entry[1]} for entry in subscribed}
        assert set(by_name) == {b"Club/News", b"Gone", b"INBOX", b"Archive", b"Drafts",
                                b"Junk", b"Sent", b"Trash"}
        assert b"\\subscribed" in by_name[b"Club/News"]
        assert {b"\\subscribed", b"\\nonexistent"} <= by_name[b"Gone"]

        special = raw.ok('LIST (SPECIAL-USE) "" "*"').parsed(b"LIST")
        assert {entry[-1] for entry in special} == {b"Drafts", b"Sent", b"Junk", b"Trash",
                                                    b"Archive"}
        returned = raw.ok('LIST "" "%" RETURN (CHILDREN SUBSCRIBED)').parsed(b"LIST")
        flags = {entry[-1]: {f.lower() for f in entry[1]} for entry in returned}
        assert b"\\haschildren" in flags[b"Club"]
        multiple = raw.ok('LIST "" ("Drafts" "Club/*")').parsed(b"LIST")
        assert {entry[-1] for entry in multiple} == {b"Drafts", b"Club/News"}

        reply = raw.ok('LIST "" "*" RETURN (STATUS (MESSAGES UIDNEXT UNSEEN))')
        statuses = {entry[1]: dict(zip(entry[2][::2], entry[2][1::2], strict=True))
                    for entry in reply.parsed(b"STATUS")}
        assert statuses[b"INBOX"][b"MESSAGES"] == 1
        assert statuses[b"Club/News"][b"UNSEEN"] == 1
        assert statuses[b"Trash"][b"MESSAGES"] == 0
        assert b"Club" in statuses  # Club is selectable: it was created as a parent
        # RFC 5819 2: each mailbox's LIST response is followed by its STATUS response
        kinds = [line.split(b" ", 2)[1] for line in reply.untagged]
        names = [parsed[-1] for parsed in reply.parsed(b"LIST")]
        assert kinds == [b"LIST", b"STATUS"] * len(names)
        assert [entry[1] for entry in reply.parsed(b"STATUS")] == names
        raw.close()

    await in_thread(dialog)


async def test_recursivematch_childinfo_also_for_a_subscribed_parent(server: Server,
                                                                     maildb: MailDB) -> None:
    for name in ("Lists", "Lists/python", "Clubs/chess"):
        await maildb.create_mailbox(ALICE, name)
        await maildb.set_subscribed(ALICE, name, True)

    def dialog() -> None:
        raw = server.raw(ALICE)
        listed = raw.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"').lines(b"LIST")
        # RFC 5258 5, example 9: a subscribed mailbox with a subscribed child carries
        # CHILDINFO as well, as does an unsubscribed one.
        assert b'* LIST (\\HasChildren \\Subscribed) "/" Lists ("CHILDINFO" ("SUBSCRIBED"))' \
            in listed, listed
        assert b'* LIST (\\HasChildren) "/" Clubs ("CHILDINFO" ("SUBSCRIBED"))' in listed
        assert b'* LIST (\\HasNoChildren \\Subscribed) "/" INBOX' in listed
        raw.close()

    await in_thread(dialog)


async def test_a_parent_that_is_only_a_name_is_nonexistent_to_an_extended_list(
        server: Server, maildb: MailDB) -> None:
    """A deleted parent is kept only by its children's names: no mailbox, no UIDVALIDITY,
    nothing stored. RFC 3501's LIST shows it \\Noselect; an extended LIST \\NonExistent
    (RFC 5258 3.5 and example 11, "\\NonExistent \\HasChildren"; it implies \\Noselect),
    as Dovecot's Maildir++, where parents are not stored either, answers."""
    for name in ("Parent/Child", "Club/News"):
        await maildb.create_mailbox(ALICE, name)
        await maildb.delete_mailbox(ALICE, name.split("/")[0])
    await maildb.set_subscribed(ALICE, "Parent", True)
    await maildb.set_subscribed(ALICE, "Club/News", True)

    def dialog() -> None:
        raw = server.raw(ALICE)

        def attributes(command: str, name: bytes) -> list[bytes]:
            found = [entry for entry in raw.ok(command).parsed(b"LIST") if entry[-1] == name]
            assert len(found) == 1, (command, found)
            return [flag.lower() for flag in found[0][1]]

        assert attributes('LIST "" "%"', b"Parent") == [b"\\noselect", b"\\haschildren"]
        for command in ('LIST () "" "%"', 'LIST "" "%" RETURN (CHILDREN)',
                        'LIST "" ("Parent" "Club")', 'LIST "" "*" RETURN (SPECIAL-USE)'):
            assert attributes(command, b"Parent") == [b"\\nonexistent", b"\\haschildren"]
            assert attributes(command, b"Club") == [b"\\nonexistent", b"\\haschildren"]
        assert attributes('LIST (SUBSCRIBED) "" "*"', b"Parent") == [
            b"\\nonexistent", b"\\haschildren", b"\\subscribed"]
        recursive = raw.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"').lines(b"LIST")
        assert b'* LIST (\\NonExistent \\HasChildren) "/" Club ("CHILDINFO" ("SUBSCRIBED"))' \
            in recursive, recursive
        for command in ("SELECT Parent", "STATUS Parent (MESSAGES)", "DELETE Parent"):
            assert b"NONEXISTENT" in raw.command(command).code, command
        raw.close()

    await in_thread(dialog)


async def test_status_every_item(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"), "Archive")
    uids = [m.uid for m in await maildb.list_messages(ALICE, "Archive")]
    await maildb.store_flags(ALICE, "Archive", uids[:1], "+", frozenset({"\\Seen"}))
    status = await maildb.status(ALICE, "Archive")

    def dialog() -> None:
        client = server.client(ALICE)
        items = ["MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ"]
        assert client.folder_status("Archive", items) == {
            b"MESSAGES": 3, b"UIDNEXT": status.uidnext,
            b"UIDVALIDITY": status.uidvalidity, b"UNSEEN": 2,
            b"HIGHESTMODSEQ": status.highestmodseq}
        raw = server.raw(ALICE)
        assert raw.command("STATUS Nowhere (MESSAGES)").status == "NO"
        assert raw.command("STATUS Archive (BOGUS)").status == "BAD"
        raw.close()
        client.logout()

    await in_thread(dialog)


async def test_status_recent_counts_messages_no_session_has_claimed(
        server: Server, deliver: Deliver) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"), "Archive")

    def dialog() -> None:
        # RFC 3501 6.3.10: RECENT is the number of messages with \Recent; until a session
        # SELECTs the mailbox, every new message is \Recent (and SELECT says so: 3 RECENT).
        observer = server.client(ALICE)
        assert observer.folder_status("Archive", ["RECENT"]) == {b"RECENT": 3}
        selector = server.client(ALICE)
        assert selector.select_folder("Archive")[b"RECENT"] == 3
        assert selector.folder_status("Archive", ["RECENT"]) == {b"RECENT": 3}
        assert observer.folder_status("Archive", ["RECENT"]) == {b"RECENT": 0}  # claimed
        observer.logout()
        selector.logout()

    await in_thread(dialog)


# APPEND


async def test_append_flags_date_and_exact_bytes(server: Server, maildb: MailDB) -> None:
    body = ("From: Jörg <joerg@example.org>\r\nSubject: Grüße\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n"
            "Käse, 日本語, emoji 🎉\r\n").encode()
    when = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(
        datetime.timedelta(hours=2)))

    def dialog() -> tuple[bytes, bytes]:
        client = server.client(ALICE)
        reply = client.append("Drafts", body, flags=(b"\\Seen", b"$Label1"), msg_time=when)
        legacy = server.imaplib(ALICE)
        typ, data = legacy.append("Drafts", r"(\Flagged)",
                                  imaplib.Time2Internaldate(when.timestamp()), body)
        assert typ == "OK"
        client.select_folder("Drafts")
        fetched = client.fetch(client.search(), ["FLAGS", "INTERNALDATE", "RFC822", "RFC822.SIZE"])
        first, second = (fetched[uid] for uid in sorted(fetched))
        assert first[b"RFC822"] == body and second[b"RFC822"] == body
        assert first[b"RFC822.SIZE"] == len(body)
        assert {b"\\Seen", b"$Label1"} <= set(first[b"FLAGS"])
        assert b"\\Flagged" in second[b"FLAGS"]
        internal = first[b"INTERNALDATE"]
        if internal.tzinfo is None:  # imapclient normalises to local time by default
            internal = internal.astimezone()
        assert internal == when
        with pytest.raises(IMAPClientError) as failure:
            client.append("No such folder", body)
        assert "TRYCREATE" in str(failure.value)
        client.logout()
        legacy.logout()
        return reply, data[0]

    reply, legacy_reply = await in_thread(dialog)
    stored = await maildb.list_messages(ALICE, "Drafts")
    assert len(stored) == 2
    assert b"APPENDUID" in reply
    uidvalidity, uid = reply.split(b"APPENDUID ")[1].split(b"]")[0].split()
    assert (int(uidvalidity), int(uid)) == ((await maildb.status(ALICE, "Drafts")).uidvalidity,
                                            stored[0].uid)
    assert stored[0].internaldate == when.timestamp()
    with maildb.open_message(ALICE, stored[1].guid) as f:
        assert f.read() == body


async def test_append_synchronizing_and_nonsynchronizing_literals(
        server: Server, maildb: MailDB) -> None:
    def dialog() -> None:
        raw = server.raw(ALICE)
        first = message("sync literal")
        assert raw.literal_command(b'APPEND INBOX (\\Seen)', first).status == "OK"
        second = message("literal plus")
        # LITERAL+ (RFC 7888): no continuation request, the literal follows at once
        reply = raw.literal_command(b'APPEND INBOX "02-Mar-2026 10:00:00 +0000"', second,
                                    plus=True)
        assert reply.status == "OK", reply
        assert b"APPENDUID" in reply.text
        raw.close()

    await in_thread(dialog)
    infos = await maildb.list_messages(ALICE)
    assert len(infos) == 2 and "\\Seen" in infos[0].flags


async def test_append_with_bare_lf_line_ends_is_stored_with_crlf(
        server: Server, maildb: MailDB) -> None:
    """Sizes must agree with what is sent in both protocols (POP3 counts CRLF line ends,
    RFC 1939 11); CRLF, lone CRs and a missing last line end are kept as they are."""
    sent = b"From: a@example.org\nSubject: lf\n\nline 1\r\nline 2\rstill 2\nlast"

    def dialog() -> None:
        raw = server.raw(ALICE)
        assert raw.literal_command(b"APPEND INBOX", sent, plus=True).status == "OK"
        raw.close()

    await in_thread(dialog)
    [info] = await maildb.list_messages(ALICE)
    with maildb.open_message(ALICE, info.guid) as file:
        stored = file.read()
    assert stored == b"From: a@example.org\r\nSubject: lf\r\n\r\nline 1\r\nline 2\rstill 2\r\nlast"
    assert info.size == len(stored)


# CHECK, CLOSE, EXPUNGE


async def test_check_close_expunges_silently(server: Server, deliver: Deliver,
                                             maildb: MailDB) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        assert raw.ok("CHECK").status == "OK"
        raw.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        closed = raw.ok("CLOSE")
        assert not closed.lines(b"EXPUNGE")  # CLOSE expunges without telling (6.4.2)
        assert raw.command("FETCH 1 FLAGS").status in ("BAD", "NO")  # authenticated state
        raw.ok("EXAMINE INBOX")
        raw.ok("CLOSE")
        raw.close()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE)) == 2


async def test_close_after_examine_keeps_deleted(server: Server, deliver: Deliver,
                                                 maildb: MailDB) -> None:
    await deliver(ALICE, message("keep me"))
    uid = (await maildb.list_messages(ALICE))[0].uid
    await maildb.store_flags(ALICE, "INBOX", [uid], "+", frozenset({"\\Deleted"}))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("EXAMINE INBOX")
        raw.ok("CLOSE")
        raw.close()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE)) == 1


async def test_expunge_reports_consistent_sequence_numbers(server: Server, deliver: Deliver,
                                                           maildb: MailDB) -> None:
    for n in range(6):
        await deliver(ALICE, message(f"m{n}"))
    uids = [m.uid for m in await maildb.list_messages(ALICE)]

    def dialog() -> None:
        client = server.client(ALICE, use_uid=False)
        client.select_folder("INBOX")
        client.add_flags([2, 4, 5], [b"\\Deleted"])
        _, responses = client.expunge()
        remaining = list(uids)
        for number in (r[0] for r in responses if r[1] == b"EXPUNGE"):
            del remaining[number - 1]  # each EXPUNGE renumbers at once (RFC 3501 7.4.1)
        assert remaining == [uids[0], uids[2], uids[5]]
        assert client.select_folder("INBOX")[b"EXISTS"] == 3
        assert client.expunge()[1] == []  # nothing left to expunge
        client.logout()

    await in_thread(dialog)
    assert [m.uid for m in await maildb.list_messages(ALICE)] == [uids[0], uids[2], uids[5]]


# SEARCH


SEARCH_SET = [
    # (message, flags, internal date)
    (message("Report Q1", "quarterly numbers attached\r\n", sender="Ann <ann@example.org>",
             date="Mon, 05 Jan 2026 09:00:00 +0000"),
     (b"\\Seen",), datetime.datetime(2026, 1, 5, 12, tzinfo=UTC)),
    (message("Lunch", "pizza or sushi?\r\n", sender="bob@example.test",
             date="Tue, 10 Feb 2026 09:00:00 +0000", extra="Cc: carol@example.org\r\n"),
     (b"\\Flagged", b"\\Answered"), datetime.datetime(2026, 2, 10, 12, tzinfo=UTC)),
    (message("=?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Käse und Brötchen\r\n",
             sender="ann@example.org", date="Sun, 15 Mar 2026 09:00:00 +0000",
             extra="X-Priority: 1\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: 8bit\r\n"),
     (), datetime.datetime(2026, 3, 15, 12, tzinfo=UTC)),
    (message("Report Q2", "x" * 70 + "\r\n" * 1 + ("y" * 78 + "\r\n") * 60,
             sender="dave@example.net", to="bob@example.test",
             date="Sun, 15 Mar 2026 18:00:00 +0000", extra="Bcc: alice@example.test\r\n"),
     (b"\\Deleted", b"$Work"), datetime.datetime(2026, 3, 20, 12, tzinfo=UTC)),
    (message("Misc", "nothing here\r\n", sender="erin@example.com",
             date="Wed, 01 Apr 2026 09:00:00 +0000"),
     (b"\\Draft",), datetime.datetime(2026, 4, 1, 12, tzinfo=UTC)),
]

# criteria -> 1-based positions in SEARCH_SET
SEARCHES: list[tuple[list[Any], set[int]]] = [
    (["ALL"], {1, 2, 3, 4, 5}),
    (["SEEN"], {1}), (["UNSEEN"], {2, 3, 4, 5}),
    (["FLAGGED"], {2}), (["UNFLAGGED"], {1, 3, 4, 5}),
    (["ANSWERED"], {2}), (["UNANSWERED"], {1, 3, 4, 5}),
    (["DELETED"], {4}), (["UNDELETED"], {1, 2, 3, 5}),
    (["DRAFT"], {5}), (["UNDRAFT"], {1, 2, 3, 4}),
    (["KEYWORD", "$Work"], {4}), (["UNKEYWORD", "$Work"], {1, 2, 3, 5}),
    (["FROM", "ANN@example"], {1, 3}), (["FROM", "Ann"], {1, 3}),
    (["TO", "bob@"], {4}), (["CC", "carol"], {2}), (["BCC", "alice"], {4}),
    (["SUBJECT", "report"], {1, 4}),
    (["BODY", "sushi"], {2}), (["BODY", "Report"], set()),
    (["TEXT", "quarterly"], {1}), (["TEXT", "dave@example.net"], {4}),
    (["HEADER", "X-Priority", "1"], {3}), (["HEADER", "x-priority", ""], {3}),
    (["LARGER", 3000], {4}), (["SMALLER", 1000], {1, 2, 3, 5}),
    (["BEFORE", datetime.date(2026, 2, 10)], {1}),
    (["ON", datetime.date(2026, 3, 15)], {3}),
    (["SINCE", datetime.date(2026, 3, 15)], {3, 4, 5}),
    (["SENTBEFORE", datetime.date(2026, 2, 10)], {1}),
    (["SENTON", datetime.date(2026, 3, 15)], {3, 4}),
    (["SENTSINCE", datetime.date(2026, 4, 1)], {5}),
    (["OR", "SEEN", "FLAGGED"], {1, 2}),
    (["NOT", "SEEN"], {2, 3, 4, 5}),
    (["FROM", "ann", "SUBJECT", "report"], {1}),
    ([["OR", "DRAFT", "DELETED"], "UNSEEN"], {4, 5}),
    (["OR", ["FROM", "ann", "SEEN"], "LARGER", 3000], {1, 4}),
    (["NOT", ["OR", "SEEN", "DELETED"]], {2, 3, 5}),
    (["NEW"], {2, 3, 4, 5}), (["RECENT"], {1, 2, 3, 4, 5}), (["OLD"], set()),
]


async def appended_search_set(server: Server) -> None:
    def fill() -> None:
        client = server.client(ALICE)
        client.create_folder("Search")
        for data, flags, when in SEARCH_SET:
            client.append("Search", data, flags=flags, msg_time=when)
        client.logout()

    await in_thread(fill)


async def test_search_keys(server: Server) -> None:
    await appended_search_set(server)

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("Search")
        uids = client.search("ALL")
        assert len(uids) == 5 and uids == sorted(uids)
        failures = []
        for criteria, expected in SEARCHES:
            found = set(client.search(criteria))
            if found != {uids[n - 1] for n in expected}:
                failures.append((criteria, sorted(found), sorted(expected)))
        assert not failures, failures

        utf8 = client.search(["SUBJECT", "Grüße"], charset="UTF-8")  # encoded word decoded
        assert utf8 == [uids[2]]
        assert client.search(["BODY", "Brötchen"], charset="UTF-8") == [uids[2]]
        assert client.search(["TEXT", "Köln"], charset="UTF-8") == [uids[2]]

        legacy = server.imaplib(ALICE)
        legacy.select("Search")
        for criteria, expected in ((("2:4",), "2 3 4"), (("*",), "5"), (("4:*",), "4 5"),
                                   (("1,3:2",), "1 2 3"), (("UID", f"{uids[1]}:{uids[2]}"),
                                                           "2 3"),
                                   (("UID", "*"), "5"), (("SEEN", "5:*"), "")):
            typ, data = legacy.search(None, *criteria)
            assert typ == "OK" and data[0].decode().split() == expected.split(), criteria
        typ, data = legacy.uid("SEARCH", "FLAGGED")
        assert data[0].split() == [str(uids[1]).encode()]
        typ, data = legacy.search("KOI9-X", "SUBJECT", "x")
        assert typ == "NO" and b"[BADCHARSET" in data[0]
        with pytest.raises(imaplib.IMAP4.error):
            legacy.search(None, "NOSUCHKEY")
        legacy.logout()

        later = server.client(ALICE)  # \Recent belonged to the first session
        later.select_folder("Search")
        assert later.search("RECENT") == [] and later.search("NEW") == []
        assert set(later.search("OLD")) == set(uids)
        later.logout()
        client.logout()

    await in_thread(dialog)


# What SEARCH TEXT/BODY read besides the plain text: what the reader of the mail sees.
READABLE = [
    message("Fwd: see below", "--f\r\nContent-Type: text/plain\r\n\r\nFYI\r\n--f\r\n"
            "Content-Type: message/rfc822\r\n\r\nFrom: Original Sender <orig@example.net>\r\n"
            "Subject: Budget draft\r\n\r\nthe numbers\r\n--f--\r\n",
            extra='MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="f"\r\n'),
    message("transfer", "--a\r\nContent-Type: text/plain\r\n\r\nattached\r\n--a\r\n"
            "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename*=utf-8''%C3%9Cberweisung%20M%C3%A4rz.pdf"
            "\r\n\r\nJVBERi0xLjQK\r\n--a--\r\n",
            extra='MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="a"\r\n'),
    message("Quarterly\r\n\treport", "folded the Outlook way\r\n"),
    message("html", "<html><head><style>.hiddencss { color: red }</style></head><body>"
            "<p>Ver<b>y</b>&nbsp;important</p>\r\n<p>second paragraph</p></body></html>\r\n",
            extra="Content-Type: text/html; charset=utf-8\r\n"),
]


async def test_search_text_reads_what_the_reader_sees(server: Server, deliver: Deliver
                                                       ) -> None:
    for data in READABLE:
        await deliver(ALICE, data)

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("INBOX")
        uids = client.search("ALL")
        expectations: list[tuple[list[Any], list[int]]] = [
            (["TEXT", "Original Sender"], [0]),  # an attached message's header
            (["BODY", "Budget draft"], [0]),
            (["BODY", "the numbers"], [0]),
            (["SUBJECT", "Budget"], []),  # SUBJECT is the message's own header only
            (["TEXT", "Überweisung März"], [1]),  # an attachment's file name
            (["BODY", "JVBERi0"], []),  # not its content
            (["SUBJECT", "Quarterly report"], [2]),  # folding tab read as a space
            (["TEXT", "quarterly report"], [2]),
            (["BODY", "very important"], [3]),  # inline tags split no words
            (["BODY", "important second"], []),  # paragraphs do not run together
            (["TEXT", "hiddencss"], []),  # styles are not text
            (["BODY", "color"], []),
        ]
        failures = [(criteria, found, expected) for criteria, expected in expectations
                    if (found := client.search(criteria, charset="UTF-8"))
                    != [uids[n] for n in expected]]
        assert not failures, failures
        client.logout()

    await in_thread(dialog)


# FETCH


async def nested_in_inbox(deliver: Deliver) -> None:
    await deliver(ALICE, NESTED)


async def test_fetch_body_structure_of_nested_multipart(server: Server, deliver: Deliver
                                                        ) -> None:
    await nested_in_inbox(deliver)

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("INBOX", readonly=True)
        uid = client.search()[0]
        got = client.fetch([uid], ["BODYSTRUCTURE", "BODY", "ENVELOPE", "RFC822.SIZE"])[uid]
        structure = got[b"BODYSTRUCTURE"]
        assert structure.is_multipart and low(structure[1]) == b"mixed"
        alternative, forwarded, attachment = structure[0]
        assert alternative.is_multipart and low(alternative[1]) == b"alternative"
        text, html = alternative[0]
        assert low(text[:3]) == (b"text", b"plain", (b"charset", b"utf-8"))
        assert low(text[5]) == b"8bit" and text[6] == len(b"plain body")
        assert low(html[:2]) == (b"text", b"html")
        assert low(forwarded[:2]) == (b"message", b"rfc822")
        inner_envelope, inner_body = forwarded[7], forwarded[8]
        assert inner_envelope[1] == b"forwarded"
        assert inner_envelope[9] == b"<inner@example.org>"
        assert low(inner_body[:2]) == (b"text", b"plain")
        assert low(attachment[:3]) == (b"application", b"octet-stream", (b"name", b"data.bin"))
        assert low(attachment[5]) == b"base64" and attachment[6] == len(b"AAECAw==")
        assert got[b"BODY"].is_multipart and len(got[b"BODY"][0]) == 3
        assert got[b"RFC822.SIZE"] == len(NESTED)

        envelope = got[b"ENVELOPE"]
        assert envelope.subject == b"=?UTF-8?Q?Gr=C3=BC=C3=9Fe?= nested"  # not decoded
        date = envelope.date if envelope.date.tzinfo else envelope.date.astimezone()
        assert date == datetime.datetime(2026, 3, 2, 10, tzinfo=UTC)
        (ann,) = envelope.from_
        assert (ann.name, ann.mailbox, ann.host) == (b"Ann Example", b"ann", b"example.org")
        assert envelope.sender == envelope.from_ and envelope.reply_to == envelope.from_
        assert [(a.name, a.mailbox, a.host) for a in envelope.to] == [
            (None, b"alice", b"example.test"), (b"Bob", b"bob", b"example.test")]
        assert [a.mailbox for a in envelope.cc] == [b"carol"]
        assert envelope.bcc is None and envelope.in_reply_to is None
        assert envelope.message_id == b"<nested@example.org>"
        client.logout()

    await in_thread(dialog)


async def test_fetch_sections_and_partials(server: Server, deliver: Deliver) -> None:
    await nested_in_inbox(deliver)
    text = NESTED[len(NESTED_HEADER):]
    sections = [
        ("BODY.PEEK[]", b"BODY[]", NESTED),
        ("BODY.PEEK[HEADER]", b"BODY[HEADER]", NESTED_HEADER),
        ("BODY.PEEK[TEXT]", b"BODY[TEXT]", text),
        ("BODY.PEEK[1.1]", b"BODY[1.1]", b"plain body"),
        ("BODY.PEEK[1.2]", b"BODY[1.2]", b"<p>html body</p>"),
        ("BODY.PEEK[1.1.MIME]", b"BODY[1.1.MIME]",
         b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"),
        ("BODY.PEEK[2]", b"BODY[2]", b"From: dave@example.org\r\nSubject: forwarded\r\n"
                                     b"Message-ID: <inner@example.org>\r\n\r\nforwarded body"),
        ("BODY.PEEK[2.HEADER]", b"BODY[2.HEADER]",
         b"From: dave@example.org\r\nSubject: forwarded\r\nMessage-ID: <inner@example.org>\r\n"
         b"\r\n"),
        ("BODY.PEEK[2.TEXT]", b"BODY[2.TEXT]", b"forwarded body"),
        ("BODY.PEEK[3]", b"BODY[3]", b"AAECAw=="),
        ("BODY.PEEK[]<0.10>", b"BODY[]<0>", NESTED[:10]),
        ("BODY.PEEK[1.1]<6.100>", b"BODY[1.1]<6>", b"body"),
        ("BODY.PEEK[]<100000.5>", b"BODY[]<100000>", b""),
        ("RFC822.HEADER", b"RFC822.HEADER", NESTED_HEADER),
    ]

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("INBOX")
        uid = client.search()[0]
        for request, key, expected in sections:
            got = client.fetch([uid], [request])[uid]
            assert item(got, key) == expected, request

        fields = item(client.fetch([uid], ["BODY.PEEK[HEADER.FIELDS (SUBJECT MESSAGE-ID)]"])[uid],
                      b"BODY[HEADER.FIELDS")
        assert fields.endswith(b"\r\n\r\n")
        assert sorted(fields.split(b"\r\n")[:-2]) == [
            b"Message-ID: <nested@example.org>", b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?= nested"]
        rest = item(client.fetch([uid], ["BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT MESSAGE-ID)]"])
                    [uid], b"BODY[HEADER.FIELDS.NOT")
        assert b"Subject:" not in rest and b"Message-ID" not in rest
        assert b"From: \"Ann Example\" <ann@example.org>\r\n" in rest
        assert rest.endswith(b"\r\n\r\n")
        # partials of the sections built on request (not a range of the stored bytes)
        subject = b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?= nested\r\n\r\n"
        for start, count in ((2, 5), (0, len(subject) + 10), (len(subject) - 1, 5),
                             (len(subject), 5)):
            got = client.fetch([uid], [f"BODY.PEEK[HEADER.FIELDS (SUBJECT)]<{start}.{count}>"])
            assert item(got[uid], b"BODY[HEADER.FIELDS") == subject[start:start + count], start
        # no section fetched so far was allowed to set \Seen
        assert b"\\Seen" not in client.get_flags([uid])[uid]
        client.logout()

    await in_thread(dialog)


async def test_large_messages_sent_from_their_files_answer_as_small_ones_do(
        server: Server, deliver: Deliver) -> None:
    """Messages over STREAM_OVER are sent from their files in chunks: whole, partial, as
    RFC822 (which sets \\Seen and reports it), their TEXT and parts, with cached structure
    and among small messages in one FETCH, the answers are what the stored octets say."""
    large = message("large", "".join(f"line {n:07d} " + "x" * 60 + "\r\n" for n in range(8000)))
    small = message("small")
    await deliver(ALICE, small)
    await deliver(ALICE, large)
    await deliver(ALICE, small)
    assert len(large) > 2 * 256 * 1024

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("INBOX")
        uids = client.search()
        got = client.fetch(uids, ["BODY.PEEK[]", "RFC822.SIZE"])
        assert [got[u][b"BODY[]"] for u in uids] == [small, large, small]
        assert [got[u][b"RFC822.SIZE"] for u in uids] == [len(small), len(large), len(small)]
        for origin, count in [(0, 10), (300_000, 70_000), (len(large) - 5, 100),
                              (len(large) + 1, 10)]:
            part = client.fetch([uids[1]], [f"BODY.PEEK[]<{origin}.{count}>"])[uids[1]]
            assert part[b"BODY[]<%d>" % origin] == large[origin:origin + count], origin
        structure = client.fetch([uids[1]], ["BODYSTRUCTURE"])[uids[1]][b"BODYSTRUCTURE"]
        again = client.fetch([uids[1]], ["BODYSTRUCTURE", "ENVELOPE", "BODY.PEEK[]"])[uids[1]]
        assert again[b"BODYSTRUCTURE"] == structure and again[b"BODY[]"] == large
        assert again[b"ENVELOPE"].subject == b"large"
        text = large[large.index(b"\r\n\r\n") + 4:]
        sections = client.fetch([uids[1]], ["BODY.PEEK[TEXT]", "BODY.PEEK[1]<100000.300000>",
                                            "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])[uids[1]]
        assert sections[b"BODY[TEXT]"] == text
        assert sections[b"BODY[1]<100000>"] == text[100_000:400_000]
        assert sections[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: large\r\n\r\n"
        read = client.fetch([uids[1]], ["RFC822"])[uids[1]]
        assert read[b"RFC822"] == large and b"\\Seen" in read[b"FLAGS"]
        assert b"\\Seen" not in client.get_flags([uids[0]])[uids[0]]
        client.logout()

    await in_thread(dialog)


async def test_seen_flag_side_effects(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for n in range(4):
        await deliver(ALICE, message(f"m{n}"))
    uids = [m.uid for m in await maildb.list_messages(ALICE)]

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("INBOX", readonly=True)
        client.fetch([uids[0]], ["BODY[]"])  # EXAMINE: nothing may change
        client.select_folder("INBOX")
        client.fetch([uids[1]], ["BODY.PEEK[]", "RFC822.HEADER", "RFC822.SIZE"])
        got = client.fetch([uids[2]], ["BODY[]"])[uids[2]]
        assert b"\\Seen" in got.get(b"FLAGS", ()), "implicit \\Seen reported with the data"
        client.fetch([uids[3]], ["RFC822.TEXT"])
        client.logout()

    await in_thread(dialog)
    seen = ["\\Seen" in m.flags for m in await maildb.list_messages(ALICE)]
    assert seen == [False, False, True, True]


async def test_fetch_malformed_mime_is_best_effort(server: Server, deliver: Deliver) -> None:
    broken = [
        b"Content-Type: multipart/mixed\r\nSubject: no boundary\r\n\r\n--x\r\nbody\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
        b"\r\nnever closed",
        b"Subject: =?bogus?X?@@@?=\r\nFrom: <<<>>>\r\nTo: ,,,@\r\nDate: yesterday\r\n\r\nx",
        b"no header at all, no blank line",
        b"Content-Type: message/rfc822\r\n\r\nnot really a message",
    ]
    for data in broken:
        await deliver(ALICE, data)

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        for items in ("BODYSTRUCTURE", "ENVELOPE", "BODY", "BODY.PEEK[1]", "BODY.PEEK[1.MIME]",
                      "BODY.PEEK[2.TEXT]", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"):
            reply = raw.command(f"FETCH 1:* ({items})")
            assert reply.status == "OK", (items, reply)
            assert len(reply.lines(b"FETCH")) == len(broken), (items, reply)
        raw.close()

    await in_thread(dialog)


# STORE, COPY, UID variants


async def test_store_flags(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        added = raw.ok("STORE 1:2 +FLAGS (\\Flagged $Important)").parsed(b"FETCH")
        assert {entry[0] for entry in added} == {1, 2}
        assert all({b"\\Flagged", b"$Important"} <= set(dict(zip(
            e[2][::2], e[2][1::2], strict=True))[b"FLAGS"]) for e in added)
        assert not raw.ok("STORE 1 -FLAGS.SILENT (\\Flagged)").lines(b"FETCH")
        replaced = raw.ok("STORE 3 FLAGS (\\Answered)").parsed(b"FETCH")
        assert b"\\Answered" in replaced[0][2][1]
        uid_reply = raw.ok("UID STORE 1:* +FLAGS (\\Seen)").parsed(b"FETCH")
        assert all(b"UID" in entry[2] for entry in uid_reply)  # UID STORE reports UIDs
        assert raw.command("STORE 1 XFLAGS (\\Seen)").status == "BAD"
        raw.close()

    await in_thread(dialog)
    flags = [m.flags for m in await maildb.list_messages(ALICE)]
    assert flags[0] == {"$Important", "\\Seen"}
    assert flags[1] == {"\\Flagged", "$Important", "\\Seen"}
    assert flags[2] == {"\\Answered", "\\Seen"}


async def test_store_announces_a_new_keyword_before_the_fetch_that_shows_it(
        server: Server, deliver: Deliver) -> None:
    await deliver(ALICE, message("m"))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        reply = raw.ok("STORE 1 +FLAGS ($Fresh)")
        kinds = [line.split(b" ")[2 if line[2:3].isdigit() else 1] for line in reply.untagged]
        assert kinds[:3] == [b"FLAGS", b"OK", b"FETCH"], reply.untagged
        assert b"$Fresh" in reply.lines(b"FLAGS")[0]
        assert not raw.ok("NOOP").lines(b"FLAGS")  # announced once
        raw.close()

    await in_thread(dialog)


async def test_copy_and_uid_copy(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))
    src = [m.uid for m in await maildb.list_messages(ALICE)]
    await maildb.store_flags(ALICE, "INBOX", src[:1], "+", frozenset({"\\Flagged"}))

    def dialog() -> bytes:
        legacy = server.imaplib(ALICE)
        legacy.select("INBOX")
        assert legacy.copy("1:2", "Archive")[0] == "OK"
        typ, data = legacy.copy("1", '"No such box"')
        assert typ == "NO" and b"TRYCREATE" in data[0]
        legacy.logout()
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        reply = raw.ok(f"UID COPY {src[2]} Trash").text  # imapclient drops UID COPY's text
        raw.close()
        return reply

    reply = await in_thread(dialog)
    archived = await maildb.list_messages(ALICE, "Archive")
    assert len(archived) == 2 and "\\Flagged" in archived[0].flags
    assert len(await maildb.list_messages(ALICE)) == 3  # the source keeps them
    trash = await maildb.list_messages(ALICE, "Trash")
    trash_validity = (await maildb.status(ALICE, "Trash")).uidvalidity
    assert b"[COPYUID %d %d %d]" % (trash_validity, src[2], trash[0].uid) in reply


async def test_uid_fetch_ranges(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for n in range(4):
        await deliver(ALICE, message(f"m{n}"))
    uids = [m.uid for m in await maildb.list_messages(ALICE)]
    await maildb.expunge(ALICE, "INBOX", [uids[1]])
    uids.remove(uids[1])

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")

        def fetched(command: str) -> list[tuple[int, int]]:
            out = []
            for entry in raw.ok(command).parsed(b"FETCH"):
                attrs = dict(zip(entry[2][::2], entry[2][1::2], strict=True))
                out.append((entry[0], attrs[b"UID"]))
            return out

        assert fetched("UID FETCH 1:* FLAGS") == [(1, uids[0]), (2, uids[1]), (3, uids[2])]
        assert fetched(f"UID FETCH {uids[2] + 100}:* FLAGS") == [(3, uids[2])]  # n:* (6.4.8)
        assert fetched(f"UID FETCH {uids[2] + 100} FLAGS") == []
        assert fetched(f"UID FETCH {uids[0]},{uids[2]} (UID)") == [(1, uids[0]),
                                                                   (3, uids[2])]
        assert fetched("FETCH 2:* (UID)") == [(2, uids[1]), (3, uids[2])]
        assert raw.command("FETCH 4 FLAGS").status in ("BAD", "NO")  # beyond EXISTS
        assert raw.command("FETCH 0 FLAGS").status == "BAD"
        raw.close()

    await in_thread(dialog)


async def test_modified_utf7_names_round_trip(server: Server, maildb: MailDB) -> None:
    name = "Entwürfe/日本語 & Co"

    def dialog() -> None:
        client = server.client(ALICE)
        client.create_folder(name)
        assert name in {n for _, _, n in client.list_folders()}
        client.append(name, message("unicode folder"))
        assert client.select_folder(name)[b"EXISTS"] == 1
        client.logout()
        raw = server.raw(ALICE)
        listed = raw.ok('LIST "" "Entw&APw-rfe/*"').lines(b"LIST")
        assert listed and listed[0].endswith(b'"Entw&APw-rfe/&ZeVnLIqe- &- Co"'), listed
        assert raw.command('SELECT "Entw\xfcrfe"'.encode("latin-1")).status in ("BAD", "NO")
        raw.close()

    await in_thread(dialog)
    assert name in {box.name for box in await maildb.list_mailboxes(ALICE)}
