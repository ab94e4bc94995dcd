"""The filter's ledger of unconfirmed publishes (services/filter/unconfirmed.py): which
transaction counts as a retry, expiry, the bound, and entries as other workers announce
them. Redis's side is in tests/integration/filter/test_failures.py and
test_unconfirmed_ledger.py."""

from __future__ import annotations

from services.filter.unconfirmed import UnconfirmedLedger, names_itself, transaction_digest

MESSAGE = b"Subject: hi\r\nMessage-ID: <1@x>\r\nDate: Fri, 4 Dec 2026 21:00 +0000\r\n\r\nbody\r\n"
DATE = b"Date: Fri, 4 Dec 2026 21:00:00 +0000\r\n"


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


def test_a_message_names_itself_with_a_message_id_and_a_date_in_its_header() -> None:
    assert names_itself(MESSAGE)
    assert names_itself(b"MESSAGE-ID : <1@x>\r\n" + DATE + b"\r\nbody\r\n")
    assert names_itself(b"Message-ID:\r\n <1@x>\r\n" + DATE + b"\r\n")  # folded
    assert names_itself(b"Message-ID: <1@x>\n" + DATE.replace(b"\r\n", b"\n") + b"\n")
    not_named = [
        b"Subject: disk full\r\n\r\nMessage-ID: <1@x>\r\n" + DATE,  # in the body
        b"Message-ID: <1@x> deferred\r\nsee the log\r\n" + DATE + b"\r\n",  # no header
        b"Subject: x\r\nMessage-ID: <1@x>\r\n\r\n",  # no Date: a cron job's alert
        b"Subject: x\r\n" + DATE + b"\r\n",  # no Message-ID
        b"Message-ID: \r\n" + DATE + b"\r\n",  # an empty one
        b"X-Message-ID: <1@x>\r\n" + DATE + b"\r\n",
        b"Message-ID: <1@x>\r\n" + DATE,  # no end of the header section
        b"\r\nMessage-ID: <1@x>\r\n" + DATE + b"\r\n",  # an empty header section
    ]
    assert [names_itself(content) for content in not_named] == [False] * len(not_named)


def test_addresses_cannot_join_into_the_same_envelope() -> None:
    assert (transaction_digest("a@x", ["b\0c"], MESSAGE)
            != transaction_digest("a@x", ["b", "c"], MESSAGE))


async def test_a_forgotten_transaction_is_a_new_message_again() -> None:
    ledger = UnconfirmedLedger(None, "t:")
    await ledger.remember("d1", "Q1")
    await ledger.remember("d2", "Q2")
    ledger.forget("d1", "Q1")
    assert ledger.queue_id_for("d1") is None and ledger.queue_id_for("d2") == "Q2"
    ledger._on_message({"type": "message", "data": b"- d2"})  # another worker forgot it
    assert ledger.queue_id_for("d2") is None


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


async def test_past_the_bound_the_earliest_added_go() -> None:
    ledger = UnconfirmedLedger(None, "t:", max_entries=3)
    for n in range(5):
        await ledger.remember(f"d{n}", f"Q{n}")
    assert len(ledger) == 3
    assert [ledger.queue_id_for(f"d{n}") for n in range(5)] == [None, None, "Q2", "Q3", "Q4"]


def test_announced_entries_are_taken_expired_and_malformed_ones_not() -> None:
    clock = Clock()
    ledger = UnconfirmedLedger(None, "t:", clock=clock)
    ledger._on_message({"type": "message", "data": f"d1 Q1 {clock.now + 10:.0f}".encode()})
    ledger._on_message({"type": "message", "data": f"d2 Q2 {clock.now - 1:.0f}".encode()})
    for bad in (b"d3 Q3", b"d3 Q3 soon", b"d3 Q3 1 extra", b""):
        ledger._on_message({"type": "message", "data": bad})
    assert ledger.queue_id_for("d1") == "Q1"
    assert ledger.queue_id_for("d2") is None and ledger.queue_id_for("d3") is None
