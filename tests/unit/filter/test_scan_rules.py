"""Verdict mapping: scanner results -> Verdict, failure policies, and the combined scan step."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.envelope import Envelope, Recipient
from services.filter.backends.errors import ScannerUnavailable, StreamTooLarge
from services.filter.protocol import replies
from services.filter.protocol.clamd import CLEAN, ClamdResult
from services.filter.protocol.rspamd import parse_checkv2
from services.filter.protocol.scan_headers import NOT_SCANNED_HEADER
from services.filter.protocol.spamd import SpamdResult
from services.filter.rules.base import ACCEPT, Verdict
from services.filter.rules.scan import ScanRule, combine
from services.filter.rules.scan_failure import ScanFailure
from services.filter.rules.spam import (
    SpamClass,
    SpamJudgement,
    SpamRule,
    judge_rspamd,
    judge_spamd,
)
from services.filter.rules.virus import Oversize, VirusRule
from services.filter.stats import WorkerStats

ENVELOPE = Envelope(queue_id="Q1", mail_from="s@remote.test",
                    recipients=(Recipient("a@x.test", ("a@x.test",)),),
                    client_ip="192.0.2.1", client_helo="h", received_at=0.0, size=1)


def rspamd_reply(action: str, score: float = 1.0, symbols: dict[str, Any] | None = None,
                 smtp_message: str | None = None) -> bytes:
    raw: dict[str, Any] = {"action": action, "score": score, "required_score": 15.0,
                           "symbols": symbols or {"SYM": {"name": "SYM", "score": score}}}
    if smtp_message is not None:
        raw["messages"] = {"smtp_message": smtp_message}
    return json.dumps(raw).encode()


@pytest.mark.parametrize(("action", "kind", "reply"), [
    ("reject", SpamClass.REJECT, replies.SPAM_REJECTED),
    ("soft reject", SpamClass.TEMPFAIL, replies.SPAM_TEMPFAIL),
    ("greylist", SpamClass.TEMPFAIL, replies.SPAM_TEMPFAIL),
    ("add header", SpamClass.JUNK, None),
    ("rewrite subject", SpamClass.JUNK, None),
    ("no action", SpamClass.HAM, None),
])
def test_rspamd_actions(action: str, kind: SpamClass, reply: str | None) -> None:
    judgement = judge_rspamd(parse_checkv2(rspamd_reply(action)), "mx.test")
    assert (judgement.kind, judgement.reply) == (kind, reply)
    headers = dict(judgement.headers)
    if kind in (SpamClass.JUNK, SpamClass.REJECT):
        assert headers["X-Spam"] == "Yes" and judgement.is_spam
        assert headers["X-Spam-Score"] == "1.00 / 15.00"
        assert headers["X-Spam-Symbols"] == "SYM(1.00)"
    else:
        assert headers == {"X-Spam-Status": "No, score=1.00 required=15.00"}
        assert not judgement.is_spam


def test_rspamd_smtp_message_is_one_safe_line() -> None:
    judgement = judge_rspamd(parse_checkv2(rspamd_reply(
        "reject", smtp_message="Spam\r\n250 2.0.0 fake ok \u00e9" + "x" * 500)), "mx")
    assert judgement.reply is not None
    assert judgement.reply.startswith("550 5.7.1 Spam 250 2.0.0 fake ok ")
    assert "\r" not in judgement.reply and "\n" not in judgement.reply
    assert judgement.reply.isascii() and len(judgement.reply) < 250
    gtube = judge_rspamd(parse_checkv2(rspamd_reply("reject", smtp_message="Gtube pattern")),
                         "mx")
    assert gtube.reply == "550 5.7.1 Gtube pattern"


def test_rspamd_authentication_results_first() -> None:
    symbols = {"R_SPF_ALLOW": {"name": "R_SPF_ALLOW", "score": -0.2},
               "R_DKIM_NA": {"name": "R_DKIM_NA", "score": 0.0}}
    judgement = judge_rspamd(parse_checkv2(rspamd_reply("no action", 0.5, symbols)), "mx.test")
    assert judgement.headers[0] == ("Authentication-Results", "mx.test; spf=pass; dkim=none")


@pytest.mark.parametrize(("score", "spam", "kind"), [
    (20.0, True, SpamClass.REJECT), (15.0, True, SpamClass.REJECT),
    (7.0, True, SpamClass.JUNK), (1.0, False, SpamClass.HAM),
])
def test_spamassassin_mapping(score: float, spam: bool, kind: SpamClass) -> None:
    judgement = judge_spamd(SpamdResult(spam, score, 5.0, ("A", "B")), reject_score=15.0)
    assert judgement.kind is kind
    if kind is SpamClass.REJECT:
        assert judgement.reply == replies.SPAM_REJECTED
    if kind is SpamClass.JUNK:
        assert dict(judgement.headers)["X-Spam-Symbols"] == "A, B"


class FakeJudge:
    name = "rspamd"

    def __init__(self, outcome: SpamJudgement | Exception) -> None:
        self.outcome = outcome

    async def judge(self, envelope: Envelope, content: bytes) -> SpamJudgement:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class FakeVirus:
    name = "clamd"

    def __init__(self, outcome: ClamdResult | Exception) -> None:
        self.outcome = outcome

    async def scan(self, content: bytes) -> ClamdResult:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


DOWN = ScannerUnavailable("rspamd", "ConnectError")


@pytest.mark.parametrize(("policy", "expected"), [
    (ScanFailure.TEMPFAIL, Verdict(replies.SCANNER_UNAVAILABLE)),
    (ScanFailure.ACCEPT,
     Verdict(headers=((NOT_SCANNED_HEADER, "not scanned (rspamd unavailable)"),))),
    (ScanFailure.DEFER, Verdict(defer=True)),
])
async def test_spam_rule_failure_policies(policy: ScanFailure, expected: Verdict) -> None:
    stats = WorkerStats()
    verdict = await SpamRule(FakeJudge(DOWN), failure=policy, stats=stats).check(ENVELOPE, b"")
    assert verdict == expected
    assert stats.scanner_unavailable == 1
    assert (stats.scan_tempfailed, stats.scan_not_scanned, stats.scan_deferred) == {
        ScanFailure.TEMPFAIL: (1, 0, 0), ScanFailure.ACCEPT: (0, 1, 0),
        ScanFailure.DEFER: (0, 0, 1)}[policy]


async def test_spam_rule_verdicts_and_counters() -> None:
    stats = WorkerStats()
    junk = judge_rspamd(parse_checkv2(rspamd_reply("add header", 9.0)), "mx")
    verdict = await SpamRule(FakeJudge(junk), failure=ScanFailure.TEMPFAIL,
                             stats=stats).check(ENVELOPE, b"")
    assert verdict.junk and verdict.accepted and dict(verdict.headers)["X-Spam"] == "Yes"
    reject = judge_rspamd(parse_checkv2(rspamd_reply("reject", 20.0)), "mx")
    verdict = await SpamRule(FakeJudge(reject), failure=ScanFailure.TEMPFAIL,
                             stats=stats).check(ENVELOPE, b"")
    assert verdict.reply == replies.SPAM_REJECTED
    assert (stats.spam_junk, stats.spam_rejected) == (1, 1)


async def test_virus_rule() -> None:
    stats = WorkerStats()

    def rule(outcome: ClamdResult | Exception, oversize: Oversize = Oversize.TEMPFAIL,
             failure: ScanFailure = ScanFailure.TEMPFAIL) -> VirusRule:
        return VirusRule(FakeVirus(outcome), failure=failure, oversize=oversize, stats=stats)

    assert await rule(CLEAN).check(ENVELOPE, b"") == ACCEPT
    found = await rule(ClamdResult("Eicar-Sig\r\n.UNOFFICIAL")).check(ENVELOPE, b"")
    assert found.reply == "554 5.7.1 Message refused: virus Eicar-Sig .UNOFFICIAL found"
    too_big = StreamTooLarge(10, 5)
    assert (await rule(too_big, Oversize.REJECT).check(ENVELOPE, b"")).reply == \
        replies.SCAN_TOO_BIG_REJECT
    assert (await rule(too_big).check(ENVELOPE, b"")).reply == replies.SCAN_TOO_BIG_TEMPFAIL
    down = ScannerUnavailable("clamd", "refused")
    assert (await rule(down, failure=ScanFailure.DEFER).check(ENVELOPE, b"")).defer
    assert (stats.virus_clean, stats.virus_found, stats.scan_oversize) == (1, 1, 2)


VIRUS = Verdict("554 5.7.1 Message refused: virus X found")
SPAM = Verdict(replies.SPAM_REJECTED)
TEMP = Verdict(replies.SCANNER_UNAVAILABLE)
DEFER = Verdict(defer=True)
HAM = Verdict(headers=(("X-Spam-Status", "No"),))
JUNK = Verdict(headers=(("X-Spam", "Yes"),), junk=True)
NOTE = Verdict(headers=((NOT_SCANNED_HEADER, "not scanned (clamd unavailable)"),))


@pytest.mark.parametrize(("verdicts", "expected"), [
    ([VIRUS, SPAM], VIRUS),  # virus wins over spam
    ([TEMP, SPAM], SPAM),  # a permanent refusal wins over a temporary one
    ([DEFER, SPAM], SPAM),
    ([TEMP, HAM], TEMP),
    ([DEFER, JUNK], DEFER),  # deferred whole: rescanned later with every scanner
    ([NOTE, JUNK], Verdict(headers=NOTE.headers + JUNK.headers, junk=True)),
    ([ACCEPT, HAM], HAM),
])
def test_combine(verdicts: list[Verdict], expected: Verdict) -> None:
    assert combine(verdicts) == expected


async def test_scan_rule_runs_members_concurrently() -> None:
    import asyncio

    started: list[str] = []
    both = asyncio.Event()

    class Slow:
        def __init__(self, name: str, verdict: Verdict) -> None:
            self.name, self.verdict = name, verdict

        async def check(self, envelope: Envelope, content: bytes) -> Verdict:
            started.append(self.name)
            if len(started) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 5)  # deadlocks unless both run at once
            return self.verdict

    rule = ScanRule([Slow("virus", VIRUS), Slow("spam", SPAM)])
    assert await rule.check(ENVELOPE, b"") == VIRUS
