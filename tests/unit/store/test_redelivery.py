"""Renewing a message whose delivery count came from broken links (services/store/redelivery.py),
played against a model of RabbitMQ 3.10's counting: every return counts, and the return
after the delivery whose count equals the limit dead-letters the message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from common.envelope import Envelope, Recipient
from services.store.backends.attempts import AttemptLog
from services.store.redelivery import (
    DELIVERY_COUNT_HEADER,
    MAX_RENEWALS,
    RENEWALS_HEADER,
    Returns,
    attempt_key,
    failed_before,
    renewed_headers,
    returns_of,
    should_renew,
)

# What happens to one delivery of the message.
UNSEEN = "the link breaks before the store sees it"
FAILS = "the store's attempt fails (an error, or the store is killed)"
LOST_ACK = "stored, then the link breaks before the ack arrives"
ACKED = "stored and acked"


@dataclass
class Queued:
    """One message in the broker, and the store's record of it."""

    limit: int
    recorded: bool = True  # False: the store cannot write its record (and dies anyway)
    count: int = 0
    renewals: int = 0
    renewed_at: int = 0
    unfinished: int = 0
    deliveries: int = 0
    failures: int = 0
    renewed: int = 0
    dead: bool = False
    done: bool = False

    def deliver(self, what: str) -> None:
        self.deliveries += 1
        if what != UNSEEN:
            returns = Returns(self.count, self.renewals, self.renewed_at)
            if should_renew(returns, self.unfinished, self.limit):
                self.count, self.renewals, self.renewed_at = 0, self.renewals + 1, self.unfinished
                self.renewed += 1
                return
            if returns.redelivered and self.recorded:
                self.unfinished += 1
            if what == FAILS:
                self.failures += 1
            else:
                self.unfinished = 0
                if what == ACKED:
                    self.done = True
                    return
        self.count += 1
        self.dead = self.count > self.limit

    def run(self, events: list[str]) -> None:
        for what in events:
            if self.dead or self.done:
                return
            self.deliver(what)


limits = st.integers(min_value=3, max_value=12)
# Events within what MAX_RENEWALS allows: a copy is renewed after 3 deliveries or more.
WITHIN_RENEWALS = 3 * MAX_RENEWALS


@given(limits)
def test_a_message_that_always_fails_is_dead_lettered_at_the_limit(limit: int) -> None:
    message = Queued(limit)
    message.run([FAILS] * 100)
    assert message.dead and message.renewed == 0
    assert message.deliveries == limit + 1


@given(limits, st.lists(st.sampled_from([LOST_ACK, ACKED]), max_size=WITHIN_RENEWALS))
def test_a_message_the_store_sees_every_time_is_never_dead_lettered_by_broken_links(
        limit: int, events: list[str]) -> None:
    message = Queued(limit)
    message.run(events)
    assert not message.dead


@given(limits)
def test_acks_lost_every_time_never_dead_letter_within_the_renewals(limit: int) -> None:
    message = Queued(limit)
    message.run([LOST_ACK] * WITHIN_RENEWALS)
    assert not message.dead
    assert message.renewed >= WITHIN_RENEWALS // limit - 1
    message.run([LOST_ACK] * 100 * limit)  # a link that never stops breaking: an end
    assert message.dead and message.renewed == MAX_RENEWALS


@given(st.integers(min_value=4, max_value=12),
       st.lists(st.sampled_from([UNSEEN, LOST_ACK, ACKED]), max_size=WITHIN_RENEWALS))
@example(4, [UNSEEN, LOST_ACK, UNSEEN, UNSEEN, UNSEEN])
def test_links_that_break_less_than_three_times_in_a_row_never_dead_letter(
        limit: int, events: list[str]) -> None:
    """The store renews from the delivery two before the last chance on, so it needs to see
    one of the last three (with a limit of 3, one of the last two: a first copy is renewed
    only once two returns are unexplained)."""
    for at in range(len(events) - 2):
        if events[at:at + 3] == [UNSEEN] * 3:
            events[at + 2] = LOST_ACK
    message = Queued(limit)
    message.run(events)
    assert not message.dead


@given(limits, st.lists(st.sampled_from([UNSEEN, FAILS]), max_size=400))
def test_failures_still_dead_letter_a_message_whatever_the_links_do(
        limit: int, events: list[str]) -> None:
    message = Queued(limit)
    message.run(events)
    assert message.failures <= 2 * limit + 2
    if events.count(FAILS) > 2 * limit + 2:
        assert message.dead


@given(limits)
def test_a_failure_in_every_renewed_copy_still_meets_the_limit(limit: int) -> None:
    """Each copy fails once and loses enough to broken links to be renewed: without a bound
    on the failed attempts over all copies it would go round for ever."""
    message = Queued(limit)
    message.run(([FAILS] + [UNSEEN] * (limit - 2) + [FAILS]) * 10 * limit)
    assert message.dead
    assert message.renewed >= 1
    assert message.failures <= 2 * limit + 2


@given(limits)
def test_a_message_that_kills_a_store_without_its_record_still_meets_an_end(
        limit: int) -> None:
    """A record that misses every attempt explains no return: each copy is renewed, but
    only MAX_RENEWALS times."""
    message = Queued(limit, recorded=False)
    message.run([FAILS] * 10_000)
    assert message.dead
    assert message.renewed == MAX_RENEWALS
    assert message.deliveries <= (MAX_RENEWALS + 1) * (limit + 1)


def test_the_first_renewal_comes_two_deliveries_before_the_last_chance() -> None:
    assert not should_renew(Returns(7, 0, 0), 0, 10)
    assert should_renew(Returns(8, 0, 0), 0, 10)
    # One return unexplained is the unrecorded first delivery, which may have failed.
    assert not should_renew(Returns(8, 0, 0), 7, 10)
    assert should_renew(Returns(8, 0, 0), 6, 10)
    # A renewed copy's attempts are counted from its renewal on.
    assert should_renew(Returns(18, 1, 6), 12, 20)
    assert not should_renew(Returns(18, 1, 2), 19, 20)
    # Every unfinished attempt predates the renewal: this copy's returns were all broken
    # links (it may be stored already), not failures of its own.
    assert should_renew(Returns(8, 1, 7), 7, 10)
    assert not should_renew(Returns(8, 1, 0), 7, 10)  # all 7 are this copy's
    # Failed attempts up to the limit: no more renewals, however few are this copy's.
    assert not should_renew(Returns(10, 3, 0), 10, 10)
    assert not should_renew(Returns(8, 1, 5), 10, 10)
    assert should_renew(Returns(8, 1, 5), 9, 10)
    # A record with fewer attempts than at the renewal (rows forgotten since) holds none of
    # this copy's: no failures, not fewer than none, so one return is not taken for three.
    assert failed_before(Returns(1, 1, 5), 2) == 0
    assert not should_renew(Returns(1, 1, 5), 2, 3)


def test_the_fresh_copy_does_not_carry_the_brokers_count() -> None:
    old = {DELIVERY_COUNT_HEADER: 9, "x-tiermail-envelope": "{}", RENEWALS_HEADER: 2}
    fresh = renewed_headers(old, returns_of(old), 4)
    assert DELIVERY_COUNT_HEADER not in fresh
    assert returns_of(fresh) == Returns(count=0, renewals=3, renewed_at=4)
    assert fresh["x-tiermail-envelope"] == "{}"
    assert returns_of(fresh).redelivered


def test_headers_that_are_not_counts_read_as_none() -> None:
    assert returns_of(None) == Returns(0, 0, 0)
    assert returns_of({DELIVERY_COUNT_HEADER: "9", RENEWALS_HEADER: True}) == Returns(0, 0, 0)
    assert not returns_of({}).redelivered


def test_the_parts_of_a_message_for_a_large_alias_are_recorded_apart() -> None:
    def part(mailbox: str) -> Envelope:
        return Envelope(queue_id="Q1", mail_from="a@example.test",
                        recipients=(Recipient("team@example.test", (mailbox,)),),
                        client_ip="127.0.0.1", client_helo="here", received_at=1.0, size=10)

    first, second = part("a@example.test"), part("b@example.test")
    assert attempt_key(first) != attempt_key(second)
    assert attempt_key(first).startswith("Q1 ")


def test_the_attempt_log_counts_unfinished_attempts_across_a_restart(tmp_path: Path) -> None:
    log = AttemptLog.for_store(tmp_path)
    log.begin(["a", "b"])
    log.begin(["a"])
    assert log.unfinished(["a", "b", "c"]) == {"a": 2, "b": 1, "c": 0}
    log.close()
    log = AttemptLog.for_store(tmp_path)  # a store killed and started again
    assert log.unfinished(["a", "b"]) == {"a": 2, "b": 1}
    log.finished(["a"])
    assert log.unfinished(["a", "b"]) == {"a": 0, "b": 1}
    log.forget_older_than(-1)
    assert log.unfinished(["b"]) == {"b": 0}
    many = [f"m{i}" for i in range(1200)]  # more than one query's parameters
    log.begin(many)
    assert set(log.unfinished(many).values()) == {1}
    log.close()
