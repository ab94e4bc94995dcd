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
import re
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
    overhead: LatencyResult  # per message: DATA->250 minus the filter's measured check time


def ham_message(seq: int, size: int) -> bytes:
    line = b"The quarterly figures are attached below; lunch on Thursday as usual.\r\n"
    body = line * max(1, size // len(line))
    return (
        f"From: Sender <{SENDER}>\r\nTo: User <{USER}>\r\nSubject: figures {seq}\r\n"
        f"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\nMessage-ID: <bench.{seq}@remote.test>\r\n"
        f"\r\n".encode() + body
    )


QUEUED_AS = re.compile(r"queued as ([A-Z0-9]+)")
CHECKS_LINE = re.compile(r"queued from=.* checks_ms=([0-9.]+).*queue_id=([A-Z0-9]+)")


def data_latency(port: int, count: int, size: int,
                 by_queue_id: dict[str, float] | None = None) -> LatencyResult:
    """DATA -> final 250 per message, one at a time over one connection; with `by_queue_id`,
    also each message's time under its queue id (from the 250 reply)."""
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
            found = QUEUED_AS.search(text.decode(errors="replace"))
            if by_queue_id is not None and found:
                by_queue_id[found.group(1)] = elapsed * 1000
    return result


def filter_overhead(logs: Path, data_ms: dict[str, float]) -> LatencyResult:
    """Per message: DATA->250 minus the filter's own measure of its checks (the scanners'
    time as the filter waited for them), i.e. what the filter adds on top of the scanners."""
    checks: dict[str, float] = {}
    for path in logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            found = CHECKS_LINE.search(line)
            if found:
                checks[found.group(2)] = float(found.group(1))
    result = LatencyResult()
    result.samples_ms = [total - checks[qid] for qid, total in data_ms.items() if qid in checks]
    if len(result.samples_ms) < len(data_ms):
        raise BenchError(f"only {len(result.samples_ms)} of {len(data_ms)} messages have a "
                         "checks_ms log line")
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


RECEIVED_ID = re.compile(rb"^\s+by .* id ([A-Z0-9]+)", re.MULTILINE)
SPAM_STATUS = re.compile(rb"^X-Spam-Status: ([A-Za-z]+)", re.MULTILINE)


def spam_status_by_queue_id(stack: TiermailStack, newest: int) -> dict[str, bytes]:
    """The X-Spam-Status verdict (b"" when the field is missing) of the newest messages in
    the mailbox, by the queue id in the filter's Received field (the top one)."""
    pop = poplib.POP3("127.0.0.1", stack.pop3_port, timeout=30)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        verdicts: dict[str, bytes] = {}
        for number in range(max(1, count - newest + 1), count + 1):
            head = b"\r\n".join(pop.top(number, 0)[1])
            queue_id = RECEIVED_ID.search(head)
            if queue_id:
                status = SPAM_STATUS.search(head)
                verdicts[queue_id.group(1).decode()] = status.group(1) if status else b""
        return verdicts
    finally:
        pop.quit()


def check_scanned(stack: TiermailStack, queue_ids: set[str], timeout: float) -> None:
    """Every message sent through the scanning filter is in the mailbox with the verdict ham."""
    verdicts: dict[str, bytes] = {}

    def all_delivered() -> bool:
        verdicts.update(spam_status_by_queue_id(stack, len(queue_ids)))
        return queue_ids <= verdicts.keys()

    wait_for(all_delivered, timeout, "the scanned messages in the mailbox", interval=0.5)
    wrong = {qid: verdicts[qid] for qid in queue_ids if verdicts[qid] != b"No"}
    if wrong:
        raise BenchError(f"{len(wrong)} of {len(queue_ids)} scanned messages are not "
                         f"X-Spam-Status: No: {sorted(wrong.items())[:5]}")


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
        on_by_id: dict[str, float] = {}
        data_on = data_latency(stack.smtp_port, latency_messages, size, on_by_id)
        if len(on_by_id) != latency_messages:
            raise BenchError(f"{len(on_by_id)} of {latency_messages} 250 replies named a queue id")
        check_scanned(stack, set(on_by_id), timeout)
        data_off = data_latency(off_port, latency_messages, size)
        overhead = filter_overhead(stack.logs, on_by_id)
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
                           scan_clamd, overhead)
    except BenchError:
        stack.log_tails()
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
        f"Scanning adds {added50:.2f} ms (p50) / {added99:.2f} ms (p99) to DATA->250. Per "
        f"message, DATA->250 minus the scan time the filter measured while waiting for the "
        f"scanners (its `checks_ms` log field), i.e. everything the filter does around the "
        f"scanners (receiving DATA, headers, publish and broker confirm): "
        f"{r.overhead.p50:.2f} ms (p50) / {r.overhead.p99:.2f} ms (p99).",
    ]
    return "\n".join(lines)
