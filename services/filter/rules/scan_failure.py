"""What a scanner failure means for the message: the `scan_failure` policy.

Not a rule: the spam and virus rules call `unavailable_verdict` when their scanner raised
ScannerUnavailable (unreachable, timed out, answered garbage).
"""

from __future__ import annotations

import enum
import logging

from common.envelope import Envelope
from services.filter.backends.errors import ScannerUnavailable
from services.filter.protocol import replies
from services.filter.protocol.scan_headers import not_scanned_header
from services.filter.rules.base import Verdict
from services.filter.stats import WorkerStats

log = logging.getLogger(__name__)


class ScanFailure(enum.StrEnum):
    TEMPFAIL = "tempfail"  # 451 4.7.0: the sender retries later (the default)
    ACCEPT = "accept"  # accept unscanned, with a header saying so
    DEFER = "defer"  # accept into the scan-pending queue, scanned before the store sees it


def unavailable_verdict(policy: ScanFailure, error: ScannerUnavailable, envelope: Envelope,
                        stats: WorkerStats) -> Verdict:
    stats.scanner_unavailable += 1
    extra = {"queue_id": envelope.queue_id, "scanner": error.scanner}
    if policy is ScanFailure.ACCEPT:
        stats.scan_not_scanned += 1
        log.warning("%s unavailable (%s): accepted unscanned", error.scanner, error.reason,
                    extra=extra)
        return Verdict(headers=(not_scanned_header(error.scanner),))
    if policy is ScanFailure.DEFER:
        stats.scan_deferred += 1
        log.warning("%s unavailable (%s): deferred to the scan queue", error.scanner,
                    error.reason, extra=extra)
        return Verdict(defer=True)
    stats.scan_tempfailed += 1
    log.warning("%s unavailable (%s): 451", error.scanner, error.reason, extra=extra)
    return Verdict(replies.SCANNER_UNAVAILABLE)
