"""The IMAP extensions real clients use: IDLE, UIDPLUS, MOVE, NAMESPACE, ID, ENABLE, CONDSTORE,
QRESYNC, UNSELECT, ESEARCH, SORT, THREAD and QUOTA, each checked on the wire and in the store.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

import pytest
from imapclient.exceptions import IMAPClientError

from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MailDB
from tests.integration.imap.clients import (
    Reply,
    Server,
    collect_idle,
    expand,
    in_thread,
    message,
    numbers,
)
from tests.integration.imap.conftest import ALICE, Deliver, ImapStack, StartImap


@pytest.fixture
def server(imap_server: ImapStack) -> Server:
    return Server.of(imap_server)


async def fill(deliver: Deliver, count: int, mailbox: str = "INBOX") -> None:
    for n in range(count):
        await deliver(ALICE, message(f"message {n}"), mailbox)


async def uids_of(maildb: MailDB, mailbox: str = "INBOX") -> list[int]:
    return [m.uid for m in await maildb.list_messages(ALICE, mailbox)]


def attrs(entry: tuple[Any, ...]) -> dict[bytes, Any]:
    """The attribute list of a parsed `n FETCH (...)` as a dict."""
    data = entry[2]
    return dict(zip(data[::2], data[1::2], strict=True))


# IDLE (RFC 2177)


async def test_idle_reports_delivery_append_flags_and_expunge(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    await fill(deliver, 2)
    idler = await in_thread(lambda: server.client(ALICE, use_uid=False))

    def start() -> None:
        idler.select_folder("INBOX")
        idler.idle()

    await in_thread(start)
    await deliver(ALICE, message("delivered while idling"))  # the consumer's path
    seen = await in_thread(lambda: collect_idle(idler, lambda s: 3 in numbers(s, b"EXISTS")))
    assert 3 in numbers(seen, b"EXISTS")

    def other_session() -> None:
        other = server.client(ALICE, use_uid=False)
        other.append("INBOX", message("appended while idling"))
        assert 4 in numbers(collect_idle(idler, lambda s: 4 in numbers(s, b"EXISTS")),
                            b"EXISTS")
        other.select_folder("INBOX")
        other.add_flags([2], [b"\\Flagged"])
        flagged = collect_idle(idler, lambda s: 2 in numbers(s, b"FETCH"))
        assert any(r[0] == 2 and b"\\Flagged" in dict(zip(r[2][::2], r[2][1::2], strict=True))
                   [b"FLAGS"] for r in flagged if r[1] == b"FETCH")
        other.add_flags([1], [b"\\Deleted"])
        other.expunge()
        gone = collect_idle(idler, lambda s: 1 in numbers(s, b"EXPUNGE"))
        assert 1 in numbers(gone, b"EXPUNGE")
        other.logout()
        text, _ = idler.idle_done()
        assert idler.select_folder("INBOX")[b"EXISTS"] == 3
        idler.logout()

    await in_thread(other_session)



async def test_idle_ends_only_with_done(server: Server) -> None:
    """RFC 2177: IDLE is answered with a continuation and ended by DONE (any case); a
    command sent instead of DONE is a protocol error: IDLE ends with BAD and the session
    goes on."""
    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        raw.send(b"i1 IDLE\r\n")
        assert raw.response().startswith(b"+ ")
        raw.send(b"n1 NOOP\r\n")
        assert raw.reply("i1").status == "BAD"
        raw.ok("NOOP")
        raw.send(b"i2 IDLE\r\n")
        assert raw.response().startswith(b"+ ")
        raw.send(b"done\r\n")
        assert raw.reply("i2").status == "OK"
        raw.close()

    await in_thread(dialog)


async def test_idle_sends_keepalives_between_changes(
        start_imap: StartImap, settings: Settings, deliver: Deliver) -> None:
    """A quiet IDLE still writes `* OK Still here` every imap_idle_keepalive seconds (NAT
    gateways drop silent connections), and changes still come through between them."""
    server = Server.of(await start_imap(settings.replace(imap_idle_keepalive=0.2)))
    idler = await in_thread(lambda: server.client(ALICE))

    def start() -> None:
        idler.select_folder("INBOX")
        idler.idle()

    def still_here(seen: list[Any]) -> int:
        return sum(1 for r in seen if r == (b"OK", b"Still here"))

    await in_thread(start)
    seen = await in_thread(lambda: collect_idle(idler, lambda s: still_here(s) >= 2))
    await deliver(ALICE, message("between keepalives"))
    seen += await in_thread(lambda: collect_idle(
        idler, lambda s: bool(numbers(s, b"EXISTS")) and still_here(s) >= 1))
    assert numbers(seen, b"EXISTS") == [1]

    def done() -> None:
        text, _ = idler.idle_done()
        assert text.startswith(b"IDLE")  # the tagged OK
        idler.logout()

    await in_thread(done)


async def test_idle_in_other_mailbox_is_quiet_and_done_ends_it(
        server: Server, deliver: Deliver) -> None:
    await fill(deliver, 3)
    idler = await in_thread(lambda: server.client(ALICE))

    def start() -> None:
        idler.select_folder("Archive")
        idler.idle()

    await in_thread(start)
    await deliver(ALICE, message("to INBOX"))
    await deliver(ALICE, message("to Archive"), "Archive")
    seen = await in_thread(lambda: collect_idle(idler, lambda s: bool(numbers(s, b"EXISTS"))))
    assert numbers(seen, b"EXISTS") == [1]  # Archive's message; INBOX (4) is not selected

    def finish() -> None:
        idler.idle_done()
        assert idler.noop()[0]  # the session is usable after DONE
        idler.logout()

    await in_thread(finish)


# UIDPLUS (RFC 4315) and MOVE (RFC 6851)


async def test_uid_expunge_removes_only_the_given_uids(server: Server, deliver: Deliver,
                                                       maildb: MailDB) -> None:
    await fill(deliver, 3)
    uids = await uids_of(maildb)
    await maildb.store_flags(ALICE, "INBOX", uids, "+", frozenset({"\\Deleted"}))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        reply = raw.ok(f"UID EXPUNGE {uids[1]}")
        assert [line.split()[1] for line in reply.lines(b"EXPUNGE")] == [b"2"]
        raw.close()

    await in_thread(dialog)
    assert await uids_of(maildb) == [uids[0], uids[2]]


async def test_move_reports_copyuid_and_expunge(server: Server, deliver: Deliver,
                                                maildb: MailDB) -> None:
    await fill(deliver, 3)
    uids = await uids_of(maildb)
    await maildb.store_flags(ALICE, "INBOX", [uids[1]], "+", frozenset({"$Keep"}))
    moved_to: list[int] = []

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        reply = raw.ok(f"UID MOVE {uids[1]}:{uids[2]} Archive")
        # RFC 6851 4.3: COPYUID in an untagged OK before the expunges (or the tagged OK)
        copyuid = [line for line in reply.untagged if b"[COPYUID" in line] + [reply.text]
        found = re.search(rb"\[COPYUID (\d+) (\S+) (\S+)\]", copyuid[0])
        assert found, reply
        assert expand(found.group(2)) == uids[1:]
        moved_to.extend(expand(found.group(3)))
        assert [line.split()[1] for line in reply.lines(b"EXPUNGE")] in ([b"2", b"2"],
                                                                        [b"3", b"2"])
        failed = raw.command(f"UID MOVE {uids[0]} Nowhere")
        assert failed.status == "NO" and b"TRYCREATE" in failed.text
        raw.close()

    await in_thread(dialog)
    assert await uids_of(maildb) == [uids[0]]
    moved = await maildb.list_messages(ALICE, "Archive")
    assert [m.uid for m in moved] == moved_to
    assert "$Keep" in moved[0].flags


async def test_move_with_imapclient(server: Server, deliver: Deliver,
                                                         maildb: MailDB) -> None:
    await fill(deliver, 2)

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("INBOX")
        client.move(client.search()[:1], "Trash")  # imapclient moves by UID only
        assert client.select_folder("INBOX")[b"EXISTS"] == 1
        client.logout()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE, "Trash")) == 1
    assert len(await maildb.list_messages(ALICE)) == 1


# NAMESPACE (RFC 2342), ID (RFC 2971), ENABLE (RFC 5161), UNSELECT (RFC 3691)


async def test_namespace_id_enable_unselect(server: Server, deliver: Deliver,
                                            maildb: MailDB) -> None:
    await fill(deliver, 1)
    uid = (await uids_of(maildb))[0]
    await maildb.store_flags(ALICE, "INBOX", [uid], "+", frozenset({"\\Deleted"}))

    def dialog() -> None:
        raw = server.raw()
        ident = raw.ok('ID ("name" "tiermail-tests" "version" "1")')  # allowed before login
        assert len(ident.lines(b"ID")) == 1
        assert raw.command("ENABLE CONDSTORE").status in ("BAD", "NO")  # authenticated only
        raw.close()

        client = server.client(ALICE)
        namespace = client.namespace()
        assert [tuple(n) for n in namespace.personal] == [("", "/")]
        assert namespace.other is None and namespace.shared is None
        info = client.id_({"name": "imapclient"})
        assert info is None or b"name" in info[0][::2]  # the server's parameter list or NIL
        client.select_folder("INBOX")
        client.unselect_folder()
        with pytest.raises(IMAPClientError):
            client.fetch([1], ["FLAGS"])  # no mailbox selected any more
        client.logout()

        raw = server.raw(ALICE)
        assert raw.ok("ENABLE CONDSTORE X-UNKNOWN").lines(b"ENABLED") == [
            b"* ENABLED CONDSTORE"]
        raw.ok("SELECT INBOX")
        flagged = raw.ok("STORE 1 +FLAGS (\\Flagged)").parsed(b"FETCH")
        assert b"MODSEQ" in attrs(flagged[0])  # CONDSTORE enabled: MODSEQ with every FLAGS
        raw.close()

    await in_thread(dialog)
    assert await uids_of(maildb) == [uid]  # UNSELECT expunged nothing


# CONDSTORE (RFC 7162 section 3.1)


async def test_condstore_modseq_changedsince_unchangedsince(server: Server, deliver: Deliver,
                                                            maildb: MailDB) -> None:
    await fill(deliver, 4)
    uids = await uids_of(maildb)
    before = (await maildb.status(ALICE)).highestmodseq

    def dialog() -> None:
        raw = server.raw(ALICE)
        selected = raw.ok("SELECT INBOX (CONDSTORE)")
        assert any(f"[HIGHESTMODSEQ {before}]".encode() in line
                   for line in selected.untagged)
        fetched = raw.ok("FETCH 1:* (MODSEQ)").parsed(b"FETCH")
        modseqs = {e[0]: attrs(e)[b"MODSEQ"][0] for e in fetched}
        assert len(modseqs) == 4 and all(m <= before for m in modseqs.values())

        raw.ok("STORE 2 +FLAGS.SILENT (\\Seen)")
        changed = raw.ok(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {before})").parsed(b"FETCH")
        assert [e[0] for e in changed] == [2]
        after = attrs(changed[0])[b"MODSEQ"][0]
        assert after > before

        # UNCHANGEDSINCE: message 2 changed after `before`, so it is left alone and reported
        conditional = raw.command(f"STORE 1:3 (UNCHANGEDSINCE {before}) +FLAGS (\\Flagged)")
        assert conditional.status == "OK"
        assert b"[MODIFIED 2]" in conditional.text
        searched = raw.ok(f"SEARCH MODSEQ {before + 1}")
        assert searched.lines(b"SEARCH")[0].startswith(b"* SEARCH 1 2 3 (MODSEQ ")
        uid_search = raw.ok(f"UID SEARCH MODSEQ {after + 1}").lines(b"SEARCH")[0]
        assert uid_search.split()[2:4] == [str(uids[0]).encode(), str(uids[2]).encode()]
        # The boundary: a MODSEQ equal to UNCHANGEDSINCE is unchanged since (the STORE is
        # done), one above it is not (left alone, reported MODIFIED).
        [entry] = raw.ok("FETCH 2 (MODSEQ)").parsed(b"FETCH")
        current = attrs(entry)[b"MODSEQ"][0]
        equal = raw.command(f"STORE 2 (UNCHANGEDSINCE {current}) +FLAGS.SILENT (\\Draft)")
        assert equal.status == "OK" and b"MODIFIED" not in equal.text
        above = raw.command(f"STORE 2 (UNCHANGEDSINCE {current}) +FLAGS.SILENT (\\Deleted)")
        assert above.status == "OK" and b"[MODIFIED 2]" in above.text
        raw.close()

    await in_thread(dialog)
    flags = [m.flags for m in await maildb.list_messages(ALICE)]
    assert flags == [{"\\Flagged"}, {"\\Seen", "\\Draft"}, {"\\Flagged"}, frozenset()]
    status = await maildb.status(ALICE)
    modseqs = [m.modseq for m in await maildb.list_messages(ALICE)]
    assert max(modseqs) == status.highestmodseq


async def test_condstore_session_gets_uid_and_modseq_in_every_fetch_response(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 7162 3.2.4: once CONDSTORE is enabled, FETCH responses from STORE, from a FETCH
    that set \\Seen and from another session's change carry UID and MODSEQ; a FETCH that
    asked for neither and set nothing does not; a session without CONDSTORE sees neither."""
    await fill(deliver, 3)
    uids = await uids_of(maildb)

    def dialog() -> None:
        raw, other, plain = server.raw(ALICE), server.raw(ALICE), server.raw(ALICE)
        raw.ok("ENABLE CONDSTORE")
        for session in (raw, other, plain):
            session.ok("SELECT INBOX")

        def uid_and_modseq(reply_lines: list[tuple[Any, ...]]) -> list[tuple[int, bool]]:
            return [(attrs(e).get(b"UID"), b"MODSEQ" in attrs(e)) for e in reply_lines]

        stored = raw.ok("STORE 1 +FLAGS (\\Answered)").parsed(b"FETCH")
        assert uid_and_modseq(stored) == [(uids[0], True)]
        read = b"".join(raw.ok("FETCH 2 BODY[]").lines(b"FETCH"))  # sets \Seen
        assert re.match(rb"\* 2 FETCH \(UID %d MODSEQ \(\d+\) " % uids[1], read), read
        assert read.endswith(b" FLAGS (\\Recent \\Seen))"), read
        assert uid_and_modseq(raw.ok("FETCH 3 (FLAGS)").parsed(b"FETCH")) == [(None, False)]

        other.ok("STORE 3 +FLAGS.SILENT (\\Flagged)")
        assert uid_and_modseq(raw.ok("NOOP").parsed(b"FETCH")) == [(uids[2], True)]
        assert uid_and_modseq(plain.ok("NOOP").parsed(b"FETCH")) == [(None, False)] * 3
        assert uid_and_modseq(plain.ok("STORE 1 -FLAGS (\\Answered)").parsed(b"FETCH")) == [
            (None, False)]
        for session in (raw, other, plain):
            session.close()

    await in_thread(dialog)


# RFC 7162 3.1: each of these makes the session CONDSTORE-aware (ENABLE before SELECT).
CONDSTORE_ENABLING = ("ENABLE CONDSTORE", "SELECT INBOX (CONDSTORE)", "EXAMINE INBOX (CONDSTORE)",
                      "STATUS INBOX (HIGHESTMODSEQ)", "FETCH 1 (MODSEQ)",
                      "FETCH 1 (FLAGS) (CHANGEDSINCE 1)", "SEARCH MODSEQ 1",
                      "UID SEARCH RETURN (COUNT) MODSEQ 1",
                      "STORE 2 (UNCHANGEDSINCE 1) +FLAGS (\\Draft)")


async def test_every_condstore_enabling_command_brings_modseq_into_later_updates(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 7162 3.1: after any CONDSTORE enabling command, another session's flag change
    reaches this one as a FETCH with UID and MODSEQ; after a plain NOOP it does not."""
    await fill(deliver, 2)
    uid = (await uids_of(maildb))[0]

    def update_after(command: str) -> dict[bytes, Any]:
        raw, other = server.raw(ALICE), server.raw(ALICE)
        if command.startswith("ENABLE"):
            raw.ok(command)
        raw.ok("SELECT INBOX")
        if not command.startswith("ENABLE"):
            raw.ok(command)
        other.ok("SELECT INBOX")
        other.ok("STORE 1 +FLAGS (\\Flagged)")
        [update] = raw.ok("NOOP").parsed(b"FETCH")
        other.ok("STORE 1 -FLAGS (\\Flagged)")
        raw.close()
        other.close()
        return attrs(update)

    def dialog() -> None:
        for command in CONDSTORE_ENABLING:
            update = update_after(command)
            assert update.get(b"UID") == uid and b"MODSEQ" in update, (command, update)
        assert update_after("NOOP").keys() == {b"FLAGS"}

    await in_thread(dialog)


async def test_stores_that_change_nothing_leave_every_modseq_alone(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 7162 3.1.3: UNCHANGEDSINCE 0 fails for every message (a MODSEQ is at least 1) and
    changes nothing; RFC 7162 3.1: a STORE that leaves the flags as they were gives them no
    new MODSEQ, so the mailbox's HIGHESTMODSEQ stays too."""
    await fill(deliver, 2)
    uids = await uids_of(maildb)
    await maildb.store_flags(ALICE, "INBOX", uids[:1], "+", frozenset({"\\Seen"}))
    before = await maildb.list_messages(ALICE)
    highest = (await maildb.status(ALICE)).highestmodseq

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        never = raw.ok("STORE 1:2 (UNCHANGEDSINCE 0) +FLAGS (\\Flagged)")
        assert never.code == b"MODIFIED 1:2" and not never.lines(b"FETCH")
        never = raw.ok(f"UID STORE {uids[1]} (UNCHANGEDSINCE 0) -FLAGS (\\Seen)")
        assert never.code == f"MODIFIED {uids[1]}".encode()
        reported = [attrs(e)[b"MODSEQ"][0] for command in (
            "STORE 1 +FLAGS (\\Seen)", "STORE 2 -FLAGS (\\Seen)", "STORE 1 FLAGS (\\Seen)")
            for e in raw.ok(command).parsed(b"FETCH")]
        assert reported == [before[0].modseq, before[1].modseq, before[0].modseq]
        [status] = raw.ok("STATUS INBOX (HIGHESTMODSEQ)").lines(b"STATUS")
        assert status.endswith(b"(HIGHESTMODSEQ %d)" % highest)
        raw.close()

    await in_thread(dialog)
    assert await maildb.list_messages(ALICE) == before


# QRESYNC (RFC 7162 section 3.2)


async def test_qresync_select_reports_vanished_earlier(server: Server, deliver: Deliver,
                                                       maildb: MailDB) -> None:
    await fill(deliver, 5)
    uids = await uids_of(maildb)
    status = await maildb.status(ALICE)
    # while the client was offline: one expunged, one flagged
    await maildb.expunge(ALICE, "INBOX", [uids[1]])
    await maildb.store_flags(ALICE, "INBOX", [uids[3]], "+", frozenset({"\\Answered"}))

    def dialog() -> None:
        raw = server.raw(ALICE)
        assert raw.command("SELECT INBOX (QRESYNC (1 1))").status == "BAD"  # not ENABLEd
        enabled = raw.ok("ENABLE QRESYNC").lines(b"ENABLED")[0]
        assert b"QRESYNC" in enabled
        reply = raw.ok(f"SELECT INBOX (QRESYNC ({status.uidvalidity} {status.highestmodseq}))")
        assert reply.lines(b"VANISHED") == [f"* VANISHED (EARLIER) {uids[1]}".encode()]
        changed = reply.parsed(b"FETCH")
        assert [attrs(e)[b"UID"] for e in changed] == [uids[3]]
        assert b"\\Answered" in attrs(changed[0])[b"FLAGS"]

        # with QRESYNC, expunges are announced as VANISHED UIDs, not sequence numbers
        raw.ok(f"UID STORE {uids[0]} +FLAGS.SILENT (\\Deleted)")
        expunged = raw.ok("EXPUNGE")
        assert expunged.lines(b"VANISHED") == [f"* VANISHED {uids[0]}".encode()]
        assert not expunged.lines(b"EXPUNGE")
        fetch = raw.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {status.highestmodseq} VANISHED)")
        vanished = fetch.lines(b"VANISHED")
        assert len(vanished) == 1 and vanished[0].startswith(b"* VANISHED (EARLIER) ")
        # Exactly the expunged UIDs of the set asked about: none never assigned (RFC 7162
        # would allow more; a client then drops a UID it may yet be shown) and none outside.
        assert set(expand(vanished[0].split()[-1])) == {uids[0], uids[1]}
        fetch = raw.ok(f"UID FETCH {uids[1]}:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
        assert fetch.lines(b"VANISHED") == [f"* VANISHED (EARLIER) {uids[1]}".encode()]
        fetch = raw.ok(f"UID FETCH {uids[2]}:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
        assert fetch.lines(b"VANISHED") == []
        raw.close()

    await in_thread(dialog)



async def test_modseqs_sent_while_expunges_wait_come_with_a_highestmodseq_below_them(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 5162 erratum 1810 (kept in RFC 7162): a FETCH by sequence number may not hear of
    another session's expunge (RFC 3501 7.4.1), but its MODSEQs are above that expunge's.
    `OK [HIGHESTMODSEQ n]` below the expunge follows them, so a client whose connection
    drops now resynchronises from n and is told of the expunge (it never was, before)."""
    await fill(deliver, 3)
    uids = await uids_of(maildb)
    uidvalidity = (await maildb.status(ALICE)).uidvalidity

    def dialog() -> None:
        raw, other = server.raw(ALICE), server.raw(ALICE)
        raw.ok("ENABLE QRESYNC")
        raw.ok("SELECT INBOX")
        other.ok("SELECT INBOX")
        other.ok(f"UID STORE {uids[0]} +FLAGS.SILENT (\\Deleted)")
        other.ok(f"UID EXPUNGE {uids[0]}")
        other.ok(f"UID STORE {uids[1]} +FLAGS (\\Flagged)")
        fetched = raw.ok("FETCH 1 (FLAGS)")
        assert not fetched.lines(b"VANISHED")
        seen = max(attrs(e)[b"MODSEQ"][0] for e in fetched.parsed(b"FETCH")
                   if b"MODSEQ" in attrs(e))
        floors = [int(line.split(b"[HIGHESTMODSEQ ")[1].split(b"]")[0])
                  for line in fetched.untagged if b"[HIGHESTMODSEQ " in line]
        assert floors and fetched.untagged[-1].startswith(b"* OK [HIGHESTMODSEQ ")
        resync_from = floors[-1]  # the last one a client saw is where it resumes
        assert resync_from < seen
        raw.close()  # the connection drops before any command may announce the expunge

        again = server.raw(ALICE)
        again.ok("ENABLE QRESYNC")
        reply = again.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {resync_from}))")
        assert reply.lines(b"VANISHED") == [f"* VANISHED (EARLIER) {uids[0]}".encode()]
        again.close()
        other.close()

    await in_thread(dialog)


async def test_a_qresync_client_is_told_the_highestmodseq_its_own_append_made(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """A QRESYNC client keeps the last HIGHESTMODSEQ it was told as its resync point (RFC
    7162 6). After an APPEND into the selected mailbox (or new mail arriving) nothing told it
    the new one, so its next SELECT (QRESYNC ...) reported its own messages as changed:
    interimap took the user's flag change on the other side for a conflict and put the
    flag back. `OK [HIGHESTMODSEQ n]` now comes with the announcement."""
    await fill(deliver, 2)
    uidvalidity = (await maildb.status(ALICE)).uidvalidity

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("ENABLE QRESYNC")
        raw.ok("SELECT INBOX")
        appended = raw.literal_command(b"APPEND INBOX", b"Subject: mine\r\n\r\nbody\r\n")
        assert appended.status == "OK", appended
        noop = raw.ok("NOOP")
        told = [int(line.split(b"[HIGHESTMODSEQ ")[1].split(b"]")[0])
                for line in appended.untagged + noop.untagged if b"[HIGHESTMODSEQ " in line]
        raw.close()
        assert told, (appended.untagged, noop.untagged)
        again = server.raw(ALICE)
        again.ok("ENABLE QRESYNC")
        reply = again.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {told[-1]}))")
        assert not reply.lines(b"FETCH") and not reply.lines(b"VANISHED"), reply.untagged
        again.close()

    await in_thread(dialog)


async def test_examine_offers_no_permanent_flags_when_keywords_appear(
        server: Server, deliver: Deliver) -> None:
    """RFC 3501 7.1: PERMANENTFLAGS lists what the client can change for good, nothing in a
    read-only mailbox; a keyword another session made was announced with every flag and \\*
    to an EXAMINE session, whose STORE is still NO [READ-ONLY]."""
    await fill(deliver, 1)

    def dialog() -> None:
        raw, other = server.raw(ALICE), server.raw(ALICE)
        examined = raw.ok("EXAMINE INBOX")
        assert [line for line in examined.untagged if b"PERMANENTFLAGS" in line] == [
            b"* OK [PERMANENTFLAGS ()] Flags permitted"]
        other.ok("SELECT INBOX")
        other.ok("STORE 1 +FLAGS (NewKeyword1)")
        noop = raw.ok("NOOP")
        assert any(b"NewKeyword1" in line for line in noop.lines(b"FLAGS"))
        assert [line for line in noop.untagged if b"PERMANENTFLAGS" in line] == [
            b"* OK [PERMANENTFLAGS ()] Flags permitted"]
        assert raw.command("STORE 1 +FLAGS (\\Seen)").status == "NO"
        raw.close()
        other.close()

    await in_thread(dialog)


async def test_select_with_qresync_before_enable_is_refused_and_keeps_the_mailbox(
        server: Server, deliver: Deliver) -> None:
    """RFC 7162 3.2.5: SELECT (QRESYNC ...) without ENABLE QRESYNC is a BAD, and a command
    refused with BAD is not carried out: the mailbox selected before stays selected, and
    no [CLOSED] says otherwise."""
    await fill(deliver, 1)

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        for command in ("SELECT Archive (QRESYNC (1 1))", "EXAMINE INBOX (QRESYNC (1 1))"):
            refused = raw.command(command)
            assert (refused.status, refused.untagged) == ("BAD", []), refused
        assert len(raw.ok("FETCH 1 (UID)").lines(b"FETCH")) == 1  # INBOX, still selected
        raw.close()

    await in_thread(dialog)


async def test_qresync_enabled_after_unselect_reports_other_sessions_expunges_as_vanished(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 5161 3.1: ENABLE only outside a selected mailbox (after UNSELECT is fine); RFC
    7162 3.2.10: from then on another session's expunges come as VANISHED, between commands
    and in IDLE, never as EXPUNGE."""
    await fill(deliver, 3)
    uids = await uids_of(maildb)

    def dialog() -> None:
        raw, other = server.raw(ALICE), server.raw(ALICE)
        raw.ok("SELECT INBOX")
        assert raw.command("ENABLE QRESYNC").status == "BAD"
        raw.ok("UNSELECT")
        assert raw.ok("ENABLE QRESYNC").lines(b"ENABLED") == [b"* ENABLED QRESYNC"]
        raw.ok("SELECT INBOX")
        other.ok("SELECT INBOX")
        other.ok(f"UID STORE {uids[0]} +FLAGS.SILENT (\\Deleted)")
        other.ok("EXPUNGE")
        noop = raw.ok("NOOP")
        assert noop.lines(b"VANISHED") == [b"* VANISHED %d" % uids[0]]
        assert not noop.lines(b"EXPUNGE")

        raw.send(b"i1 IDLE\r\n")
        assert raw.response().startswith(b"+ ")
        other.ok(f"UID MOVE {uids[1]} Archive")
        assert raw.response() == b"* VANISHED %d" % uids[1]
        raw.send(b"DONE\r\n")
        assert raw.reply("i1").status == "OK"
        raw.close()
        other.close()

    await in_thread(dialog)


async def test_qresync_sequence_match_data_leaves_out_expunges_the_client_has_seen(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 7162 3.2.5.2: with (sequence numbers, UIDs) pairs that still hold, the client has
    seen every expunge up to the last of them; VANISHED (EARLIER) reports only later ones,
    even from a MODSEQ too old to say which expunges the client saw."""
    await fill(deliver, 6)
    uids = await uids_of(maildb)
    uidvalidity = (await maildb.status(ALICE)).uidvalidity
    await maildb.expunge(ALICE, "INBOX", [uids[1]])  # seen by the client before it left
    await maildb.expunge(ALICE, "INBOX", [uids[4]])  # while it was away
    seqs, known = "1:3", f"{uids[0]},{uids[2]},{uids[3]}"  # its view: 1 2 3 -> uids 0 2 3

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("ENABLE QRESYNC")
        everything = f"SELECT INBOX (QRESYNC ({uidvalidity} 1 1:{uids[-1]}"
        matched = raw.ok(f"{everything} ({seqs} {known})))").lines(b"VANISHED")
        assert matched == [f"* VANISHED (EARLIER) {uids[4]}".encode()]
        unmatched = raw.ok(f"{everything} (1:3 {uids[0]},{uids[1]},{uids[2]})))")
        assert unmatched.lines(b"VANISHED") == [  # pair 2 does not hold: from uid 0 on
            f"* VANISHED (EARLIER) {uids[1]},{uids[4]}".encode()]
        without = raw.ok(f"{everything}))").lines(b"VANISHED")
        assert without == [f"* VANISHED (EARLIER) {uids[1]},{uids[4]}".encode()]
        raw.close()

    await in_thread(dialog)


async def test_qresync_removals_end_with_the_new_highestmodseq(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 7162 3.2.7/3.2.9 and RFC 6851 4.4: EXPUNGE, UID EXPUNGE and MOVE that removed
    something tell a QRESYNC client the mailbox's new HIGHESTMODSEQ in the tagged OK; a
    resync from that value has nothing left to report. CLOSE must not (3.2.8), and without
    QRESYNC the code stays out."""
    await fill(deliver, 6)
    uids = await uids_of(maildb)
    uidvalidity = (await maildb.status(ALICE)).uidvalidity
    await maildb.create_mailbox(ALICE, "Archive/2026")

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("ENABLE QRESYNC")
        raw.ok("SELECT INBOX")
        raw.ok(f"UID STORE {uids[0]} +FLAGS.SILENT (\\Deleted)")
        removals = [raw.ok("EXPUNGE")]
        raw.ok(f"UID STORE {uids[1]} +FLAGS.SILENT (\\Deleted)")
        removals += [raw.ok(f"UID EXPUNGE {uids[1]}:{uids[2]}"),
                     raw.ok(f"UID MOVE {uids[2]} Archive/2026")]
        nothing_removed = raw.ok(f"UID EXPUNGE {uids[3]}")  # not \Deleted: stays
        highest = 0
        for removal in removals:
            code = removal.code.split()
            assert code[0] == b"HIGHESTMODSEQ" and int(code[1]) > highest, removal
            highest = int(code[1])
            assert removal.lines(b"VANISHED") and not removal.lines(b"EXPUNGE")  # 3.2.10
        assert nothing_removed.code == b""
        raw.ok(f"UID STORE {uids[4]} +FLAGS.SILENT (\\Deleted)")
        assert raw.ok("CLOSE").code == b""
        raw.close()

        again = server.raw(ALICE)
        status = again.ok("STATUS INBOX (HIGHESTMODSEQ)").lines(b"STATUS")[0]
        assert int(re.search(rb"HIGHESTMODSEQ (\d+)", status)[1]) > highest  # CLOSE's
        again.ok("ENABLE QRESYNC")
        reply = again.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {highest}))")
        assert reply.lines(b"VANISHED") == [f"* VANISHED (EARLIER) {uids[4]}".encode()]
        again.close()

        plain = server.raw(ALICE)
        plain.ok("SELECT INBOX")
        plain.ok(f"UID STORE {uids[5]} +FLAGS.SILENT (\\Deleted)")
        assert plain.ok("EXPUNGE").code == b""
        plain.close()

    await in_thread(dialog)


# ESEARCH (RFC 4731), SORT and THREAD (RFC 5256)


async def test_esearch(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    await fill(deliver, 5)
    uids = await uids_of(maildb)
    await maildb.store_flags(ALICE, "INBOX", uids[:1], "+", frozenset({"\\Seen"}))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        reply = raw.command("SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN", tag="e1")
        assert reply.lines(b"ESEARCH") == [b'* ESEARCH (TAG "e1") MIN 2 MAX 5 COUNT 4 ALL 2:5']
        uid_reply = raw.command("UID SEARCH RETURN (COUNT) ALL", tag="e2")
        assert uid_reply.lines(b"ESEARCH") == [b'* ESEARCH (TAG "e2") UID COUNT 5']
        plain = raw.command("SEARCH RETURN () SEEN", tag="e3")  # () means ALL
        assert plain.lines(b"ESEARCH") == [b'* ESEARCH (TAG "e3") ALL 1']
        empty = raw.command("SEARCH RETURN (MIN MAX ALL) DELETED", tag="e4")
        assert empty.lines(b"ESEARCH") == [b'* ESEARCH (TAG "e4")']
        assert not empty.lines(b"SEARCH")  # ESEARCH replaces the SEARCH response
        raw.close()

    await in_thread(dialog)



async def test_esearch_modseq_is_the_highest_of_the_messages_returned(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 4731 3.2 (RFC 7162 3.1.10): with only MIN and/or MAX asked for, the MODSEQ item
    is of the messages they name; with ALL or COUNT, of every message found."""
    await fill(deliver, 3)
    uids = await uids_of(maildb)
    await maildb.store_flags(ALICE, "INBOX", uids[1:2], "+", frozenset({"\\Flagged"}))
    first, middle, last = [m.modseq for m in await maildb.list_messages(ALICE)]
    assert middle > max(first, last)

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")

        def modseq(search: str) -> int:
            [line] = raw.ok(f"{search} MODSEQ 1").lines(b"ESEARCH")
            return int(line.rpartition(b" MODSEQ ")[2])

        assert modseq("SEARCH RETURN (MIN)") == first
        assert modseq("UID SEARCH RETURN (MAX)") == last
        assert modseq("SEARCH RETURN (MIN MAX)") == max(first, last)
        assert modseq("SEARCH RETURN (COUNT)") == modseq("SEARCH RETURN (MIN ALL)") == middle
        raw.close()

    await in_thread(dialog)


async def test_sort(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for subject, sender, date, size in (
            ("b", "zed@example.org", "Mon, 02 Mar 2026 10:00:00 +0000", 10),
            ("Re: a", "amy@example.org", "Sun, 01 Mar 2026 10:00:00 +0000", 300),
            ("c", "Bea <bea@example.org>", "Wed, 04 Mar 2026 10:00:00 +0000", 20),
            ("Fwd: A", "carl@example.org", "Tue, 03 Mar 2026 10:00:00 +0000", 100)):
        await deliver(ALICE, message(subject, "z" * size + "\r\n", sender=sender, date=date))
    uids = await uids_of(maildb)

    def dialog() -> None:
        client = server.client(ALICE)
        client.select_folder("INBOX")

        def order(*positions: int) -> list[int]:
            return [uids[p - 1] for p in positions]

        assert client.sort(["SUBJECT"]) == order(2, 4, 1, 3)  # base subjects, then by number
        assert client.sort(["DATE"]) == order(2, 1, 4, 3)
        assert client.sort(["REVERSE", "DATE"]) == order(3, 4, 1, 2)
        assert client.sort(["FROM"]) == order(2, 3, 4, 1)  # by mailbox, not display name
        assert client.sort(["SIZE"]) == order(1, 3, 4, 2)
        assert client.sort(["ARRIVAL"]) == order(1, 2, 3, 4)
        assert client.sort(["SIZE"], ["FROM", "example", "NOT", "SUBJECT", "c"]) == \
            order(1, 4, 2)
        with pytest.raises(IMAPClientError):
            client.sort(["NONSENSE"])
        client.logout()

        # RFC 7162 3.1.9: a SORT with a MODSEQ criterion that found something ends with the
        # highest MODSEQ of what it returns, as SEARCH does
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        raw.ok(f"UID STORE {uids[1]} +FLAGS.SILENT (\\Flagged)")
        flagged = raw.ok(f"UID FETCH {uids[1]} (MODSEQ)").parsed(b"FETCH")
        changed = attrs(flagged[0])[b"MODSEQ"][0]
        sorted_ = raw.ok(f"SORT (DATE) UTF-8 MODSEQ {changed}").lines(b"SORT")
        assert sorted_ == [b"* SORT 2 (MODSEQ %d)" % changed]
        searched = raw.ok(f"SEARCH MODSEQ {changed}").lines(b"SEARCH")
        assert searched == [b"* SEARCH 2 (MODSEQ %d)" % changed]
        assert raw.ok(f"SORT (DATE) UTF-8 MODSEQ {changed + 1}").lines(b"SORT") == [b"* SORT"]
        raw.close()

    await in_thread(dialog)


async def test_thread(server: Server, deliver: Deliver, maildb: MailDB) -> None:
    mails = [
        message("Plan", message_id="<1@t>", date="Sun, 01 Mar 2026 10:00:00 +0000"),
        message("Re: Plan", message_id="<2@t>", date="Mon, 02 Mar 2026 10:00:00 +0000",
                extra="In-Reply-To: <1@t>\r\nReferences: <1@t>\r\n"),
        message("Other", message_id="<3@t>", date="Tue, 03 Mar 2026 10:00:00 +0000"),
        message("Re: Plan", message_id="<4@t>", date="Wed, 04 Mar 2026 10:00:00 +0000",
                extra="References: <1@t> <2@t>\r\n"),
        message("Re: Plan", message_id="<5@t>", date="Thu, 05 Mar 2026 10:00:00 +0000",
                extra="References: <1@t>\r\n"),
    ]
    for data in mails:
        await deliver(ALICE, data)

    def dialog() -> None:
        client = server.client(ALICE, use_uid=False)
        algorithms = {c.decode().upper() for c in client.capabilities()
                      if c.upper().startswith(b"THREAD=")}
        assert "THREAD=REFERENCES" in algorithms or "THREAD=ORDEREDSUBJECT" in algorithms
        client.select_folder("INBOX")
        if "THREAD=REFERENCES" in algorithms:
            # 1 has children 2 (with child 4) and 5: (1 (2 4)(5)), then 3
            assert client.thread("REFERENCES") == ((1, (2, 4), (5,)), (3,))
        if "THREAD=ORDEREDSUBJECT" in algorithms:
            assert client.thread("ORDEREDSUBJECT") == ((1, (2,), (4,), (5,)), (3,))
        client.logout()

    await in_thread(dialog)


# QUOTA (RFC 9208)


async def test_quota_root_and_overquota(server: Server, deliver: Deliver, maildb: MailDB,
                                        imap_users: AccountDB) -> None:
    await fill(deliver, 2)
    imap_users.set_quota(ALICE, 40 * 1024)
    used = await maildb.usage(ALICE)

    def dialog() -> None:
        raw = server.raw(ALICE)
        reply = raw.ok("GETQUOTAROOT INBOX")
        roots = reply.parsed(b"QUOTAROOT")
        assert len(roots) == 1 and roots[0][1] == b"INBOX"
        root = roots[0][2] if len(roots[0]) > 2 else b""
        quotas = reply.parsed(b"QUOTA")
        assert len(quotas) == 1 and quotas[0][1] == root
        resource, usage, limit = quotas[0][2]
        assert resource.upper() == b"STORAGE" and limit == 40
        assert usage in (used // 1024, math.ceil(used / 1024))  # units of 1024 octets
        assert raw.ok(f'GETQUOTA "{root.decode()}"').parsed(b"QUOTA") == quotas

        big = message("too big", "x" * 76 + "\r\n" * 1 + ("y" * 78 + "\r\n") * 600)
        refused = raw.literal_command(b"APPEND INBOX", big)
        assert refused.status == "NO" and b"[OVERQUOTA]" in refused.text
        raw.ok("SELECT INBOX")
        assert raw.ok("COPY 1:* Archive").status == "OK"  # still fits
        raw.close()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE)) == 2
    assert len(await maildb.list_messages(ALICE, "Archive")) == 2

    imap_users.set_quota(ALICE, used * 2 - 1)  # copying both again would exceed it

    def copy_over() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        refused = raw.command("COPY 1:* Trash")
        assert refused.status == "NO" and b"[OVERQUOTA]" in refused.text
        raw.close()

    await in_thread(copy_over)
    assert await maildb.list_messages(ALICE, "Trash") == []


async def test_quota_details_of_rfc_9208(server: Server, deliver: Deliver, maildb: MailDB,
                                        imap_users: AccountDB) -> None:
    """DELETED-STORAGE (required with QUOTA=RES-STORAGE) and DELETED; GETQUOTAROOT of a
    mailbox not created yet; a limit that is no whole number of KiB does not look full."""
    await fill(deliver, 3)
    infos = await maildb.list_messages(ALICE)
    imap_users.set_quota(ALICE, 10 * 1024 * 1024 + 1)

    def dialog() -> tuple[list[bytes], Reply]:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        raw.ok("STORE 1,3 +FLAGS.SILENT (\\Deleted)")
        status = raw.ok("STATUS INBOX (MESSAGES DELETED DELETED-STORAGE)").lines(b"STATUS")
        root = raw.ok("GETQUOTAROOT NotCreatedYet")
        raw.close()
        return status, root

    status, root = await in_thread(dialog)
    deleted_kib = math.ceil((infos[0].size + infos[2].size) / 1024)
    assert status == [b"* STATUS INBOX (MESSAGES 3 DELETED 2 DELETED-STORAGE %d)" % deleted_kib]
    assert root.lines(b"QUOTAROOT") == [b'* QUOTAROOT NotCreatedYet ""']
    [quota] = root.parsed(b"QUOTA")
    assert quota[2][2] == 10 * 1024 + 1  # 10 MiB and one octet: rounded up


async def test_an_append_over_quota_is_refused_before_its_literal(
        server: Server, deliver: Deliver, maildb: MailDB, imap_users: AccountDB) -> None:
    """RFC 3501 7.5 lets the server answer NO instead of `+`: a message larger than the room
    left is refused before the client uploads it (a phone sent megabytes to hear NO), and
    the session goes on. One that fits exactly, and a mailbox name sent as a literal, get
    `+` as before; a non-synchronizing literal is still read, then refused."""
    await fill(deliver, 1)
    used = await maildb.usage(ALICE)
    room = 1000
    imap_users.set_quota(ALICE, used + room)
    fits = message("fits", "x" * (room - len(message("fits", ""))))
    assert len(fits) == room

    def dialog() -> tuple[Reply, Reply]:
        raw = server.raw(ALICE)
        raw.send(b"a1 APPEND INBOX (\\Seen) {%d}\r\n" % (room + 1))
        assert raw.response() == b"a1 NO [OVERQUOTA] Quota exceeded"  # not "+ Ready"
        raw.ok("NOOP")  # the session takes commands again, none swallowed as a literal
        by_name = raw.literal_command(b"APPEND {5}\r\nINBOX", fits)  # "+" for the name
        plus = raw.literal_command(b"APPEND INBOX", fits + b"y", plus=True)
        raw.close()
        return by_name, plus

    by_name, plus = await in_thread(dialog)
    assert by_name.status == "OK"
    assert plus.status == "NO" and plus.code == b"OVERQUOTA"
    assert await maildb.usage(ALICE) == used + room


async def test_an_append_whose_quota_cannot_be_checked_early_goes_on(
        server: Server, maildb: MailDB, imap_users: AccountDB,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check before `+` is an optimisation: when it fails, the client gets `+` and the
    APPEND checks the quota itself (the connection is not dropped)."""
    imap_users.set_quota(ALICE, 10_000)

    async def broken(user: str) -> int:
        raise RuntimeError("usage unreadable")

    def dialog() -> Reply:
        raw = server.raw(ALICE)
        reply = raw.literal_command(b"APPEND INBOX", message("still stored"))
        raw.close()
        return reply

    monkeypatch.setattr(maildb, "usage", broken)
    assert (await in_thread(dialog)).status == "OK"
    assert len(await maildb.list_messages(ALICE)) == 1


async def test_concurrent_idlers_each_get_their_own_updates(server: Server, deliver: Deliver
                                                            ) -> None:
    idlers = await asyncio.gather(*(in_thread(lambda: server.client(ALICE, use_uid=False))
                                    for _ in range(5)))

    def start(client: Any) -> None:
        client.select_folder("INBOX")
        client.idle()

    await asyncio.gather(*(in_thread(lambda c=c: start(c)) for c in idlers))
    await deliver(ALICE, message("one for everybody"))

    def collect(client: Any) -> None:
        assert 1 in numbers(collect_idle(client, lambda s: 1 in numbers(s, b"EXISTS")),
                            b"EXISTS")
        client.idle_done()
        client.logout()

    await asyncio.gather(*(in_thread(lambda c=c: collect(c)) for c in idlers))
