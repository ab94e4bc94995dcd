"""The message-list cache: merging changes by UID (and keeping what SELECT derives from the
list: UIDs, keywords, first unseen), and eviction by message count."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert merged.infos == (info(2, "\\Seen", 5), info(3), info(4), info(7))
    assert list(merged.uids) == [2, 3, 4, 7] and merged.modseq == 9 and merged.first_unseen == 1
    assert cached.infos == (info(1), info(2), info(4)), "the cached snapshot is never changed"


def test_a_merge_keeps_keywords_no_message_has_any_more() -> None:
    cached = snapshot(info(1, "todo"), info(2))
    assert merge(cached, 2, [info(1, "", 2)], []).keywords == {"todo"}


flag_sets = st.sampled_from(["", "\\Seen", "\\Seen \\Answered", "$Work", "\\Seen later"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(1, 60), flag_sets),
       st.dictionaries(st.integers(1, 80), flag_sets), st.sets(st.integers(1, 80)))
def test_merge_equals_reading_the_mailbox_again(before: dict[int, str],
                                                changed: dict[int, str],
                                                expunged: set[int]) -> None:
    expunged -= changed.keys()  # a UID is never both (UIDs are not reused)
    cached = Snapshot.of(1, 1, [info(uid, before[uid]) for uid in sorted(before)])
    updates = [info(uid, changed[uid], 9) for uid in sorted(changed)]
    merged = merge(cached, 9, updates, sorted(expunged))
    truth = {uid: info(uid, flags) for uid, flags in before.items()}
    truth.update({u.uid: u for u in updates})
    for uid in expunged:
        truth.pop(uid, None)
    reread = Snapshot.of(1, 9, [truth[uid] for uid in sorted(truth)])
    assert (merged.infos, merged.uids, merged.first_unseen) == (
        reread.infos, reread.uids, reread.first_unseen)
    assert merged.keywords == reread.keywords | cached.keywords


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
