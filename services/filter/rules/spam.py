"""Spam verdicts from rspamd (or SpamAssassin), applied at the end of DATA.

rspamd decides with its own thresholds; we map its action:

    reject, discard             -> 550 5.7.1 (rspamd's smtp_message when it gives one)
    soft reject, greylist       -> 451 4.7.1
    add header, rewrite subject,
    quarantine                  -> accepted, X-Spam headers, filed into Junk
    no action                   -> accepted, X-Spam-Status: No

`discard` (a milter drops the message silently) is refused instead: we never lose a message
without a word, and at DATA the sender's server is the one to tell its user. `quarantine` (a
milter's MTA holds the message for its administrator) goes to the recipient's Junk, where the
recipient can review it; tiermail's quarantine queue is for infected mail only.

SpamAssassin: score >= `spamassassin_reject_score` -> 550; spam by its own threshold -> Junk;
otherwise X-Spam-Status: No. Authentication-Results (RFC 8601) comes from rspamd's SPF, DKIM
and DMARC symbols when they appear.

The mapping (`judge_rspamd`, `judge_spamd`) is pure and shared with the deferred scanner,
which cannot refuse any more and files every spam class into Junk instead.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Protocol

from common.envelope import Envelope
from services.filter.backends.errors import ScannerUnavailable
from services.filter.backends.rspamd import RspamdClient
from services.filter.backends.spamd import SpamdClient
from services.filter.protocol import replies
from services.filter.protocol import rspamd as rspamd_protocol
from services.filter.protocol.rspamd import RspamdResult
from services.filter.protocol.scan_headers import (
    Header,
    authentication_results,
    ham_headers,
    header_safe,
    spam_headers,
)
from services.filter.protocol.spamd import SpamdResult
from services.filter.rules.base import Verdict
from services.filter.rules.scan_failure import ScanFailure, unavailable_verdict
from services.filter.stats import WorkerStats

log = logging.getLogger(__name__)

SMTP_MESSAGE_LIMIT = 200


class SpamClass(enum.Enum):
    HAM = "ham"
    JUNK = "junk"
    REJECT = "reject"
    TEMPFAIL = "tempfail"  # rspamd asks to try later: meaningless once accepted


@dataclass(frozen=True)
class SpamJudgement:
    kind: SpamClass
    score: float
    required: float
    headers: tuple[Header, ...]  # for the message when it is accepted (now or deferred)
    reply: str | None = None  # at SMTP time, for REJECT and TEMPFAIL

    @property
    def is_spam(self) -> bool:
        """Spam once it can no longer be refused (the deferred scan): Junk."""
        return self.kind in (SpamClass.JUNK, SpamClass.REJECT)


_RSPAMD_CLASSES = {
    rspamd_protocol.REJECT: SpamClass.REJECT,
    rspamd_protocol.DISCARD: SpamClass.REJECT,
    rspamd_protocol.QUARANTINE: SpamClass.JUNK,
    rspamd_protocol.SOFT_REJECT: SpamClass.TEMPFAIL,
    rspamd_protocol.GREYLIST: SpamClass.TEMPFAIL,
    rspamd_protocol.ADD_HEADER: SpamClass.JUNK,
    rspamd_protocol.REWRITE_SUBJECT: SpamClass.JUNK,
    rspamd_protocol.NO_ACTION: SpamClass.HAM,
}


def smtp_text(message: str | None) -> str | None:
    """rspamd's smtp_message as one line of printable ASCII, or None when nothing is left."""
    if not message:
        return None
    text = header_safe(message, SMTP_MESSAGE_LIMIT)
    return text or None


def judge_rspamd(result: RspamdResult, authserv_id: str) -> SpamJudgement:
    kind = _RSPAMD_CLASSES[result.action]
    scored = [(s.name, s.score) for s in result.symbols if s.score != 0]
    symbols: list[tuple[str, float | None]] = list(
        scored or [(s.name, s.score) for s in result.symbols])
    headers = _headers(kind, result.score, result.required_score, symbols)
    auth = authentication_results(authserv_id, (s.name for s in result.symbols))
    if auth is not None:
        headers = (auth, *headers)
    reply = None
    if kind is SpamClass.REJECT:
        text = smtp_text(result.smtp_message)
        reply = replies.SPAM_REJECTED_TEXT.format(text=text) if text else replies.SPAM_REJECTED
    elif kind is SpamClass.TEMPFAIL:
        reply = replies.SPAM_TEMPFAIL
    return SpamJudgement(kind, result.score, result.required_score, headers, reply)


def judge_spamd(result: SpamdResult, reject_score: float) -> SpamJudgement:
    if result.score >= reject_score:
        kind = SpamClass.REJECT
    elif result.spam:
        kind = SpamClass.JUNK
    else:
        kind = SpamClass.HAM
    symbols: list[tuple[str, float | None]] = [(name, None) for name in result.symbols]
    headers = _headers(kind, result.score, result.threshold, symbols)
    reply = replies.SPAM_REJECTED if kind is SpamClass.REJECT else None
    return SpamJudgement(kind, result.score, result.threshold, headers, reply)


def _headers(kind: SpamClass, score: float, required: float,
             symbols: list[tuple[str, float | None]]) -> tuple[Header, ...]:
    if kind in (SpamClass.JUNK, SpamClass.REJECT):
        return spam_headers(score, required, symbols)
    return ham_headers(score, required)


class SpamJudge(Protocol):
    name: str

    async def judge(self, envelope: Envelope, content: bytes) -> SpamJudgement: ...


class RspamdJudge:
    def __init__(self, client: RspamdClient, authserv_id: str) -> None:
        self.name = client.name
        self._client = client
        self._authserv_id = authserv_id

    async def judge(self, envelope: Envelope, content: bytes) -> SpamJudgement:
        return judge_rspamd(await self._client.check(envelope, content), self._authserv_id)


class SpamAssassinJudge:
    def __init__(self, client: SpamdClient, reject_score: float) -> None:
        self.name = client.name
        self._client = client
        self._reject_score = reject_score

    async def judge(self, envelope: Envelope, content: bytes) -> SpamJudgement:
        result = await self._client.check(content, envelope.authenticated_user)
        return judge_spamd(result, self._reject_score)


class SpamRule:
    name = "spam"

    def __init__(self, judge: SpamJudge, *, failure: ScanFailure, stats: WorkerStats) -> None:
        self._judge = judge
        self._failure = failure
        self._stats = stats

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        try:
            judgement = await self._judge.judge(envelope, content)
        except ScannerUnavailable as exc:
            return unavailable_verdict(self._failure, exc, envelope, self._stats)
        extra = {"queue_id": envelope.queue_id, "scanner": self._judge.name}
        log.info("spam verdict %s score=%.2f required=%.2f", judgement.kind.value,
                 judgement.score, judgement.required, extra=extra)
        if judgement.kind is SpamClass.REJECT:
            self._stats.spam_rejected += 1
            assert judgement.reply is not None
            return Verdict(judgement.reply)
        if judgement.kind is SpamClass.TEMPFAIL:
            self._stats.spam_tempfailed += 1
            assert judgement.reply is not None
            return Verdict(judgement.reply)
        if judgement.kind is SpamClass.JUNK:
            self._stats.spam_junk += 1
            return Verdict(headers=judgement.headers, junk=True)
        self._stats.spam_ham += 1
        return Verdict(headers=judgement.headers)
