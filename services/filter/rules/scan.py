"""Run several scan rules at the same time and combine their verdicts (the "scan" step).

rspamd and clamd are independent network calls; running them concurrently makes the added
latency the slower of the two instead of their sum. The combination is deterministic:

  * a permanent refusal (5xx) wins over a temporary one, and among equals the earlier
    member wins: with members [virus, spam], a virus verdict (554) wins over spam (550),
    and a GTUBE 550 still refuses the message when clamd is down;
  * otherwise, if any member defers, the message is deferred whole, without the other
    members' headers: the deferred scanner scans it again with every scanner;
  * otherwise headers add up in member order and any Junk verdict makes it Junk.

An unexpected exception in one member cancels the others (TaskGroup) and reaches the session,
which answers 451 4.3.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from common.envelope import Envelope
from services.filter.rules.base import Header, Rule, Verdict


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    refusals = [v for v in verdicts if not v.accepted]
    if refusals:
        permanent = [v for v in refusals if v.reply is not None and v.reply.startswith("5")]
        return (permanent or refusals)[0]
    if any(v.defer for v in verdicts):
        return Verdict(defer=True)
    headers: list[Header] = []
    for verdict in verdicts:
        headers.extend(verdict.headers)
    return Verdict(headers=tuple(headers), junk=any(v.junk for v in verdicts))


class ScanRule:
    def __init__(self, members: Sequence[Rule], name: str = "scan") -> None:
        self.members = tuple(members)
        self.name = name

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        if len(self.members) == 1:
            return await self.members[0].check(envelope, content)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(m.check(envelope, content)) for m in self.members]
        return combine([task.result() for task in tasks])
