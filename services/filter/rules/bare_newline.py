"""Refuse messages with a bare CR or LF (RFC 5321 2.3.8; SMTP smuggling defence).

aiosmtpd ends DATA only at <CRLF>.<CRLF> (since 1.4.5), so `<LF>.<LF>` cannot split a message
here; but a bare newline passed on could split it at the next hop. Postfix refuses the same
(smtpd_forbid_bare_newline). The session stays usable after the refusal.
"""

from __future__ import annotations

from common.envelope import Envelope
from services.filter.protocol import replies
from services.filter.protocol.message import has_bare_newline
from services.filter.rules.base import ACCEPT, Verdict


class BareNewlineRule:
    name = "bare-newline"

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        if has_bare_newline(content):
            return Verdict(replies.BARE_NEWLINE)
        return ACCEPT
