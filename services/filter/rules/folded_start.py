"""Refuse a message whose first line starts with a space or a tab.

Such a line continues the field before it (RFC 5322 2.2.3), and the field before it would be
the Received header the filter puts on top: the sender's text would read as part of our
trace field (`...; <date>\\r\\n\\tfrom evil ([6.6.6.6]) by ...`), past its date and outside
RFC 5321 4.4's syntax. A header section cannot start with one (2.2: a field starts with its
name), so no well-formed message does. Refused like a bare newline, with 554 5.6.0.
"""

from __future__ import annotations

from common.envelope import Envelope
from services.filter.protocol import replies
from services.filter.rules.base import ACCEPT, Verdict


class FoldedStartRule:
    name = "folded-start"

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        if content[:1] in (b" ", b"\t"):
            return Verdict(replies.FOLDED_START)
        return ACCEPT
