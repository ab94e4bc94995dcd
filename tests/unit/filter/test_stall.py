"""PublishWatch: how long the oldest publish has waited for its confirm."""

from __future__ import annotations

from services.filter.stall import PublishWatch


def test_stalled_only_while_a_publish_waits_too_long() -> None:
    now = [0.0]
    watch = PublishWatch(stalled_after=2.0, clock=lambda: now[0])
    assert not watch.stalled
    with watch.publishing():
        now[0] = 1.0
        with watch.publishing():
            now[0] = 2.5
            assert watch.stalled  # the first has waited 2.5 s
        assert watch.stalled
    assert not watch.stalled  # confirmed or given up: mail is taken again
    with watch.publishing():
        now[0] = 4.0
        assert not watch.stalled


def test_a_failed_publish_stops_counting() -> None:
    now = [0.0]
    watch = PublishWatch(stalled_after=2.0, clock=lambda: now[0])
    try:
        with watch.publishing():
            now[0] = 10.0
            raise TimeoutError
    except TimeoutError:
        pass
    assert not watch.stalled
