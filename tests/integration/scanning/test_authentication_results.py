"""Authentication-Results from the real rspamd's SPF/DKIM/DMARC symbols.

rspamd skips these checks for loopback clients, so this asks as if the client were a
documentation address (192.0.2.10). Offline, every DNS answer is NXDOMAIN (our stub), so the
methods come back as `none`: what matters is that the real symbols reach the header."""

from __future__ import annotations

import time

from common.envelope import Envelope, Recipient
from common.ids import new_queue_id
from services.filter.backends.rspamd import RspamdClient
from services.filter.rules.spam import judge_rspamd

MESSAGE = (b"From: Bob <bob@sender.example>\r\nTo: alice@example.org\r\n"
           b"Subject: lunch\r\nDate: Sun, 22 Nov 2026 09:00:00 +0000\r\n"
           b"Message-ID: <ar.test@sender.example>\r\n\r\nSee you at noon.\r\n")


async def test_spf_dkim_dmarc_symbols_become_an_authentication_results_header(
        rspamd: str) -> None:
    envelope = Envelope(queue_id=new_queue_id(), mail_from="bob@sender.example",
                        recipients=(Recipient("alice@example.org", ("alice@example.org",)),),
                        client_ip="192.0.2.10", client_helo="mail.sender.example",
                        received_at=time.time(), size=len(MESSAGE))
    client = RspamdClient(rspamd, timeout=10.0, hostname="mx.test.invalid")
    try:
        result = await client.check(envelope, MESSAGE)
    finally:
        await client.aclose()
    names = {symbol.name for symbol in result.symbols}
    assert names & {"R_SPF_NA", "R_SPF_DNSFAIL", "R_SPF_FAIL", "R_SPF_ALLOW", "R_SPF_SOFTFAIL",
                    "R_SPF_NEUTRAL", "R_SPF_PERMFAIL"}, names
    judgement = judge_rspamd(result, authserv_id="mx.test.invalid")
    (value,) = [v for k, v in judgement.headers if k == "Authentication-Results"]
    assert value.startswith("mx.test.invalid")
    assert "spf=" in value, value
