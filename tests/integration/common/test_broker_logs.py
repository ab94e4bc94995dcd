"""A broker that goes away is an expected state: the tiers say so at WARNING with the reason,
and aiormq's own ERROR lines and tracebacks for it stay out of their logs."""

from __future__ import annotations

from collections.abc import Callable

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


def test_a_store_that_loses_the_broker_says_so_once_per_attempt_without_tracebacks(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    relay = TcpProxy(5672)
    try:
        store = run_tier(broker_at(settings, relay.port), "store")
        wait_until(lambda: "event=amqp-connected" in store.output(), timeout=30,
                   what="the store consuming")
        relay.cut()  # the connection reset, and every reconnect refused
        wait_until(lambda: store.output().count("broker session ended") >= 3, timeout=30,
                   what="the store's reconnect attempts")
        relay.start()
        wait_until(lambda: store.output().count("event=amqp-connected") == 2, timeout=30,
                   what="the store consuming again")
        log = store.output()
        assert "broker connection lost: " in log, log
        assert errors_in(log) == [], log
    finally:
        relay.cut()


def test_a_learner_that_loses_the_broker_says_so_without_errors(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """pika logged six ERROR lines per lost or refused connection, and dramatiq a CRITICAL
    one, for a consumer that reconnects by itself."""
    relay = TcpProxy(5672)
    try:
        learner = run_tier(broker_at(settings, relay.port, learn="rspamd"), "learner")
        wait_until(lambda: "learner running" in learner.output(), timeout=30,
                   what="the learner consuming")
        relay.cut()
        # Both consumers (jobs, delayed retries) lose the connection, then fail to connect.
        wait_until(lambda: learner.output().count("Restarting consumer") >= 4, timeout=30,
                   what="the learner's reconnect attempts")
        log = learner.output()
        assert "Consumer encountered a connection error" in log, log
        assert errors_in(log) == [], log
    finally:
        relay.cut()
