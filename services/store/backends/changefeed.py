"""Recent flag changes of each mailbox, in memory, so a session catches up without a query.

Twenty sessions on one mailbox, each changing a flag now and then: every command of every
session found the mailbox changed and asked the index what changed since its MODSEQ, a trip
to a reader thread and two queries, though the answer was one or two flag changes that the
writer had just made. The writer's flag changes are handed to this feed as they are
published (in the event loop, in commit order), with the mailbox's status after them, and
`changes_since` answers from it.

The feed of a mailbox is complete for every MODSEQ above its `base`: flag changes are its
only entries, so any other change of the mailbox (a delivery, an expunge, a move, a rename)
drops the feed, and the next flag change starts a new one whose base is the MODSEQ just
before it. A session whose MODSEQ is below the base, or a mailbox without a feed, is asked
of the index as before. Bounded: ENTRIES per mailbox (older ones are dropped and the base
moves up), MAILBOXES feeds (least recently changed dropped).

Used in the event loop only; no locks.
"""

from __future__ import annotations

import bisect
import operator
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.store.mailbox import Changes, MailboxStatus, MessageInfo

ENTRIES = 1024  # flag changes kept per mailbox (a session further behind asks the index)
MAILBOXES = 256  # mailboxes with a feed: at most 256k entries (~60 MiB) in all
_MODSEQ = operator.itemgetter(5)  # MessageInfo.modseq


@dataclass
class _Feed:
    base: int  # complete for every change with a MODSEQ above this
    status: MailboxStatus  # the mailbox after the last entry
    entries: list[MessageInfo] = field(default_factory=list)  # ascending MODSEQ


class ChangeFeeds:
    def __init__(self, entries: int = ENTRIES, mailboxes: int = MAILBOXES) -> None:
        self._max_entries = entries
        self._max_mailboxes = mailboxes
        self._feeds: OrderedDict[tuple[str, str], _Feed] = OrderedDict()

    def flags_changed(self, user: str, status: MailboxStatus,
                      changed: Iterable[MessageInfo]) -> None:
        """Messages of `status.name` got new flags, all at MODSEQ status.highestmodseq."""
        key = (user, status.name)
        modseq = status.highestmodseq
        feed = self._feeds.get(key)
        if (feed is None or feed.status.uidvalidity != status.uidvalidity
                or feed.status.highestmodseq != modseq - 1):
            # New, or a change it was not told of came in between: complete from here on.
            feed = self._feeds[key] = _Feed(base=modseq - 1, status=status)
        self._feeds.move_to_end(key)
        feed.entries.extend(changed)
        feed.status = status
        if len(feed.entries) > self._max_entries:
            dropped = feed.entries[:len(feed.entries) // 2]
            del feed.entries[:len(dropped)]
            feed.base = max(feed.base, dropped[-1].modseq)
        while len(self._feeds) > self._max_mailboxes:
            self._feeds.popitem(last=False)

    def forget(self, user: str, mailbox: str | None = None) -> None:
        """Something other than flags changed `mailbox` (every mailbox of `user` when None)."""
        if mailbox is not None:
            self._feeds.pop((user, mailbox), None)
            return
        for key in [key for key in self._feeds if key[0] == user]:
            del self._feeds[key]

    def changes_since(self, user: str, mailbox: str, modseq: int) -> Changes | None:
        """What `MailDB.changes_since` would answer, or None when the feed cannot tell."""
        feed = self._feeds.get((user, mailbox))
        if feed is None or modseq < feed.base:
            return None
        entries = feed.entries
        start = bisect.bisect_right(entries, modseq, key=_MODSEQ)
        latest = {info.uid: info for info in entries[start:]}  # a later change wins
        return Changes(status=feed.status, changed=[latest[uid] for uid in sorted(latest)],
                       expunged=[])
