"""The scanning part of bench/smtp_bench.py (`--scanning`): real rspamd and clamd started by
services/devscanners/runner.py with the project's configuration (deploy/scanners/), one
tiermail stack with two filter workers on two ports, one scanning and one not.

It measures
  * accepted msg/s with scanning on (smtp-source ham, N sessions), and with it off on the
    same stack for comparison;
  * DATA -> 250 time per message, one at a time, scanning on and off: the difference is what
    scanning adds as a client sees it;
  * the scanners' own time for the same message through the filter's own clients (rspamd and
    clamd concurrently, as the filter runs them): the filter's overhead is the added time
    minus that.
"""

from __future__ import annotations

import asyncio
import poplib
import smtplib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    DOMAIN,
    PASSWORD,
    USER,
    BenchError,
    LatencyResult,
    LoadResult,
    TiermailStack,
    free_port,
    log,
    measure_load,
    port_open,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.envelope import Envelope, Recipient  # noqa: E402
from services.devscanners.runner import (  # noqa: E402
    Scanner,
    start_clamd,
    start_dns_stub,
    start_rspamd,
)
from services.filter.backends.clamd import ClamdClient  # noqa: E402
from services.filter.backends.rspamd import RspamdClient  # noqa: E402

SENDER = "sender@remote.test"


@dataclass
class ScanResults:
    load_on: LoadResult
    load_off: LoadResult
    data_on: LatencyResult
    data_off: LatencyResult
    scanners: LatencyResult  # rspamd and clamd concurrently, through our clients
    rspamd: LatencyResult
    clamd: LatencyResult


def ham_message(seq: int, size: int) -> bytes:
    line = b"The quarterly figures are attached below; lunch on Thursday as usual.\r\n"
    body = line * max(1, size // len(line))
    return (
        f"From: Sender <{SENDER}>\r\nTo: User <{USER}>\r\nSubject: figures {seq}\r\n"
        f"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\nMessage-ID: <bench.{seq}@remote.test>\r\n"
        f"\r\n".encode() + body
    )


def data_latency(port: int, count: int, size: int) -> LatencyResult:
    """DATA -> final 250 per message, one at a time over one connection."""
    result = LatencyResult()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.remote.test", timeout=60) as c:
        c.ehlo()
        for seq in range(count):
            message = ham_message(seq, size)
            if c.mail(SENDER)[0] != 250 or c.rcpt(USER)[0] != 250:
                raise BenchError("MAIL/RCPT refused")
            started = time.perf_counter()
            code, text = c.data(message)
            elapsed = time.perf_counter() - started
            if code != 250:
                raise BenchError(f"DATA answered {code} {text!r}")
            result.samples_ms.append(elapsed * 1000)
    return result


async def _scanner_times(rspamd_url: str, clamd_address: str, count: int, size: int
                         ) -> tuple[LatencyResult, LatencyResult, LatencyResult]:
    rspamd = RspamdClient(rspamd_url, 30.0, "bench.invalid")
    clamd = ClamdClient(clamd_address, 30.0, 100 * 1024 * 1024)
    both, only_rspamd, only_clamd = LatencyResult(), LatencyResult(), LatencyResult()
    try:
        for seq in range(count):
            message = ham_message(seq, size)
            envelope = Envelope(f"B{seq}", SENDER, (Recipient(USER, (USER,)),), "127.0.0.1",
                                "bench.remote.test", time.time(), len(message))
            started = time.perf_counter()
            await asyncio.gather(rspamd.check(envelope, message), clamd.scan(message))
            both.samples_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await rspamd.check(envelope, message)
            only_rspamd.samples_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await clamd.scan(message)
            only_clamd.samples_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await rspamd.aclose()
    return both, only_rspamd, only_clamd


def last_message_head(stack: TiermailStack) -> bytes:
    pop = poplib.POP3("127.0.0.1", stack.pop3_port, timeout=30)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        _, lines, _ = pop.top(count, 0)
        return b"\r\n".join(lines)
    finally:
        pop.quit()


def run_scanning(root: Path, messages: int, sessions: int, size: int, latency_messages: int,
                 timeout: float, redis_db: int) -> ScanResults:
    scanners: list[Scanner] = []
    dns = start_dns_stub()
    stack = TiermailStack(root / "tiermail", redis_db)
    try:
        log("scanning: starting rspamd and clamd (deploy/scanners/ configuration)")
        rspamd = start_rspamd(root / "rspamd", port=free_port(), controller_port=free_port(),
                              dns_address=dns.address, test_rules=False)
        scanners.append(rspamd)
        clamd = start_clamd(root / "clamd", address=str(root / "clamd" / "clamd.sock"))
        scanners.append(clamd)
        stack.env.update({
            "TIERMAIL_SPAM": "rspamd", "TIERMAIL_RSPAMD_URL": rspamd.address,
            "TIERMAIL_VIRUS": "clamd", "TIERMAIL_CLAMD_ADDRESS": clamd.address,
        })
        stack.setup()
        stack.start_store()
        stack.start_filter()  # scanning on, stack.smtp_port
        off_port = free_port()
        saved = dict(stack.env)
        stack.env.update({"TIERMAIL_SPAM": "off", "TIERMAIL_VIRUS": "off",
                          "TIERMAIL_SMTP_PORT": str(off_port)})
        stack.start("filter")
        stack.env = saved
        wait_for(lambda: port_open(off_port), 30, f"SMTP on port {off_port}")
        log(f"scanning: filter with scanning on port {stack.smtp_port}, without on {off_port}")
        for port in (stack.smtp_port, off_port):  # warm up: first-use costs not measured
            data_latency(port, 20, size)

        log(f"scanning: DATA->250 latency, {latency_messages} messages each, on and off")
        data_on = data_latency(stack.smtp_port, latency_messages, size)
        # The last message sent through the scanning filter carries its verdict.
        wait_for(lambda: f"figures {latency_messages - 1}".encode() in last_message_head(stack),
                 timeout, "the last scanned message in the mailbox", interval=0.5)
        head = last_message_head(stack)
        if b"X-Spam-Status: No" not in head:
            raise BenchError(f"the scanned message has no X-Spam-Status: No:\n{head!r}")
        data_off = data_latency(off_port, latency_messages, size)
        log("scanning: the scanners' own time through the filter's clients")
        scan_both, scan_rspamd, scan_clamd = asyncio.run(
            _scanner_times(rspamd.address, clamd.address, latency_messages, size))

        log(f"scanning: load, {messages} messages over {sessions} sessions, scanning on")
        load_on = measure_load(stack.smtp_port, stack.indexed, messages, sessions, size,
                               timeout, poll_interval=0.02)
        log(f"scanning: load, {messages} messages over {sessions} sessions, scanning off")
        load_off = measure_load(off_port, stack.indexed, messages, sessions, size, timeout,
                                poll_interval=0.02)
        stack.check_alive()
        return ScanResults(load_on, load_off, data_on, data_off, scan_both, scan_rspamd,
                           scan_clamd)
    except BenchError:
        for path in sorted(stack.logs.glob("*.log")):
            log(f"{path.name}:\n{path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        stack.close()
        for scanner in reversed(scanners):
            scanner.stop()
        dns.stop()


def markdown(results: ScanResults, messages: int, sessions: int, size: int,
             latency_messages: int) -> str:
    r = results
    added50 = r.data_on.p50 - r.data_off.p50
    added99 = r.data_on.p99 - r.data_off.p99
    lines = [
        f"Scanning (rspamd 3.4 + clamd 1.4.6 with the EICAR-only database, {DOMAIN} ham of "
        f"{size} bytes): {messages} messages over {sessions} smtp-source sessions; latency "
        f"from {latency_messages} messages sent one at a time.",
        "",
        "| filter | SMTP accepted msg/s | end-to-end msg/s | DATA->250 p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| scanning on (1 worker) | {r.load_on.smtp_rate:.0f} | {r.load_on.e2e_rate:.0f} "
        f"| {r.data_on.p50:.2f} | {r.data_on.p99:.2f} |",
        f"| scanning off (1 worker) | {r.load_off.smtp_rate:.0f} | {r.load_off.e2e_rate:.0f} "
        f"| {r.data_off.p50:.2f} | {r.data_off.p99:.2f} |",
        "",
        "| scanners' own time, through the filter's clients | p50 ms | p99 ms |",
        "| --- | ---: | ---: |",
        f"| rspamd /checkv2 | {r.rspamd.p50:.2f} | {r.rspamd.p99:.2f} |",
        f"| clamd INSTREAM | {r.clamd.p50:.2f} | {r.clamd.p99:.2f} |",
        f"| both concurrently (the filter's scan step) | {r.scanners.p50:.2f} "
        f"| {r.scanners.p99:.2f} |",
        "",
        f"Scanning adds {added50:.2f} ms (p50) / {added99:.2f} ms (p99) to DATA->250; the "
        f"scanners' own time is {r.scanners.p50:.2f} / {r.scanners.p99:.2f} ms, so the "
        f"filter's own overhead for scanning is about {added50 - r.scanners.p50:.2f} ms (p50) "
        f"/ {added99 - r.scanners.p99:.2f} ms (p99) (differences of percentiles, not "
        f"percentiles of differences).",
    ]
    return "\n".join(lines)
