"""Three IMAP sessions, deliveries and POP3 sessions on one INBOX, checked against a model:
what test_sessions_model.py checks (every session's numbering and flags follow from what it
was told) plus what that test leaves out: when the server may announce expunges (RFC 3501
7.4.1: never during FETCH, STORE or SEARCH by number), CLOSE, SELECT and EXAMINE of the
mailbox already selected (sessions switch between read-write and read-only), STORE
UNCHANGEDSINCE against another session's change (RFC 7162 3.1.3), HIGHESTMODSEQ never going
back, \\Recent given to exactly one read-write session (RFC 3501 2.3.2; EXAMINE shows it but
never takes it), a read-only session changing nothing (not even \\Seen by BODY[]; CLOSE
expunges nothing), and a POP3 session's DELE+QUIT (while it holds the maildrop a second POP3
login is refused) announced to the IMAP sessions as expunges.
"""

from __future__ import annotations

import asyncio
import poplib
import random
import re
from collections.abc import Callable
from contextlib import closing

import pytest

from services.store.backends.maildb import MailDB
from services.store.imap.protocol.sequence import format_set
from services.store.mailbox import ARCHIVE, MessageInfo
from services.store.pop3.server import start_pop3_servers
from tests.integration.imap.clients import TIMEOUT, Raw, Reply, Server, in_thread, message
from tests.integration.imap.conftest import ALICE, USERS, Deliver, ImapStack
from tests.integration.imap.test_sessions_model import (
    FETCH_LINE,
    FLAGS,
    FLAGS_ITEM,
    HIGHESTMODSEQ,
    NUMBERED,
    UID_ITEM,
    VANISHED,
    Model,
    View,
    fetch_all,
    parse_flags,
)
from tests.support import free_port

MODSEQ_ITEM = re.compile(rb"\bMODSEQ \((\d+)\)")
MODIFIED = re.compile(rb"\[MODIFIED ([\d:,]+)\]")


class Session(View):
    """A View that also knows whether it is read-only, which messages it was shown as
    \\Recent while read-write, and the highest HIGHESTMODSEQ it was told."""

    def __init__(self, raw: Raw, name: str, *, qresync: bool = False,
                 condstore: bool = False) -> None:
        super().__init__(raw, name, qresync=qresync)
        if condstore:
            self.raw.ok("ENABLE CONDSTORE")
        self.condstore = condstore or qresync  # also once it uses MODSEQ (RFC 7162 3.1)
        self.modseqs: dict[int, int] = {}
        self.readonly = False
        self.selected = False
        self.recent: set[int] = set()
        self.highestmodseq = 0
        self.uidvalidity = 0
        self.idling = False

    def run(self, command: str, *, expunges: bool = True) -> Reply:
        reply = self.raw.command(command)
        if not expunges:
            assert_no_expunge(self.name, command, reply)
        self.absorb(reply)
        return reply

    def absorb(self, reply: Reply) -> None:
        for line in [*reply.untagged, reply.text]:
            highest = HIGHESTMODSEQ.search(line)
            if highest:
                self.saw_highestmodseq(int(highest.group(1)), line)
            numbered = NUMBERED.match(line)
            # RFC 7162 3.2.10: with QRESYNC enabled, expunges are VANISHED only
            assert not (self.qresync and numbered and numbered.group(2) == b"EXPUNGE"), (
                self.name, line)
        super().absorb(reply)

    def saw_highestmodseq(self, value: int, line: bytes) -> None:
        assert value >= self.highestmodseq, (self.name, line, self.highestmodseq)
        self.highestmodseq = value

    def _fetched(self, number: int, items: bytes, line: bytes) -> None:
        super()._fetched(number, items, line)
        modseq = MODSEQ_ITEM.search(items)
        if modseq:  # a message's MODSEQ only grows, and never past the mailbox's
            uid = self.uids[number - 1]
            value = int(modseq.group(1))
            assert value >= self.modseqs.get(uid, 0), (self.name, line, self.modseqs[uid])
            self.modseqs[uid] = value
        flags = FLAGS_ITEM.search(items)
        if flags and b"\\Recent" in flags.group(1).split() and not self.readonly:
            self.recent.add(self.uids[number - 1])

    def _learn_new(self) -> None:
        """As View's, but a FETCH by number: no expunge may come with it. Not in IDLE."""
        while 0 in self.uids and not self.idling:
            reply = self.run(f"FETCH {self.uids.index(0) + 1}:* (UID FLAGS)", expunges=False)
            assert reply.status == "OK", (self.name, reply)

    def select(self, readonly: bool, *, resync: bool = False) -> Reply:
        """SELECT or EXAMINE INBOX, also when it is selected already (RFC 3501 6.3.1: the
        mailbox is deselected first; RFC 7162 3.2.11: `OK [CLOSED]` marks where the old
        mailbox's responses end). With `resync` (a QRESYNC session that selected before) the
        session keeps its UIDs and flags and catches up with SELECT (QRESYNC ...) (RFC 7162
        3.2.5): VANISHED (EARLIER) and FETCH of what changed since its HIGHESTMODSEQ."""
        was_selected, cache = self.selected, dict(self.flags)
        verb = "EXAMINE" if readonly else "SELECT"
        resync = resync and self.qresync and self.uidvalidity > 0
        since = f" (QRESYNC ({self.uidvalidity} {self.highestmodseq}))" * resync
        reply = self.raw.command(f"{verb} INBOX{since}")
        assert reply.status == "OK", (self.name, reply)
        closed = [i for i, line in enumerate(reply.untagged) if b"[CLOSED]" in line]
        # RFC 7162 3.2.11 (and RFC 9051 7.1): a server offering QRESYNC sends it to every
        # client, enabled or not, and only when a mailbox was selected.
        assert len(closed) == was_selected, (self.name, reply)
        start = closed[0] + 1 if closed else 0
        # What follows is about the mailbox selected now: a numbered EXPUNGE here would be
        # ambiguous, since the client cannot tell which selection it is about.
        new = Reply(reply.untagged[start:], reply.status, reply.text)
        assert_no_expunge(self.name, verb, new)
        self.readonly, self.selected = readonly, True
        uidvalidity = re.search(rb"\[UIDVALIDITY (\d+)\]", b"\n".join(new.untagged))
        assert uidvalidity, (self.name, reply)
        self.uidvalidity = int(uidvalidity.group(1))
        if resync:
            self.catch_up(new, cache)
        else:
            self.uids, self.flags = [], {}
            self.absorb(new)
        assert (b"[READ-ONLY]" in reply.text) == readonly, (self.name, reply)
        return reply

    def catch_up(self, reply: Reply, cache: dict[int, frozenset[str]]) -> None:
        exists = 0
        for line in [*reply.untagged, reply.text]:
            highest = HIGHESTMODSEQ.search(line)
            if highest:
                self.saw_highestmodseq(int(highest.group(1)), line)
            numbered = NUMBERED.match(line)
            if numbered and numbered.group(2) == b"EXISTS":
                exists = int(numbered.group(1))
            vanished = VANISHED.match(line)
            if vanished:
                for uid in expand_set(vanished.group(1)):
                    cache.pop(uid, None)
            fetched = FETCH_LINE.match(line)
            if fetched:
                uid_item, flags_item = (UID_ITEM.search(fetched.group(2)),
                                        FLAGS_ITEM.search(fetched.group(2)))
                assert uid_item and flags_item, (self.name, line)
                cache[int(uid_item.group(1))] = parse_flags(flags_item.group(1))
        self.uids, self.flags = sorted(cache), cache
        assert len(self.uids) == exists, (self.name, self.uids, reply)
        # Everything again, by number: the numbering the cache gives must be the server's,
        # and what this SELECT claimed is shown as \\Recent.
        assert self.run("FETCH 1:* (UID FLAGS)", expunges=False).status == "OK"


def assert_no_expunge(name: str, command: str, reply: Reply) -> None:
    """RFC 3501 7.4.1 (and RFC 7162 3.2.10 for VANISHED without EARLIER)."""
    for line in reply.untagged:
        numbered = NUMBERED.match(line)
        assert not (numbered and numbered.group(2) == b"EXPUNGE"), (name, command, line)
        vanished = VANISHED.match(line)
        assert not (vanished and b"(EARLIER)" not in line), (name, command, line)


class Scenario:
    def __init__(self, server: Server, pop3_port: int, deliver_now: Callable[[], int],
                 deliver_soon: Callable[[], Callable[[], int]],
                 guids: Callable[[], dict[int, str]], model: Model,
                 rng: random.Random) -> None:
        self.sessions = [Session(server.raw(ALICE), "plain"),
                         Session(server.raw(ALICE), "condstore", condstore=True),
                         Session(server.raw(ALICE), "qresync", qresync=True)]
        self.statuser = server.raw(ALICE)
        # Archive selected all along: what MOVE brings in is announced to it (RFC 3501 7.3.1)
        self.archive = Session(server.raw(ALICE), "archive")
        self.archive.raw.ok(f"SELECT {ARCHIVE}")
        self.pop3_port = pop3_port
        self.deliver_now = deliver_now
        self.deliver_soon = deliver_soon
        self.guids = guids
        self.model = model
        self.rng = rng
        self.log: list[str] = []
        self.highestmodseq = 0
        self.unsure: set[int] = set()
        self.last_state: list[tuple[int, frozenset[str]]] = []

    def start(self) -> None:
        for session in self.sessions:
            session.select(readonly=False)
            self.check(session)

    def step(self) -> None:
        session = self.rng.choice(self.sessions)
        if not session.selected:
            action: Callable[[Session], None] = self.reselect
        else:
            action = self.rng.choices(
                [self.append, self.deliver, self.store, self.uid_store, self.unchangedsince,
                 self.copy, self.move, self.expunge, self.uid_expunge, self.close,
                 self.reselect, self.noop, self.fetch, self.search, self.idle, self.pop3,
                 self.concurrently],
                [5, 6, 20, 8, 8, 4, 5, 6, 5, 3, 6, 12, 10, 6, 5, 3, 10])[0]
        self.log.append(f"{session.name}{' (ro)' * session.readonly}: {action.__name__}")
        action(session)
        assert 0 not in session.uids, (session.name, self.log[-5:])

    def others(self, session: Session) -> list[Session]:
        return [s for s in self.sessions if s is not session and s.selected]

    # The actions

    def append(self, session: Session) -> None:
        flags = self.some_flags()
        reply = session.raw.literal_command(
            b"APPEND INBOX (" + " ".join(sorted(flags)).encode() + b")",
            message(f"appended {len(self.log)}"), plus=True)
        session.absorb(reply)
        assert reply.status == "OK", reply
        self.model.inbox[int(reply.code.split()[2])] = set(flags)

    def deliver(self, session: Session) -> None:
        self.model.inbox[self.deliver_now()] = set()

    def store(self, session: Session) -> None:
        if not session.uids:
            return
        numbers = self.pick(session)
        uids = [session.uids[n - 1] for n in numbers]
        sign, flags = self.rng.choice("+-"), self.some_flags() or {"\\Flagged"}
        silent = self.rng.random() < 0.3
        reply = session.run(f"STORE {format_set(numbers)} {sign}FLAGS{'.SILENT' * silent} "
                            f"({' '.join(sorted(flags))})", expunges=False)
        if self.refused_read_only(session, reply):
            return
        self.apply_store(uids, sign, flags, reply)
        if silent:
            self.learn_silent(session, uids, sign, flags)

    def uid_store(self, session: Session) -> None:
        if not session.uids:
            return
        uids = [session.uids[n - 1] for n in self.pick(session)]
        sign, flags = self.rng.choice("+-"), self.some_flags() or {"\\Seen"}
        reply = session.run(f"UID STORE {format_set(uids)} {sign}FLAGS "
                            f"({' '.join(sorted(flags))})")
        if not self.refused_read_only(session, reply):
            self.apply_store(uids, sign, flags, reply)

    def unchangedsince(self, session: Session) -> None:
        """The session reads MODSEQs, another session changes some of those messages, then
        the session's STORE (UNCHANGEDSINCE) must refuse exactly the changed ones (RFC 7162
        3.1.3: MODIFIED lists them, by number for STORE, by UID for UID STORE)."""
        others = [s for s in self.others(session) if not s.readonly]
        if not session.uids or not others:
            return
        numbers = self.pick(session)
        uids = [session.uids[n - 1] for n in numbers]
        reply = session.run(f"FETCH {format_set(numbers)} (UID MODSEQ)", expunges=False)
        session.condstore = True
        modseqs = [int(m.group(1)) for line in reply.untagged
                   if (m := MODSEQ_ITEM.search(line))]
        if not modseqs:
            return  # all of them expunged by another session meanwhile
        since = max(modseqs)
        changed = self.interfere(self.rng.choice(others), uids)
        by_uid = self.rng.random() < 0.5
        flags = self.some_flags() or {"$Label"}
        named = format_set(uids if by_uid else numbers)
        reply = session.run(f"{'UID ' * by_uid}STORE {named} (UNCHANGEDSINCE {since}) +FLAGS "
                            f"({' '.join(sorted(flags))})", expunges=by_uid)
        if self.refused_read_only(session, reply):
            return
        modified = MODIFIED.search(reply.text)
        refused = set(expand_set(modified.group(1)) if modified else ())
        refused_uids = refused if by_uid else {session_uid(numbers, uids, n) for n in refused}
        present = {uid for uid in uids if uid in self.model.inbox}
        assert changed & present <= refused_uids, (reply, changed, self.log[-4:])
        assert not refused_uids & (present - changed - self.unsure), (reply, changed)
        self.apply_store([u for u in uids if u not in refused_uids], "+", flags, reply)

    def interfere(self, other: Session, uids: list[int]) -> set[int]:
        """Another session stores flags on some of `uids`; returns the UIDs whose flags it
        really changed (a STORE that changes nothing may or may not raise the MODSEQ: those
        are left in self.unsure)."""
        chosen = [u for u in uids if u in other.uids and self.rng.random() < 0.5]
        self.unsure = set()
        if not chosen:
            return set()
        sign, flags = self.rng.choice("+-"), self.some_flags() or {"\\Answered"}
        before = {u: set(self.model.inbox.get(u, ())) for u in chosen}
        reply = other.run(f"UID STORE {format_set(chosen)} {sign}FLAGS "
                          f"({' '.join(sorted(flags))})")
        self.log.append(f"  {other.name} interferes: {sign}{sorted(flags)} on {chosen}")
        self.apply_store(chosen, sign, flags, reply)
        changed = {u for u in chosen
                   if u in self.model.inbox and self.model.inbox[u] != before[u]}
        self.unsure = set(chosen) - changed
        return changed

    def copy(self, session: Session) -> None:
        if not session.uids:
            return
        numbers = self.pick(session)
        uids = [session.uids[n - 1] for n in numbers]
        reply = session.run(f"COPY {format_set(numbers)} INBOX")
        sources = [uid for uid in uids if uid in self.model.inbox]
        if not sources:
            return
        assert reply.status == "OK", reply
        copied = reply.code.split()
        for source, dest in zip(expand_set(copied[2]), expand_set(copied[3]), strict=True):
            self.model.inbox[dest] = set(self.model.inbox[source])

    def move(self, session: Session) -> None:
        if not session.uids:
            return
        numbers = self.pick(session)
        uids = [session.uids[n - 1] for n in numbers]
        reply = session.run(f"MOVE {format_set(numbers)} {ARCHIVE}")
        if self.refused_read_only(session, reply):
            return
        present = [uid for uid in uids if uid in self.model.inbox]
        assert reply.status == "OK" or len(present) < len(uids), reply
        if reply.status == "OK":
            for uid in present:
                del self.model.inbox[uid]
            self.model.archived += len(present)

    def expunge(self, session: Session) -> None:
        reply = session.run("EXPUNGE")
        if self.refused_read_only(session, reply):
            return
        self.remove_deleted(None)
        self.check(session)

    def uid_expunge(self, session: Session) -> None:
        if not session.uids:
            return
        uids = [session.uids[n - 1] for n in self.pick(session)]
        reply = session.run(f"UID EXPUNGE {format_set(uids)}")
        if not self.refused_read_only(session, reply):
            self.remove_deleted(set(uids))

    def close(self, session: Session) -> None:
        """RFC 3501 6.4.2: expunges silently (no EXPUNGE to this session), except when the
        mailbox was selected by EXAMINE: then nothing is removed."""
        reply = session.run("CLOSE")
        assert reply.status == "OK", reply
        assert not any(NUMBERED.match(line) and line.endswith(b"EXPUNGE")
                       for line in reply.untagged), (session.name, reply)
        if not session.readonly:
            self.remove_deleted(None)
        session.selected = False
        session.uids = []  # its flags stay: what a client with a cache keeps
        self.check_status()

    def reselect(self, session: Session) -> None:
        session.select(readonly=self.rng.random() < 0.4, resync=self.rng.random() < 0.5)
        self.check(session)

    def concurrently(self, session: Session) -> None:
        """Two sessions' commands in flight at once (each sent before either is answered),
        sometimes with a delivery under way too. The pairs are chosen so that either order
        ends in the same mailbox: this session's STORE never touches \\Deleted or \\Seen
        (or it runs EXPUNGE), the other's command is an EXPUNGE, a MOVE (what it moved is
        read from its COPYUID), a STORE of other flags or a FETCH of BODY[] (which sets
        \\Seen)."""
        others = [s for s in self.others(session) if not s.readonly]
        if not session.uids or not others or session.readonly:
            return
        other = self.rng.choice(others)
        numbers = self.pick(session)
        uids = [session.uids[n - 1] for n in numbers]
        mine = (self.some_flags() - {"\\Deleted", "\\Seen"}) or {"\\Flagged"}
        sign = self.rng.choice("+-")
        my_command = ("EXPUNGE" if self.rng.random() < 0.3 else
                      f"STORE {format_set(numbers)} {sign}FLAGS ({' '.join(sorted(mine))})")
        theirs = sorted(set(FLAGS) - mine - {"\\Deleted"})[:1]
        kind = self.rng.choice(["EXPUNGE", "MOVE", "UID STORE", "FETCH"])
        their_numbers = self.pick(other) if other.uids else []
        their_uids = [other.uids[n - 1] for n in their_numbers]
        if kind != "EXPUNGE" and not their_uids:
            kind = "EXPUNGE"
        their_command = {
            "EXPUNGE": "EXPUNGE",
            "MOVE": f"MOVE {format_set(their_numbers or [1])} {ARCHIVE}",
            "UID STORE": f"UID STORE {format_set(their_uids or [1])} +FLAGS "
                         f"({' '.join(theirs)})",
            "FETCH": f"FETCH {format_set(their_numbers or [1])} (UID FLAGS BODY[])",
        }[kind]
        self.log.append(f"  {my_command}, with {other.name}: {their_command}")
        delivered = self.deliver_soon() if self.rng.random() < 0.3 else None
        my_tag, their_tag = next(session.raw.tags), next(other.raw.tags)
        session.raw.send(f"{my_tag} {my_command}\r\n".encode())
        other.raw.send(f"{their_tag} {their_command}\r\n".encode())
        mine_reply, their_reply = session.raw.reply(my_tag), other.raw.reply(their_tag)
        if delivered is not None:
            self.model.inbox[delivered()] = set()
        # Removals first, then the flag changes, which commute with them.
        if kind == "MOVE" and their_reply.status == "OK":
            moved = moved_uids(their_reply)
            assert set(moved) <= set(their_uids) & set(self.model.inbox), (their_reply, moved)
            for uid in moved:
                del self.model.inbox[uid]
            self.model.archived += len(moved)
        if kind == "EXPUNGE" or my_command == "EXPUNGE":
            self.remove_deleted(None)
        gone = set(their_uids) - set(self.model.inbox)
        if kind == "MOVE":
            assert their_reply.status == "OK" or gone, their_reply
        elif kind == "UID STORE":
            self.apply_store(their_uids, "+", set(theirs), their_reply)
        elif kind == "FETCH":
            assert_no_expunge(other.name, "FETCH", their_reply)
            assert their_reply.status == "OK" or gone, their_reply
            for uid in set(their_uids) - gone:
                self.model.inbox[uid].add("\\Seen")
        if my_command == "EXPUNGE":
            assert mine_reply.status == "OK", mine_reply
        else:
            assert_no_expunge(session.name, "STORE", mine_reply)
            self.apply_store(uids, sign, mine, mine_reply)
        other.absorb(their_reply)
        session.absorb(mine_reply)

    def noop(self, session: Session) -> None:
        self.check_unsolicited(session, session.run("NOOP"))
        self.check(session)

    def check_unsolicited(self, session: Session, reply: Reply) -> None:
        """RFC 7162 3.1.2 and 3.2.4: once CONDSTORE is on, every unsolicited FETCH carries
        MODSEQ, and UID as well with QRESYNC (architecture: both, for every CONDSTORE
        session)."""
        if not session.condstore:
            return
        for line in reply.untagged:
            fetched = FETCH_LINE.match(line)
            if fetched:
                assert MODSEQ_ITEM.search(fetched.group(2)), (session.name, line)
                assert UID_ITEM.search(fetched.group(2)), (session.name, line)

    def fetch(self, session: Session) -> None:
        """FETCH by number, sometimes with BODY[]: \\Seen for a read-write session (and the
        changed FLAGS in the same response), nothing for a read-only one."""
        if not session.uids:
            return
        numbers = self.pick(session)
        uids = [session.uids[n - 1] for n in numbers]
        body = self.rng.random() < 0.4
        reply = session.run(f"FETCH {format_set(numbers)} (UID FLAGS{' BODY[]' * body})",
                            expunges=False)
        assert reply.status == "OK" or set(uids) - set(self.model.inbox), reply
        if body and not session.readonly:
            for uid in uids:
                if uid in self.model.inbox:
                    self.model.inbox[uid].add("\\Seen")

    def search(self, session: Session) -> None:
        if not session.uids:
            return
        numbers = self.pick(session)
        reply = session.run(f"SEARCH {format_set(numbers)}", expunges=False)
        assert reply.status == "OK", reply
        [line] = reply.lines(b"SEARCH")
        found = {int(word) for word in line.split()[2:]}
        must = {n for n in numbers if session.uids[n - 1] in self.model.inbox}
        assert must <= found <= set(numbers), (session.name, reply, numbers)

    def idle(self, session: Session) -> None:
        """IDLE while the other sessions act: what they did is told during the IDLE (RFC 2177),
        and after DONE the session is up to date."""
        session.raw.send(b"idle1 IDLE\r\n")
        assert session.raw.response().startswith(b"+"), session.name
        for _ in range(self.rng.randint(1, 3)):
            actors = self.others(session)
            if not actors:
                break
            actor = self.rng.choice(actors)
            action = self.rng.choice([self.deliver, self.store, self.expunge, self.move,
                                      self.uid_store, self.pop3])
            self.log.append(f"  while {session.name} idles, {actor.name}: {action.__name__}")
            action(actor)
        self.wait_until_told(session)
        session.raw.send(b"DONE\r\n")
        reply = session.raw.reply("idle1")
        assert reply.status == "OK", reply
        self.check_unsolicited(session, reply)
        session.absorb(reply)
        self.check(session)

    def wait_until_told(self, session: Session) -> None:
        """Read what the IDLE session is told until its numbering and flags are the model's
        (new messages known by number only). Every read is bounded by TIMEOUT: an update
        that never comes fails the test."""
        session.idling = True
        while not self.told_everything(session):
            line = session.raw.response()
            assert line and not line.startswith(b"idle1 "), (session.name, line, self.log[-5:])
            told = Reply([line], "OK", b"")
            self.check_unsolicited(session, told)
            session.absorb(told)
        session.idling = False

    def told_everything(self, session: Session) -> bool:
        truth = self.model.ordered()
        return len(session.uids) == len(truth) and all(
            told == 0 or (told == uid and session.flags.get(uid) == flags)
            for told, (uid, flags) in zip(session.uids, truth, strict=True))

    def pop3(self, session: Session) -> None:
        """A POP3 client logs in, DELEs some messages and QUITs. While it holds the maildrop
        a second POP3 login is refused, and IMAP goes on. The IMAP sessions are told of the
        removal as of any other expunge (RFC 1939 6: the UPDATE state removes them)."""
        guids = self.guids()
        order = sorted(self.model.inbox)
        assert sorted(guids) == order, (sorted(guids), order)
        with closing(poplib.POP3("127.0.0.1", self.pop3_port, timeout=TIMEOUT)) as pop:
            pop.user(ALICE)
            pop.pass_(USERS[ALICE])
            listed = [line.split()[1].decode() for line in pop.uidl()[1]]
            assert listed == [guids[uid] for uid in order], (listed, self.log[-4:])
            with closing(poplib.POP3("127.0.0.1", self.pop3_port, timeout=TIMEOUT)) as second:
                second.user(ALICE)
                with pytest.raises(poplib.error_proto, match="IN-USE"):
                    second.pass_(USERS[ALICE])
            chosen = self.rng.sample(range(1, len(order) + 1),
                                     min(len(order), self.rng.randint(0, 3)))
            for number in chosen:
                pop.dele(number)
            # IMAP goes on meanwhile: new mail is not in this POP3 session's list, and a
            # message it deleted may be gone already when it QUITs.
            meanwhile = self.rng.choice([self.deliver, self.store, self.expunge, self.move,
                                         self.uid_expunge, self.noop])
            if session.selected:
                self.log.append(f"  while pop3 holds the maildrop, {session.name}: "
                                f"{meanwhile.__name__}")
                meanwhile(session)
            pop.quit()
        for number in chosen:
            self.model.inbox.pop(order[number - 1], None)
        self.log.append(f"  pop3 deleted {[order[n - 1] for n in chosen]}")

    # Helpers

    def refused_read_only(self, session: Session, reply: Reply) -> bool:
        """A read-only session changes nothing: every write is refused."""
        if session.readonly:
            assert reply.status == "NO" and b"READ-ONLY" in reply.text, (session.name, reply)
        return session.readonly

    def apply_store(self, uids: list[int], sign: str, flags: set[str], reply: Reply) -> None:
        gone = self.model.store(uids, sign, flags)
        assert reply.status == "OK" or (reply.status == "NO" and gone), (reply, self.log[-3:])

    def learn_silent(self, session: Session, uids: list[int], sign: str,
                     flags: set[str]) -> None:
        """After .SILENT the client knows what it asked for."""
        for uid in uids:
            if uid in session.flags and uid in self.model.inbox:
                own = session.flags[uid]
                session.flags[uid] = own | flags if sign == "+" else own - flags

    def remove_deleted(self, among: set[int] | None) -> None:
        for uid, flags in list(self.model.inbox.items()):
            if "\\Deleted" in flags and (among is None or uid in among):
                del self.model.inbox[uid]

    def check(self, session: Session) -> None:
        if session.state() != self.model.ordered():
            told, truth = dict(session.state()), dict(fetch_all(session))
            wrong = {uid: (told.get(uid), flags, truth.get(uid))
                     for uid, flags in self.model.ordered() if told.get(uid) != flags}
            raise AssertionError(f"{session.name}: (view, model, server) differ: {wrong}; "
                                 f"last steps {self.log[-8:]}")
        self.check_status()

    def check_status(self) -> None:
        [line] = self.statuser.ok("STATUS INBOX (MESSAGES HIGHESTMODSEQ)").lines(b"STATUS")
        items = dict(re.findall(rb"(MESSAGES|HIGHESTMODSEQ) (\d+)", line))
        assert int(items[b"MESSAGES"]) == len(self.model.inbox), (line, self.log[-4:])
        highest = int(items[b"HIGHESTMODSEQ"])
        # RFC 7162 3.1.1, 3.2.10: every change (flags, new mail, expunge) raises it
        state = self.model.ordered()
        changed = state != self.last_state
        assert highest > self.highestmodseq if changed else highest >= self.highestmodseq, (
            line, self.highestmodseq, changed, self.log[-4:])
        self.highestmodseq, self.last_state = highest, state
        self.archive.run("NOOP")
        assert len(self.archive.uids) == self.model.archived, (self.archive.uids, self.log[-4:])
        assert self.archive.uids == sorted(set(self.archive.uids)), self.archive.uids
        for session in self.sessions:
            assert session.highestmodseq <= highest, (session.name, line)
            assert max(session.modseqs.values(), default=0) <= highest, (session.name, line)

    def check_recent(self) -> None:
        """Every message in INBOX was shown as \\Recent to exactly one read-write session."""
        for i, first in enumerate(self.sessions):
            for second in self.sessions[i + 1:]:
                both = first.recent & second.recent
                assert not both, (first.name, second.name, sorted(both))
        shown = set().union(*(s.recent for s in self.sessions))
        missing = set(self.model.inbox) - shown
        assert not missing, (sorted(missing), self.log[-10:])

    def pick(self, session: Session) -> list[int]:
        count = len(session.uids)
        return sorted(self.rng.sample(range(1, count + 1), min(count, self.rng.randint(1, 3))))

    def some_flags(self) -> set[str]:
        return set(self.rng.sample(FLAGS, self.rng.randint(0, 2)))


def expand_set(text: bytes) -> list[int]:
    out: list[int] = []
    for part in text.decode().split(","):
        low, _, high = part.partition(":")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def moved_uids(reply: Reply) -> list[int]:
    """The source UIDs of MOVE's COPYUID (RFC 6851 4.3: in an untagged OK, before the
    expunges), none when it moved nothing."""
    for line in [*reply.untagged, reply.text]:
        copied = re.search(rb"\[COPYUID \d+ ([\d:,]+) [\d:,]+\]", line)
        if copied:
            return expand_set(copied.group(1))
    return []


def session_uid(numbers: list[int], uids: list[int], number: int) -> int:
    assert number in numbers, (number, numbers)
    return uids[numbers.index(number)]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_concurrent_sessions_agree_with_the_model(imap_server: ImapStack, maildb: MailDB,
                                                        deliver: Deliver, seed: int) -> None:
    settings = imap_server.settings.replace(pop3_port=free_port(), tls_cert="", tls_key="")
    pop3_servers = await start_pop3_servers(settings, maildb, imap_server.accounts,
                                            auth_failure_delay=0.05)
    for n in range(6):
        await deliver(ALICE, message(f"initial {n}"))
    model = Model({m.uid: set() for m in await maildb.list_messages(ALICE)})
    loop = asyncio.get_running_loop()

    def inbox() -> list[MessageInfo]:
        return asyncio.run_coroutine_threadsafe(maildb.list_messages(ALICE), loop).result(10)

    def deliver_soon() -> Callable[[], int]:
        """Start a delivery; the function returned waits for it and gives its UID (the
        highest: nothing else adds to INBOX meanwhile)."""
        async def deliver_one() -> None:
            await deliver(ALICE, message("delivered"))

        started = asyncio.run_coroutine_threadsafe(deliver_one(), loop)

        def delivered() -> int:
            started.result(timeout=10)
            return max(m.uid for m in inbox())

        return delivered

    def deliver_now() -> int:
        return deliver_soon()()

    def guids() -> dict[int, str]:
        return {m.uid: m.guid for m in inbox()}

    def dialog() -> None:
        scenario = Scenario(Server.of(imap_server), settings.pop3_port, deliver_now,
                            deliver_soon, guids, model, random.Random(seed))
        scenario.start()
        for _ in range(250):
            scenario.step()
        for session in scenario.sessions:
            if session.readonly or not session.selected:
                session.select(readonly=False)
            session.run("NOOP")
            scenario.check(session)
            assert fetch_all(session) == model.ordered(), session.name
        scenario.check_recent()
        for session in scenario.sessions:
            session.raw.close()

    try:
        await in_thread(dialog)
    finally:
        for server in pop3_servers:
            server.close()
            await server.wait_closed()
    stored = await maildb.list_messages(ALICE)
    assert [(m.uid, frozenset(m.flags) - {"\\Recent"}) for m in stored] == model.ordered()
    assert len(await maildb.list_messages(ALICE, ARCHIVE)) == model.archived
