"""The filter's ledger of unconfirmed publishes (services/filter/unconfirmed.py): which
transaction counts as a retry, expiry, the bound, and entries as other workers announce
them. Redis's side is in tests/integration/filter/test_failures.py."""

from __future__ import annotations

from services.filter.unconfirmed import UnconfirmedLedger, names_itself, transaction_digest

MESSAGE = b"Subject: hi\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_same_transaction_has_the_same_digest_and_any_difference_another() -> None:
    digest = transaction_digest("a@x", ["b@y", "c@y"], MESSAGE)
    assert digest == transaction_digest("a@x", ["b@y", "c@y"], MESSAGE)
    others = {transaction_digest("a@x", ["c@y", "b@y"], MESSAGE),
              transaction_digest("", ["b@y", "c@y"], MESSAGE),
              transaction_digest("a@x", ["b@y"], MESSAGE),
              transaction_digest("a@x", ["b@y", "c@y"], MESSAGE + b"."),
              transaction_digest("a@xb@y", ["c@y"], MESSAGE)}  # no ambiguity at the joins
    assert digest not in others and len(others) == 5


def test_only_a_message_with_a_message_id_names_itself() -> None:
    assert names_itself(MESSAGE)
    assert names_itself(b"Subject: x\r\nMESSAGE-ID: <1@x>\r\n\r\nbody\r\n")
    assert names_itself(b"Message-ID: <1@x>\r\n\r\n")
    assert not names_itself(b"Subject: disk full\r\n\r\nMessage-ID: <in the body>\r\n")
    assert not names_itself(b"Subject: x\r\nX-Message-ID: <1@x>\r\n\r\nbody\r\n")
    assert not names_itself(b"Subject: x\r\n\r\n")


async def test_a_remembered_transaction_gives_its_queue_id_until_it_expires() -> None:
    clock = Clock()
    ledger = UnconfirmedLedger(None, "t:", window=100, clock=clock)
    assert ledger.queue_id_for("d1") is None
    await ledger.remember("d1", "Q1")
    assert ledger.queue_id_for("d1") == "Q1" and ledger.queue_id_for("d2") is None
    clock.now += 99
    assert ledger.queue_id_for("d1") == "Q1"
    clock.now += 1
    assert ledger.queue_id_for("d1") is None and len(ledger) == 0


async def test_past_the_bound_the_expired_then_the_oldest_go() -> None:
    clock = Clock()
    ledger = UnconfirmedLedger(None, "t:", window=100, max_entries=3, clock=clock)
    await ledger.remember("old", "Q0")
    clock.now += 60
    for n in (1, 2):
        await ledger.remember(f"d{n}", f"Q{n}")
    clock.now += 50  # "old" has expired, d1 and d2 have not
    await ledger.remember("d3", "Q3")
    assert [ledger.queue_id_for(d) for d in ("old", "d1", "d2", "d3")] == [None, "Q1", "Q2",
                                                                         "Q3"]
    await ledger.remember("d4", "Q4")  # none expired: the oldest (d1) goes
    assert [ledger.queue_id_for(d) for d in ("d1", "d2", "d3", "d4")] == [None, "Q2", "Q3",
                                                                        "Q4"]


def test_announced_entries_are_taken_expired_and_malformed_ones_not() -> None:
    clock = Clock()
    ledger = UnconfirmedLedger(None, "t:", clock=clock)
    ledger._on_message({"type": "message", "data": f"d1 Q1 {clock.now + 10:.0f}".encode()})
    ledger._on_message({"type": "message", "data": f"d2 Q2 {clock.now - 1:.0f}".encode()})
    for bad in (b"d3 Q3", b"d3 Q3 soon", b"d3 Q3 1 extra", b""):
        ledger._on_message({"type": "message", "data": bad})
    assert ledger.queue_id_for("d1") == "Q1"
    assert ledger.queue_id_for("d2") is None and ledger.queue_id_for("d3") is None
