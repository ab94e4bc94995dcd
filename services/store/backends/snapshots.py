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

Thread-safe (reader threads share it). Lists handed out are copies: callers may change them.
"""

from __future__ import annotations

import bisect
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass

from services.store.mailbox import MessageInfo

DEFAULT_CAPACITY = 500_000  # messages across all cached mailboxes (~250 octets each)
# Above this many changes a fresh read is cheaper than merging one by one.
MERGE_LIMIT = 5_000


@dataclass(frozen=True)
class Snapshot:
    uidvalidity: int
    modseq: int  # the mailbox's HIGHESTMODSEQ when `infos` was true
    infos: tuple[MessageInfo, ...]  # ascending UID; never mutated


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


def merge(infos: tuple[MessageInfo, ...], changed: list[MessageInfo],
          expunged: list[int]) -> tuple[MessageInfo, ...]:
    """`infos` with the changed messages (new ones, or their new flags) put in place and the
    expunged UIDs removed; all three ascending by UID."""
    result = list(infos)
    uids = list(map(operator.itemgetter(0), result)) if (changed or expunged) else []
    gone = set(expunged)
    for info in changed:
        at = bisect.bisect_left(uids, info.uid)
        if at < len(uids) and uids[at] == info.uid:
            result[at] = info
        else:
            result.insert(at, info)
            uids.insert(at, info.uid)
    if gone:
        result = [info for info in result if info.uid not in gone]
    return tuple(result)
