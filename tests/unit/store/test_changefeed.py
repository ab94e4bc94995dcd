"""The in-memory feed of flag changes (changefeed.py), and MailDB answering from it exactly
what the index would answer."""

from __future__ import annotations

import functools
import random
from pathlib import Path

from services.store.backends.changefeed import ChangeFeeds
from services.store.backends.maildb import MailDB
from services.store.mailbox import INBOX, Changes, MailboxStatus, MessageInfo

ALICE = "alice@example.test"


def status(modseq: int, uidvalidity: int = 7) -> MailboxStatus:
    return MailboxStatus(INBOX, uidvalidity, 100, modseq, 50)


def info(uid: int, flags: str, modseq: int) -> MessageInfo:
    return MessageInfo(uid, f"{uid:032x}", 10, 0.0, frozenset(flags.split()), modseq)


def test_the_feed_answers_from_its_base_on_with_the_latest_state_of_each_message() -> None:
    feeds = ChangeFeeds()
    feeds.flags_changed(ALICE, status(11), [info(5, "\\Seen", 11), info(9, "\\Seen", 11)])
    feeds.flags_changed(ALICE, status(12), [info(5, "", 12)])
    assert feeds.changes_since(ALICE, INBOX, 9) is None  # before the feed began
    since_10 = feeds.changes_since(ALICE, INBOX, 10)
    assert since_10 == Changes(status(12), [info(5, "", 12), info(9, "\\Seen", 11)], [])
    assert feeds.changes_since(ALICE, INBOX, 11) == Changes(status(12), [info(5, "", 12)], [])
    assert feeds.changes_since(ALICE, INBOX, 12) == Changes(status(12), [], [])
    assert feeds.changes_since(ALICE, "Junk", 12) is None


def test_a_gap_or_another_kind_of_change_restarts_the_feed() -> None:
    feeds = ChangeFeeds()
    feeds.flags_changed(ALICE, status(11), [info(5, "\\Seen", 11)])
    feeds.flags_changed(ALICE, status(14), [info(6, "\\Seen", 14)])  # 12, 13 not seen here
    assert feeds.changes_since(ALICE, INBOX, 12) is None
    assert feeds.changes_since(ALICE, INBOX, 13) == Changes(status(14), [info(6, "\\Seen", 14)],
                                                           [])
    feeds.forget(ALICE, INBOX)
    assert feeds.changes_since(ALICE, INBOX, 14) is None
    feeds.flags_changed(ALICE, status(15), [info(6, "", 15)])
    feeds.flags_changed(ALICE, status(16, uidvalidity=8), [info(1, "", 16)])  # recreated
    assert feeds.changes_since(ALICE, INBOX, 14) is None
    feeds.forget(ALICE)
    assert feeds.changes_since(ALICE, INBOX, 16) is None


def test_old_entries_are_dropped_and_the_base_moves_up() -> None:
    feeds = ChangeFeeds(entries=4)
    for modseq in range(11, 17):
        feeds.flags_changed(ALICE, status(modseq), [info(modseq, "\\Seen", modseq)])
    assert feeds.changes_since(ALICE, INBOX, 11) is None
    assert feeds.changes_since(ALICE, INBOX, 14) == Changes(
        status(16), [info(15, "\\Seen", 15), info(16, "\\Seen", 16)], [])


async def test_maildb_answers_from_the_feed_what_the_index_answers(tmp_path: Path) -> None:
    """Random flag changes, appends, expunges and moves; after each, changes since every
    MODSEQ from the feed (where it answers) equal the index's answer."""
    db = MailDB(tmp_path / "mail", inline_max=65536)
    rng = random.Random(20261203)
    flags = ["\\Seen", "\\Flagged", "$Work", "\\Answered"]
    try:
        uids = [(await db.append(ALICE, INBOX, b"Subject: x\r\n\r\nbody\r\n", frozenset())).uid
                for _ in range(20)]
        answered = 0
        for _ in range(150):
            roll = rng.random()
            if roll < 0.75 and uids:
                chosen = rng.sample(uids, rng.randint(1, min(4, len(uids))))
                await db.store_flags(ALICE, INBOX, chosen, rng.choice("+-"),
                                     frozenset(rng.sample(flags, rng.randint(1, 2))))
            elif roll < 0.85:
                uids.append((await db.append(ALICE, INBOX, b"Subject: y\r\n\r\nb\r\n",
                                             frozenset())).uid)
            elif roll < 0.95 and uids:
                gone = uids.pop(rng.randrange(len(uids)))
                await db.expunge(ALICE, INBOX, [gone])
            elif uids:
                await db.move(ALICE, INBOX, [uids.pop(rng.randrange(len(uids)))], "Archive")
            highest = (await db.status(ALICE)).highestmodseq
            for since in range(max(0, highest - 6), highest + 1):
                from_feed = db._feeds.changes_since(ALICE, INBOX, since)
                if from_feed is None:
                    continue
                answered += 1
                from_index = await db._read(functools.partial(db._changes_sync, modseq=since),
                                            ALICE, INBOX)
                assert from_feed == from_index, f"since {since}"
        assert answered > 200, "the feed answered too rarely for the comparison to mean much"
    finally:
        await db.close()
