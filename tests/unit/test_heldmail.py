"""What `tiermail deadletters` and `tiermail quarantine` make of a held message (pure), and
how they settle again what the broker returned."""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import AsyncIterator, Callable

import pytest
from pamqp.commands import Basic

from common.topology import (
    ENVELOPE_HEADER,
    MAILBOXES_HEADER,
    REASON_HEADER,
    RESENT_AT_HEADER,
    Topology,
    message_properties,
)
from services import heldmail
from services.heldmail import RELEASE_HEADER, HeldMessage, describe, resend_properties
from tests.integration.store.helpers import make_message

ALICE, GHOST = "alice@example.test", "ghost@example.test"
DEAD = heldmail.dead_letters(Topology()).reason
QUARANTINE = heldmail.quarantine(Topology()).reason


def dead_copy(**headers: object) -> Basic.Properties:
    envelope, _ = make_message(ALICE, GHOST)
    properties = message_properties(envelope)
    assert properties.headers is not None
    properties.headers.update(headers)
    return properties


def test_a_copy_for_missing_owners_names_only_them_and_the_stores_reason() -> None:
    properties = dead_copy(**{REASON_HEADER: "no such mailbox owner", MAILBOXES_HEADER: GHOST})
    held = describe(properties, b"12345", DEAD)
    assert (held.reason, held.recipients, held.size) == ("no such mailbox owner", (GHOST,), 5)
    assert held.sender == "sender@remote.test" and held.queue_id == properties.message_id
    assert isinstance(held.received_at, datetime.datetime)


def test_a_message_the_broker_dead_lettered_says_why_in_words() -> None:
    held = describe(dead_copy(**{"x-first-death-reason": b"delivery_limit"}), b"", DEAD)
    assert held.reason == "delivery failed too often (TIERMAIL_DELIVERY_ATTEMPTS)"
    assert held.recipients == (ALICE, GHOST)
    odd = describe(dead_copy(**{"x-first-death-reason": "expired"}), b"", DEAD)
    assert odd.reason == "expired"


def test_a_dead_letter_of_the_scan_queue_says_it_was_never_scanned() -> None:
    scan_queue = {"x-first-death-queue": Topology().scan_queue}
    held = describe(dead_copy(**scan_queue, **{"x-first-death-reason": "delivery_limit"}),
                    b"", DEAD)
    assert held.reason == "not scanned: given back to the scan queue 100 times"
    held = describe(dead_copy(**scan_queue, **{"x-first-death-reason": "rejected"}), b"", DEAD)
    assert held.reason.startswith("not scanned: rejected by the deferred scanner (undecodable")


def test_an_undecodable_message_is_still_described() -> None:
    properties = Basic.Properties(message_id="bad1", headers={ENVELOPE_HEADER: "{not json",
                                                              "x-first-death-reason": "rejected"})
    held = describe(properties, b"garbage", DEAD)
    assert (held.queue_id, held.sender, held.recipients, held.received_at) == (
        "bad1", None, (), None)
    assert held.reason == "rejected by the store (undecodable)"
    assert describe(Basic.Properties(), b"", DEAD).as_dict()["reason"] == "unknown"


@pytest.mark.parametrize(("body", "reason"), [
    (b"X-Tiermail-Virus: Eicar-Signature.UNOFFICIAL\r\nFrom: a@b\r\n\r\nx",
     "virus Eicar-Signature.UNOFFICIAL"),
    (b"x-tiermail-scan: not scanned (too big for the virus scanner)\r\n\r\nx",
     "not scanned (too big for the virus scanner)"),
    (b"From: a@b\r\n\r\nX-Tiermail-Virus: in the body, not a header\r\n", "quarantined"),
    (b"", "quarantined"),
])
def test_a_quarantined_message_says_what_the_scan_found(body: bytes, reason: str) -> None:
    assert describe(dead_copy(), body, QUARANTINE).reason == reason


def test_a_resent_message_keeps_its_envelope_and_sheds_its_dead_letter_history() -> None:
    properties = dead_copy(**{REASON_HEADER: "x", MAILBOXES_HEADER: GHOST,
                              "x-death": [{"reason": "rejected"}], "x-delivery-count": 3,
                              "x-first-death-reason": "rejected", "x-custom": "kept"})
    before = time.time()
    resent = resend_properties(properties)
    assert properties.headers is not None and resent.headers is not None
    # When it was sent back: the store counts its delivery lag from then.
    resent_at = resent.headers.pop(RESENT_AT_HEADER)
    assert isinstance(resent_at, int) and before * 1000 - 1 <= resent_at <= time.time() * 1000
    assert resent.headers == {ENVELOPE_HEADER: properties.headers[ENVELOPE_HEADER],
                              "x-custom": "kept"}
    assert (resent.message_id, resent.delivery_mode, resent.timestamp) == (
        properties.message_id, properties.delivery_mode, properties.timestamp)
    # A release marks what it sends back; a later release replaces the mark.
    marked = resend_properties(properties, "first")
    assert marked.headers is not None and marked.headers[RELEASE_HEADER] == "first"
    again = resend_properties(marked, "second")
    assert again.headers is not None and again.headers[RELEASE_HEADER] == "second"
    unmarked = resend_properties(marked).headers
    assert unmarked is not None and RESENT_AT_HEADER in unmarked
    assert {k: v for k, v in unmarked.items() if k != RESENT_AT_HEADER} == resent.headers


async def test_messages_whose_acks_the_broker_ignored_are_settled_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ can ignore acks sent just before a channel closes (the message returns to
    the queue): the queue ids just settled are looked for again, and settled again."""
    queue = [describe(dead_copy(), b"", DEAD) for _ in range(5)]
    ignored_once = {queue[1].queue_id, queue[3].queue_id}
    passes = []

    async def one_pass(connection: object, settings: object, where: object,
                       chosen: Callable[[HeldMessage], bool],
                       *, resend: bool, release: str | None = None,
                       sent: set[heldmail.CopyKey] | None = None,
                       outcome: heldmail.Outcome | None = None) -> list[HeldMessage]:
        picked = [held for held in queue if chosen(held)]
        if outcome is not None:
            outcome.settled.extend(picked)
        passes.append([held.queue_id for held in picked])
        for held in picked:
            if held.queue_id in ignored_once:
                ignored_once.discard(held.queue_id)  # this ack is lost; the next one holds
            else:
                queue.remove(held)
        return picked

    @contextlib.asynccontextmanager
    async def unlocked(settings: object, where: object) -> AsyncIterator[None]:
        yield None  # (the lock needs a broker: tests/integration/store/test_consumer.py)

    monkeypatch.setattr(heldmail, "_one_pass", one_pass)
    monkeypatch.setattr(heldmail, "_locked", unlocked)
    monkeypatch.setattr(heldmail, "RESETTLE_PAUSE", 0)
    wanted = {held.queue_id for held in queue[:4]}
    unchosen = queue[4].queue_id
    done = await heldmail.release(None, None,  # type: ignore[arg-type]
                                  lambda held: held.queue_id in wanted)
    assert {held.queue_id for held in done} == wanted
    assert [len(p) for p in passes] == [4, 2, 0]  # the last pass finds them gone
    assert [held.queue_id for held in queue] == [unchosen]


def test_copies_of_a_held_message_are_one_message_per_queue_id_and_recipients() -> None:
    """A crash between publishing a message to a held queue and acking what it came from
    puts it there twice: the copies share queue id and recipients (in any order)."""
    envelope, _ = make_message(ALICE, GHOST)

    def copy(**headers: object) -> HeldMessage:
        properties = message_properties(envelope)
        assert properties.headers is not None
        properties.headers.update(headers)
        return describe(properties, b"x", DEAD)

    first, again = copy(), copy()
    reordered = copy(**{MAILBOXES_HEADER: f"{GHOST},{ALICE}"})
    ghost_only = copy(**{MAILBOXES_HEADER: GHOST})  # another delivery's leftover: its own
    nameless = [describe(Basic.Properties(), b"", DEAD) for _ in range(2)]
    held = heldmail.grouped([first, ghost_only, again, *nameless, reordered])
    assert [(m.recipients, m.copies) for m in held] == [
        ((ALICE, GHOST), 3), ((GHOST,), 1), ((), 1), ((), 1)]
    assert held[0].queue_id == envelope.queue_id and heldmail.copy_key(nameless[0]) is None
    assert held[0].as_dict()["copies"] == 3
