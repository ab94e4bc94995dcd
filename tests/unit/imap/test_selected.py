"""The selected mailbox's view: a session keeps the shared snapshot's message tuple and the
flag changes it learns of beside it until it needs a list of its own. Whichever it holds, it
must answer exactly as a session that copied the list at SELECT."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.store.backends.snapshots import Snapshot, merge
from services.store.imap import selected as selected_module
from services.store.imap.selected import SelectedMailbox
from services.store.mailbox import (
    Changes,
    MailboxStatus,
    MessageInfo,
    every_spelling,
    in_known_spelling,
)

FLAG_SETS = [frozenset(), frozenset({"\\Seen"}), frozenset({"\\Seen", "$Work"}),
             frozenset({"\\Answered"})]


def info(uid: int, flags: frozenset[str], modseq: int) -> MessageInfo:
    return MessageInfo(uid, f"{uid:032x}", 10, 0.0, flags, modseq)


def shared_snapshot(count: int, changed_uids: Sequence[int] = ()) -> Snapshot:
    """A mailbox of `count` messages whose snapshot holds flag changes to `changed_uids` in
    its overlay, as one does after other sessions' STOREs."""
    infos = [info(uid, FLAG_SETS[uid % 4], 1) for uid in range(1, count + 1)]
    changed = [info(uid, FLAG_SETS[(uid + 1) % 4], 2)
               for uid in sorted(set(changed_uids)) if uid <= count]
    return merge(Snapshot.of(1, 1, infos), 2, changed, [])


def open_view(count: int, own_list: bool, changed_uids: Sequence[int] = ()) -> SelectedMailbox:
    snapshot = shared_snapshot(count, changed_uids)
    status = MailboxStatus("INBOX", uidvalidity=1, uidnext=count + 1,
                           highestmodseq=snapshot.modseq, messages=count)
    view = SelectedMailbox("INBOX", readonly=False, status=status, snapshot=snapshot,
                           recent_from=count + 1, version=0)
    if own_list:
        view._own_infos()  # as if a bulk operation had needed the list at once
    return view


steps = st.lists(st.tuples(
    st.sampled_from(["flags", "new", "expunge", "announce", "bulk"]),
    st.lists(st.integers(1, 40), max_size=8), st.integers(0, 3)), max_size=25)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), steps, st.integers(1, 6), st.lists(st.integers(1, 30), max_size=8))
@example(10, [("flags", [1], 2), ("announce", [], 0)], 5, [])
@example(10, [("flags", [1, 2], 2), ("flags", [3], 1), ("bulk", [], 0)], 1, [2, 4])
def test_a_view_on_the_shared_tuple_answers_as_one_with_its_own_list(
        count: int, script: list[tuple[str, list[int], int]], overlay_max: int,
        changed_in_snapshot: list[int]) -> None:
    selected_module.OVERLAY_MAX, saved = overlay_max, selected_module.OVERLAY_MAX
    try:
        shared = open_view(count, own_list=False, changed_uids=changed_in_snapshot)
        own = open_view(count, own_list=True, changed_uids=changed_in_snapshot)
        modseq, next_uid = 2, count + 1
        for kind, uids, flag_index in script:
            modseq += 1
            if kind == "flags":
                changed = [info(u, FLAG_SETS[flag_index], modseq) for u in sorted(set(uids))]
                changes = Changes(MailboxStatus("INBOX", 1, next_uid, modseq, 0), changed, [])
            elif kind == "new":
                changed = [info(next_uid, FLAG_SETS[flag_index], modseq)]
                next_uid += 1
                changes = Changes(MailboxStatus("INBOX", 1, next_uid, modseq, 0), changed, [])
            elif kind == "expunge":
                changes = Changes(MailboxStatus("INBOX", 1, next_uid, modseq, 0), [],
                                  sorted(set(uids)))
            for view in (shared, own):
                if kind in ("flags", "new", "expunge"):
                    view.apply(changes)
                elif kind == "bulk":
                    view.infos  # noqa: B018 - a FETCH 1:* asks for the whole list
            if kind == "announce":
                assert (shared.updates(allow_expunge=True, qresync=False, condstore=True)
                        == own.updates(allow_expunge=True, qresync=False, condstore=True))
            positions = list(range(shared.count))
            assert [shared.info(p) for p in positions] == [own.info(p) for p in positions]
            infos, changed = shared.infos_for(positions)  # without a list of its own
            assert ([changed.get(p) or infos[p] for p in positions]
                    == [own.info(p) for p in positions])
            assert [shared.flags_of(p) for p in positions] == [own.flags_of(p) for p in positions]
        assert list(shared.infos) == list(own.infos)
    finally:
        selected_module.OVERLAY_MAX = saved


def test_the_snapshots_own_changes_do_not_make_a_session_copy_the_list() -> None:
    """Other sessions' STOREs leave up to OVERLAY_LIMIT changes in the shared snapshot. A
    session selecting it must not take a list of its own (a copy of the whole mailbox) at
    the next change it learns of: only its own OVERLAY_MAX count."""
    many = selected_module.OVERLAY_MAX + 10
    count = 3 * many
    view = open_view(count, own_list=False, changed_uids=range(1, many + 1))
    shared_infos = view._infos
    status = MailboxStatus("INBOX", 1, count + 1, 3, count)
    view.apply(Changes(status, [info(many + 2, frozenset({"$Mine"}), 3)], []))
    assert view._infos is shared_infos
    assert view.info(many + 1).flags == {"$Mine"}
    assert view.info(0).flags == FLAG_SETS[2]  # the snapshot's change to UID 1
    # Past OVERLAY_MAX changes of its own, the session takes its list.
    changes = [info(uid, frozenset({"\\Draft"}), 4)
               for uid in range(many + 3, many + selected_module.OVERLAY_MAX + 4)]
    view.apply(Changes(MailboxStatus("INBOX", 1, count + 1, 4, count), changes, []))
    assert isinstance(view._infos, list)
    assert view.info(0).flags == FLAG_SETS[2]
    assert view.info(many + 2).flags == {"\\Draft"}


def test_flag_fetch_lines_carry_recent_uid_and_modseq_as_asked() -> None:
    """One message \\Recent, one not, with the same stored flags: the formatted flag lists
    the view keeps per flag set must not give one's list to the other."""
    infos = [info(1, frozenset({"\\Seen"}), 3), info(2, frozenset({"\\Seen"}), 4)]
    view = SelectedMailbox("INBOX", readonly=False,
                           status=MailboxStatus("INBOX", 1, 3, 4, 2),
                           snapshot=Snapshot.of(1, 1, infos), recent_from=2, version=0)
    assert view.flags_fetches([0, 1], uid=False, modseq=False) == [
        b"* 1 FETCH (FLAGS (\\Seen))\r\n", b"* 2 FETCH (FLAGS (\\Recent \\Seen))\r\n"]
    assert view.flags_fetches([1, 0], uid=True, modseq=False) == [
        b"* 2 FETCH (FLAGS (\\Recent \\Seen) UID 2)\r\n", b"* 1 FETCH (FLAGS (\\Seen) UID 1)\r\n"]
    assert view.flags_fetches([0], uid=True, modseq=True)[0] == (
        b"* 1 FETCH (FLAGS (\\Seen) UID 1 MODSEQ (3))\r\n")


def test_a_new_keyword_is_announced_once_with_the_flags_it_joins() -> None:
    view = open_view(4, own_list=False)  # $Work is known from the start
    status = MailboxStatus("INBOX", 1, 5, 2, 4)
    view.apply(Changes(status, [info(1, frozenset({"\\Seen", "$Work"}), 2)], []))
    assert view.updates(allow_expunge=True, qresync=False, condstore=False) == [
        b"* 1 FETCH (FLAGS (\\Seen $Work))\r\n"]
    view.apply(Changes(status, [info(3, frozenset({"$New"}), 3)], []))
    assert view.updates(allow_expunge=True, qresync=False, condstore=False) == [
        b"* FLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen $New $Work)\r\n",
        b"* OK [PERMANENTFLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen $New $Work \\*)]"
        b" Flags permitted\r\n",
        b"* 3 FETCH (FLAGS ($New))\r\n"]
    view.update([info(1, frozenset({"$New", "$Other"}), 4)])  # this session's own STORE
    assert view.keywords == {"$Work", "$New", "$Other"}
    lines = view.updates(allow_expunge=True, qresync=False, condstore=False)
    assert lines[0] == (b"* FLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen $New $Other"
                        b" $Work)\r\n")
    assert len(lines) == 2  # FLAGS and PERMANENTFLAGS; its own change is not echoed


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(1, 12), max_size=12),
       st.lists(st.integers(1, 12), max_size=6), st.integers(0, 3), st.booleans())
def test_taking_changes_in_steps_answers_as_taking_them_at_once(
        count: int, changed: list[int], expunged: list[int], new: int,
        condstore: bool) -> None:
    """A session takes in and announces a large change a STEP at a time, letting other
    sessions run in between; what it ends up announcing must not change."""
    status = MailboxStatus("INBOX", 1, count + new + 1, 5, count + new)
    changes = Changes(status, [info(uid, frozenset({f"$K{uid % 3}"}), 5)
                               for uid in [*changed, *range(count + 1, count + new + 1)]],
                      sorted(set(expunged)))
    whole, stepped = open_view(count, own_list=False), open_view(count, own_list=False)
    saved = selected_module.STEP
    selected_module.STEP = 2
    try:
        new_whole = whole.apply(changes)
        new_stepped: list[int] = []
        turns = sum(1 for _ in stepped.apply_in_steps(changes, new_stepped))
        pieces = list(stepped.updates_in_steps(allow_expunge=True, qresync=False,
                                               condstore=condstore))
    finally:
        selected_module.STEP = saved
    assert new_stepped == new_whole
    assert turns == len(changes.expunged) // 2 + len(changes.changed) // 2
    assert [line for piece in pieces for line in piece] == whole.updates(
        allow_expunge=True, qresync=False, condstore=condstore)
    fetches = [sum(b" FETCH " in line for line in piece) for piece in pieces]
    assert all(count <= 2 for count in fetches)


def test_keywords_take_the_spelling_the_mailbox_knows() -> None:
    # RFC 3501 9: case-insensitive; the first spelling of a new keyword wins within a command
    assert in_known_spelling(["junk", "\\Seen", "New"], {"Junk", "Other"}) == {
        "Junk", "\\Seen", "New"}
    assert len(in_known_spelling(["Fresh", "FRESH"], set())) == 1


def test_a_spelling_the_mailbox_has_is_kept_and_minus_takes_every_spelling() -> None:
    # A mailbox from before keywords were case-insensitive may hold "Junk" and "junk".
    both = {"Junk", "junk"}
    for _ in range(5):  # the same answer whatever the set's order
        assert in_known_spelling(["junk", "Junk"], both) == both
        assert in_known_spelling(["JUNK"], both) == {"Junk"}
    assert every_spelling(["jUNK", "\\Seen"], both | {"Other"}) == {
        "jUNK", "Junk", "junk", "\\Seen"}
