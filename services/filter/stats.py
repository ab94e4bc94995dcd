"""Per-worker counters, read by the health reporter and by tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class WorkerStats:
    """Counters of one filter worker process. Mutated on the event loop only.

    connections: connections admitted since start; active: open right now;
    refused_connections: turned away with 421 because `smtp_max_connections` were open;
    refused_client_connections: turned away with 421 because that client address already had
    `smtp_max_connections_per_ip` open;
    stressed_since: when 80 % of `smtp_max_connections` were open (0: not so), until fewer
    than 60 % are: client timeouts are `smtp_stress_timeout` (services/filter/server.py);
    stress_periods: how often that began;
    accepted: messages queued (250 after the broker confirm);
    rejected / tempfailed: 5xx / 4xx replies sent (any command);
    data_memory_full: messages refused with 452 4.3.1 because the worker already held
    `smtp_data_memory` octets of message data;
    broker_stalled: MAIL FROMs refused with 451 4.3.0 while a publish waited for its confirm
    longer than services/filter/stall.py's STALLED_AFTER, or after one went unconfirmed
    until the broker confirms again (common/broker.py Publisher.stalled);
    broker_unreachable: MAIL FROMs refused with 451 4.3.0 because the broker could not be
    reached (common/broker.py Publisher.ready).

    Scanning, at DATA (see services/filter/rules/spam.py, virus.py):
    spam_ham / spam_junk / spam_rejected / spam_tempfailed: spam verdicts;
    virus_clean / virus_found: virus verdicts; scan_oversize: too big for clamd;
    scanner_unavailable: scanner calls that failed, then per policy scan_failure
    scan_tempfailed / scan_not_scanned (accepted unscanned) / scan_deferred.
    Deferred scans (services/filter/deferred.py): deferred_ham / deferred_junk /
    deferred_quarantined published onwards; deferred_requeued: returned to the queue for a
    scanner outage, a scanner failing on that message, or a publish that failed;
    deferred_dead_lettered: a scanner failed on it POISON_STRIKES times while scanning others.
    """

    connections: int = 0
    active: int = 0
    stressed_since: float = 0.0
    stress_periods: int = 0
    refused_connections: int = 0
    refused_client_connections: int = 0
    data_memory_full: int = 0
    broker_stalled: int = 0
    broker_unreachable: int = 0
    accepted: int = 0
    rejected: int = 0
    tempfailed: int = 0
    # Rate limits (common/ratelimit.py): refused with 421 / 451 4.7.1, and checks
    # that failed open because Redis did not answer.
    rate_limited_connections: int = 0
    rate_limited_messages: int = 0
    rate_limit_errors: int = 0
    spam_ham: int = 0
    spam_junk: int = 0
    spam_rejected: int = 0
    spam_tempfailed: int = 0
    virus_clean: int = 0
    virus_found: int = 0
    scan_oversize: int = 0
    scanner_unavailable: int = 0
    scan_tempfailed: int = 0
    scan_not_scanned: int = 0
    scan_deferred: int = 0
    deferred_ham: int = 0
    deferred_junk: int = 0
    deferred_quarantined: int = 0
    deferred_requeued: int = 0
    deferred_dead_lettered: int = 0

    def count_reply(self, reply: str) -> None:
        if reply.startswith("5"):
            self.rejected += 1
        elif reply.startswith("4"):
            self.tempfailed += 1

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
