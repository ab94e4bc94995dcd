"""The rule list a filter worker runs, built from settings: one place decides the order.

    bare-newline  (cheap, local: refuse before spending a scanner call)
    folded-start  (cheap, local)
    scan          virus and spam concurrently (rules/scan.py combines: virus wins)
"""

from __future__ import annotations

from common.settings import Settings
from services.filter.backends.rspamd import RspamdClient
from services.filter.backends.scanners import Scanners
from services.filter.rules.bare_newline import BareNewlineRule
from services.filter.rules.base import Rule
from services.filter.rules.folded_start import FoldedStartRule
from services.filter.rules.scan import ScanRule
from services.filter.rules.scan_failure import ScanFailure
from services.filter.rules.spam import RspamdJudge, SpamAssassinJudge, SpamJudge, SpamRule
from services.filter.rules.virus import Oversize, VirusRule
from services.filter.stats import WorkerStats


def build_rules(settings: Settings | None = None, scanners: Scanners | None = None,
                stats: WorkerStats | None = None) -> list[Rule]:
    rules: list[Rule] = [BareNewlineRule(), FoldedStartRule()]
    if settings is None or scanners is None or not scanners.enabled:
        return rules
    stats = stats if stats is not None else WorkerStats()
    failure = ScanFailure(settings.scan_failure)
    members: list[Rule] = []
    if scanners.virus is not None:
        members.append(VirusRule(scanners.virus, failure=failure,
                                 oversize=Oversize(settings.virus_oversize), stats=stats))
    if scanners.spam is not None:
        members.append(SpamRule(spam_judge(settings, scanners), failure=failure, stats=stats))
    rules.append(ScanRule(members))
    return rules


def spam_judge(settings: Settings, scanners: Scanners) -> SpamJudge:
    if isinstance(scanners.spam, RspamdClient):
        return RspamdJudge(scanners.spam, settings.hostname)
    assert scanners.spam is not None
    return SpamAssassinJudge(scanners.spam, settings.spamassassin_reject_score)
