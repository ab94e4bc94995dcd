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
first unseen message), kept up to date by the merge, so a session's SELECT copies two tuples
instead of passing over 100,000 entries in Python.

Thread-safe (reader threads share it). Snapshots are immutable and shared.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.store.mailbox import MessageInfo

DEFAULT_CAPACITY = 500_000  # messages across all cached mailboxes (~250 octets each)
# Above this many changes a fresh read is cheaper than merging one by one.
MERGE_LIMIT = 5_000
SEEN = "\\Seen"
_UID = operator.itemgetter(0)  # MessageInfo.uid, at C speed
_FLAGS = operator.itemgetter(4)  # MessageInfo.flags


@dataclass(frozen=True)
class Snapshot:
    """A mailbox's messages at one MODSEQ, with what a SELECT derives from them, so that
    twenty sessions selecting the same mailbox derive it once. Shared: never mutated (not
    even the array)."""

    uidvalidity: int
    modseq: int  # the mailbox's HIGHESTMODSEQ when `infos` was true
    infos: tuple[MessageInfo, ...]  # ascending UID
    uids: array[int]  # the UIDs of `infos` (an array: sessions copy it with one memcpy)
    keywords: frozenset[str]  # every keyword set on a message (a merge never drops one)
    first_unseen: int | None  # position of the first message without \Seen

    @classmethod
    def of(cls, uidvalidity: int, modseq: int, infos: Sequence[MessageInfo]) -> Snapshot:
        infos = tuple(infos)
        return cls(uidvalidity, modseq, infos, array("q", map(_UID, infos)), _keywords(infos),
                   _first_unseen(infos, 0))
class MessageListCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str], Snapshot] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.merges = self.misses = 0

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
            while self._size > self._capacity:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted.infos)

    def forget_user(self, user: str) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[0] == user]:
                self._size -= len(self._entries.pop(key).infos)


def merge(old: Snapshot, modseq: int, changed: list[MessageInfo],
          expunged: Iterable[int]) -> Snapshot:
    """`old` at `modseq`: the changed messages (new ones, or their new flags) put in place and
    the expunged UIDs removed; `changed` ascending by UID. New flags and new messages at the
    end, the common cases, cost a copy of the tuple and no pass over its entries."""
    gone = set(expunged)
    infos = list(old.infos)
    uids = old.uids
    appended: list[MessageInfo] = []
    replaced: list[int] = []
    for info in changed:
        at = bisect.bisect_left(uids, info.uid)
        if at < len(uids) and uids[at] == info.uid:
            infos[at] = info
            replaced.append(at)
        elif at == len(uids) and (not appended or appended[-1].uid < info.uid):
            appended.append(info)
        else:  # a UID below the newest one that the old list lacks: rebuild
            return _rebuilt(old, modseq, changed, gone)
    if gone:
        return _rebuilt(old, modseq, changed, gone)
    keywords = old.keywords | _keywords(itertools.chain(
        (infos[at] for at in replaced), appended))
    infos.extend(appended)
    new_uids = uids + array("q", map(_UID, appended)) if appended else uids
    return Snapshot(old.uidvalidity, modseq, tuple(infos), new_uids, keywords,
                    _moved_first_unseen(old.first_unseen, len(uids), infos, replaced))


def _rebuilt(old: Snapshot, modseq: int, changed: list[MessageInfo],
             gone: set[int]) -> Snapshot:
    by_uid = {info.uid: info for info in old.infos}
    by_uid.update((info.uid, info) for info in changed)
    infos = [by_uid[uid] for uid in sorted(by_uid) if uid not in gone]
    merged = Snapshot.of(old.uidvalidity, modseq, infos)
    return Snapshot(merged.uidvalidity, modseq, merged.infos, merged.uids,
                    merged.keywords | old.keywords, merged.first_unseen)


def _moved_first_unseen(first: int | None, old_count: int, infos: list[MessageInfo],
                        replaced: list[int]) -> int | None:
    """The first unseen position after flags changed at `replaced` (and messages may have
    been appended): only an earlier message losing \\Seen, or the first one gaining it,
    moves it, and then no further than the next unseen one."""
    start = old_count if first is None else first
    for at in replaced:
        if at < start and SEEN not in infos[at].flags:
            start = at
    if start < len(infos) and SEEN not in infos[start].flags:
        return start
    return _first_unseen(infos, start)


def _first_unseen(infos: Sequence[MessageInfo], start: int) -> int | None:
    """The first position from `start` whose flags lack \\Seen, at C speed: the distinct flag
    sets (messages share them) are tested once each, then found by identity of membership."""
    rest = itertools.islice(infos, start, None)
    unseen = {flags for flags in set(map(_FLAGS, rest)) if SEEN not in flags}
    if not unseen:
        return None
    hits = map(unseen.__contains__, map(_FLAGS, itertools.islice(infos, start, None)))
    return start + next(itertools.compress(itertools.count(), hits))


def _keywords(infos: Iterable[MessageInfo]) -> frozenset[str]:
    return frozenset(flag for flags in set(map(_FLAGS, infos)) for flag in flags
                     if not flag.startswith("\\"))
