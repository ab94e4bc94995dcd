"""Verdicts at the end of DATA with the real rspamd, clamd and spamd."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import smtplib
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from common.settings import Settings
from services.devscanners.devdns import DnsStub
from services.devscanners.runner import start_clamd, start_rspamd
from services.filter.main import open_worker
from services.filter.protocol import replies
from services.filter.protocol.scan_headers import NOT_SCANNED_HEADER
from tests.integration.scanning.conftest import (
    ALICE,
    add_header_band,
    closed_address,
    depth,
    eicar_attachment,
    gtube,
    ham,
    message,
    send_one,
    take_all,
)
from tests.support import TcpProxy, eicar_bytes, free_port


async def send(port: int, data: bytes) -> tuple[int, str]:
    return await asyncio.to_thread(send_one, port, data)


def reply_of(code: int, text: str) -> str:
    return f"{code} {text}"


async def test_gtube_is_refused_at_data_and_never_queued(scan_settings: Settings) -> None:
    async with open_worker(scan_settings) as worker:
        code, text = await send(worker.ports[0], gtube())
        assert code == 550 and text.startswith("5.7.1"), text
        assert worker.stats.spam_rejected == 1
    assert await depth(scan_settings, scan_settings.topology.deliver_queue) == 0


async def test_add_header_band_is_queued_as_junk_with_headers(scan_settings: Settings) -> None:
    async with open_worker(scan_settings) as worker:
        assert await send(worker.ports[0], add_header_band()) == (250, "")
        assert worker.stats.spam_junk == 1
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert queued.envelope.junk is True
    assert queued.header("X-Spam") == "Yes"
    score, _, required = (queued.header("X-Spam-Score") or "").partition(" / ")
    assert 6 <= float(score) < float(required) == 15.0
    assert "TIERMAIL_TEST_ADD_HEADER(8.00)" in (queued.header("X-Spam-Symbols") or "")
    assert queued.body.index(b"X-Spam:") < queued.body.index(b"Received:")
    assert queued.envelope.size == len(queued.body)


async def test_ham_is_queued_with_x_spam_status_no(scan_settings: Settings) -> None:
    async with open_worker(scan_settings) as worker:
        assert await send(worker.ports[0], ham()) == (250, "")
        assert (worker.stats.spam_ham, worker.stats.virus_clean) == (1, 1)
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert queued.envelope.junk is False
    assert (queued.header("X-Spam-Status") or "").startswith("No, score=")
    assert queued.header("X-Spam") is None


def send_smtputf8(port: int, sender: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.test",
                      timeout=60) as client:
        client.ehlo()
        client.sendmail(sender, [ALICE], data, mail_options=["SMTPUTF8"])


async def test_smtputf8_mail_is_not_junk(scan_settings: Settings) -> None:
    """RFC 6531/6532 mail, a UTF-8 address in the envelope and in From:, was filed into Junk:
    rspamd 3.4 scored the envelope sender it could not read BROKEN_HEADERS (8) and the
    From: INVALID_FROM_8BIT (6) + FROM_INVALID (2), both past its add-header threshold."""
    sender = "jörg@beispiel.test"
    data = ("From: Jörg <jörg@beispiel.test>\r\nTo: Alice <" + ALICE + ">\r\n"
            "Subject: Grüße aus München\r\nDate: Sun, 06 Dec 2026 06:00:00 +0000\r\n"
            "Message-ID: <gruss-1@beispiel.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\nHallo Alice,\r\n\r\nviele Grüße aus München. Wir sehen uns nächste "
            "Woche.\r\n\r\nJörg\r\n").encode()
    async with open_worker(scan_settings) as worker:
        await asyncio.to_thread(send_smtputf8, worker.ports[0], sender, data)
        assert worker.stats.spam_ham == 1
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert queued.envelope.junk is False
    assert (queued.header("X-Spam-Status") or "").startswith("No, score="), queued.body[:600]


async def test_eicar_attachment_is_refused_naming_the_signature(scan_settings: Settings) -> None:
    async with open_worker(scan_settings) as worker:
        code, text = await send(worker.ports[0], eicar_attachment())
        assert worker.stats.virus_found == 1
    assert code == 554
    assert text.startswith("5.7.1 Message refused: virus ") and text.endswith(" found"), text
    signature = text.split()[4]
    assert signature.endswith(".UNOFFICIAL"), text
    assert await depth(scan_settings, scan_settings.topology.deliver_queue) == 0


async def test_rspamd_down_tempfail_then_accept(scan_settings: Settings) -> None:
    down = scan_settings.replace(rspamd_url=f"http://{closed_address()}")
    async with open_worker(down) as worker:
        assert reply_of(*await send(worker.ports[0], ham())) == replies.SCANNER_UNAVAILABLE
        assert worker.stats.scan_tempfailed == 1
    assert await depth(scan_settings, scan_settings.topology.deliver_queue) == 0
    async with open_worker(down.replace(scan_failure="accept")) as worker:
        assert await send(worker.ports[0], ham()) == (250, "")
        assert worker.stats.scan_not_scanned == 1
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert queued.header(NOT_SCANNED_HEADER) == "not scanned (rspamd unavailable)"
    assert queued.header("X-Spam-Status") is None and not queued.envelope.junk


async def test_clamd_down_tempfail_then_accept(scan_settings: Settings) -> None:
    down = scan_settings.replace(clamd_address=closed_address())
    async with open_worker(down) as worker:
        assert reply_of(*await send(worker.ports[0], ham())) == replies.SCANNER_UNAVAILABLE
    async with open_worker(down.replace(scan_failure="accept")) as worker:
        assert await send(worker.ports[0], ham()) == (250, "")
        # GTUBE is still refused: rspamd is up and a permanent refusal wins.
        code, _ = await send(worker.ports[0], gtube())
        assert code == 550
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert queued.header(NOT_SCANNED_HEADER) == "not scanned (clamd unavailable)"
    assert (queued.header("X-Spam-Status") or "").startswith("No, ")


async def test_oversize_for_clamd_is_never_passed_silently(scan_settings: Settings) -> None:
    big = ham("big") + b"x" * 2000 + b"\r\n"
    small_limit = scan_settings.replace(clamd_stream_max=1024)
    async with open_worker(small_limit.replace(virus_oversize="reject")) as worker:
        assert reply_of(*await send(worker.ports[0], big)) == replies.SCAN_TOO_BIG_REJECT
    async with open_worker(small_limit.replace(virus_oversize="tempfail")) as worker:
        assert reply_of(*await send(worker.ports[0], big)) == replies.SCAN_TOO_BIG_TEMPFAIL
        assert worker.stats.scan_oversize == 1
        assert await send(worker.ports[0], ham("small")) == (250, "")
    assert len(await take_all(scan_settings, scan_settings.topology.deliver_queue)) == 1


async def test_a_virus_past_clamds_scan_limits_is_never_passed_as_clean(
        scan_settings: Settings) -> None:
    """EICAR inside 25 nested zips (2 KB) is past clamd's MaxRecursion (17): clamd scanned
    what it could, answered OK, and the message was delivered as clean (found in review).
    With AlertExceedsMax it says Heuristics.Limits.Exceeded, which is the oversize policy."""
    nested = eicar_bytes()
    for level in range(25):
        nested = _zipped(f"l{level}.zip" if level else "eicar.com", nested)
    bomb = _with_attachment("nested", "archive.zip", nested)
    async with open_worker(scan_settings.replace(virus_oversize="reject")) as worker:
        assert reply_of(*await send(worker.ports[0], bomb)) == replies.SCAN_LIMITS_REJECT
        assert worker.stats.scan_oversize == 1 and worker.stats.virus_clean == 0
        shallow = _with_attachment("shallow", "archive.zip", _zipped("eicar.com",
                                                                      eicar_bytes()))
        code, text = await send(worker.ports[0], shallow)
        assert code == 554 and "virus" in text, text
    assert await depth(scan_settings, scan_settings.topology.deliver_queue) == 0


def _zipped(name: str, data: bytes) -> bytes:
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return packed.getvalue()


def _with_attachment(subject: str, name: str, data: bytes) -> bytes:
    payload = base64.encodebytes(data).replace(b"\n", b"\r\n")
    body = (b"--XYZ\r\nContent-Type: text/plain\r\n\r\nAttached.\r\n"
            b"--XYZ\r\nContent-Type: application/zip\r\n"
            b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"--XYZ--\r\n")
    return message(subject, body, b"MIME-Version: 1.0\r\n"
                                  b"Content-Type: multipart/mixed; boundary=\"XYZ\"\r\n")


async def test_a_senders_spam_verdict_is_replaced_by_ours(scan_settings: Settings) -> None:
    """X-Spam-Status: No, score=-100 and X-Spam: No written by the sender were delivered
    beside ours (found in review): a client rule matching `X-Spam: No` took the sender's
    word. With a spam scanner on, the X-Spam family is ours alone."""
    forged_fields = [b"X-Spam-Status: No, score=-100 required=5", b"X-Spam: No",
                     b"X-Spam-Score: -100", b"X-Spam-Flag: NO", b"X-Spam-Level: ",
                     b"X-Spam-Report: all clear", b"X-Spam-Symbols: WHITELISTED",
                     b"X-Tiermail-Scan: scanned clean", b"X-Tiermail-Virus: clean"]
    forged = b"".join(field + b"\r\n" for field in forged_fields)
    async with open_worker(scan_settings) as worker:
        assert await send(worker.ports[0], forged + ham("forged verdict")) == (250, "")
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    header_section = b"\n" + queued.body.partition(b"\r\n\r\n")[0].lower()
    assert header_section.count(b"\nx-spam-status:") == 1, header_section
    assert b"score=-100" not in header_section
    for field in forged_fields:
        name = field.partition(b":")[0].lower()
        if name != b"x-spam-status":  # ours is there, with rspamd's score
            assert b"\n" + name + b":" not in header_section, (name, header_section)


async def test_spamassassin_backend(scan_settings: Settings, spamd: str) -> None:
    sa = scan_settings.replace(spam="spamassassin", spamd_address=spamd, virus="off")
    async with open_worker(sa) as worker:
        code, _ = await send(worker.ports[0], gtube())
        assert code == 550  # GTUBE scores 1000 in SpamAssassin: over the reject score
        assert await send(worker.ports[0], ham()) == (250, "")
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert (queued.header("X-Spam-Status") or "").startswith("No, score=")


async def test_clamd_own_stream_limit_is_the_oversize_policy(
        scan_settings: Settings, tmp_path: Path) -> None:
    """clamd's StreamMaxLength below our setting: its "size limit exceeded" is not a pass."""
    scanner = await asyncio.to_thread(start_clamd, tmp_path / "clamd-small",
                                      address=closed_address(), stream_max=4096)
    try:
        small = scan_settings.replace(clamd_address=scanner.address, virus_oversize="reject")
        async with open_worker(small) as worker:
            big = ham("big") + (b"y" * 76 + b"\r\n") * 200
            assert reply_of(*await send(worker.ports[0], big)) == replies.SCAN_TOO_BIG_REJECT
            assert worker.stats.scan_oversize == 1
            assert await send(worker.ports[0], ham("small")) == (250, "")
    finally:
        await asyncio.to_thread(scanner.stop)


async def test_the_largest_message_is_scanned_by_an_rspamd_with_the_same_limit(
        scan_settings: Settings, scanner_dns: DnsStub, tmp_path: Path) -> None:
    """rspamd resets the connection for a message over its max_message (a scanner failure
    to us, 451 for ever): TIERMAIL_MAX_MESSAGE_SIZE may be at most TIERMAIL_RSPAMD_MAX_MESSAGE,
    and a message of exactly that size must be scanned. The runner gives its rspamd the
    setting's limit (as `make run` does); 20000 octets here."""
    limit = 20_000
    data = ham("at the limit") + b"x" * 78 + b"\r\n"  # 80-octet lines, then a last one
    lines, rest = divmod(limit - len(data) - 2, 80)
    data = ham("at the limit") + (b"x" * 78 + b"\r\n") * (lines + 1) + b"y" * rest + b"\r\n"
    assert len(data) == limit
    with start_rspamd(tmp_path / "rspamd", port=free_port(), controller_port=free_port(),
                      dns_address=scanner_dns.address, max_message=limit) as small:
        async with httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.TransportError):  # rspamd's answer to one octet more
                await client.post(f"{small.address}/checkv2", content=data + b"\n")
        at_limit = scan_settings.replace(rspamd_url=small.address, virus="off",
                                         rspamd_max_message=limit, max_message_size=limit)
        async with open_worker(at_limit) as worker:
            assert await send(worker.ports[0], data) == (250, "")
            assert worker.stats.scanner_unavailable == 0
            # Two octets more are refused (552, SIZE), never handed to rspamd.
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                await send(worker.ports[0], data + b"\r\n")
            assert refused.value.smtp_code == 552
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert (queued.header("X-Spam-Status") or "").startswith("No, ")
    assert queued.body.endswith(data)


class BlackHole:
    """A loopback server that accepts connections and reads, but never answers: a hung
    scanner, which must cost at most `scan_timeout`, never a hung SMTP session."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(65536):
                pass
            writer.close()

        self.server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_scanners_that_time_out_follow_the_failure_policy(
        scan_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.filter.rules")
    async with BlackHole() as hung:
        for slow in (scan_settings.replace(rspamd_url=f"http://{hung}", scan_timeout=1.0),
                     scan_settings.replace(clamd_address=hung, scan_timeout=1.0)):
            async with open_worker(slow) as worker:
                started = time.monotonic()
                assert reply_of(*await send(worker.ports[0], ham())) == \
                    replies.SCANNER_UNAVAILABLE
                assert time.monotonic() - started < 10  # bounded by the timeout, not hung
            async with open_worker(slow.replace(scan_failure="defer"),
                                   drain_scan_queue=False) as worker:
                assert await send(worker.ports[0], ham()) == (250, "")
    assert await depth(scan_settings, scan_settings.topology.deliver_queue) == 0
    assert await depth(scan_settings, scan_settings.topology.scan_queue) == 2
    # The log says what happened: it said "(TimeoutError)" or "(TimeoutError: )".
    lines = {r.getMessage() for r in caplog.records}
    for scanner in ("rspamd", "clamd"):
        assert f"{scanner} unavailable (no answer within 1 s): 451" in lines, lines


async def test_rspamd_soft_reject_is_a_temporary_refusal(scan_settings: Settings) -> None:
    """rspamd's `soft reject` (a test-only rule forces it) must make the sender retry: 451
    4.7.1 at DATA, nothing queued."""
    async with open_worker(scan_settings) as worker:
        reply = reply_of(*await send(worker.ports[0], message(
            "retry later", extra_headers=b"X-Tiermail-Test: soft-reject\r\n")))
        assert reply == replies.SPAM_TEMPFAIL, reply
    assert await depth(scan_settings, scan_settings.topology.deliver_queue) == 0


async def test_a_scan_timeout_above_30_s_is_waited_out_not_cut_off(
        scan_settings: Settings) -> None:
    """The session's bound from the end of DATA to our reply must make room for
    TIERMAIL_SCAN_TIMEOUT: it allowed 30 s for scanning whatever the setting, so a longer
    scan timeout (full signature sets scan large mail slowly) ended the session with 421 and
    the scan-failure policy was never applied."""
    host, _, port = scan_settings.clamd_address.rpartition(":")
    proxy = TcpProxy(int(port), host)
    # With a 1 s publish timeout the old bound was 5 + 1 + 30 = 36 s.
    slow = scan_settings.replace(clamd_address=f"127.0.0.1:{proxy.port}", scan_timeout=37.0,
                                 publish_timeout=1.0)
    try:
        proxy.hang()
        async with open_worker(slow, drain_scan_queue=False) as worker:
            reply = reply_of(*await send(worker.ports[0], ham()))
            assert reply == replies.SCANNER_UNAVAILABLE, reply
            assert worker.stats.scan_tempfailed == 1
    finally:
        proxy.cut()


async def test_rspamd_discard_is_refused_and_quarantine_filed_into_junk(
        scan_settings: Settings) -> None:
    """rspamd's `discard` and `quarantine` actions (an operator's rule gives them) were
    "unknown": every such message got 451 4.7.0 as if rspamd were down, and the sender
    retried it for days (under TIERMAIL_SCAN_FAILURE=accept it was delivered as not
    scanned). `discard` refuses like `reject`, `quarantine` files into the recipient's Junk."""
    async with open_worker(scan_settings, drain_scan_queue=False) as worker:
        code, text = await send(worker.ports[0], message(
            "drop it", extra_headers=b"X-Tiermail-Test: discard\r\n"))
        assert reply_of(code, text) == replies.SPAM_REJECTED
        assert await send(worker.ports[0], message(
            "hold it", extra_headers=b"X-Tiermail-Test: quarantine\r\n")) == (250, "")
        assert (worker.stats.spam_rejected, worker.stats.spam_junk) == (1, 1)
        assert worker.stats.scanner_unavailable == 0
    [queued] = await take_all(scan_settings, scan_settings.topology.deliver_queue)
    assert queued.envelope.junk is True
    assert queued.header("Subject") == "hold it"
    assert queued.header("X-Spam") == "Yes"
