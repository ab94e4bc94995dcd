"""RFC 3501 requirements the other conversation tests do not already cover, one test per
requirement (docs/imap-conformance.md lists each requirement with the test that checks it).
The real server, a real MailDB, byte-level or imaplib clients.
"""

from __future__ import annotations

import pytest

from common.settings import Settings
from services.store.backends.maildb import MailDB
from tests.integration.imap.clients import Raw, Server, in_thread, message
from tests.integration.imap.conftest import ALICE, USERS, Deliver, ImapStack


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


async def test_copy_and_move_write_keywords_as_the_destination_spells_them(
        server: Server, maildb: MailDB) -> None:
    """RFC 3501 9 across mailboxes: COPY and MOVE into a mailbox that already has "junk"
    give the messages "junk", not a second spelling "Junk" beside it."""
    await maildb.append(ALICE, "Archive", message("old"), frozenset({"junk", "\\Seen"}))
    for n in range(2):
        await maildb.append(ALICE, "INBOX", message(f"m{n}"), frozenset({"Junk", "$Work"}))
    await _in_inbox(server, "COPY 1 Archive", "MOVE 2 Archive")
    flags = [info.flags for info in await maildb.list_messages(ALICE, "Archive")]
    assert flags == [frozenset({"junk", "\\Seen"}), *[frozenset({"junk", "$Work"})] * 2]
    assert [info.flags for info in await maildb.list_messages(ALICE)] == [
        frozenset({"Junk", "$Work"})]  # the source keeps its own spelling


async def test_store_on_a_mailbox_holding_two_spellings_of_a_keyword(
        server: Server, maildb: MailDB) -> None:
    """A mailbox written before keywords were case-insensitive may hold "Junk" and "junk":
    -FLAGS (JUNK) takes away both, and +FLAGS (junk) keeps the spelling sent (it is known)."""
    await maildb.append(ALICE, "INBOX", message("a"), frozenset({"Junk"}))
    await maildb.append(ALICE, "INBOX", message("b"), frozenset({"junk"}))
    await maildb.append(ALICE, "INBOX", message("c"), frozenset())
    await _in_inbox(server, "STORE 3 +FLAGS.SILENT (junk)", "STORE 1:2 -FLAGS.SILENT (JUNK)")
    flags = [info.flags for info in await maildb.list_messages(ALICE)]
    assert flags == [frozenset(), frozenset(), frozenset({"junk"})]


async def _in_inbox(server: Server, *commands: str) -> None:
    """Alice selects INBOX and runs `commands`, each of which must answer OK."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        for command in commands:
            raw.ok(command)
        raw.close()

    await in_thread(dialog)


# RFC 3501 6: each command in the states the RFC lists it under; any other state is BAD.
ANY_STATE = ["CAPABILITY", "NOOP"]
NOT_AUTHENTICATED = ["STARTTLS", "AUTHENTICATE PLAIN", 'LOGIN "x" "y"']
AUTHENTICATED = ["SELECT INBOX", "EXAMINE INBOX", "CREATE Made", "DELETE Made",
                 "RENAME Archive Elsewhere", "SUBSCRIBE Archive", "UNSUBSCRIBE Archive",
                 'LIST "" "*"', 'LSUB "" "*"', "STATUS INBOX (MESSAGES)"]
SELECTED = ["CHECK", "CLOSE", "EXPUNGE", "SEARCH ALL", "FETCH 1 FLAGS",
            "STORE 1 +FLAGS (\\Seen)", "COPY 1 Archive", "UID FETCH 1 FLAGS",
            "UID STORE 1 +FLAGS (\\Seen)", "UID COPY 1 Archive", "UID SEARCH ALL"]


async def test_each_command_outside_its_states_is_bad_and_changes_nothing(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    await deliver(ALICE, message("m"))

    def refused(raw: Raw, commands: list[str]) -> None:
        for command in commands:
            assert raw.command(command).status == "BAD", command
            raw.ok("NOOP")  # BADs in a row would end the session

    def dialog() -> None:
        raw = server.raw(None)
        refused(raw, AUTHENTICATED + SELECTED + ["APPEND INBOX {1+}\r\nx"])
        for command in ANY_STATE:
            raw.ok(command)
        raw.ok(f'LOGIN "{ALICE}" "{USERS[ALICE]}"')
        refused(raw, NOT_AUTHENTICATED + SELECTED)
        raw.ok("SELECT INBOX")
        refused(raw, NOT_AUTHENTICATED)
        raw.close()

    await in_thread(dialog)
    assert {box.name for box in await maildb.list_mailboxes(ALICE)} >= {"Archive"}
    assert [info.flags for info in await maildb.list_messages(ALICE)] == [frozenset()]
    assert await maildb.list_messages(ALICE, "Archive") == []


async def test_nothing_is_sent_while_no_command_is_in_progress(
        server: Server, deliver: Deliver) -> None:
    """RFC 3501 5.3 and 7.4.1: another session's expunge and a delivery wait for the next
    command; no EXPUNGE (nor anything else) arrives unasked."""
    for n in range(2):
        await deliver(ALICE, message(f"m{n}"))

    def changes_elsewhere() -> Raw:
        watcher = server.raw(ALICE)
        watcher.ok("SELECT INBOX")
        other = server.raw(ALICE)
        other.ok("SELECT INBOX")
        other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        other.ok("EXPUNGE")
        other.close()
        return watcher

    watcher = await in_thread(changes_elsewhere)
    await deliver(ALICE, message("new"))

    def dialog() -> None:
        # A NOOP from a third session is answered only after its store work is done; by then
        # the expunge and the delivery are committed, and the watcher had all that time.
        third = server.raw(ALICE)
        third.ok("NOOP")
        third.close()
        watcher.sock.setblocking(False)
        try:
            unasked = watcher.sock.recv(1024)
        except BlockingIOError:
            unasked = b""
        watcher.sock.setblocking(True)
        assert unasked == b""
        assert watcher.ok("NOOP").untagged == [b"* 1 EXPUNGE", b"* 2 EXISTS", b"* 2 RECENT"]
        watcher.close()

    await in_thread(dialog)


async def test_a_name_used_again_gets_a_new_uidvalidity_and_inbox_uids_keep_rising(
        server: Server, deliver: Deliver) -> None:
    """RFC 3501 2.3.1.1: a mailbox deleted and created again under its name gets a new
    UIDVALIDITY; after RENAME INBOX (6.3.5) the emptied INBOX keeps its UIDVALIDITY, so its
    next UIDs must not repeat those that went with the messages."""
    await deliver(ALICE, message("m"))

    def status(raw: Raw, name: str) -> dict[bytes, int]:
        items = raw.ok(f"STATUS {name} (UIDVALIDITY UIDNEXT MESSAGES)").parsed(b"STATUS")[0][2]
        return dict(zip(items[::2], items[1::2], strict=True))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("CREATE Again")
        first = status(raw, "Again")
        raw.ok("DELETE Again")
        raw.ok("CREATE Again")
        assert status(raw, "Again")[b"UIDVALIDITY"] != first[b"UIDVALIDITY"]

        before = status(raw, "INBOX")
        raw.ok("RENAME INBOX Moved")
        assert status(raw, "Moved")[b"MESSAGES"] == 1
        after = status(raw, "INBOX")
        assert after[b"MESSAGES"] == 0
        assert (after[b"UIDVALIDITY"] != before[b"UIDVALIDITY"]
                or after[b"UIDNEXT"] >= before[b"UIDNEXT"])
        raw.close()

    await in_thread(dialog)


async def test_sent_keys_read_the_date_header_the_others_the_internal_date(
        server: Server) -> None:
    """RFC 3501 6.4.4: BEFORE/ON/SINCE compare the internal date, SENTBEFORE/SENTON/
    SENTSINCE the Date header, both disregarding time and timezone: 23:30 -0500 on 2 March
    is 2 March, though it is 3 March in UTC."""
    late = message("late", date="Mon, 02 Mar 2026 23:30:00 -0500")
    expected = {
        "SENTON 2-Mar-2026": b"1", "SENTON 3-Mar-2026": b"", "SENTBEFORE 3-Mar-2026": b"1",
        "SENTBEFORE 2-Mar-2026": b"", "SENTSINCE 2-Mar-2026": b"1", "SENTSINCE 3-Mar-2026": b"",
        "ON 5-Mar-2026": b"1", "ON 2-Mar-2026": b"", "BEFORE 5-Mar-2026": b"",
        "BEFORE 6-Mar-2026": b"1", "SINCE 5-Mar-2026": b"1", 'SINCE "6-Mar-2026"': b"",
    }

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.literal_command(b'APPEND INBOX " 5-Mar-2026 12:00:00 +0000"', late)
        raw.ok("SELECT INBOX")
        found = {key: raw.ok(f"SEARCH {key}").untagged[0][len(b"* SEARCH "):]
                 for key in expected}
        assert found == expected
        raw.close()

    await in_thread(dialog)


async def test_larger_and_smaller_are_strict_and_rfc822_size_is_exact(
        server: Server, deliver: Deliver) -> None:
    """RFC 3501 6.4.4 (LARGER/SMALLER: size greater/smaller than n) and 2.3.4 (RFC822.SIZE
    is the number of octets BODY[] returns)."""
    data = message("sized")
    await deliver(ALICE, data)
    size = len(data)

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        assert raw.ok("FETCH 1 RFC822.SIZE").untagged == [b"* 1 FETCH (RFC822.SIZE %d)" % size]
        body = raw.ok("FETCH 1 BODY.PEEK[]").untagged[0]
        assert body.endswith(b"{%d}\r\n" % size + data + b")")
        for key, hit in ((f"LARGER {size}", False), (f"LARGER {size - 1}", True),
                         (f"SMALLER {size}", False), (f"SMALLER {size + 1}", True)):
            assert raw.ok(f"SEARCH {key}").untagged == [b"* SEARCH 1" if hit else b"* SEARCH"]
        raw.close()

    await in_thread(dialog)


async def test_append_takes_both_forms_of_the_day_and_keeps_the_zone_instant(
        server: Server, maildb: MailDB) -> None:
    """RFC 3501 9: date-day-fixed is SP DIGIT or 2DIGIT, the zone is required; the internal
    date is the instant given (6.3.11), and a date-time without a zone is BAD."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        for when in (b'" 2-Mar-2026 10:00:00 +0000"', b'"02-Mar-2026 10:00:00 +0000"',
                     b'"02-mar-2026 08:30:00 -0130"'):
            assert raw.literal_command(b"APPEND INBOX " + when, message("m")).status == "OK"
        assert raw.literal_command(b'APPEND INBOX "02-Mar-2026 10:00:00"',
                                   message("m")).status == "BAD"
        raw.ok("SELECT INBOX")
        dates = raw.ok("FETCH 1:* INTERNALDATE").untagged
        assert dates == [b'* %d FETCH (INTERNALDATE " 2-Mar-2026 10:00:00 +0000")' % n
                         for n in (1, 2, 3)]
        raw.close()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE)) == 3


async def test_lsub_percent_shows_an_unsubscribed_parent_as_noselect(server: Server) -> None:
    """RFC 3501 6.3.9: with "foo/bar" subscribed and "foo" not, LSUB "" "%" returns foo
    with \\Noselect; a subscribed name whose mailbox does not exist is still listed."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("CREATE Outer/Inner")
        raw.ok("SUBSCRIBE Outer/Inner")
        raw.ok("SUBSCRIBE Ghost")
        top = raw.ok('LSUB "" "%"').lines(b"LSUB")
        assert b'* LSUB (\\Noselect) "/" Outer' in top
        assert any(line.endswith(b'"/" Ghost') for line in top)
        assert raw.ok('LSUB "" "Outer/%"').lines(b"LSUB") == [b'* LSUB () "/" Outer/Inner']
        raw.close()

    await in_thread(dialog)


async def test_sections_of_a_message_that_is_not_multipart(server: Server,
                                                           deliver: Deliver) -> None:
    """RFC 3501 6.4.5: part 1 of a non-multipart message is its body; a partial whose origin
    is past the end is an empty string; HEADER.FIELDS names match case-insensitively, a
    missing field leaves the blank line; the partial's origin is echoed in the response."""
    await deliver(ALICE, message("plain", body="line one\r\nline two\r\n"))

    def fetch(raw: Raw, item: str) -> bytes:
        return raw.ok(f"FETCH 1 {item}").untagged[0].removeprefix(b"* 1 FETCH (")

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        assert fetch(raw, "BODY.PEEK[1]") == b"BODY[1] {20}\r\nline one\r\nline two\r\n)"
        assert fetch(raw, "BODY.PEEK[TEXT]<5.3>") == b"BODY[TEXT]<5> {3}\r\none)"
        assert fetch(raw, "BODY.PEEK[]<100000.10>") == b"BODY[]<100000> {0}\r\n)"
        assert fetch(raw, "BODY.PEEK[HEADER.FIELDS (subject X-Nowhere)]") == (
            b"BODY[HEADER.FIELDS (SUBJECT X-NOWHERE)] {18}\r\nSubject: plain\r\n\r\n)")
        assert fetch(raw, "BODY.PEEK[HEADER.FIELDS (X-Nowhere)]") == (
            b"BODY[HEADER.FIELDS (X-NOWHERE)] {2}\r\n\r\n)")
        assert raw.ok("FETCH 1 FLAGS").untagged == [b"* 1 FETCH (FLAGS (\\Recent))"]  # PEEK
        raw.close()

    await in_thread(dialog)


def test_the_autologout_timer_defaults_to_at_least_30_minutes() -> None:
    """RFC 3501 5.4 (the timer itself: test_an_idle_logged_in_session_is_logged_out)."""
    assert Settings.from_env({}).imap_timeout >= 30 * 60


async def test_authenticate_unknown_mechanism_is_no_and_a_cancelled_one_bad(
        server: Server) -> None:
    """RFC 3501 6.2.2: NO for an unsupported mechanism; "*" cancels with a tagged BAD."""
    def dialog() -> None:
        raw = server.raw(None)
        assert raw.command("AUTHENTICATE X-UNHEARD-OF").status == "NO"
        raw.send(b"c1 AUTHENTICATE PLAIN\r\n")
        assert raw.response().startswith(b"+")
        raw.send(b"*\r\n")
        assert raw.reply("c1").status == "BAD"
        raw.ok(f'LOGIN "{ALICE}" "{USERS[ALICE]}"')  # the session goes on
        raw.close()

    await in_thread(dialog)


async def test_pipelined_commands_are_answered_in_order_on_the_state_each_left(
        server: Server, deliver: Deliver) -> None:
    """RFC 3501 5.5: commands sent without waiting run one after the other, each seeing
    what the one before it did; the EXPUNGE renumbers before the FETCH behind it."""
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        raw.send(b"p1 STORE 1 +FLAGS.SILENT (\\Deleted)\r\np2 EXPUNGE\r\n"
                 b"p3 FETCH 1 (UID)\r\np4 STORE 1 +FLAGS (\\Flagged)\r\np5 FETCH 1 FLAGS\r\n")
        replies = [raw.reply(tag) for tag in ("p1", "p2", "p3", "p4", "p5")]
        assert [reply.status for reply in replies] == ["OK"] * 5
        assert replies[1].untagged == [b"* 1 EXPUNGE"]
        assert replies[2].untagged == [b"* 1 FETCH (UID 2)"]
        assert replies[4].untagged == [b"* 1 FETCH (FLAGS (\\Flagged \\Recent))"]
        raw.close()

    await in_thread(dialog)


async def test_recent_cannot_be_stored(server: Server, deliver: Deliver) -> None:
    """RFC 3501 2.3.2: \\Recent cannot be altered by the client: setting it on a message
    another session holds as recent shows nothing new, replacing the flags keeps it."""
    await deliver(ALICE, message("m"))

    def dialog() -> None:
        holder = server.raw(ALICE)
        holder.ok("SELECT INBOX")  # first session told: \Recent is this one's
        later = server.raw(ALICE)
        later.ok("SELECT INBOX")
        assert later.ok("STORE 1 +FLAGS (\\Recent)").untagged == [b"* 1 FETCH (FLAGS ())"]
        assert later.ok("SEARCH RECENT").untagged == [b"* SEARCH"]
        assert holder.ok("STORE 1 FLAGS ()").untagged == [b"* 1 FETCH (FLAGS (\\Recent))"]
        holder.close()
        later.close()

    await in_thread(dialog)


async def test_copy_keeps_flags_and_internal_date_and_sets_recent(
        server: Server, maildb: MailDB) -> None:
    """RFC 3501 6.4.7: the copy's flags and internal date SHOULD be the original's, and
    \\Recent SHOULD be set on it."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.literal_command(b'APPEND INBOX (\\Flagged Mine) " 7-Mar-2026 09:15:00 +0000"',
                            message("m"))
        raw.ok("SELECT INBOX")
        raw.ok("COPY 1 Archive")
        raw.ok("EXAMINE Archive")
        assert raw.ok("FETCH 1 (FLAGS INTERNALDATE)").untagged == [
            b'* 1 FETCH (FLAGS (\\Flagged \\Recent Mine) INTERNALDATE " 7-Mar-2026 09:15:00'
            b' +0000")']
        raw.close()

    await in_thread(dialog)


async def test_copy_of_nothing_to_a_missing_mailbox_is_trycreate(server: Server) -> None:
    """RFC 3501 6.4.7: a COPY whose destination does not exist is [TRYCREATE], also when
    its set matches no message (it answered OK and the client took the copy as done)."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.literal_command(b"APPEND INBOX", message("m"))
        raw.ok("SELECT INBOX")
        raw.ok("UID COPY 999 Archive")
        for command in ("UID COPY 999 Nowhere", "UID MOVE 999 Nowhere", "UID COPY 1 Nowhere"):
            reply = raw.command(command)
            assert (reply.status, reply.code) == ("NO", b"TRYCREATE"), (command, reply)
        reply = raw.command('UID COPY 999 "a//b"')
        assert (reply.status, reply.code) == ("NO", b"CANNOT")
        raw.close()

    await in_thread(dialog)


async def test_rename_creates_the_superior_names_it_needs(server: Server) -> None:
    """RFC 3501 6.3.5: RENAME to a name with the delimiter creates the superiors (SHOULD)."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("CREATE Leaf")
        raw.ok("RENAME Leaf Top/Middle/Leaf")
        listed = raw.ok('LIST "" "Top*"').lines(b"LIST")
        assert [line.rsplit(b" ", 1)[1] for line in listed] == [
            b"Top", b"Top/Middle", b"Top/Middle/Leaf"]
        assert not any(b"\\Noselect" in line for line in listed)
        raw.close()

    await in_thread(dialog)


async def test_inbox_is_case_insensitive_and_only_inbox_is(server: Server) -> None:
    """RFC 3501 5.1: "INBOX" in any case is the INBOX, also as the first level of a longer
    name; other names, "inboxes" or "foo/inbox", keep their case."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        assert b"[READ-WRITE]" in raw.ok("SELECT iNbOx").text
        assert raw.ok("STATUS inbox (MESSAGES)").untagged == [b"* STATUS INBOX (MESSAGES 0)"]
        assert raw.command("CREATE Inbox").status == "NO"
        raw.ok("CREATE inbox/Child")
        raw.ok("CREATE inboxes")
        raw.ok("CREATE Box/inbox")
        assert raw.command("CREATE INBOX/child").status == "OK"  # other names keep case
        names = [line.rsplit(b" ", 1)[1] for line in raw.ok('LIST "" "*"').lines(b"LIST")]
        assert {b"INBOX", b"INBOX/Child", b"INBOX/child", b"inboxes", b"Box/inbox"} <= set(names)
        assert raw.ok('LIST "" "inbox"').lines(b"LIST")[0].endswith(b'"/" INBOX')
        raw.close()

    await in_thread(dialog)


async def test_a_star_in_an_empty_mailbox_selects_nothing(server: Server) -> None:
    """RFC 3501 9 (seq-number) says a server SHOULD answer BAD to "*" in an empty mailbox;
    tiermail answers a range ending in "*" with what exists, as for UIDs (deliberate, see
    docs/imap-conformance.md), while a plain number above the count stays BAD."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        assert raw.ok("FETCH 1:* FLAGS").untagged == []
        assert raw.command("FETCH 1 FLAGS").status == "BAD"
        raw.close()

    await in_thread(dialog)
