"""`tiermail status --prometheus` (services/status_metrics.py), read back with the Prometheus
client library's own parser: the text must be what a scraper takes, with status's numbers."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.status_metrics import prometheus_text


def parsed(report: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, and every family's type checked against the
    name's suffix."""
    samples = {}
    for family in text_string_to_metric_families(prometheus_text(report)):
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name == family.name + "_total", sample
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


STORE_BEAT = {
    "tier": "store", "host": 'vm "a"', "pid": 41, "started": 1_700_000_000.5, "at": 1.0,
    "delivered": 60, "taken": 58, "batches": 7, "consumer_connected": True,
    "imap_sessions": 3, "imap_sessions_limit": 1000, "last_delivery_at": 1_700_000_100.25,
    "delivery_lag_seconds": 1.5, "storage_down_since": 0.0,
    "recent": {"seconds": 60.0, "counts": {"delivered": 6}},
}


def report(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "healthy": False, "problems": ["one", "two"],
        "broker": {"reachable": True,
                   "deliver": {"queue": "t.deliver", "declared": True, "messages": 5,
                               "consumers": 1},
                   "dead": {"queue": "t.deliver.dead", "declared": False}},
        "backlog": {"messages": 5, "taken_per_second": 2.5, "arriving_per_second": 0.5,
                    "over_seconds": 60, "catch_up_seconds": 2.5},
        "redis": {"reachable": True, "processes": [STORE_BEAT], "silent": [{}],
                  "directory": {"published": True, "domains": 1, "users": 2, "aliases": 3}},
    }
    return {**base, **changes}


def test_the_report_in_prometheus_text() -> None:
    samples = parsed(report())
    store = (("host", 'vm "a"'), ("pid", "41"), ("tier", "store"))
    assert samples[("tiermail_healthy", ())] == 0
    assert samples[("tiermail_problems", ())] == 2
    assert samples[("tiermail_broker_up", ())] == 1
    assert samples[("tiermail_queue_messages", (("queue", "t.deliver"),))] == 5
    assert samples[("tiermail_queue_consumers", (("queue", "t.deliver"),))] == 1
    assert not [key for key in samples if ("queue", "t.deliver.dead") in key[1]]
    assert samples[("tiermail_backlog_messages", ())] == 5
    assert samples[("tiermail_backlog_taken_per_second", ())] == 2.5
    assert samples[("tiermail_backlog_arriving_per_second", ())] == 0.5
    assert samples[("tiermail_backlog_catch_up_seconds", ())] == 2.5
    assert samples[("tiermail_redis_up", ())] == 1
    assert samples[("tiermail_directory_published", ())] == 1
    assert samples[("tiermail_directory_aliases", ())] == 3
    assert samples[("tiermail_silent_processes", ())] == 1
    assert samples[("tiermail_process_start_time_seconds", store)] == 1_700_000_000.5
    assert samples[("tiermail_process_delivered_total", store)] == 60
    assert samples[("tiermail_process_taken_total", store)] == 58
    assert samples[("tiermail_process_imap_sessions", store)] == 3
    assert samples[("tiermail_process_imap_sessions_limit", store)] == 1000
    assert samples[("tiermail_process_consumer_connected", store)] == 1
    assert samples[("tiermail_process_last_delivery_at", store)] == 1_700_000_100.25
    assert samples[("tiermail_process_delivery_lag_seconds", store)] == 1.5
    assert samples[("tiermail_process_storage_down_since", store)] == 0
    assert not [key for key in samples if "recent" in key[0] or key[0].endswith("_pid")]


def test_what_cannot_be_reached_is_down_and_shows_nothing_else() -> None:
    samples = parsed(report(broker={"reachable": False, "error": "refused"},
                            redis={"reachable": False, "error": "refused"}))
    names = {key[0] for key in samples}
    assert samples[("tiermail_broker_up", ())] == 0 and samples[("tiermail_redis_up", ())] == 0
    assert not [name for name in names if name.startswith(("tiermail_process_",
                                                            "tiermail_queue_"))]


def test_every_family_is_announced_once() -> None:
    beats = [STORE_BEAT, {**STORE_BEAT, "pid": 42}, {"tier": "filter", "host": "h", "pid": 1,
                                                     "accepted": 3}]
    text = prometheus_text(report(redis={**report()["redis"], "processes": beats}))
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert text.count("tiermail_process_delivered_total{") == 2
