"""Refuse infected messages (clamd INSTREAM): 554 5.7.1 naming the signature; never queued.

A message larger than clamd's StreamMaxLength is handled by the `virus_oversize` policy
(reject: 552 5.3.4, tempfail: 451 4.7.0), never passed unscanned; so is one clamd cannot
scan whole (a scan limit reached inside it: 554 5.7.1 or 451 4.7.0).
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from common.envelope import Envelope
from services.filter.backends.errors import ScannerUnavailable, StreamTooLarge
from services.filter.protocol import replies
from services.filter.protocol.clamd import ClamdResult
from services.filter.protocol.scan_headers import header_safe
from services.filter.rules.base import ACCEPT, Verdict
from services.filter.rules.scan_failure import ScanFailure, unavailable_verdict
from services.filter.stats import WorkerStats

log = logging.getLogger(__name__)


class VirusScanner(Protocol):
    name: str

    async def scan(self, content: bytes) -> ClamdResult: ...


class Oversize(enum.StrEnum):
    REJECT = "reject"
    TEMPFAIL = "tempfail"


def virus_reply(signature: str) -> str:
    return replies.VIRUS_FOUND.format(signature=header_safe(signature, 200))


class VirusRule:
    name = "virus"

    def __init__(self, scanner: VirusScanner, *, failure: ScanFailure, oversize: Oversize,
                 stats: WorkerStats) -> None:
        self._scanner = scanner
        self._failure = failure
        self._oversize = oversize
        self._stats = stats

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        extra = {"queue_id": envelope.queue_id, "scanner": self._scanner.name}
        try:
            result = await self._scanner.scan(content)
        except StreamTooLarge as exc:
            self._stats.scan_oversize += 1
            log.warning("too big for the virus scanner (%s): %s", exc, self._oversize.value,
                        extra=extra)
            reject = self._oversize is Oversize.REJECT
            if exc.beyond_limits:
                return Verdict(replies.SCAN_LIMITS_REJECT if reject
                               else replies.SCAN_LIMITS_TEMPFAIL)
            return Verdict(replies.SCAN_TOO_BIG_REJECT if reject
                           else replies.SCAN_TOO_BIG_TEMPFAIL)
        except ScannerUnavailable as exc:
            return unavailable_verdict(self._failure, exc, envelope, self._stats)
        if result.signature is not None:
            self._stats.virus_found += 1
            log.warning("virus %s found: refused", header_safe(result.signature, 200),
                        extra=extra)
            return Verdict(virus_reply(result.signature))
        self._stats.virus_clean += 1
        log.debug("no virus found", extra=extra)
        return ACCEPT
