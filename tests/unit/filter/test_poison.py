"""Strikes against a message a scanner fails on (services/filter/poison.py)."""

from __future__ import annotations

from services.filter.poison import Strikes


def test_a_message_failing_while_others_pass_is_poisoned_at_the_limit() -> None:
    strikes = Strikes(limit=3)
    seen = []
    for _ in range(3):
        seen.append(strikes.failed("BAD"))
        strikes.scanned("good")
    assert seen == [1, 2, 3]
    assert not strikes.poisoned(2) and strikes.poisoned(3)


def test_a_message_failing_alone_collects_strikes_only_as_other_mail_is_scanned() -> None:
    """Nothing else in the queue: its failures are no evidence against it (a clamd that
    failed every scan dead-lettered a lone message within 35 ms, found in review). They
    count once the scanner comes to verdicts on other mail in between."""
    strikes = Strikes(limit=3)
    assert [strikes.failed("BAD") for _ in range(5)] == [1, None, None, None, None]
    seen = []
    for _ in range(2):
        strikes.scanned("good")
        seen.append(strikes.failed("BAD"))
    assert seen == [2, 3] and strikes.poisoned(3)


def test_a_message_failing_while_others_wait_to_be_scanned_collects_strikes() -> None:
    strikes = Strikes(limit=3)
    assert [strikes.failed("BAD", others_pending=True) for _ in range(3)] == [1, 2, 3]


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
