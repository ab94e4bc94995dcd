"""How many messages a sequence set can cover, for the long-command lane."""

from __future__ import annotations

import pytest

from services.store.imap.lanes import set_size
from services.store.imap.protocol.command import SequenceSet


@pytest.mark.parametrize(("ranges", "uid", "expected"), [
    (((1, 200),), False, 200),
    (((1, None),), False, 1000),  # 1:*
    (((None, None),), False, 1),  # *
    (((200, 1),), False, 200),  # a:b with a > b
    (((5, 5), (7, 9)), False, 4),
    (((1, 5000),), False, 1000),  # beyond the mailbox
    (((1, None),), True, 1000),  # UID 1:*
    (((1990, None),), True, 11),  # UIDs 1990..2000 (uidnext 2001)
    (((5000, 6000),), True, 0),  # UIDs above uidnext: nothing
])
def test_set_size(ranges: tuple[tuple[int | None, int | None], ...], uid: bool,
                  expected: int) -> None:
    assert set_size(SequenceSet(ranges), count=1000, uid=uid, uidnext=2001) == expected
