"""A broker that goes away is an expected state: the tiers say so at WARNING with the reason,
and aiormq's own ERROR lines and tracebacks for it stay out of their logs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from common.settings import Settings
from tests.support import TcpProxy, TierProcess, broker_at, free_port, wait_until


def errors_in(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]


def test_a_filter_that_cannot_reach_the_broker_says_why_once(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    broken = broker_at(settings, free_port())
    worker = run_tier(broken, "filter")
    worker.wait_for_port(broken.smtp_port)
    # At start, then the idle worker's reconnect loop: two failed connects at least.
    wait_until(lambda: "event=amqp-unreachable" in worker.output(), timeout=30,
               what="the filter's broker-unreachable warning")
    log = worker.output()
    assert "broker unreachable (Connection refused): MAIL FROM gets 451" in log, log
    assert errors_in(log) == [], log


@pytest.mark.parametrize(("tier", "changes", "ready", "attempt", "attempts", "note"), [
    # The connection reset, then every reconnect refused: one line per attempt.
    ("store", {}, "event=amqp-connected", "broker session ended", 3,
     "broker connection lost: "),
    # pika logged six ERROR lines per lost or refused connection, and dramatiq a CRITICAL
    # one, for a consumer that reconnects by itself; both consumers (jobs, delayed retries)
    # lose the connection, then fail to connect.
    ("learner", {"learn": "rspamd"}, "learner running", "Restarting consumer", 4,
     "Consumer encountered a connection error"),
])
def test_a_tier_that_loses_the_broker_says_so_without_errors(
        settings: Settings, run_tier: Callable[..., TierProcess], tier: str,
        changes: dict[str, str], ready: str, attempt: str, attempts: int, note: str) -> None:
    relay = TcpProxy(5672)
    try:
        process = run_tier(broker_at(settings, relay.port, **changes), tier)
        wait_until(lambda: ready in process.output(), timeout=30, what=f"the {tier} consuming")
        relay.cut()
        wait_until(lambda: process.output().count(attempt) >= attempts, timeout=30,
                   what=f"the {tier}'s reconnect attempts")
        log = process.output()
        assert note in log, log
        assert errors_in(log) == [], log
    finally:
        relay.cut()
