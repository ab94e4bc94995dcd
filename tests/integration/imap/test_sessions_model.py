"""Three sessions on one mailbox against a model: random APPEND, delivery, STORE, COPY, MOVE,
EXPUNGE, UID EXPUNGE, FETCH, SEARCH by number and IDLE from all of them, each session keeping its
own view (sequence number -> UID and flags) only from what the server tells it (one of them
with QRESYNC enabled, so told by VANISHED). After every command the session's view is what
its untagged responses made it; after a NOOP it must equal the model, and so must a FETCH
1:* of everything. A fourth client connects now and then and catches up with
SELECT (QRESYNC ...), as a phone does; its copy must equal the model too.

This is what a real client does with the untagged EXPUNGE/EXISTS/FETCH responses (RFC 3501
7.4.1, 5.2), and it exercises the store's shared message-list snapshots, the sessions' flag
overlays and the in-memory change feed together. The large variant has more messages than
the overlays hold before they are folded in, so the folding is on the path as well. It found
COPY and MOVE taking the wrong messages when another session's expunges were announced
before the command's own numbers were read.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from services.store.backends.maildb import MailDB, user_path
from services.store.backends.snapshots import OVERLAY_LIMIT
from services.store.imap.protocol.sequence import format_set
from services.store.imap.selected import FEW_POSITIONS, OVERLAY_MAX
from services.store.mailbox import ARCHIVE
from tests.integration.imap.clients import Raw, Reply, Server, expand, in_thread, message
from tests.integration.imap.conftest import ALICE, Deliver, ImapStack
from tests.support import check_bodies

FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "$Label")
FETCH_LINE = re.compile(rb"^\* (\d+) FETCH \((.*)\)$", re.S)
UID_ITEM = re.compile(rb"\bUID (\d+)")
FLAGS_ITEM = re.compile(rb"\bFLAGS \(([^)]*)\)")
NUMBERED = re.compile(rb"^\* (\d+) (EXISTS|EXPUNGE|RECENT)$")
VANISHED = re.compile(rb"^\* VANISHED (?:\(EARLIER\) )?([\d:,]+)$")
HIGHESTMODSEQ = re.compile(rb"\[HIGHESTMODSEQ (\d+)\]")


@pytest.fixture
def server(imap_server: ImapStack) -> Server:
    return Server.of(imap_server)


@dataclass
class Model:
    """The truth: INBOX's UIDs with their flags, and how many messages Archive holds."""

    inbox: dict[int, set[str]] = field(default_factory=dict)
    archived: int = 0

    def ordered(self) -> list[tuple[int, frozenset[str]]]:
        return [(uid, frozenset(self.inbox[uid])) for uid in sorted(self.inbox)]

    def store(self, uids: list[int], sign: str, flags: set[str]) -> list[int]:
        """+FLAGS or -FLAGS on the UIDs still in INBOX; returns the ones that are gone."""
        for uid in uids:
            if uid in self.inbox:
                if sign == "+":
                    self.inbox[uid] |= flags
                else:
                    self.inbox[uid] -= flags
        return [uid for uid in uids if uid not in self.inbox]


class View:
    """One session: a Raw connection and what the server has told it."""

    def __init__(self, raw: Raw, name: str, *, qresync: bool = False) -> None:
        self.raw = raw
        self.name = name
        self.qresync = qresync
        if qresync:
            raw.ok("ENABLE QRESYNC")
        self.uids: list[int] = []
        self.flags: dict[int, frozenset[str]] = {}

    def run(self, command: str) -> Reply:
        reply = self.raw.command(command)
        self.absorb(reply)
        return reply

    def absorb(self, reply: Reply) -> None:
        """Apply the untagged responses in the order they came, as a client must. A message
        announced by EXISTS has the UID 0 here until a FETCH tells it (it may also be expunged
        before that)."""
        for line in reply.untagged:
            vanished = VANISHED.match(line)
            if vanished:  # QRESYNC's EXPUNGE, by UID (RFC 7162 3.2.10)
                assert self.qresync, (self.name, line)
                for uid in expand(vanished.group(1)):
                    # One whose UID this session has not fetched yet is among the newest,
                    # announced by EXISTS only: the count goes down by one.
                    known = uid if uid in self.uids else 0
                    assert known in self.uids, (self.name, line, "never announced")
                    self.uids.remove(known)
                    self.flags.pop(uid, None)
                continue
            numbered = NUMBERED.match(line)
            if numbered:
                number, kind = int(numbered.group(1)), numbered.group(2)
                if kind == b"EXPUNGE":
                    assert 1 <= number <= len(self.uids), (self.name, line, len(self.uids))
                    self.flags.pop(self.uids.pop(number - 1), None)
                elif kind == b"EXISTS":
                    assert number >= len(self.uids), (self.name, line, len(self.uids))
                    self.uids += [0] * (number - len(self.uids))
                continue
            fetched = FETCH_LINE.match(line)
            if fetched:
                self._fetched(int(fetched.group(1)), fetched.group(2), line)
        self._learn_new()

    def _fetched(self, number: int, items: bytes, line: bytes) -> None:
        assert 1 <= number <= len(self.uids), (self.name, line, len(self.uids))
        uid_item = UID_ITEM.search(items)
        uid = self.uids[number - 1]
        if uid_item:
            told = int(uid_item.group(1))
            assert uid in (0, told), (self.name, line, uid)
            uid = self.uids[number - 1] = told
        flags_item = FLAGS_ITEM.search(items)
        if flags_item and uid:
            self.flags[uid] = parse_flags(flags_item.group(1))

    def _learn_new(self) -> None:
        """FETCH the UIDs and flags of messages known only from EXISTS."""
        while 0 in self.uids:
            first = self.uids.index(0) + 1
            reply = self.raw.command(f"FETCH {first}:* (UID FLAGS)")
            assert reply.status == "OK", (self.name, reply)
            self.absorb(reply)

    def state(self) -> list[tuple[int, frozenset[str]]]:
        return [(uid, self.flags[uid]) for uid in self.uids]


def parse_flags(text: bytes) -> frozenset[str]:
    return frozenset(f for f in text.decode().split() if f != "\\Recent")


def fetch_all(view: View) -> list[tuple[int, frozenset[str]]]:
    """A fresh FETCH 1:* (UID FLAGS), read on its own (not through the view)."""
    reply = view.raw.command("FETCH 1:* (UID FLAGS)")
    assert reply.status == "OK", reply
    found = []
    for line in reply.untagged:
        fetched = FETCH_LINE.match(line)
        if fetched:
            uid_item, flags_item = UID_ITEM.search(fetched.group(2)), FLAGS_ITEM.search(
                fetched.group(2))
            assert uid_item and flags_item, line
            found.append((int(uid_item.group(1)), parse_flags(flags_item.group(1))))
    return found


class OfflineClient:
    """A client that connects now and then (a phone): it keeps UIDs, flags and the highest
    MODSEQ between connections and catches up with SELECT (QRESYNC ...) (RFC 7162 3.2.5):
    VANISHED (EARLIER) for what was expunged, FETCH for what changed or arrived."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.flags: dict[int, frozenset[str]] = {}
        self.uidvalidity = 0
        self.modseq = 0
        self.with_known_uids = False

    def sync(self) -> None:
        raw = self.server.raw(ALICE)
        raw.ok("ENABLE QRESYNC")
        if not self.uidvalidity:
            reply = raw.ok("SELECT INBOX")
            self.uidvalidity = int(re.search(rb"\[UIDVALIDITY (\d+)\]",
                                             b"\n".join(reply.untagged)).group(1))
            reply.untagged += raw.ok("UID FETCH 1:* (FLAGS)").untagged
        else:
            # Every other time with the UIDs it knows (the optional known-uids argument).
            self.with_known_uids = not self.with_known_uids
            known = f" {format_set(sorted(self.flags))}" if (
                self.with_known_uids and self.flags) else ""
            reply = raw.ok(f"SELECT INBOX (QRESYNC ({self.uidvalidity} {self.modseq}{known}))")
        self.absorb(reply)
        raw.ok("LOGOUT")
        raw.close()

    def absorb(self, reply: Reply) -> None:
        for line in reply.untagged:
            vanished = VANISHED.match(line)
            if vanished:
                for uid in expand(vanished.group(1)):
                    self.flags.pop(uid, None)
            fetched = FETCH_LINE.match(line)
            if fetched:
                uid_item = UID_ITEM.search(fetched.group(2))
                flags_item = FLAGS_ITEM.search(fetched.group(2))
                assert uid_item and flags_item, line
                self.flags[int(uid_item.group(1))] = parse_flags(flags_item.group(1))
            highest = HIGHESTMODSEQ.search(line)
            if highest:
                self.modseq = int(highest.group(1))

    def state(self) -> list[tuple[int, frozenset[str]]]:
        return sorted(self.flags.items())


class Scenario:
    def __init__(self, server: Server, deliver_now: Callable[[], int], model: Model,
                 rng: random.Random,
                 *, ranges: bool) -> None:
        self.views = [View(server.raw(ALICE), f"session{i}", qresync=i == 2) for i in range(3)]
        self.offline = OfflineClient(server)
        self.statuser = server.raw(ALICE)
        self.deliver_now = deliver_now
        self.model = model
        self.rng = rng
        self.ranges = ranges  # operate on runs of messages, not single ones
        self.log: list[str] = []

    def start(self) -> None:
        for view in self.views:
            view.run("SELECT INBOX")
            assert view.state() == self.model.ordered(), view.name
        self.offline.sync()
        assert self.offline.state() == self.model.ordered()

    def step(self) -> None:
        view = self.rng.choice(self.views)
        action = self.rng.choices(
            [self.append, self.deliver, self.store, self.uid_store, self.copy, self.move,
             self.expunge, self.uid_expunge, self.noop, self.fetch, self.search,
             self.resync, self.idle],
            [6, 6, 30, 10, 5, 6, 6, 5, 16, 8, 8, 4, 5])[0]
        self.log.append(f"{view.name}: {action.__name__}")
        action(view)
        assert 0 not in view.uids, (view.name, self.log[-5:])

    # The actions

    def append(self, view: View) -> None:
        flags = self.some_flags()
        body = message(f"appended {len(self.log)}")
        reply = view.raw.literal_command(
            b"APPEND INBOX (" + " ".join(sorted(flags)).encode() + b")", body, plus=True)
        view.absorb(reply)
        assert reply.status == "OK", reply
        uid = int(reply.code.split()[2])  # APPENDUID uidvalidity uid
        self.model.inbox[uid] = set(flags)

    def deliver(self, view: View) -> None:
        uid = self.deliver_now()
        self.model.inbox[uid] = set()

    def store(self, view: View) -> None:
        if not view.uids:
            return
        numbers = self.pick(view)
        sign = self.rng.choice("+-")
        flags = self.some_flags() or {"\\Flagged"}
        silent = self.rng.random() < 0.3
        uids = [view.uids[n - 1] for n in numbers]  # as numbered when sent
        reply = view.run(f"STORE {format_set(numbers)} {sign}FLAGS{'.SILENT' * silent} "
                         f"({' '.join(sorted(flags))})")
        self.apply_store(uids, sign, flags, reply)
        if silent:  # the client knows what it asked for; the server need not echo it
            for uid in uids:
                if uid in view.flags and uid in self.model.inbox:
                    own = view.flags[uid]
                    view.flags[uid] = own | flags if sign == "+" else own - flags

    def uid_store(self, view: View) -> None:
        if not view.uids:
            return
        uids = [view.uids[n - 1] for n in self.pick(view)]
        sign = self.rng.choice("+-")
        flags = self.some_flags() or {"\\Seen"}
        reply = view.run(f"UID STORE {format_set(uids)} {sign}FLAGS "
                         f"({' '.join(sorted(flags))})")
        self.apply_store(uids, sign, flags, reply)

    def apply_store(self, uids: list[int], sign: str, flags: set[str], reply: Reply) -> None:
        gone = self.model.store(uids, sign, flags)
        assert reply.status == "OK" or (reply.status == "NO" and gone), (reply, self.log[-3:])

    def copy(self, view: View) -> None:
        if not view.uids:
            return
        numbers, uids = self.pick_uids(view)
        reply = view.run(f"COPY {format_set(numbers)} INBOX")
        sources = [uid for uid in uids if uid in self.model.inbox]
        if not sources:
            assert reply.status in ("OK", "NO"), reply
            return
        assert reply.status == "OK", reply
        copied = reply.code.split()  # COPYUID uidvalidity source-set dest-set
        source_uids, dest_uids = expand(copied[2]), expand(copied[3])
        assert sorted(source_uids) == sorted(sources), (reply, sources)
        for source, dest in zip(source_uids, dest_uids, strict=True):
            self.model.inbox[dest] = set(self.model.inbox[source])

    def move(self, view: View) -> None:
        if not view.uids:
            return
        numbers, uids = self.pick_uids(view)
        reply = view.run(f"MOVE {format_set(numbers)} {ARCHIVE}")
        present = [uid for uid in uids if uid in self.model.inbox]
        assert reply.status == "OK" or (reply.status == "NO" and len(present) < len(uids)), reply
        if reply.status == "OK":
            for uid in present:
                del self.model.inbox[uid]
            self.model.archived += len(present)
            # Only what this MOVE moved must be gone from the view: a message another session
            # expunged may stay listed until a command that reports expunges.
            assert not set(present) & set(view.uids), (view.name, reply, self.log[-5:])

    def expunge(self, view: View) -> None:
        view.run("EXPUNGE")
        for uid in [u for u, flags in self.model.inbox.items() if "\\Deleted" in flags]:
            del self.model.inbox[uid]
        self.check(view)  # EXPUNGE reports everything, as NOOP does

    def uid_expunge(self, view: View) -> None:
        if not view.uids:
            return
        uids = [view.uids[n - 1] for n in self.pick(view)]
        view.run(f"UID EXPUNGE {format_set(uids)}")
        for uid in uids:
            if "\\Deleted" in self.model.inbox.get(uid, ()):
                del self.model.inbox[uid]

    def fetch(self, view: View) -> None:
        """FETCH by number: the UIDs that come back must be the view's (checked in absorb)."""
        if view.uids:
            view.run(f"FETCH {format_set(self.pick(view))} (UID FLAGS)")

    def search(self, view: View) -> None:
        """SEARCH and UID SEARCH by a sequence set: the numbers are the view's as sent."""
        if not view.uids:
            return
        numbers = self.pick(view)
        named = [(n, view.uids[n - 1]) for n in numbers]
        uid = self.rng.random() < 0.5
        reply = view.run(f"{'UID ' * uid}SEARCH {format_set(numbers)}")
        assert reply.status == "OK", reply
        [line] = reply.lines(b"SEARCH")
        found = {int(word) for word in line.split()[2:]}
        answer = {n: (u if uid else n) for n, u in named}
        # Every named message that still exists is found; one another session expunged but
        # this one has not been told of yet may be found or not (RFC 2180 4.1).
        must = {answer[n] for n, u in named if u in self.model.inbox}
        assert must <= found <= set(answer.values()), (view.name, reply, named)

    def resync(self, view: View) -> None:
        """The client that was away comes back: QRESYNC brings its copy up to date."""
        self.offline.sync()
        assert self.offline.state() == self.model.ordered(), self.log[-8:]

    def idle(self, view: View) -> None:
        """IDLE (RFC 2177) while the other sessions act; after DONE, what it was told
        during and at the end of the IDLE must have brought its view up to date."""
        others = [v for v in self.views if v is not view]
        view.raw.send(b"idle1 IDLE\r\n")
        assert view.raw.response().startswith(b"+"), view.name
        for _ in range(self.rng.randint(1, 3)):
            actor = self.rng.choice(others)
            action = self.rng.choice([self.deliver, self.append, self.store, self.expunge,
                                      self.move, self.uid_store])
            self.log.append(f"  while {view.name} idles, {actor.name}: {action.__name__}")
            action(actor)
        view.raw.send(b"DONE\r\n")
        reply = view.raw.reply("idle1")
        assert reply.status == "OK", reply
        view.absorb(reply)
        self.check(view)

    def noop(self, view: View) -> None:
        view.run("NOOP")
        self.check(view)

    # Helpers

    def check(self, view: View) -> None:
        if view.state() != self.model.ordered():
            told = dict(view.state())
            truth = dict(fetch_all(view))
            wrong = {uid: (told.get(uid), flags, truth.get(uid))
                     for uid, flags in self.model.ordered() if told.get(uid) != flags}
            raise AssertionError(f"{view.name}: (view, model, server) differ: {wrong}; "
                                 f"last steps {self.log[-8:]}")
        self.check_status()

    def check_status(self) -> None:
        """STATUS from a session that has nothing selected agrees with the model too."""
        [line] = self.statuser.ok("STATUS INBOX (MESSAGES UNSEEN UIDNEXT)").lines(b"STATUS")
        items = dict(re.findall(rb"(MESSAGES|UNSEEN|UIDNEXT) (\d+)", line))
        unseen = sum(1 for flags in self.model.inbox.values() if "\\Seen" not in flags)
        assert int(items[b"MESSAGES"]) == len(self.model.inbox), (line, self.log[-5:])
        assert int(items[b"UNSEEN"]) == unseen, (line, self.log[-5:])
        assert int(items[b"UIDNEXT"]) > max(self.model.inbox, default=0), line

    def pick(self, view: View) -> list[int]:
        count = len(view.uids)
        if self.ranges and self.rng.random() < 0.7:
            first = self.rng.randint(1, count)
            last = min(count, first + self.rng.randint(0, 3000))
            return list(range(first, last + 1))
        return sorted(self.rng.sample(range(1, count + 1), min(count, self.rng.randint(1, 3))))

    def pick_uids(self, view: View) -> tuple[list[int], list[int]]:
        """Some message numbers, and the UIDs they stand for now, before the command."""
        numbers = self.pick(view)
        return numbers, [view.uids[n - 1] for n in numbers]

    def some_flags(self) -> set[str]:
        return set(self.rng.sample(FLAGS, self.rng.randint(0, 2)))


# More messages than a session's overlay (OVERLAY_MAX) and the shared snapshot's
# (OVERLAY_LIMIT) hold before they are folded in, with STOREs over up to 3,000 of them.
LARGE = 5000


@pytest.mark.parametrize(("seed", "initial", "steps", "ranges"), [
    (1, 8, 400, False),
    (2, 8, 400, False),
    (3, 30, 300, True),
    (4, LARGE, 120, True),
])
async def test_sessions_agree_with_the_model(server: Server, maildb: MailDB, deliver: Deliver,
                                             seed: int, initial: int, steps: int,
                                             ranges: bool) -> None:
    assert max(OVERLAY_MAX, OVERLAY_LIMIT, FEW_POSITIONS) < LARGE
    for n in range(initial):
        await deliver(ALICE, message(f"initial {n}"))
    model = Model({m.uid: set(m.flags) - {"\\Recent"}
                   for m in await maildb.list_messages(ALICE)})
    loop = asyncio.get_running_loop()

    def deliver_now() -> int:
        future = asyncio.run_coroutine_threadsafe(deliver(ALICE, message("delivered")), loop)
        future.result(timeout=10)
        newest = asyncio.run_coroutine_threadsafe(maildb.list_messages(ALICE), loop)
        return max(m.uid for m in newest.result(timeout=10))

    def dialog() -> Model:
        scenario = Scenario(server, deliver_now, model, random.Random(seed), ranges=ranges)
        scenario.start()
        for _ in range(steps):
            scenario.step()
        for view in scenario.views:
            view.run("NOOP")
            scenario.check(view)
            assert fetch_all(view) == model.ordered(), view.name
            view.raw.close()
        return model

    final = await in_thread(dialog)
    stored = await maildb.list_messages(ALICE)
    assert [(m.uid, frozenset(m.flags) - {"\\Recent"}) for m in stored] == final.ordered()
    assert len(await maildb.list_messages(ALICE, ARCHIVE)) == final.archived
    check_bodies(user_path(maildb.root, ALICE))
