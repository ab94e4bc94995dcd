"""The rule interface and the loop that runs rules in order.

A rule judges one message at the end of DATA. It may refuse it (an SMTP reply), or accept it
with headers to add (X-Spam-*, Authentication-Results, a not-scanned notice), a Junk verdict
(the store files the message into the recipient's Junk folder), or `defer`: a scanner it
needs is unavailable and the policy is to accept into the scan-pending queue, where it is
scanned before the store ever sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from common.envelope import Envelope

if TYPE_CHECKING:
    from common.settings import Settings
    from services.filter.backends.scanners import Scanners
    from services.filter.stats import WorkerStats

Header = tuple[str, str]


@dataclass(frozen=True)
class Verdict:
    reply: str | None = None  # refuse with this SMTP reply
    headers: tuple[Header, ...] = ()  # add to the message when it is accepted
    junk: bool = False
    defer: bool = False

    @property
    def accepted(self) -> bool:
        return self.reply is None


ACCEPT = Verdict()


@dataclass(frozen=True)
class Decision:
    """All rules' verdicts combined: the first refusal wins; otherwise headers add up."""

    reply: str | None = None
    refused_by: str | None = None
    headers: tuple[Header, ...] = ()
    junk: bool = False
    defer: bool = False


class Rule(Protocol):
    name: str

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        """Judge one message; `content` is the body as received (no Received header)."""
        ...


async def evaluate(rules: Sequence[Rule], envelope: Envelope, content: bytes) -> Decision:
    headers: list[Header] = []
    junk = defer = False
    for rule in rules:
        verdict = await rule.check(envelope, content)
        if not verdict.accepted:
            return Decision(reply=verdict.reply, refused_by=rule.name)
        headers.extend(verdict.headers)
        junk = junk or verdict.junk
        defer = defer or verdict.defer
    return Decision(headers=tuple(headers), junk=junk, defer=defer)


def format_headers(headers: Sequence[Header]) -> bytes:
    """Header fields as wire bytes (values are ours, never folded over 998 octets)."""
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)


def default_rules(settings: Settings | None = None, scanners: Scanners | None = None,
                  stats: WorkerStats | None = None) -> list[Rule]:
    """The rules from settings (services/filter/rules/defaults.py); with no scanners, only
    the local checks."""
    from services.filter.rules.defaults import build_rules

    return build_rules(settings, scanners, stats)
