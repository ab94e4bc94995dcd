"""The message-list cache: merging changes by UID (and keeping what SELECT derives from the
list: UIDs, keywords, first unseen), and eviction by message count."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.store.backends import snapshots
from services.store.backends.snapshots import MessageListCache, Snapshot, merge
from services.store.mailbox import MessageInfo


def info(uid: int, flags: str = "", modseq: int = 1) -> MessageInfo:
    return MessageInfo(uid, f"{uid:032x}", 10, 0.0, frozenset(flags.split()), modseq)


def snapshot(*infos: MessageInfo) -> Snapshot:
    return Snapshot.of(1, 1, infos)


def test_a_snapshot_derives_uids_keywords_and_the_first_unseen_message() -> None:
    snap = snapshot(info(3, "\\Seen"), info(5, "\\Seen $Work"), info(8), info(9, "todo"))
    assert list(snap.uids) == [3, 5, 8, 9]
    assert snap.keywords == {"$Work", "todo"}
    assert snap.first_unseen == 2
    assert snapshot(info(1, "\\Seen")).first_unseen is None
    assert snapshot().first_unseen is None and not snapshot().uids


def test_merge_puts_new_messages_in_order_replaces_changed_and_drops_expunged() -> None:
    cached = snapshot(info(1), info(2), info(4))
    merged = merge(cached, 9, [info(2, "\\Seen", 5), info(3), info(7)], [1])
    assert merged.messages() == [info(2, "\\Seen", 5), info(3), info(4), info(7)]
    assert list(merged.uids) == [2, 3, 4, 7] and merged.modseq == 9 and merged.first_unseen == 1
    assert cached.infos == (info(1), info(2), info(4)), "the cached snapshot is never changed"


def test_a_merge_keeps_keywords_no_message_has_any_more() -> None:
    cached = snapshot(info(1, "todo"), info(2))
    assert merge(cached, 2, [info(1, "", 2)], []).keywords == {"todo"}


flag_sets = st.sampled_from(["", "\\Seen", "\\Seen \\Answered", "$Work", "\\Seen later"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.integers(1, 60), flag_sets),
       st.lists(st.tuples(st.dictionaries(st.integers(1, 64), flag_sets, max_size=6),
                          st.sets(st.integers(1, 64), max_size=2)), min_size=1, max_size=6),
       st.integers(1, 8))
@example({1: "", 2: "", 3: "\\Seen"}, [({1: "\\Seen"}, set())], 5)  # the first unseen read
@example({1: "\\Seen", 2: ""}, [({2: "\\Seen"}, set()), ({1: ""}, set())], 5)
def test_merges_equal_reading_the_mailbox_again(before: dict[int, str],
                                                steps: list[tuple[dict[int, str], set[int]]],
                                                overlay_limit: int) -> None:
    """Several merges in a row (flag changes kept beside the tuple, folded in once there
    are more than `overlay_limit`, new messages, expunges) against a fresh read."""
    snapshots.OVERLAY_LIMIT, saved = overlay_limit, snapshots.OVERLAY_LIMIT
    try:
        snapshot = Snapshot.of(1, 1, [info(uid, before[uid]) for uid in sorted(before)])
        keywords = set(snapshot.keywords)
        truth = {uid: info(uid, flags) for uid, flags in before.items()}
        for modseq, (changed, expunged) in enumerate(steps, start=2):
            expunged -= changed.keys()  # a UID is never both (UIDs are not reused)
            expunged -= {uid for uid in expunged if uid not in truth}
            changed = {uid: flags for uid, flags in changed.items()
                       if uid in truth or uid > max(truth, default=0)}  # UIDs only grow
            updates = [info(uid, changed[uid], modseq) for uid in sorted(changed)]
            snapshot = merge(snapshot, modseq, updates, sorted(expunged))
            truth.update({u.uid: u for u in updates})
            for uid in expunged:
                del truth[uid]
            reread = Snapshot.of(1, modseq, [truth[uid] for uid in sorted(truth)])
            keywords |= reread.keywords
            assert (snapshot.messages(), list(snapshot.uids), snapshot.first_unseen) == (
                reread.messages(), list(reread.uids), reread.first_unseen)
            assert snapshot.keywords == keywords
            assert all(snapshot.info(p) == m for p, m in enumerate(reread.messages()))
    finally:
        snapshots.OVERLAY_LIMIT = saved


def test_entries_are_dropped_when_uidvalidity_changes_and_evicted_by_size() -> None:
    cache = MessageListCache(capacity=5)
    cache.put("a", "INBOX", Snapshot.of(1, 3, (info(1), info(2), info(3))))
    assert cache.get("a", "INBOX", 1) is not None
    assert cache.get("a", "INBOX", 2) is None  # deleted and created again
    cache.put("b", "INBOX", Snapshot.of(1, 1, (info(1), info(2))))
    cache.get("a", "INBOX", 1)  # a is now the most recently used
    cache.put("c", "INBOX", Snapshot.of(1, 1, (info(1),)))  # 6 > 5: the oldest (b) goes
    assert cache.get("b", "INBOX", 1) is None
    assert cache.get("a", "INBOX", 1) is not None and cache.get("c", "INBOX", 1) is not None
    cache.put("d", "INBOX", Snapshot.of(1, 1, tuple(info(u) for u in range(1, 7))))  # too big
    assert cache.get("d", "INBOX", 1) is None


def test_empty_mailboxes_are_evicted_too() -> None:
    """An empty mailbox counts no messages against the capacity; the cache of a store whose
    accounts each list an empty INBOX once must not keep every one of them."""
    cache = MessageListCache(capacity=100, mailboxes=50)
    for number in range(1000):
        cache.put(f"user{number}@example.test", "INBOX", Snapshot.of(1, 1, ()))
    assert len(cache) == 50
    assert cache.get("user999@example.test", "INBOX", 1) is not None  # the latest are kept
    assert cache.get("user0@example.test", "INBOX", 1) is None


def test_a_mailbox_of_exactly_the_capacity_is_cached() -> None:
    cache = MessageListCache(capacity=3)
    cache.put("a", "INBOX", Snapshot.of(1, 1, (info(1), info(2), info(3))))
    assert cache.get("a", "INBOX", 1) is not None


def test_a_mailbox_cached_again_counts_only_its_latest_snapshot() -> None:
    """Each SELECT of a changed mailbox puts a new snapshot in place of the old one: only
    the new one's messages count against the capacity (counting both evicted every other
    mailbox, and then failed with nothing left to evict)."""
    cache = MessageListCache(capacity=5)
    for modseq in range(1, 6):
        cache.put("a", "INBOX", Snapshot.of(1, modseq, (info(1), info(2), info(3))))
    cache.put("b", "INBOX", Snapshot.of(1, 1, (info(1), info(2))))
    assert cache.get("a", "INBOX", 1) is not None and cache.get("b", "INBOX", 1) is not None
