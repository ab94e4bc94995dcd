"""Per-worker counters, read by the health reporter and by tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class WorkerStats:
    """Counters of one filter worker process. Mutated on the event loop only.

    connections: connections admitted since start; active: open right now;
    refused_connections: turned away with 421 because `smtp_max_connections` were open;
    accepted: messages queued (250 after the broker confirm);
    rejected / tempfailed: 5xx / 4xx replies sent (any command).
    """

    connections: int = 0
    active: int = 0
    refused_connections: int = 0
    accepted: int = 0
    rejected: int = 0
    tempfailed: int = 0

    def count_reply(self, reply: str) -> None:
        if reply.startswith("5"):
            self.rejected += 1
        elif reply.startswith("4"):
            self.tempfailed += 1

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
