import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.envelope import Envelope, EnvelopeError, Recipient
from common.ids import new_queue_id
from common.topology import (
    DELIVER_ROUTING_KEY,
    LARGE_DELIVER_ROUTING_KEY,
    LARGE_MESSAGE,
    Topology,
    delivery_route,
    envelope_from_properties,
    message_properties,
)


def make(**changes: object) -> Envelope:
    base = dict(queue_id=new_queue_id(), mail_from="a@example.net",
                recipients=(Recipient("alias@example.org", ("u1@example.org", "u2@example.org")),
                            Recipient("u1@example.org", ("u1@example.org",))),
                client_ip="192.0.2.7", client_helo="mx.example.net", received_at=1.5, size=10)
    base.update(changes)
    return Envelope(**base)  # type: ignore[arg-type]


def test_round_trip() -> None:
    env = make(tls="TLSv1.3", smtputf8=True, mail_from="")
    assert Envelope.decode(env.encode()) == env


def test_as_dict_has_every_field_as_asdict_would() -> None:
    # as_dict is written out field by field for speed; a field added to Envelope without
    # adding it there must fail here, not vanish from the queue.
    env = make(tls="TLSv1.3", authenticated_user="u1@example.org", junk=True, body_8bit=True)
    assert json.loads(env.encode()) == json.loads(json.dumps(dataclasses.asdict(env)))


def test_mailboxes_are_distinct_in_first_seen_order() -> None:
    assert make().mailboxes == ("u1@example.org", "u2@example.org")


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"schema": 2}', b"\xff",
                                 json.dumps({**json.loads(make().encode()), "recipients": [1]})
                                 .encode()])
def test_malformed_envelopes_raise_envelope_error(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Envelope.decode(raw)


def _changed(**fields: object) -> bytes:
    return json.dumps({**json.loads(make().encode()), **fields}).encode()


@pytest.mark.parametrize("raw", [
    _changed(size=float("inf")),  # json writes Infinity
    _changed(received_at=float("nan")),
    b'{"schema": 1, "size": 1e400}',
    _changed(received_at=10**400),
    _changed(received_at=-1.0),
    _changed(received_at=253402300800),  # year 10000
    _changed(size=-5),
    _changed(size=True),
    _changed(size="12"),
    _changed(mail_from="\ud800@example.org"),
    _changed(recipients=[{"address": "a@example.org", "mailboxes": ["\udcff@example.org"]}]),
    b"[" * 5000 + b"]" * 5000,
    _changed(queue_id=""),  # the store's duplicate check keys on it
    _changed(recipients=[{"address": "a@example.org", "mailboxes": [""]}]),
    _changed(schema=2),  # a newer filter's envelope, whole: not misread by an older store
    _changed(junk="false"),
    _changed(smtputf8=[0]),
    _changed(body_8bit=1),
    _changed(tls=True),
])
def test_envelopes_a_broken_publisher_could_send_raise_envelope_error(raw: bytes) -> None:
    """Each of these escaped the decoder (OverflowError, RecursionError, and the encoding
    error of a lone surrogate later in the store), and took the consumer's broker session
    down with a batch of good mail."""
    with pytest.raises(EnvelopeError):
        Envelope.decode(raw)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(raw: bytes) -> None:
    try:
        Envelope.decode(raw)
    except EnvelopeError:
        pass


def test_amqp_properties_carry_the_envelope() -> None:
    env = make()
    props = message_properties(env)
    assert props.delivery_mode == 2 and props.message_id == env.queue_id
    assert envelope_from_properties(props) == env


def test_mismatched_message_id_is_refused() -> None:
    props = message_properties(make())
    props.message_id = "OTHER"
    with pytest.raises(EnvelopeError):
        envelope_from_properties(props)


def test_queue_ids_are_unique_and_time_ordered() -> None:
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 26 for i in ids)


def test_topology_dead_letters_at_least_once() -> None:
    args = Topology(prefix="p", delivery_limit=7).deliver_queue_arguments()
    assert args["x-queue-type"] == "quorum" and args["x-delivery-limit"] == 7
    assert args["x-dead-letter-exchange"] == "p.dead"
    assert args["x-dead-letter-strategy"] == "at-least-once"
    assert args["x-overflow"] == "reject-publish"


def test_messages_over_a_mebibyte_take_the_large_delivery_queue() -> None:
    assert delivery_route(1) == delivery_route(LARGE_MESSAGE) == DELIVER_ROUTING_KEY
    assert delivery_route(LARGE_MESSAGE + 1) == LARGE_DELIVER_ROUTING_KEY
    assert Topology(prefix="p").large_queue == "p.deliver.large"


def _mailbox(i: int) -> str:
    return f"user{i:05d}@example.org"


def test_an_envelope_that_fits_is_not_split() -> None:
    env = make()
    assert env.split(len(env.encode())) == (env,)


def test_a_large_alias_splits_into_parts_that_fit_each_mailbox_once() -> None:
    everyone = tuple(_mailbox(i) for i in range(3000))
    env = make(recipients=(Recipient("all@example.org", everyone),
                           Recipient(everyone[5], (everyone[5],)),  # named twice: one copy
                           Recipient("x@example.org", ("x@example.org",))))
    budget = 16 * 1024
    parts = env.split(budget)
    assert len(parts) > 3
    assert all(len(part.encode()) <= budget for part in parts)
    delivered = [mailbox for part in parts for mailbox in part.mailboxes]
    assert delivered == [*everyone, "x@example.org"]
    assert {dataclasses.replace(part, recipients=()) for part in parts} == \
        {dataclasses.replace(env, recipients=())}
    assert all(Envelope.decode(part.encode()) == part for part in parts)


def test_an_envelope_that_cannot_be_split_small_enough_raises() -> None:
    env = make(mail_from="s" * 200 + "@example.net")
    with pytest.raises(EnvelopeError):
        env.split(len(dataclasses.replace(env, recipients=()).encode()) + 10)


@given(st.lists(st.tuples(st.integers(0, 40), st.lists(st.integers(0, 300), min_size=1,
                                                       max_size=60)),
                min_size=1, max_size=20),
       st.integers(600, 4000))
def test_split_parts_fit_and_cover_every_mailbox_exactly_once(
        recipients: list[tuple[int, list[int]]], budget: int) -> None:
    env = make(recipients=tuple(Recipient(_mailbox(address), tuple(_mailbox(m) for m in boxes))
                                for address, boxes in recipients))
    parts = env.split(budget)
    assert all(len(part.encode()) <= budget for part in parts)
    assert [m for part in parts for m in part.mailboxes] == list(env.mailboxes)
