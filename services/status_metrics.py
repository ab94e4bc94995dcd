"""`tiermail status --prometheus`: the status report in Prometheus's text exposition format
(version 0.0.4), for node_exporter's textfile collector or anything else that reads it.

Every number status knows, with the same meaning: the verdict and the count of problems
(their words stay in `tiermail status`), the broker's queues, the directory, the backlog, and
each reporting process's heartbeat (labels `tier`, `host`, `pid`): its counters as
`tiermail_process_<name>_total`, values of the moment (sessions, memory held, flags as 0/1,
times in seconds since the epoch) as gauges."""

from __future__ import annotations

import re
from typing import Any

from services.status import BEAT_IDENTITY, QUEUE_KEYS, is_counter

_NOT_IN_A_NAME = re.compile(r"[^a-zA-Z0-9_]")


class _Families:
    """Samples grouped by metric name, each family once with its HELP and TYPE."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, value: float,
            labels: dict[str, str] | None = None) -> None:
        name = f"tiermail_{name}"
        _, _, samples = self._families.setdefault(name, (kind, help_text, []))
        samples.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def prometheus_text(report: dict[str, Any]) -> str:
    families = _Families()
    families.add("healthy", "gauge", "1 when tiermail status finds nothing wrong",
                 report["healthy"])
    families.add("problems", "gauge", "Problems tiermail status names (read them there)",
                 len(report["problems"]))
    _broker(families, report["broker"])
    _backlog(families, report.get("backlog"))
    _redis(families, report["redis"])
    return families.text()


def _broker(families: _Families, broker: dict[str, Any]) -> None:
    families.add("broker_up", "gauge", "1 when RabbitMQ could be used", broker["reachable"])
    for key in QUEUE_KEYS:
        queue = broker.get(key)
        if not queue or not queue.get("declared"):
            continue
        labels = {"queue": queue["queue"]}
        families.add("queue_messages", "gauge", "Messages ready in the queue",
                     queue["messages"], labels)
        families.add("queue_consumers", "gauge", "Consumers of the queue",
                     queue["consumers"], labels)


def _backlog(families: _Families, backlog: dict[str, Any] | None) -> None:
    if backlog is None:
        return
    families.add("backlog_messages", "gauge", "Messages waiting for the store",
                 backlog["messages"])
    if "taken_per_second" in backlog:
        families.add("backlog_taken_per_second", "gauge",
                     "Messages a second the store took over its recent heartbeat window",
                     backlog["taken_per_second"])
        families.add("backlog_arriving_per_second", "gauge",
                     "Messages a second the filters accepted over their recent heartbeat windows",
                     backlog["arriving_per_second"])
    if "catch_up_seconds" in backlog:
        families.add("backlog_catch_up_seconds", "gauge",
                     "Seconds until the backlog is gone at the recent pace (taken less arriving)",
                     backlog["catch_up_seconds"])


def _redis(families: _Families, redis: dict[str, Any]) -> None:
    families.add("redis_up", "gauge", "1 when Redis answered", redis["reachable"])
    if not redis["reachable"]:
        return
    directory = redis["directory"]
    families.add("directory_published", "gauge", "1 when the directory is in Redis",
                 directory["published"])
    for kind in ("domains", "users", "aliases"):
        if kind in directory:
            families.add(f"directory_{kind}", "gauge", f"Directory {kind}", directory[kind])
    families.add("silent_processes", "gauge",
                 "Processes that went within the last hour without stopping",
                 len(redis.get("silent", [])))
    for beat in redis.get("processes", []):
        _process(families, beat)


def _process(families: _Families, beat: dict[str, Any]) -> None:
    labels = {"tier": str(beat.get("tier")), "host": str(beat.get("host")),
              "pid": str(beat.get("pid"))}
    if isinstance(beat.get("started"), int | float):
        families.add("process_start_time_seconds", "gauge",
                     "When the process started, in seconds since the epoch",
                     beat["started"], labels)
    for key, value in beat.items():
        if key in BEAT_IDENTITY or not isinstance(value, int | float):
            continue
        name = _NOT_IN_A_NAME.sub("_", key)
        if is_counter(key, value):
            families.add(f"process_{name}_total", "counter", f"Heartbeat counter {key}",
                         value, labels)
        else:
            families.add(f"process_{name}", "gauge", f"Heartbeat value {key}", value, labels)


def _labels(labels: dict[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escaped(value)}"' for name, value in labels.items()) + "}"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)
