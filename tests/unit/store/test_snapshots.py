"""The message-list cache: merging changes by UID, and eviction by message count."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.store.backends.snapshots import MessageListCache, Snapshot, merge
from services.store.mailbox import MessageInfo


def info(uid: int, flags: str = "", modseq: int = 1) -> MessageInfo:
    return MessageInfo(uid, f"{uid:032x}", 10, 0.0, frozenset(flags.split()), modseq)


def test_merge_puts_new_messages_in_order_replaces_changed_and_drops_expunged() -> None:
    cached = (info(1), info(2), info(4))
    merged = merge(cached, [info(2, "\\Seen", 5), info(3), info(7)], [1])
    assert merged == (info(2, "\\Seen", 5), info(3), info(4), info(7))
    assert cached == (info(1), info(2), info(4)), "the cached tuple is never changed"


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(1, 60)), st.sets(st.integers(1, 80)), st.sets(st.integers(1, 80)))
def test_merge_equals_reading_the_mailbox_again(before: set[int], changed: set[int],
                                                 expunged: set[int]) -> None:
    expunged -= changed  # a UID is never both (UIDs are not reused)
    before -= expunged - before  # expunged UIDs were in the mailbox or are simply unknown
    cached = tuple(info(uid) for uid in sorted(before))
    updates = [info(uid, "\\Flagged", 9) for uid in sorted(changed)]
    merged = merge(cached, updates, sorted(expunged))
    truth = {uid: info(uid) for uid in before}
    truth.update({u.uid: u for u in updates})
    for uid in expunged:
        truth.pop(uid, None)
    assert merged == tuple(truth[uid] for uid in sorted(truth))


def test_entries_are_dropped_when_uidvalidity_changes_and_evicted_by_size() -> None:
    cache = MessageListCache(capacity=5)
    cache.put("a", "INBOX", Snapshot(1, 3, (info(1), info(2), info(3))))
    assert cache.get("a", "INBOX", 1) is not None
    assert cache.get("a", "INBOX", 2) is None  # deleted and created again
    cache.put("b", "INBOX", Snapshot(1, 1, (info(1), info(2))))
    cache.get("a", "INBOX", 1)  # a is now the most recently used
    cache.put("c", "INBOX", Snapshot(1, 1, (info(1),)))  # 6 > 5: the oldest (b) goes
    assert cache.get("b", "INBOX", 1) is None
    assert cache.get("a", "INBOX", 1) is not None and cache.get("c", "INBOX", 1) is not None
    cache.put("d", "INBOX", Snapshot(1, 1, tuple(info(u) for u in range(1, 7))))  # too big
    assert cache.get("d", "INBOX", 1) is None
