"""Two sessions on one mailbox: what one changes, the other learns between commands (RFC 3501
5.2, 7.4.1), never in the middle of a FETCH, STORE or SEARCH; other users see nothing."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from common.ids import new_queue_id
from services.store.backends.maildb import MailDB
from services.store.imap import lanes as lanes_module
from services.store.imap import responses as r
from services.store.imap import search as search_module
from services.store.imap import server as imap_server_module
from services.store.imap.server import LITERAL_CONTINUATION
from services.store.listening import SessionEndingServer
from services.store.mailbox import Delivery
from tests.integration.imap.clients import Raw, Reply, Server, in_thread, message, quote
from tests.integration.imap.conftest import ALICE, BOB, Deliver, ImapStack
from tests.support import (
    eventually,
    half_a_command_then_eof,
    session_ends_after_a_stalled_handshake,
)


@pytest.fixture
def server(imap_server: ImapStack) -> Server:
    return Server.of(imap_server)


def fetched_numbers(raw: Raw, command: str) -> tuple[str, list[int], list[bytes]]:
    reply = raw.command(command)
    return reply.status, [entry[0] for entry in reply.parsed(b"FETCH")], reply.lines(b"EXPUNGE")


async def test_expunge_in_one_session_reaches_the_other_between_commands(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    for n in range(5):
        await deliver(ALICE, message(f"m{n}"))
    uids = [m.uid for m in await maildb.list_messages(ALICE)]

    def dialog() -> None:
        watcher, actor = server.raw(ALICE), server.raw(ALICE)
        watcher.ok("SELECT INBOX")
        actor.ok("SELECT INBOX")
        actor.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        assert len(actor.ok("EXPUNGE").lines(b"EXPUNGE")) == 1

        # FETCH, STORE and SEARCH must not announce the expunge (7.4.1): the numbers the
        # watcher uses stay valid until it runs a command that may renumber.
        status, numbers, expunges = fetched_numbers(watcher, "FETCH 1:* (FLAGS)")
        assert not expunges
        assert status in ("OK", "NO")  # NO (EXPUNGEISSUED) is allowed for the gone message
        assert {1, 3, 4, 5} <= set(numbers)
        searched = watcher.ok("SEARCH ALL")
        assert not searched.lines(b"EXPUNGE")
        assert searched.lines(b"SEARCH")[0].split()[2:] in (
            [b"1", b"2", b"3", b"4", b"5"], [b"1", b"3", b"4", b"5"])
        assert not watcher.command("STORE 1 +FLAGS (\\Seen)").lines(b"EXPUNGE")

        noop = watcher.ok("NOOP")
        assert noop.lines(b"EXPUNGE") == [b"* 2 EXPUNGE"]
        status, numbers, _ = fetched_numbers(watcher, "FETCH 1:* (UID)")
        assert status == "OK" and numbers == [1, 2, 3, 4]
        uid_map = [entry[2][1] for entry in watcher.ok("FETCH 1:* (UID)").parsed(b"FETCH")]
        assert uid_map == [uids[0], *uids[2:]]
        watcher.close()
        actor.close()

    await in_thread(dialog)


async def test_flags_and_new_messages_from_one_session_appear_in_the_other(
        server: Server, deliver: Deliver) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))

    def dialog() -> None:
        watcher, actor = server.raw(ALICE), server.raw(ALICE)
        watcher.ok("EXAMINE INBOX")  # read-only sessions are told as well
        actor.ok("SELECT INBOX")
        actor.ok("STORE 3 +FLAGS.SILENT (\\Flagged $Todo)")
        assert actor.literal_command(b"APPEND INBOX", message("new"), plus=True).status == "OK"

        noop = watcher.ok("NOOP")
        changes = noop.parsed(b"FETCH")
        assert 3 in [entry[0] for entry in changes]
        assert not {1, 2} & {entry[0] for entry in changes}
        third = next(entry for entry in changes if entry[0] == 3)
        flags = dict(zip(third[2][::2], third[2][1::2], strict=True))[b"FLAGS"]
        assert {b"\\Flagged", b"$Todo"} <= set(flags)
        assert noop.lines(b"EXISTS") == [b"* 4 EXISTS"]
        assert not watcher.ok("NOOP").untagged  # told once only
        watcher.close()
        actor.close()

    await in_thread(dialog)


async def test_move_by_another_session_is_an_expunge_here(server: Server, deliver: Deliver,
                                                         maildb: MailDB) -> None:
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))

    def dialog() -> None:
        watcher = server.client(ALICE, use_uid=False)
        watcher.select_folder("INBOX")
        actor = server.client(ALICE)
        actor.select_folder("INBOX")
        actor.move(actor.search()[:1], "Archive")
        _, responses = watcher.noop()
        assert (1, b"EXPUNGE") in responses
        assert watcher.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
        watcher.logout()
        actor.logout()

    await in_thread(dialog)
    assert len(await maildb.list_messages(ALICE)) == 2


async def test_other_users_mailboxes_are_invisible(server: Server) -> None:
    def dialog() -> None:
        bob = server.raw(BOB)
        bob.ok("SELECT INBOX")
        alice = server.client(ALICE)
        alice.create_folder("Private")
        alice.append("INBOX", message("for alice only"))
        assert not bob.ok("NOOP").untagged
        names = [entry[-1] for entry in bob.ok('LIST "" "*"').parsed(b"LIST")]
        assert b"Private" not in names
        assert bob.command("SELECT Private").status == "NO"
        assert bob.command(f'SELECT "../{ALICE}/INBOX"').status in ("NO", "BAD")
        assert bob.ok("STATUS INBOX (MESSAGES)").parsed(b"STATUS")[0][2] == (b"MESSAGES", 0)
        bob.close()
        alice.logout()

    await in_thread(dialog)


async def test_own_append_and_copy_into_the_selected_mailbox_report_exists(
        server: Server, deliver: Deliver) -> None:
    await deliver(ALICE, message("first"))

    def dialog() -> None:
        raw = server.raw(ALICE)
        raw.ok("SELECT INBOX")
        # RFC 3501 6.3.11: the server SHOULD notify the client immediately via EXISTS
        appended = raw.literal_command(b"APPEND INBOX", message("second"))
        assert appended.status == "OK"
        assert appended.lines(b"EXISTS") == [b"* 2 EXISTS"]
        copied = raw.ok("COPY 1:2 INBOX")
        assert copied.lines(b"EXISTS") == [b"* 4 EXISTS"]
        logout = raw.command("LOGOUT")
        assert logout.status == "OK" and logout.lines(b"BYE")
        raw.close()

    await in_thread(dialog)


def after_expunges_elsewhere(server: Server, command: str) -> tuple[Reply, Reply]:
    """Two sessions on INBOX; the second expunges messages 1 and 2, then the first, not yet
    told, runs `command` and a FETCH 1:* (UID). Returns both replies."""
    first, second = server.raw(ALICE), server.raw(ALICE)
    first.ok("SELECT INBOX")
    second.ok("SELECT INBOX")
    second.ok("STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    second.ok("EXPUNGE")
    reply = first.ok(command)
    after = first.ok("FETCH 1:* (UID)")
    first.close()
    second.close()
    return reply, after


@pytest.mark.parametrize("verb", ["MOVE", "COPY"])
async def test_message_numbers_mean_what_they_meant_when_sent(
        server: Server, deliver: Deliver, maildb: MailDB, verb: str) -> None:
    """Another session expunged messages 1 and 2; this session still numbers them as before.
    `MOVE 3:4` / `COPY 3:4` must take its third and fourth message, not the ones the numbers
    would name after the expunges were announced (RFC 3501 7.4.1: numbers shift only when
    this session is told)."""
    for n in range(5):
        await deliver(ALICE, message(f"m{n}"))
    uids = [m.uid for m in await maildb.list_messages(ALICE)]

    reply, after = await in_thread(lambda: after_expunges_elsewhere(server, f"{verb} 3:4 Archive"))
    source_set = reply.code.split()[2] if verb == "COPY" else next(
        line for line in reply.untagged if b"COPYUID" in line).split()[4]
    assert source_set == f"{uids[2]}:{uids[3]}".encode(), reply
    archived = await maildb.list_messages(ALICE, "Archive")
    assert len(archived) == 2
    left = [entry[2][1] for entry in after.parsed(b"FETCH")]
    assert left == ([uids[4]] if verb == "MOVE" else uids[2:])


async def test_a_sequence_set_in_a_uid_search_means_the_numbers_as_sent(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """UID SEARCH may announce expunges, but a sequence set among its keys still uses the
    numbering the client had when it sent the command."""
    for n in range(5):
        await deliver(ALICE, message(f"m{n}"))
    uids = [m.uid for m in await maildb.list_messages(ALICE)]

    reply, _ = await in_thread(lambda: after_expunges_elsewhere(server, "UID SEARCH 3:4"))
    assert reply.lines(b"SEARCH") == [b"* SEARCH %d %d" % (uids[2], uids[3])], reply


async def test_a_selected_mailbox_renamed_elsewhere_is_followed(
        server: Server, maildb: MailDB) -> None:
    """Another session renames the selected mailbox and creates a new one under the old name:
    this session stays with its messages (the same UIDVALIDITY), under the new name."""
    def dialog() -> tuple[Reply, Reply]:
        watcher, renamer = server.raw(ALICE), server.raw(ALICE)
        renamer.ok("CREATE Work")
        for n in range(2):
            renamer.literal_command(b"APPEND Work", message(f"w{n}"), plus=True)
        watcher.ok("SELECT Work")
        renamer.ok("RENAME Work Job")
        renamer.ok("CREATE Work")
        renamer.literal_command(b"APPEND Work", message("in the new Work"), plus=True)
        quiet = watcher.ok("NOOP")
        watcher.ok("STORE 1 +FLAGS.SILENT (\\Flagged)")
        renamer.literal_command(b"APPEND Job", message("j"), plus=True)
        grown = watcher.ok("NOOP")
        watcher.close()
        renamer.close()
        return quiet, grown

    quiet, grown = await in_thread(dialog)
    assert not quiet.lines(b"EXISTS") and not quiet.lines(b"EXPUNGE"), quiet
    assert grown.lines(b"EXISTS") == [b"* 3 EXISTS"], grown
    assert "\\Flagged" in (await maildb.list_messages(ALICE, "Job"))[0].flags
    assert "\\Flagged" not in (await maildb.list_messages(ALICE, "Work"))[0].flags


@pytest.mark.parametrize("waiting_in", ["NOOP", "IDLE"])
async def test_a_selected_mailbox_deleted_elsewhere_ends_the_session(
        server: Server, waiting_in: str, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing is left to show or change: the session gets a BYE saying why and is closed
    (the client reconnects and lists the mailboxes again), instead of NO to every command.
    In IDLE only the BYE: a tagged reply before the client's DONE broke clients (imapclient's
    idle_check), and the IDLE's read still waiting made the close fail with an ERROR."""
    caplog.set_level(logging.ERROR)

    def dialog() -> tuple[bytes, bytes, bool]:
        watcher, deleter = server.raw(ALICE), server.raw(ALICE)
        deleter.ok("CREATE Work")
        watcher.ok("SELECT Work")
        if waiting_in == "IDLE":
            watcher.send(b"i1 IDLE\r\n")
            assert watcher.response().startswith(b"+")
            deleter.ok("DELETE Work")
        else:
            deleter.ok("DELETE Work")
            watcher.send(b"i1 NOOP\r\n")
        bye = watcher.response()
        tagged = watcher.response()  # in IDLE: the end of the connection
        closed = watcher.closed()
        deleter.ok("NOOP")  # the other session is unaffected
        deleter.close()
        return bye, tagged, closed

    bye, tagged, closed = await in_thread(dialog)
    assert bye == b"* BYE The selected mailbox was deleted by another session"
    if waiting_in == "NOOP":
        assert tagged.startswith(b"i1 NO [NONEXISTENT]"), tagged
    else:
        assert tagged == b"", tagged
    assert closed
    assert not caplog.records, caplog.text


async def test_close_of_a_mailbox_deleted_elsewhere_just_leaves_it(server: Server) -> None:
    """CLOSE would expunge the \\Deleted messages; with the mailbox gone there are none
    left, and the session is back in the authenticated state, not ended."""
    def dialog() -> tuple[Reply, Reply]:
        closer, deleter = server.raw(ALICE), server.raw(ALICE)
        deleter.ok("CREATE Work")
        deleter.literal_command(b"APPEND Work (\\Deleted)", message("w"), plus=True)
        closer.ok("SELECT Work")
        deleter.ok("DELETE Work")
        closed, listed = closer.command("CLOSE"), closer.command('LIST "" "*"')
        closer.close()
        deleter.close()
        return closed, listed

    closed, listed = await in_thread(dialog)
    assert closed.status == "OK", closed
    assert listed.status == "OK" and not listed.lines(b"BYE"), listed


async def test_close_expunges_what_has_deleted_now_not_what_it_saw(
        server: Server, deliver: Deliver, maildb: MailDB) -> None:
    """RFC 3501 6.4.2: CLOSE removes the messages that have \\Deleted. Another session's
    flag changes since this session's last command count: a message restored there stays
    (it used to be removed: lost mail), one deleted there goes."""
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))
    uids = [m.uid for m in await maildb.list_messages(ALICE)]

    def dialog() -> None:
        closer, other = server.raw(ALICE), server.raw(ALICE)
        closer.ok("SELECT INBOX")
        closer.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        other.ok("SELECT INBOX")
        other.ok("STORE 1 -FLAGS.SILENT (\\Deleted)")
        other.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        closed = closer.ok("CLOSE")
        assert not closed.lines(b"EXPUNGE") and not closed.lines(b"FETCH"), closed
        assert other.ok("NOOP").lines(b"EXPUNGE") == [b"* 2 EXPUNGE"]
        closer.close()
        other.close()

    await in_thread(dialog)
    assert [m.uid for m in await maildb.list_messages(ALICE)] == [uids[0], uids[2]]


async def test_search_recent_is_the_messages_this_session_claimed(
        server: Server, deliver: Deliver) -> None:
    """\\Recent belongs to the first session that sees a message (RFC 3501 2.3.2); when
    another session claimed one between two of ours, SEARCH RECENT, NEW and OLD must agree
    with FETCH FLAGS (they used to take every UID from our first recent one on)."""
    await deliver(ALICE, message("m0"))

    def dialog() -> tuple[list[bytes], ...]:
        one, two, appender = server.raw(ALICE), server.raw(ALICE), server.raw(ALICE)
        one.ok("SELECT INBOX")  # claims m0
        two.ok("SELECT INBOX")
        appender.literal_command(b"APPEND INBOX", message("m1"), plus=True)
        two.ok("NOOP")  # claims m1
        appender.literal_command(b"APPEND INBOX", message("m2"), plus=True)
        one.ok("NOOP")  # claims m2
        flags = one.ok("FETCH 1:* (FLAGS)").lines(b"FETCH")
        found = (one.ok(f"SEARCH {key}").lines(b"SEARCH") for key in ("RECENT", "NEW", "OLD"))
        result = (flags, *found)
        for session in (one, two, appender):
            session.close()
        return result

    flags, recent, new, old = await in_thread(dialog)
    assert [b"\\Recent" in line for line in flags] == [True, False, True], flags
    assert recent == new == [b"* SEARCH 1 3"]
    assert old == [b"* SEARCH 2"]


async def test_short_commands_are_served_while_long_ones_wait_their_turn(
        imap_server: ImapStack, deliver: Deliver) -> None:
    """services/store/imap/lanes.py: while the long lane is taken, a SELECT waits for it and
    a short command of another session is answered meanwhile."""
    for n in range(3):
        await deliver(ALICE, message(f"m{n}"))
    server = Server.of(imap_server)
    lanes = imap_server.deps.lanes
    selecting, other = await in_thread(lambda: (server.raw(ALICE), server.raw(ALICE)))
    await in_thread(lambda: other.ok("SELECT INBOX"))
    try:
        async with lanes.long():  # as if another long command were running
            select = asyncio.ensure_future(in_thread(lambda: selecting.ok("SELECT INBOX")))
            await eventually(lambda: lanes.waiting == 1, within=10, what="SELECT waiting")
            await in_thread(lambda: other.ok("NOOP"))
            await in_thread(lambda: other.ok("FETCH 1:3 (FLAGS)"))  # a short set
            assert not select.done()
        assert b"* 3 EXISTS" in b"\n".join((await select).lines(b"EXISTS"))
    finally:
        selecting.close()
        other.close()


async def test_a_long_search_lets_other_sessions_long_commands_in_between(
        imap_server: ImapStack, maildb: MailDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """SEARCH TEXT with a needle too short for the text index reads and parses every message
    (a minute for large multiparts); it lets a SELECT waiting for the long lane go first
    once it has had the lane for LONG_SLICE (0 here: at its next step)."""
    monkeypatch.setattr(lanes_module, "LONG_SLICE", 0.0)
    body = b"Subject: s\r\n\r\n" + b"some text without the needles\r\n" * 50
    await maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time())
                          for _ in range(500)])
    server = Server.of(imap_server)
    lanes = imap_server.deps.lanes
    searcher, selector = await in_thread(lambda: (server.raw(ALICE), server.raw(BOB)))
    await in_thread(lambda: searcher.ok("SELECT INBOX"))
    finished: list[str] = []

    def run(client: Raw, command: str, name: str) -> Reply:
        reply = client.ok(command)
        finished.append(name)
        return reply

    try:
        async with lanes.long():  # the SEARCH, then the SELECT, queue for the lane
            search = asyncio.ensure_future(in_thread(
                lambda: run(searcher, "SEARCH NOT TEXT q1 NOT TEXT q2 NOT TEXT q3", "search")))
            await eventually(lambda: lanes.waiting == 1, within=10, what="SEARCH waiting")
            select = asyncio.ensure_future(in_thread(
                lambda: run(selector, "SELECT INBOX", "select")))
            await eventually(lambda: lanes.waiting == 2, within=10, what="SELECT waiting")
        found, _ = await asyncio.gather(search, select)
    finally:
        searcher.close()
        selector.close()
    assert found.lines(b"SEARCH") == [b"* SEARCH " + b" ".join(b"%d" % n for n in range(1, 501))]
    assert finished == ["select", "search"]


async def test_a_client_that_stops_reading_does_not_hold_up_long_commands(
        imap_server: ImapStack, maildb: MailDB) -> None:
    """A FETCH of every body to a client that reads nothing fills the socket buffers and then
    waits (until the autologout timer); meanwhile another session's SELECT, also a long
    command, is answered."""
    body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 8
    await maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time())
                          for _ in range(1000)])  # 8 MB: more than any socket buffer holds
    server = Server.of(imap_server)
    lanes = imap_server.deps.lanes

    def stalled_fetch() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.settimeout(10)
        sock.recv(4096)  # greeting
        login = f'a LOGIN {ALICE} "{server.users[ALICE]}"\r\n'.encode()
        sock.sendall(login + b"b SELECT INBOX\r\nc FETCH 1:* (BODY.PEEK[])\r\n")
        return sock  # and never read again

    stalled = await in_thread(stalled_fetch)
    other = await in_thread(lambda: server.raw(ALICE))
    try:
        # The stalled session's SELECT took one turn, its FETCH the next, and a FETCH that
        # waited for its client took another after each wait.
        await eventually(lambda: lanes.turns >= 2, within=10, what="the FETCH under way")
        reply = await in_thread(lambda: other.ok("SELECT INBOX"))
        assert b"* 1000 EXISTS" in b"\n".join(reply.lines(b"EXISTS"))
    finally:
        stalled.close()
        other.close()


async def test_a_session_waiting_for_its_client_holds_up_no_long_command(
        imap_server: ImapStack) -> None:
    """A long command's steps wait for the short commands in progress (lanes.py); a command
    waiting for its client is none: an AUTHENTICATE whose `+` is never answered (anyone can
    send one) or an IDLE (every desktop client sits in one) would otherwise cost every step
    of every other session's long commands the whole SHORT_FIRST_WAIT, all the time."""
    server = Server.of(imap_server)
    lanes = imap_server.deps.lanes
    authenticating = await in_thread(server.raw)
    idling = await in_thread(lambda: server.raw(ALICE))

    def start_waiting() -> None:
        authenticating.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert authenticating.response() == b"+ "
        idling.ok("SELECT INBOX")
        idling.send(b"i1 IDLE\r\n")
        assert idling.response().startswith(b"+ ")

    try:
        await in_thread(start_waiting)
        await eventually(lambda: lanes.short_running == 0, within=10,
                         what="no short command in progress")
        await in_thread(lambda: idling.send(b"DONE\r\n"))
        assert (await in_thread(lambda: idling.reply("i1"))).status == "OK"
        await in_thread(lambda: authenticating.send(b"*\r\n"))
        assert (await in_thread(lambda: authenticating.reply("a1"))).status == "BAD"
        assert lanes.short_running == 0
    finally:
        authenticating.close()
        idling.close()



@dataclass
class AbandonedSearch:
    client: Raw
    total: int  # scan batches the whole SEARCH takes
    ran: list[list[int]] = field(default_factory=list)  # the batches it scanned


async def _abandoned_search(imap_server: ImapStack, maildb: MailDB,
                            monkeypatch: pytest.MonkeyPatch,
                            leave: Callable[[Raw], None], *, tls: bool = False
                            ) -> AbandonedSearch:
    """A SEARCH that reads every message (needles too short for the text index), queued for
    the long lane while its client does `leave`, then let go."""
    body = b"Subject: s\r\n\r\n" + b"some text without the needles\r\n" * 50
    await maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time())
                          for _ in range(320)])
    lanes = imap_server.deps.lanes
    server = Server.of(imap_server)

    def selected() -> Raw:
        raw = Raw.connect(server.tls_port, tls=True) if tls else Raw.connect(server.port)
        raw.ok(f"LOGIN {quote(ALICE)} {quote(server.users[ALICE])}")
        raw.ok("SELECT INBOX")
        return raw

    client = await in_thread(selected)
    found = AbandonedSearch(client, total=3 * 320 // search_module.SCAN_BATCH)
    scan_batches = search_module._scan_batches

    def counted(*args: Any) -> Iterator[list[int]]:
        for batch in scan_batches(*args):
            found.ran.append(batch)
            yield batch

    monkeypatch.setattr(search_module, "_scan_batches", counted)
    async with lanes.long():
        await in_thread(lambda: client.send(b"s1 SEARCH NOT TEXT q1 NOT TEXT q2 NOT TEXT q3\r\n"))
        await eventually(lambda: lanes.waiting == 1, within=10, what="SEARCH waiting")
        await in_thread(lambda: leave(client))
    return found


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_command_whose_client_closed_the_connection_ends_at_its_next_steps(
        imap_server: ImapStack, maildb: MailDB, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tls: bool) -> None:
    """Nothing reads the socket while a command runs, so a client's close shows only when
    something is sent to it: at its next step the command sends `* OK Still working`, the
    closed socket answers with a reset, and a step after ends the command. Before, an
    abandoned SEARCH ran to its end, holding the long lane (40 of them delayed other users'
    SELECT by seconds) and a core. Over TLS the close ends the connection at once."""
    caplog.set_level(logging.INFO, logger="services.store.imap.server")
    search = await _abandoned_search(imap_server, maildb, monkeypatch, Raw.close, tls=tls)
    await eventually(lambda: "connection ended: lost" in caplog.text, within=30,
                     what="the session ended as lost")
    assert len(search.ran) < search.total // 2, f"{len(search.ran)} of {search.total} batches"
    assert imap_server.deps.lanes.waiting == 0


async def test_a_command_whose_client_only_half_closed_runs_to_its_end(
        imap_server: ImapStack, maildb: MailDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script that sends its commands and shuts down its sending side (`nc -N`) still
    reads: it gets the whole answer, after one `* OK Still working` line."""
    search = await _abandoned_search(imap_server, maildb, monkeypatch,
                                     lambda raw: raw.sock.shutdown(socket.SHUT_WR))
    try:
        reply = await in_thread(lambda: search.client.reply("s1"))
    finally:
        search.client.close()
    assert reply.status == "OK"
    assert reply.lines(b"SEARCH") == [b"* SEARCH " + b" ".join(b"%d" % n for n in range(1, 321))]
    assert reply.lines(b"OK") == [r.OK_STILL_WORKING.untagged().rstrip(b"\r\n")]
    assert len(search.ran) == search.total


async def test_a_half_closed_client_gets_a_large_fetch_intact(
        imap_server: ImapStack, maildb: MailDB) -> None:
    """A message over 256 KiB goes out in pieces with steps between them; the line sent to
    a client that closed its side (`* OK Still working`) must not land inside its literal
    (it did: 36 octets of the message replaced, the rest of the stream shifted)."""
    body = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 3000  # 3 MB
    await maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time())])
    server = Server.of(imap_server)

    def fetch_half_closed() -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the FETCH waits for us
        sock.connect(("127.0.0.1", server.port))
        sock.settimeout(30)
        login = f'a LOGIN {ALICE} "{server.users[ALICE]}"\r\n'.encode()
        sock.sendall(login + b"b SELECT INBOX\r\n")
        received = b""
        while b"\r\nb OK" not in received:  # the FIN must come during the FETCH
            received += sock.recv(65536)
        sock.sendall(b"c FETCH 1 BODY.PEEK[]\r\nd LOGOUT\r\n")
        sock.shutdown(socket.SHUT_WR)  # as `nc -N` does
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        return received

    received = await in_thread(fetch_half_closed)
    announced = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body)
    assert announced in received, received[:500]
    start = received.index(announced) + len(announced)
    assert received[start:start + len(body)] == body
    assert received[start + len(body):].startswith(b")\r\nc OK")
    assert b"d OK" in received
    assert received.count(r.OK_STILL_WORKING.untagged()) <= 1


@pytest.mark.timeout(60)  # a read loop spinning on the end of the stream holds the event loop
@pytest.mark.parametrize(("sent", "answered"), [
    (b"a NOOP", b""),
    (b"a LOGIN {5}\r\nali", LITERAL_CONTINUATION),
], ids=["in-the-line", "in-a-literal"])
async def test_a_client_that_closes_mid_command_ends_its_session(
        imap_server: ImapStack, sent: bytes, answered: bytes) -> None:
    """The end of the client's stream in the middle of a command (its line or a literal)
    ends the session: the half command is neither run nor answered, and the store hangs up.
    A read loop that took the end of the stream for more input would spin for good (here
    the test's timeout mark ends it, since it holds the event loop, so no wait of the test
    itself can); one that took it for an empty line would answer BADs, or run the half
    command."""
    plain = imap_server.servers[0]
    assert isinstance(plain, SessionEndingServer)

    said = await asyncio.to_thread(half_a_command_then_eof, imap_server.port, b"* OK", sent)
    assert said == answered
    await eventually(lambda: plain.sessions == 0, within=30, what="the session to end")


async def test_a_client_stalled_in_the_starttls_handshake_is_let_go(
        imap_server: ImapStack, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    await session_ends_after_a_stalled_handshake(
        monkeypatch, caplog, imap_server_module, imap_server.port, b"a STARTTLS\r\n",
        ended="TLS handshake failed: the handshake did not finish in time")
