"""What `tiermail deadletters` makes of a dead-lettered message's properties (pure)."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from pamqp.commands import Basic

from common.topology import ENVELOPE_HEADER, message_properties
from services.store import deadletters
from services.store.deadletters import (
    MAILBOXES_HEADER,
    REASON_HEADER,
    DeadLetter,
    describe,
    resend_properties,
)
from tests.integration.store.helpers import make_message

ALICE, GHOST = "alice@example.test", "ghost@example.test"


def dead_copy(**headers: object) -> Basic.Properties:
    envelope, _ = make_message(ALICE, GHOST)
    properties = message_properties(envelope)
    assert properties.headers is not None
    properties.headers.update(headers)
    return properties


def test_a_copy_for_missing_owners_names_only_them_and_the_stores_reason() -> None:
    properties = dead_copy(**{REASON_HEADER: "no such mailbox owner", MAILBOXES_HEADER: GHOST})
    letter = describe(properties, b"12345")
    assert (letter.reason, letter.recipients, letter.size) == (
        "no such mailbox owner", (GHOST,), 5)
    assert letter.sender == "sender@remote.test" and letter.queue_id == properties.message_id
    assert isinstance(letter.received_at, datetime.datetime)


def test_a_message_the_broker_dead_lettered_says_why_in_words() -> None:
    letter = describe(dead_copy(**{"x-first-death-reason": b"delivery_limit"}), b"")
    assert letter.reason == "delivery failed too often (TIERMAIL_DELIVERY_ATTEMPTS)"
    assert letter.recipients == (ALICE, GHOST)
    odd = describe(dead_copy(**{"x-first-death-reason": "expired"}), b"")
    assert odd.reason == "expired"


def test_an_undecodable_message_is_still_described() -> None:
    properties = Basic.Properties(message_id="bad1", headers={ENVELOPE_HEADER: "{not json",
                                                              "x-first-death-reason": "rejected"})
    letter = describe(properties, b"garbage")
    assert (letter.queue_id, letter.sender, letter.recipients, letter.received_at) == (
        "bad1", None, (), None)
    assert letter.reason == "rejected by the store (undecodable)"
    assert describe(Basic.Properties(), b"").as_dict()["reason"] == "unknown"


def test_a_resent_message_keeps_its_envelope_and_sheds_its_dead_letter_history() -> None:
    properties = dead_copy(**{REASON_HEADER: "x", MAILBOXES_HEADER: GHOST,
                              "x-death": [{"reason": "rejected"}], "x-delivery-count": 3,
                              "x-first-death-reason": "rejected", "x-custom": "kept"})
    resent = resend_properties(properties)
    assert resent.headers == {ENVELOPE_HEADER: properties.headers[ENVELOPE_HEADER],  # type: ignore[index]
                              "x-custom": "kept"}
    assert (resent.message_id, resent.delivery_mode, resent.timestamp) == (
        properties.message_id, properties.delivery_mode, properties.timestamp)


async def test_messages_whose_acks_the_broker_ignored_are_settled_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ can ignore acks sent just before a channel closes (the message returns to
    the queue): the queue ids just settled are looked for again, and settled again."""
    queue = [describe(dead_copy(), b"") for _ in range(5)]
    ignored_once = {queue[1].queue_id, queue[3].queue_id}
    passes = []

    async def one_pass(settings: object, chosen: Callable[[DeadLetter], bool], *,
                       resend: bool) -> list[DeadLetter]:
        picked = [letter for letter in queue if chosen(letter)]
        passes.append([letter.queue_id for letter in picked])
        for letter in picked:
            if letter.queue_id in ignored_once:
                ignored_once.discard(letter.queue_id)  # this ack is lost; the next one holds
            else:
                queue.remove(letter)
        return picked

    monkeypatch.setattr(deadletters, "_one_pass", one_pass)
    monkeypatch.setattr(deadletters, "RESETTLE_PAUSE", 0)
    wanted = {letter.queue_id for letter in queue[:4]}
    done = await deadletters.retry(None, lambda letter: letter.queue_id in wanted)  # type: ignore[arg-type]
    assert {letter.queue_id for letter in done} == wanted
    assert [len(p) for p in passes] == [4, 2, 0]  # the last pass finds them gone
    assert [letter.queue_id for letter in queue] == [queue[0].queue_id]  # the one not chosen
