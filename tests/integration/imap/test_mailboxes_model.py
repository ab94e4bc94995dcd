"""Mailbox management against a model: random CREATE, DELETE, RENAME (INBOX too), SUBSCRIBE,
UNSUBSCRIBE and APPEND over a small hierarchy, from two sessions, one of which keeps a mailbox
selected. After every command LIST, LSUB and STATUS must agree with the model, and the
selected session must never be told anything wrong.

The model is RFC 3501 6.3 as this server implements it: CREATE makes missing parents; DELETE
removes one mailbox (its children stay); RENAME takes the children along (also from a parent
that is only a name, its mailbox deleted) and creates missing parents of the new name,
refusing a target that exists or lies inside the mailbox itself;
RENAME INBOX moves INBOX's messages to the new mailbox and leaves INBOX empty, its children
where they are; subscriptions follow a rename and survive a delete (LSUB lists subscribed
names whether they exist or not).
"""

from __future__ import annotations

import random
import re

import pytest

from services.store.mailbox import HIERARCHY_DELIMITER as SEP
from services.store.mailbox import INBOX
from tests.integration.imap.clients import Reply, Server, in_thread, message
from tests.integration.imap.conftest import ALICE, ImapStack

NAMES = ["a", f"a{SEP}b", f"a{SEP}b{SEP}c", "b", f"b{SEP}a", f"c{SEP}d", f"{INBOX}{SEP}x", INBOX]
LISTED = re.compile(rb'^\* (?:LIST|LSUB) \(([^)]*)\) (?:"[^"]*"|NIL) (.+)$')
MESSAGES = re.compile(rb"\(MESSAGES (\d+)\)")


@pytest.fixture
def server(imap_server: ImapStack) -> Server:
    return Server.of(imap_server)


def parents(name: str) -> list[str]:
    parts = name.split(SEP)
    return [SEP.join(parts[:i]) for i in range(1, len(parts))]


def quoted(name: str) -> str:
    return '"' + name + '"'


class Model:
    def __init__(self, boxes: dict[str, int], subscribed: set[str]) -> None:
        self.boxes = boxes  # name -> number of messages
        self.subscribed = subscribed

    def create(self, name: str) -> bool:
        if name in self.boxes:
            return False
        for parent in [*parents(name), name]:
            self.boxes.setdefault(parent, 0)
        return True

    def delete(self, name: str) -> bool:
        if name == INBOX or name not in self.boxes:
            return False
        del self.boxes[name]
        return True

    def rename(self, old: str, new: str) -> dict[str, str] | None:
        """The renamed mailboxes (old name -> new name), or None when RENAME must fail."""
        moving = [n for n in self.boxes if n == old or n.startswith(old + SEP)]
        if not moving or new in self.boxes or new == old:
            return None
        if old == INBOX:
            for parent in parents(new):
                self.boxes.setdefault(parent, 0)
            self.boxes[new], self.boxes[INBOX] = self.boxes[INBOX], 0
            return {}  # INBOX itself stays (emptied)
        if new == INBOX or new.startswith(old + SEP):
            return None
        targets = {n: new + n[len(old):] for n in moving}
        if any(t in self.boxes and t not in targets for t in targets.values()):
            return None  # a name the rename frees itself is free
        for parent in parents(new):
            self.boxes.setdefault(parent, 0)
        for source, target in targets.items():
            self.boxes[target] = self.boxes.pop(source)
        # `old` may be only a name (a deleted parent): its subscription follows all the same.
        self.subscribed = {{old: new, **targets}.get(n, n) for n in self.subscribed}
        return targets


def listed(reply: Reply, keyword: bytes) -> set[str]:
    """The names in LIST or LSUB responses. LIST "*" may show the missing parent of a
    mailbox that exists as \\Noselect (RFC 3501 6.3.8): not a mailbox. LSUB shows every
    subscribed name, a missing one as \\Noselect."""
    names = set()
    for line in reply.lines(keyword):
        match = LISTED.match(line)
        assert match, line
        attributes, name = match.group(1).split(), match.group(2)
        if keyword == b"LIST" and (b"\\Noselect" in attributes
                                   or b"\\NonExistent" in attributes):
            continue
        names.add(name.decode().strip('"'))
    return names


class Watcher:
    """A second session with a mailbox selected: it follows the mailbox through renames, sees
    INBOX emptied by RENAME INBOX as expunges, and is told with a BYE when it is deleted."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.raw = server.raw(ALICE)
        self.selected: str | None = None
        self.deleted = False
        self.count = 0

    def select(self, name: str, exists: bool) -> Reply:
        reply = self.raw.command(f"SELECT {quoted(name)}")
        assert reply.status == ("OK" if exists else "NO"), reply
        self.selected = name if exists else None
        self.count = int(reply.lines(b"EXISTS")[0].split()[1]) if exists else 0
        return reply

    def renamed(self, targets: dict[str, str]) -> None:
        if self.selected is not None:
            self.selected = targets.get(self.selected, self.selected)

    def check(self, model: Model, log: list[str]) -> None:
        if self.selected is None:
            return
        reply = self.raw.command("NOOP")
        if self.deleted:
            assert reply.lines(b"BYE") and reply.status == "NO", (reply, log[-6:])
            assert self.raw.closed()
            self.raw, self.selected, self.deleted = self.server.raw(ALICE), None, False
            return
        assert reply.status == "OK" and not reply.lines(b"BYE"), (reply, log[-6:])
        for line in reply.untagged:
            words = line.split()
            if words[2:3] == [b"EXISTS"]:
                self.count = int(words[1])
            elif words[2:3] == [b"EXPUNGE"]:
                self.count -= 1
        assert self.count == model.boxes[self.selected], (self.selected, reply, log[-6:])


class Scenario:
    def __init__(self, server: Server, rng: random.Random) -> None:
        self.actor = server.raw(ALICE)
        self.watcher = Watcher(server)
        self.rng = rng
        self.log: list[str] = []
        self.model = Model({name: 0 for name in listed(self.actor.ok('LIST "" "*"'), b"LIST")},
                           listed(self.actor.ok('LSUB "" "*"'), b"LSUB"))

    def step(self) -> None:
        name = self.rng.choice(NAMES)
        if self.watcher.selected is not None and self.rng.random() < 0.3:
            name = self.watcher.selected  # changes to the selected mailbox, more often
        kind = self.rng.choices(["CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
                                 "APPEND", "SELECT"], [5, 3, 5, 2, 1, 4, 2])[0]
        self.log.append(f"{kind} {name}")
        if kind == "SELECT":
            self.watcher.select(name, name in self.model.boxes)
        elif kind == "APPEND":
            reply = self.actor.literal_command(f"APPEND {quoted(name)}".encode(),
                                               message("m"), plus=True)
            self.expect(reply, name in self.model.boxes)
            if reply.status == "OK":
                self.model.boxes[name] += 1
        elif kind == "RENAME":
            new = self.rng.choice(NAMES)
            self.log[-1] += f" {new}"
            reply = self.actor.command(f"RENAME {quoted(name)} {quoted(new)}")
            targets = self.model.rename(name, new)
            self.expect(reply, targets is not None)
            self.watcher.renamed(targets or {})
        elif kind == "CREATE":
            self.expect(self.actor.command(f"CREATE {quoted(name)}"), self.model.create(name))
        elif kind == "DELETE":
            reply = self.actor.command(f"DELETE {quoted(name)}")
            self.expect(reply, self.model.delete(name))
            if reply.status == "OK" and self.watcher.selected == name:
                self.watcher.deleted = True
        else:
            reply = self.actor.command(f"{kind} {quoted(name)}")
            self.expect(reply, True)
            if kind == "SUBSCRIBE":
                self.model.subscribed.add(name)
            else:
                self.model.subscribed.discard(name)
        self.check()

    def expect(self, reply: Reply, ok: bool) -> None:
        wanted = "OK" if ok else "NO"
        assert reply.status == wanted, (reply, self.log[-6:], sorted(self.model.boxes))

    def check(self) -> None:
        actor = self.actor
        assert listed(actor.ok('LIST "" "*"'), b"LIST") == set(self.model.boxes), self.log[-6:]
        assert listed(actor.ok('LSUB "" "*"'), b"LSUB") == self.model.subscribed, self.log[-6:]
        for name, count in self.model.boxes.items():
            [line] = actor.ok(f"STATUS {quoted(name)} (MESSAGES)").lines(b"STATUS")
            found = MESSAGES.search(line)
            assert found and int(found.group(1)) == count, (name, line, self.log[-6:])
        self.watcher.check(self.model, self.log)


# Seed 17 also renames a parent that is only a name (its mailbox deleted, children left).
@pytest.mark.parametrize("seed", [1, 2, 3, 17])
async def test_mailbox_operations_agree_with_the_model(server: Server, seed: int) -> None:
    def dialog() -> None:
        scenario = Scenario(server, random.Random(seed))
        for _ in range(150):
            scenario.step()

    await in_thread(dialog)
