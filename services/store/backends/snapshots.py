"""Message lists of recently used mailboxes, kept in memory and brought up to date by MODSEQ.

A SELECT of a 100,000-message mailbox needs every row of it (UID, GUID, size, date, flags,
MODSEQ). Reading and converting them costs a few hundred milliseconds of CPU in the single
store process; a client that reselects, or a second client on the same mailbox, would pay it
again. This cache keeps the list of each recently selected mailbox with the MODSEQ and
UIDVALIDITY it reflects. The next list reads only what changed since (the same
`(mailbox_id, modseq)` and expunge-log queries QRESYNC uses) and merges it.

Correct because every change to a message row gives it a MODSEQ above the mailbox's previous
HIGHESTMODSEQ and every expunge is logged with one; a mailbox deleted and created again, or an
INBOX rename, gets a new UIDVALIDITY, which drops the entry.

A snapshot also carries what every SELECT derives from the list (the UIDs, the keywords, the
first unseen message), kept up to date by the merge, so a session's SELECT shares them
instead of passing over 100,000 entries in Python.

Thread-safe (reader threads share it). Snapshots are immutable and shared.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import operator
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.store.mailbox import MessageInfo

DEFAULT_CAPACITY = 500_000  # messages across all cached mailboxes (~250 octets each)
# Mailboxes cached at once, whatever their size: an empty one counts no messages, and without
# this every empty mailbox a POP3 login or a SELECT ever listed stayed for good (about 700
# octets each: 70 MB for 100,000 accounts' INBOXes). Ten times the default IMAP connection
# limit.
DEFAULT_MAILBOXES = 10_000
# Above this many changes a fresh read is cheaper than merging one by one.
MERGE_LIMIT = 5_000
# Flag changes kept beside a snapshot's tuple before a merge folds them in.
OVERLAY_LIMIT = 4_096
SEEN = "\\Seen"
_UID = operator.itemgetter(0)  # MessageInfo.uid, at C speed
_FLAGS = operator.itemgetter(4)  # MessageInfo.flags


@dataclass(frozen=True)
class Snapshot:
    """A mailbox's messages at one MODSEQ, with what a SELECT derives from them, so that
    twenty sessions selecting the same mailbox derive it once. Shared: never mutated (not
    even the array or the dict).

    Flag changes are kept beside the message tuple (`changed`, by position) rather than
    copied into a new tuple: with twenty sessions changing flags, nearly every SELECT merged
    a few changes, and copying 100,000 entries each time cost milliseconds and swept the
    CPU caches. A merge folds them in once there are OVERLAY_LIMIT, or a message arrives."""

    uidvalidity: int
    modseq: int  # the mailbox's HIGHESTMODSEQ when the snapshot was true
    infos: tuple[MessageInfo, ...]  # ascending UID, without the flag changes in `changed`
    changed: Mapping[int, MessageInfo]  # position -> a newer state of infos[position]
    uids: array[int]  # the UIDs of `infos` (an array: a copy is one memcpy)
    keywords: frozenset[str]  # every keyword set on a message (a merge never drops one)
    first_unseen: int | None  # position of the first message without \Seen

    @classmethod
    def of(cls, uidvalidity: int, modseq: int, infos: Sequence[MessageInfo]) -> Snapshot:
        infos = tuple(infos)
        return cls(uidvalidity, modseq, infos, {}, array("q", map(_UID, infos)),
                   _keywords(infos), _next_unseen(infos, {}, 0))

    def info(self, position: int) -> MessageInfo:
        return self.changed.get(position) or self.infos[position]

    def messages(self) -> list[MessageInfo]:
        """Every message in UID order, as a new list."""
        return with_changes(self.infos, self.changed)


def with_changes(infos: Sequence[MessageInfo],
                 changed: Mapping[int, MessageInfo]) -> list[MessageInfo]:
    """`infos` as a list (a new one unless it is a list already) with the changes by position
    put in place."""
    result = infos if isinstance(infos, list) else list(infos)
    for position, info in changed.items():
        result[position] = info
    return result


class MessageListCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 mailboxes: int = DEFAULT_MAILBOXES) -> None:
        self._capacity = capacity
        self._max_mailboxes = mailboxes
        self._entries: OrderedDict[tuple[str, str], Snapshot] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.merges = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user: str, mailbox: str, uidvalidity: int) -> Snapshot | None:
        with self._lock:
            snapshot = self._entries.get((user, mailbox))
            if snapshot is None or snapshot.uidvalidity != uidvalidity:
                self.misses += 1
                return None
            self._entries.move_to_end((user, mailbox))
            return snapshot

    def put(self, user: str, mailbox: str, snapshot: Snapshot) -> None:
        if len(snapshot.infos) > self._capacity:
            return
        with self._lock:
            old = self._entries.pop((user, mailbox), None)
            if old is not None:
                self._size -= len(old.infos)
            self._entries[(user, mailbox)] = snapshot
            self._size += len(snapshot.infos)
            while self._size > self._capacity or len(self._entries) > self._max_mailboxes:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted.infos)


def merge(old: Snapshot, modseq: int, changed: list[MessageInfo],
          expunged: Iterable[int]) -> Snapshot:
    """`old` at `modseq`: the changed messages (new ones, or their new flags) put in place and
    the expunged UIDs removed; `changed` ascending by UID. New flags cost a copy of the small
    `changed` dict; new messages at the end a copy of the tuple; anything else a rebuild."""
    gone = set(expunged)
    uids = old.uids
    overlay = dict(old.changed)
    appended: list[MessageInfo] = []
    replaced: list[int] = []
    for info in changed:
        at = bisect.bisect_left(uids, info.uid)
        if at < len(uids) and uids[at] == info.uid:
            overlay[at] = info
            replaced.append(at)
        elif at == len(uids) and (not appended or appended[-1].uid < info.uid):
            appended.append(info)
        else:  # a UID below the newest one that the old list lacks: rebuild
            return _rebuilt(old, modseq, changed, gone)
    if gone:
        return _rebuilt(old, modseq, changed, gone)
    keywords = old.keywords | _keywords(itertools.chain(
        (overlay[at] for at in replaced), appended))
    infos, new_uids = old.infos, uids
    if appended or len(overlay) > OVERLAY_LIMIT:
        folded = with_changes(infos, overlay)
        folded.extend(appended)
        infos, overlay = tuple(folded), {}
        if appended:
            new_uids = uids + array("q", map(_UID, appended))
    first = _moved_first_unseen(old.first_unseen, len(uids), infos, overlay, replaced)
    return Snapshot(old.uidvalidity, modseq, infos, overlay, new_uids, keywords, first)


def _rebuilt(old: Snapshot, modseq: int, changed: list[MessageInfo],
             gone: set[int]) -> Snapshot:
    by_uid = {info.uid: info for info in old.messages()}
    by_uid.update((info.uid, info) for info in changed)
    infos = [by_uid[uid] for uid in sorted(by_uid) if uid not in gone]
    merged = Snapshot.of(old.uidvalidity, modseq, infos)
    return dataclasses.replace(merged, keywords=merged.keywords | old.keywords)


def _moved_first_unseen(first: int | None, old_count: int, infos: tuple[MessageInfo, ...],
                        overlay: Mapping[int, MessageInfo], replaced: list[int]) -> int | None:
    """The first unseen position after flags changed at `replaced` (and messages may have
    been appended): only an earlier message losing \\Seen, or the first one gaining it,
    moves it, and then no further than the next unseen one."""
    def flags(position: int) -> frozenset[str]:
        return (overlay.get(position) or infos[position]).flags

    start = old_count if first is None else first
    for at in replaced:
        if at < start and SEEN not in flags(at):
            start = at
    if start < len(infos) and SEEN not in flags(start):
        return start
    return _next_unseen(infos, overlay, start)


def _next_unseen(infos: Sequence[MessageInfo], overlay: Mapping[int, MessageInfo],
                 start: int) -> int | None:
    """The first position from `start` whose flags (from `overlay` where it has the
    position) lack \\Seen. The tuple is scanned at C speed; the overlay is small."""
    best = min((position for position, info in overlay.items()
                if position >= start and SEEN not in info.flags), default=None)
    position = start
    while True:
        found = _first_unseen(infos, position, len(infos) if best is None else best)
        if found is None:
            return best
        if found not in overlay:
            return found
        position = found + 1  # the overlay has it seen (an unseen one would be `best`)


def _first_unseen(infos: Sequence[MessageInfo], start: int, stop: int) -> int | None:
    """The first position in [start, stop) whose flags lack \\Seen, at C speed: stops at the
    first hit, copies nothing."""
    seen = map(operator.contains, map(_FLAGS, map(infos.__getitem__, range(start, stop))),
               itertools.repeat(SEEN))
    return next(itertools.compress(itertools.count(start), map(operator.not_, seen)), None)


def _keywords(infos: Iterable[MessageInfo]) -> frozenset[str]:
    return frozenset(flag for flags in set(map(_FLAGS, infos)) for flag in flags
                     if not flag.startswith("\\"))
