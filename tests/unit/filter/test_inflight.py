"""The file of publishes in flight that a killed filter worker leaves for another to adopt
(services/filter/inflight.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from services.filter.inflight import FOREIGN_KEPT, InFlightTable

STACK, OTHER_STACK = "vhost a queues tiermail", "vhost b queues tiermail"
DIGEST = "d" * 64


def killed(table: InFlightTable) -> None:
    """What the kernel does to a killed worker's table: the lock goes, the written pages
    stay (nothing is cleared)."""
    assert table._map is not None and table._file is not None
    table._map.close()
    table._file.close()
    table._map = table._file = None  # its generators, when collected, touch nothing


def test_a_killed_workers_publishes_in_flight_are_adopted_once(tmp_path: Path) -> None:
    dead = InFlightTable(STACK, 4, tmp_path, worker="dead")
    dead.open()
    with dead.holding("a" * 64, "QUEUEDONE"):
        pass  # its outcome came: nothing left of it
    holding = dead.holding(DIGEST, "QUEUEIDTWO")
    holding.__enter__()  # killed with this publish in flight
    killed(dead)
    alive = InFlightTable(STACK, 4, tmp_path, worker="alive")
    assert alive.open() == [(DIGEST, "QUEUEIDTWO")]
    assert not dead.path.exists()
    assert alive.adopt() == []  # once only
    alive.close()
    assert list(tmp_path.iterdir()) == []


def test_a_live_worker_and_another_stack_keep_their_files(tmp_path: Path) -> None:
    live = InFlightTable(STACK, 2, tmp_path, worker="live")
    live.open()
    idle = InFlightTable(OTHER_STACK, 2, tmp_path, worker="idle")
    idle.open()
    other = InFlightTable(OTHER_STACK, 2, tmp_path, worker="other")
    other.open()
    in_flight = other.holding(DIGEST, "OTHERSTACK")
    in_flight.__enter__()  # kept referenced: a collected one would give its slot back
    killed(other)
    killed(idle)  # killed with nothing in flight: nobody needs its file
    with live.holding(DIGEST, "LIVEQUEUE"):
        adopting = InFlightTable(STACK, 2, tmp_path, worker="adopting")
        assert adopting.open() == []
    assert live.path.exists() and other.path.exists() and not idle.path.exists()
    long_ago = time.time() - 2 * FOREIGN_KEPT
    os.utime(other.path, (long_ago, long_ago))
    assert adopting.adopt() == []
    assert not other.path.exists()  # its entries would have expired from its ledger
    live.close()
    adopting.close()


def test_more_publishes_than_slots_go_uncovered_without_harm(tmp_path: Path) -> None:
    table = InFlightTable(STACK, 1, tmp_path, worker="small")
    table.open()
    with table.holding(DIGEST, "FIRST"), table.holding("e" * 64, "SECOND"):
        pass
    in_flight = table.holding(DIGEST, "AGAIN")  # the slot was given back
    in_flight.__enter__()
    killed(table)
    assert InFlightTable(STACK, 1, tmp_path, worker="next").open() == [(DIGEST, "AGAIN")]


def test_publishes_whose_outcome_came_are_not_adopted_after_a_kill(tmp_path: Path) -> None:
    """Two publishes in flight at once, both answered, then the worker is killed: nothing of
    them is left. A confirmed message adopted as uncertain would lend its queue id to a
    later identical submission, which the store would drop as a duplicate: a lost message."""
    table = InFlightTable(STACK, 4, tmp_path, worker="busy")
    table.open()
    with table.holding(DIGEST, "FIRST"), table.holding("e" * 64, "SECOND"):
        pass
    killed(table)
    assert InFlightTable(STACK, 4, tmp_path, worker="next").open() == []
