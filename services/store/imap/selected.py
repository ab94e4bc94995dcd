"""The selected mailbox as one session sees it: the sequence-number map and pending updates.

Sequence number n is position n-1 of the ascending UID list (RFC 3501 2.3.1.2). The session
loads the list once at SELECT and afterwards only applies `changes_since` results, so a command
on a 100,000-message mailbox never rebuilds it: UID -> position is a bisection, new messages
are appended, and expunges are deferred until the session may announce them (RFC 3501 7.4.1:
no EXPUNGE during FETCH, STORE or SEARCH, since sequence numbers must not shift under the
client's feet). Until then an expunged message keeps its sequence number and is skipped where
its contents are needed.

Pure: no I/O. The session feeds `apply(changes)` and writes what `updates()` returns.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence, Set
from types import MappingProxyType

from services.store.backends.snapshots import Snapshot, with_changes
from services.store.imap.protocol import wire
from services.store.imap.protocol.command import SequenceSet
from services.store.imap.protocol.sequence import format_set, select_seqs, select_uid_positions
from services.store.mailbox import Changes, MailboxStatus, MessageInfo

RECENT = "\\Recent"
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
# Deleting this many positions one by one costs more than one rebuild of the lists.
REBUILD_THRESHOLD = 64
# Flag changes kept beside the shared message tuple before the session makes its own list.
OVERLAY_MAX = 1024
FEW_POSITIONS = 1024  # `infos_for` answers up to this many positions without the list
_NO_CHANGES: Mapping[int, MessageInfo] = MappingProxyType({})
# Messages taken in or announced between two turns of the caller's loop (`apply_in_steps`,
# `updates_in_steps`): a STORE 1:* on 32,768 messages took 150-200 ms of Python in each
# session that had the mailbox selected, one after the other, with no turn for anyone else.
STEP = 2048
FLAG_LISTS_MAX = 4096  # formatted flag lists a session keeps (one per distinct flag set)
# Keywords one mailbox may hold. Each is kept with every message that has it and listed in
# FLAGS and PERMANENTFLAGS at every SELECT: unbounded, one account could make the store hold
# gigabytes (400 APPENDs of 1,500 new keywords each: 270 MB more, a 44 MB SELECT). At the
# limit PERMANENTFLAGS no longer offers "\*" (RFC 3501 7.1) and new keywords get NO [LIMIT].
MAX_KEYWORDS = 256
# `* n FETCH (FLAGS ...)` after a flag change, by whether UID and MODSEQ are included.
_FLAGS_FETCH = {
    (False, False): b"* %d FETCH (FLAGS %s)\r\n",
    (True, False): b"* %d FETCH (FLAGS %s UID %d)\r\n",
    (True, True): b"* %d FETCH (FLAGS %s UID %d MODSEQ (%d))\r\n",
}


class InvalidSequence(ValueError):
    """A message sequence number above the number of messages (RFC 3501 6.4.8 / 9)."""


class SelectedMailboxDeleted(Exception):
    """Another session deleted the mailbox this one has selected."""


class SelectedMailbox:
    def __init__(self, name: str, *, readonly: bool, status: MailboxStatus,
                 snapshot: Snapshot, recent_from: int, version: int) -> None:
        self.name = name
        self.readonly = readonly
        self.uidvalidity = status.uidvalidity
        self.highestmodseq = status.highestmodseq
        self._told_highestmodseq = status.highestmodseq  # SELECT's OK [HIGHESTMODSEQ]
        # The UIDs and messages stay the snapshot's, shared, with the flag changes this
        # session learns of kept beside them by position, until an operation needs lists of
        # its own (`_own_infos`, `_own_uids`): for 100,000 messages a copy, and later
        # freeing it, cost milliseconds of the loop, and most sessions never need one.
        self._infos: Sequence[MessageInfo] = snapshot.infos
        self._changed_infos = dict(snapshot.changed)  # position -> newer state
        # The snapshot's own overlay may hold up to OVERLAY_LIMIT changes; only those this
        # session adds count toward OVERLAY_MAX, or nearly every SELECT of a busy mailbox
        # copied 100,000 entries at the next change (and freed them at the next SELECT).
        self._overlay_max = len(self._changed_infos) + OVERLAY_MAX
        # The snapshot's own array until this session adds or removes a UID (`_own_uids`).
        self._uids = snapshot.uids
        self._uids_shared = True
        self.first_unseen_at_select = snapshot.first_unseen
        self.uidnext = max(status.uidnext, self._uids[-1] + 1 if self._uids else 1)
        # The MailDB.version(user) the state reflects: equal means nothing to query.
        self.version = version
        self._gone: set[int] = set()  # expunged in storage, not yet announced
        # While expunges wait: the HIGHESTMODSEQ before the first of them, below their
        # mod-sequences (they came after it), for a client to resynchronise from.
        self._before_gone: int | None = None
        self._flag_updates: set[int] = set()  # flags changed by someone else, not announced
        self._recent: set[int] = set(self._uids[bisect.bisect_left(self._uids, recent_from):])
        self._announced_count = len(self._uids)
        self.keywords: set[str] = set(snapshot.keywords)
        self._keywords_changed = False
        # Every flag seen so far: one subset test tells a message brings nothing new.
        self._flags_seen: set[str] = {*SYSTEM_FLAGS, *self.keywords}
        self._flag_lists: dict[tuple[frozenset[str], bool], bytes] = {}

    # Reading the map

    @property
    def count(self) -> int:
        """EXISTS as the client knows it (announced expunges removed, pending ones kept)."""
        return len(self._uids)

    @property
    def recent_count(self) -> int:
        return len(self._recent)

    @property
    def uids(self) -> Sequence[int]:
        return self._uids

    @property
    def infos(self) -> Sequence[MessageInfo]:
        """Every message in sequence order (index = sequence number - 1)."""
        return self._own_infos() if self._changed_infos else self._infos

    def infos_for(self, positions: Sequence[int]
                  ) -> tuple[Sequence[MessageInfo], Mapping[int, MessageInfo]]:
        """(infos, changed): the message at position p is `changed.get(p) or infos[p]`. For a
        few positions the session's pending changes stay beside the shared list; for many it
        takes its own list (`infos`), which a bulk FETCH would otherwise read through."""
        changed = self._changed_infos
        if changed and len(positions) > FEW_POSITIONS:
            return self.infos, _NO_CHANGES
        return self._infos, changed

    def info(self, position: int) -> MessageInfo:
        return self._changed_infos.get(position) or self._infos[position]

    def _own_uids(self) -> array[int]:
        if self._uids_shared:
            self._uids = self._uids[:]
            self._uids_shared = False
        return self._uids

    def _own_infos(self) -> list[MessageInfo]:
        """The messages as this session's own list, with the pending changes applied."""
        infos = self._infos = with_changes(self._infos, self._changed_infos)
        self._changed_infos.clear()
        return infos

    def is_gone(self, position: int) -> bool:
        return self._uids[position] in self._gone

    @property
    def recent_uids(self) -> Container[int]:
        return self._recent

    def is_recent(self, position: int) -> bool:
        return self._uids[position] in self._recent

    def position_of(self, uid: int) -> int | None:
        position = bisect.bisect_left(self._uids, uid)
        if position < len(self._uids) and self._uids[position] == uid:
            return position
        return None

    def flags_of(self, position: int) -> frozenset[str]:
        flags = self.info(position).flags
        return flags | {RECENT} if self._uids[position] in self._recent else flags

    # Resolving sequence sets to positions, in ascending order without duplicates

    def positions(self, sequence: SequenceSet, *, uid: bool) -> list[int]:
        if uid:
            return select_uid_positions(sequence, self._uids)
        count = len(self._uids)
        for low, high in sequence.ranges:
            # RFC 3501 9 (seq-number): a number above the message count is invalid. A range
            # with "*" ("5:*", "1:*" in an empty mailbox) selects what exists, like UID ranges.
            if low is not None and high is not None and max(low, high) > count:
                raise InvalidSequence(f"sequence number above {count}")
        return [n - 1 for n in select_seqs(sequence, count)]

    # Changes

    def apply(self, changes: Changes) -> list[int]:
        """Take in what changed in storage; returns the UIDs of messages new to this session
        (the caller may claim them as \\Recent). Nothing is announced until `updates()`."""
        new: list[int] = []
        for _ in self.apply_in_steps(changes, new):
            pass
        return new

    def apply_in_steps(self, changes: Changes, new: list[int]) -> Iterator[None]:
        """`apply`, yielding after every STEP messages (the caller lets others run there);
        the new UIDs go into `new`. Nothing else may use the mailbox until it is done."""
        for done, uid in enumerate(changes.expunged, 1):
            if self.position_of(uid) is not None:
                if self._before_gone is None:
                    self._before_gone = self.highestmodseq
                self._gone.add(uid)
                self._flag_updates.discard(uid)
            if done % STEP == 0:
                yield
        last = self._uids[-1] if self._uids else 0
        for done, info in enumerate(sorted(changes.changed, key=lambda i: i.uid), 1):
            if info.uid > last:
                self._own_uids().append(info.uid)
                self._own_infos().append(info)
                self._note_keywords(info.flags)
                new.append(info.uid)
                last = info.uid
            elif self._replace(info):
                self._flag_updates.add(info.uid)
            if done % STEP == 0:
                yield
        self.highestmodseq = max(self.highestmodseq, changes.status.highestmodseq)
        self.uidnext = max(self.uidnext, changes.status.uidnext, last + 1)

    def mark_recent(self, uids: Iterable[int], recent_from: int) -> None:
        """Messages this session claimed as \\Recent (UID >= recent_from)."""
        self._recent.update(uid for uid in uids if uid >= recent_from)

    def update(self, infos: Sequence[MessageInfo]) -> None:
        """Flags this session changed itself (and has already reported, or was asked not to)."""
        if len(infos) > OVERLAY_MAX:
            self._own_infos()  # now rather than after filling the overlay
        for info in infos:
            self._replace(info)
        if self._flag_updates:
            self._flag_updates.difference_update(info.uid for info in infos)

    def _replace(self, info: MessageInfo) -> bool:
        """Store a newer state of a known message; True when its flags differ."""
        position = self.position_of(info.uid)
        if position is None or info.uid in self._gone:
            return False
        known = self.info(position)
        if info.modseq < known.modseq:
            return False
        if isinstance(self._infos, list):
            self._infos[position] = info
        else:
            self._changed_infos[position] = info
            if len(self._changed_infos) > self._overlay_max:
                self._own_infos()
        self._note_keywords(info.flags)
        return info.flags != known.flags

    def _note_keywords(self, flags: frozenset[str]) -> None:
        if flags <= self._flags_seen:
            return
        for flag in flags - self._flags_seen:
            self._flags_seen.add(flag)
            if not flag.startswith("\\"):
                self.keywords.add(flag)
                self._keywords_changed = True

    # Announcing

    def updates(self, *, allow_expunge: bool, qresync: bool, condstore: bool) -> list[bytes]:
        """The untagged responses owed to the client, in a safe order: FLAGS when keywords
        appeared, expunges (only when allowed), EXISTS/RECENT, then flag changes."""
        return [line for lines in self.updates_in_steps(
            allow_expunge=allow_expunge, qresync=qresync, condstore=condstore)
            for line in lines]

    def updates_in_steps(self, *, allow_expunge: bool, qresync: bool,
                         condstore: bool) -> Iterator[list[bytes]]:
        """`updates` in pieces, the flag changes STEP at a time: each piece is to be sent
        before the next is asked for. Nothing else may use the mailbox until it is done."""
        lines = self.keyword_announcement()
        if allow_expunge and self._gone:
            lines.extend(self._announce_expunges(qresync))
        if len(self._uids) != self._announced_count:
            self._announced_count = len(self._uids)
            lines.append(wire.untagged(b"%d EXISTS" % len(self._uids)))
            lines.append(wire.untagged(b"%d RECENT" % len(self._recent)))
        if self._flag_updates:
            uids = sorted(self._flag_updates)
            self._flag_updates.clear()
            for start in range(0, len(uids), STEP):
                positions = [p for p in map(self.position_of, uids[start:start + STEP])
                             if p is not None]
                # RFC 7162 3.2.4: UID and MODSEQ once CONDSTORE (QRESYNC implies it) is on
                lines.extend(self.flags_fetches(positions, uid=condstore, modseq=condstore))
                if start + STEP < len(uids):
                    yield lines
                    lines = []
        if qresync and self._gone and self._before_gone is not None:
            # RFC 5162 erratum 1810, kept by RFC 7162: MODSEQs above held-back expunges (in
            # these FETCHes or the command's own) must not become the client's resync
            # point, or a connection lost now would hide the expunges from it for good.
            lines.append(wire.untagged(b"OK [HIGHESTMODSEQ %d] Expunges pending"
                                       % self._before_gone))
        elif qresync and not self._gone and self.highestmodseq > self._told_highestmodseq:
            # Everything up to it is announced now: the client's resync point (RFC 7162
            # 3.2.5.1, 6). Without it, a client that appended into the mailbox (or saw new
            # mail arrive) kept SELECT's value, and its next SELECT (QRESYNC ...) reported
            # those messages as changed: interimap then took the user's flag change on the
            # other side for a conflict and put the flag back.
            lines.append(wire.untagged(b"OK [HIGHESTMODSEQ %d] Highest" % self.highestmodseq))
        if not self._gone:
            self._told_highestmodseq = self.highestmodseq
        if lines:
            yield lines

    def keyword_announcement(self) -> list[bytes]:
        """FLAGS and PERMANENTFLAGS when keywords appeared since they were last sent: they go
        before any FETCH that shows a new keyword (RFC 3501 7.2.6: FLAGS lists the flags
        applicable to the mailbox)."""
        if not self._keywords_changed:
            return []
        self._keywords_changed = False
        return [wire.untagged(b"FLAGS " + self.flag_list()),
                wire.untagged(b"OK [PERMANENTFLAGS " + self.permanent_flags()
                              + b"] Flags permitted")]

    def forget_expunged(self) -> None:
        """Drop pending expunges without announcing them (CLOSE, RFC 3501 6.4.2)."""
        self._remove(self._gone)

    def _announce_expunges(self, qresync: bool) -> list[bytes]:
        gone = sorted(self._gone)
        if qresync:
            # RFC 7162 3.2.10: VANISHED replaces EXPUNGE once QRESYNC is enabled.
            lines = [wire.untagged(b"VANISHED " + format_uids(gone))]
        else:
            positions = [p for p in (self.position_of(uid) for uid in gone) if p is not None]
            # Descending, so no announced number shifts the ones still to come.
            lines = [wire.untagged(b"%d EXPUNGE" % (p + 1)) for p in reversed(positions)]
        self._remove(set(gone))
        self._announced_count -= len(gone)
        return lines

    def _remove(self, uids: set[int]) -> None:
        if not uids:
            return
        infos = self._own_infos()
        self._own_uids()
        if len(uids) > REBUILD_THRESHOLD:
            keep = [i for i, uid in enumerate(self._uids) if uid not in uids]
            self._infos = [infos[i] for i in keep]
            self._uids = array("q", [self._uids[i] for i in keep])
        else:
            for uid in sorted(uids, reverse=True):
                position = self.position_of(uid)
                if position is not None:
                    del self._uids[position]
                    del infos[position]
        self._recent -= uids
        self._flag_updates -= uids
        self._gone -= uids
        if not self._gone:
            self._before_gone = None

    def flags_fetches(self, positions: Iterable[int], *, uid: bool,
                      modseq: bool) -> list[bytes]:
        """`* n FETCH (FLAGS (...) [UID u] [MODSEQ (m)])` per message. STORE 1:* answers
        100,000 of them, so the loop makes no calls but for a flag set not formatted before.
        MODSEQ comes with UID."""
        template = _FLAGS_FETCH[uid or modseq, modseq]
        changed, infos, recent = self._changed_infos, self._infos, self._recent
        flag_lists = self._flag_lists
        lines = []
        for position in positions:
            info = changed.get(position) or infos[position]
            key = (info.flags, info.uid in recent)
            flags = flag_lists.get(key) or self._format_flags(*key)
            if modseq:
                lines.append(template % (position + 1, flags, info.uid, info.modseq))
            elif uid:
                lines.append(template % (position + 1, flags, info.uid))
            else:
                lines.append(template % (position + 1, flags))
        return lines

    def _format_flags(self, flags: frozenset[str], recent: bool) -> bytes:
        if len(self._flag_lists) >= FLAG_LISTS_MAX:
            self._flag_lists.clear()
        formatted = self._flag_lists[flags, recent] = wire.flag_list(
            flags | {RECENT} if recent else flags)
        return formatted

    def flag_list(self) -> bytes:
        return wire.flag_list([*SYSTEM_FLAGS, *self.keywords])

    def permanent_flags(self) -> bytes:
        if self.readonly:
            return b"()"  # RFC 3501 7.1: none can be changed in a read-only mailbox
        # "\*": clients may create new keywords (RFC 3501 7.1).
        more = ["\\*"] if len(self.keywords) < MAX_KEYWORDS else []
        return wire.flag_list([*SYSTEM_FLAGS, *self.keywords, *more])


def too_many_keywords(flags: Iterable[str], keywords: Set[str]) -> bool:
    """Whether setting `flags` would take a mailbox holding `keywords` past MAX_KEYWORDS."""
    new = {flag for flag in flags if not flag.startswith("\\") and flag not in keywords}
    return bool(new) and len(keywords) + len(new) > MAX_KEYWORDS


def format_uids(numbers: Iterable[int]) -> bytes:
    """Numbers as a compact sequence set: 1:3,7,9:10."""
    return format_set(numbers).encode("ascii")
