"""The owners a dead-letter copy names: all of them for a few, a count beyond that (the header
must fit in one AMQP frame, 128 KiB, whatever the alias)."""

from __future__ import annotations

from services.store.consumer import LISTED_OWNERS, _listed


def test_a_few_owners_are_all_named() -> None:
    assert _listed(["a@x.test", "b@x.test"]) == "a@x.test,b@x.test"


def test_many_owners_are_named_up_to_the_limit_then_counted() -> None:
    owners = [f"user{n:04d}@example.test" for n in range(5000)]
    listed = _listed(owners)
    assert listed.startswith("user0000@example.test,user0001@example.test,")
    assert listed.endswith(f" and {5000 - LISTED_OWNERS} more")
    assert len(listed) < 4096
