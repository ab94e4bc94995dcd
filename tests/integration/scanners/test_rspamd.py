"""The `rspamd` fixture: a real rspamd with our configuration answers /checkv2 with the
actions the filter maps to SMTP replies, quickly, without touching the network."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from common.envelope import Envelope, Recipient
from common.ids import new_queue_id
from services.devscanners.devdns import DnsStub
from services.devscanners.runner import start_rspamd
from services.filter.backends.errors import ScannerUnavailable
from services.filter.backends.rspamd import MAX_REPLY, RspamdClient
from tests.support import GTUBE, free_port

ENVELOPE = {
    "IP": "192.0.2.10",  # TEST-NET-1: not loopback, so SPF and DMARC run (and find nothing)
    "Helo": "mail.example.org",
    "From": "alice@example.org",
    "Rcpt": "bob@example.net",
    "Queue-Id": "test-queue-id",
}


def message(body: str, *headers: str) -> bytes:
    lines = ["From: Alice <alice@example.org>", "To: Bob <bob@example.net>",
             "Subject: lunch", "Date: Sun, 22 Nov 2026 09:00:00 +0000",
             "Message-ID: <lunch-1@example.org>", *headers, "", body, ""]
    return "\r\n".join(lines).encode()


HAM = message("Hi Bob,\r\n\r\nlunch tomorrow at noon? The usual place.\r\n\r\nAlice")


def checkv2(url: str, raw: bytes) -> dict[str, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("POST", "/checkv2", body=raw, headers=ENVELOPE)
        response = conn.getresponse()
        assert response.status == 200
        result: dict[str, Any] = json.loads(response.read())
        return result
    finally:
        conn.close()


def test_gtube_is_rejected(rspamd: str) -> None:
    result = checkv2(rspamd, message(GTUBE))
    assert result["action"] == "reject"
    assert "GTUBE" in result["symbols"]


def test_ham_gets_no_action_quickly(rspamd: str) -> None:
    checkv2(rspamd, HAM)  # the first scan of a worker loads lazily-built state
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        result = checkv2(rspamd, HAM)
        timings.append(time.perf_counter() - started)
        assert result["action"] == "no action", result
    timings.sort()
    print(f"rspamd ham scan: median {timings[10] * 1000:.1f} ms, "
          f"max {timings[-1] * 1000:.1f} ms (new connection each)")


def test_add_header_band_on_request(rspamd: str) -> None:
    result = checkv2(rspamd, message("Hi Bob", "X-Tiermail-Test: add-header"))
    assert result["action"] == "add header", result
    assert "TIERMAIL_TEST_ADD_HEADER" in result["symbols"]
    assert result["score"] < 15


def test_soft_reject_on_request(rspamd: str) -> None:
    result = checkv2(rspamd, message("Hi Bob", "X-Tiermail-Test: soft-reject"))
    assert result["action"] == "soft reject", result


def test_authentication_results_from_spf_dkim_dmarc(rspamd: str) -> None:
    result = checkv2(rspamd, HAM)
    assert {"R_SPF_NA", "R_DKIM_NA", "DMARC_NA"} <= set(result["symbols"])
    value = result["milter"]["add_headers"]["Authentication-Results"]["value"]
    assert "spf=none" in value and "dkim=none" in value and "dmarc=none" in value


def test_test_rules_load_only_when_asked(rspamd: str, scanner_dns: DnsStub,
                                         tmp_path: Path) -> None:
    with start_rspamd(tmp_path / "rspamd", port=free_port(), controller_port=free_port(),
                      dns_address=scanner_dns.address, test_rules=False) as plain:
        result = checkv2(plain.address, message("Hi Bob", "X-Tiermail-Test: add-header"))
    assert "TIERMAIL_TEST_ADD_HEADER" not in result["symbols"]
    assert result["action"] == "no action"


def test_no_greylist_action_without_the_greylist_module(rspamd: str) -> None:
    # No Date and no Message-ID from a host without reverse DNS: about 5.5 points, which the
    # stock thresholds would make "greylist" (a 451 on every retry, with no greylist module).
    bare = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: x\r\n\r\nhi\r\n"
    result = checkv2(rspamd, bare)
    assert 4 <= result["score"] < 6, result
    assert result["action"] == "no action"


def test_discard_and_quarantine_on_request(rspamd: str) -> None:
    """Actions only an operator's rule gives (declared in actions.conf, forced by
    force_actions or multimap), as rspamd 3.4 names them in its reply."""
    for action in ("discard", "quarantine"):
        result = checkv2(rspamd, message("Hi Bob", f"X-Tiermail-Test: {action}"))
        assert result["action"] == action, result


def _reply(action: str, score: float) -> bytes:
    body = json.dumps({"action": action, "score": score, "required_score": 15.0,
                       "symbols": {}}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def _serve(answer: Callable[[int], bytes]) -> asyncio.Server:
    """A hostile stand-in for rspamd: reads each request, answers `answer(n)` for the n-th
    connection, and keeps the connection open as a keep-alive server would."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                await reader.readexactly(length)
                writer.write(answer(number))
                await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _envelope() -> Envelope:
    return Envelope(queue_id=new_queue_id(), mail_from="alice@example.org",
                    recipients=(Recipient("bob@example.net", ("bob@example.net",)),),
                    client_ip="192.0.2.10", client_helo="mail.example.org",
                    received_at=time.time(), size=len(HAM))


async def test_a_stray_reply_is_never_the_next_messages_verdict() -> None:
    """A server that sent one reply too many on a keep-alive connection: the extra one,
    `reject`, was read as the next message's verdict, and a clean message got 550 (found in
    review). Each scan now has a connection of its own."""
    server = await _serve(lambda n: _reply("no action", 0.0) + _reply("reject", 99.0)
                          if n == 1 else _reply("no action", 0.0))
    client = RspamdClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                          timeout=5.0)
    try:
        first = await client.check(_envelope(), HAM)
        second = await client.check(_envelope(), HAM)
        assert (first.action, second.action) == ("no action", "no action")
    finally:
        await client.aclose()
        server.close()


async def test_a_reply_past_the_limit_is_no_verdict() -> None:
    """A 200 MB reply was read whole: 250 MiB of the worker's memory, its loop held half a
    second (found in review)."""
    huge = b"x" * (MAX_REPLY + 1)
    await _no_verdict(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(huge), huge), "a reply over")


async def test_an_error_status_is_no_verdict_whatever_its_body_says() -> None:
    """A 500 (an rspamd worker failing, a proxy in front of it) is the scanner failing,
    even with a well-formed "no action" body: the failure policy decides, not that body."""
    await _no_verdict(lambda n: _reply("no action", 0.0).replace(
        b"HTTP/1.1 200 OK", b"HTTP/1.1 500 Internal Server Error", 1), "HTTP 500")


async def _no_verdict(answer: Callable[[int], bytes], why: str) -> None:
    """A scan against a stand-in answering `answer` is ScannerUnavailable matching `why`."""
    server = await _serve(answer)
    client = RspamdClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                          timeout=5.0)
    try:
        with pytest.raises(ScannerUnavailable, match=why):
            await client.check(_envelope(), HAM)
    finally:
        await client.aclose()
        server.close()


async def test_a_busy_rspamd_still_answers_its_ping() -> None:
    """Pings shared the pool of 64 scan connections: behind 64 slow scans a ping waited out
    its 5 s, and a busy but healthy rspamd was marked down (found in review)."""
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /ping"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\npong\n")
            else:
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                await reader.readexactly(length)
                await release.wait()
                writer.write(_reply("no action", 0.0))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = RspamdClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                          timeout=30.0)
    try:
        scans = [asyncio.ensure_future(client.check(_envelope(), HAM)) for _ in range(64)]
        await asyncio.sleep(0)
        assert await client.ping()
        release.set()
        assert all(result.action == "no action" for result in await asyncio.gather(*scans))
    finally:
        await client.aclose()
        server.close()
