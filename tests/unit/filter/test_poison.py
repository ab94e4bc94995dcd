"""Strikes against a message a scanner fails on (services/filter/poison.py)."""

from __future__ import annotations

import asyncio

from services.filter.poison import UNDECIDED, Strikes


def test_a_message_failing_while_others_pass_is_poisoned_at_the_limit() -> None:
    strikes = Strikes(limit=3)
    seen = []
    for _ in range(3):
        seen.append(strikes.failed("BAD"))
        strikes.scanned("good")
    assert seen == [1, 2, 3]
    assert not strikes.poisoned(2) and strikes.poisoned(3)


def test_a_failure_with_nothing_scanned_since_the_last_strike_is_undecided() -> None:
    """Nothing shows the scanner works on other mail: no evidence against the message (a
    clamd that failed every scan dead-lettered a lone message within 35 ms, and one beside
    a message still being scanned within 23 ms: found in review)."""
    strikes = Strikes(limit=3)
    assert [strikes.failed("BAD") for _ in range(3)] == [1, UNDECIDED, UNDECIDED]
    strikes.scanned("good")
    assert strikes.failed("BAD") == 2


def test_an_undecided_failure_is_a_strike_once_another_message_is_scanned() -> None:
    async def scenario() -> tuple[int | None, int | None]:
        strikes = Strikes()
        strikes.failed("BAD")
        assert strikes.failed("BAD") is UNDECIDED
        waiting = asyncio.ensure_future(strikes.decided("BAD", within=10))
        await asyncio.sleep(0)
        strikes.scanned("good")
        struck = await waiting
        assert strikes.failed("BAD") is UNDECIDED
        return struck, await strikes.decided("BAD", within=0.01)  # nothing comes: none

    assert asyncio.run(scenario()) == (2, None)


def test_an_undecided_failure_is_none_when_another_message_fails_too() -> None:
    async def scenario() -> int | None:
        strikes = Strikes()
        strikes.failed("A")
        assert strikes.failed("A") is UNDECIDED
        waiting = asyncio.ensure_future(strikes.decided("A", within=10))
        await asyncio.sleep(0)
        assert strikes.failed("B") is None  # the scanner fails on more than one
        return await waiting

    assert asyncio.run(scenario()) is None


def test_a_scanner_failing_on_everything_strikes_at_most_the_first() -> None:
    strikes = Strikes(limit=2)
    first = [strikes.failed(queue_id) for queue_id in ("A", "B", "C")]
    again = [strikes.failed(queue_id) for queue_id in ("A", "B", "C")]
    assert first == [1, None, None]  # B failed after A with nothing passing between
    assert again == [None, None, None]


def test_once_a_scan_passes_the_strikes_count_on() -> None:
    strikes = Strikes(limit=3)
    strikes.failed("A"), strikes.failed("B")
    assert strikes.failed("A") is None
    strikes.scanned("C")
    assert strikes.failed("A") == 2


def test_a_verdict_clears_the_strikes() -> None:
    strikes = Strikes()
    strikes.failed("A")
    strikes.scanned("A")
    assert strikes.failed("A") == 1


def test_only_the_newest_suspects_are_remembered() -> None:
    strikes = Strikes(remembered=2)
    for queue_id in ("A", "B", "C"):
        strikes.failed(queue_id)
        strikes.scanned("other")
    assert strikes.failed("A") == 1  # forgotten: starts again
    strikes.scanned("other")
    assert strikes.failed("C") == 2
