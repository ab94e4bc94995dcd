"""The rule interface and the loop that runs rules in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.envelope import Envelope


@dataclass(frozen=True)
class Verdict:
    """A rule's decision: accept (reply None) or refuse with an SMTP reply."""

    reply: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reply is None


ACCEPT = Verdict()


class Rule(Protocol):
    name: str

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        """Judge one message; `content` is the body as received (no Received header)."""
        ...


async def first_refusal(
    rules: Sequence[Rule], envelope: Envelope, content: bytes
) -> tuple[str, Verdict] | None:
    """Run rules in order; the first refusal wins and stops the rest."""
    for rule in rules:
        verdict = await rule.check(envelope, content)
        if not verdict.accepted:
            return rule.name, verdict
    return None


def default_rules() -> list[Rule]:
    from services.filter.rules.bare_newline import BareNewlineRule

    return [BareNewlineRule()]
