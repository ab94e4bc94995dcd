#!/usr/bin/env python3
"""SMTP intake benchmark: tiermail (1 and 2 filter workers) beside a loopback Postfix.

A benchmark, not a test: it measures and prints, and fails only when something breaks.

For each system it measures
  * SMTP accept rate: N messages from Postfix's smtp-source over S parallel sessions, divided
    by smtp-source's wall time (every message answered 250);
  * end-to-end rate: N divided by the time from smtp-source's start until the last message is
    in the mailbox;
  * latency "250 received -> visible in the mailbox", p50/p99, from a separate sender that
    sends one message at a time over one connection (light load) while a poller thread
    watches the mailbox every 2 ms: for tiermail the queue ids committed to the user's index
    (what POP3 reads), matched to the id in "250 2.0.0 Ok: queued as ID"; for Postfix the
    files in Maildir/new, matched by an X-Bench-Seq header.

Both systems are started first and then loaded in `--rounds` interleaved rounds (Postfix,
tiermail with 1 filter worker, tiermail with 2), so that a slow spell of the machine does not
fall on one system only; the round with the median end-to-end rate is reported, every round's
rates beside it, and the CPU each process used (from /proc) per message.

Each system runs isolated: tiermail gets its own AMQP vhost, Redis db and key prefix, data dir
and ports; Postfix its own config, queue and Maildir under a temp directory, loopback only, no
DNS. Everything is stopped and removed at the end, also on errors and Ctrl-C.

    .venv/bin/python bench/smtp_bench.py --quick                  # smoke run, both systems
    .venv/bin/python bench/smtp_bench.py --messages 5000 --sessions 10 --size 4096
    .venv/bin/python bench/smtp_bench.py --quick --postfix-only
    .venv/bin/python bench/smtp_bench.py --scanning --sessions 10   # rspamd + clamd on

Needs root for Postfix (it runs its own master). docs/benchmarks.md has the method and results.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import (
    BenchError,
    CpuMeter,
    LatencyResult,
    LoadResult,
    PostfixStack,
    SentMessage,
    TiermailStack,
    VisibilityPoller,
    free_port,
    log,
    measure_latency,
    measure_load,
    process_cpu_seconds,
    settle,
    temp_root,
    terminate_on_sigterm,
)


@dataclass
class Row:
    system: str
    loads: list[LoadResult]  # one per round
    latency: LatencyResult | None
    note: str = ""

    @property
    def load(self) -> LoadResult:
        """The round with the median end-to-end rate (what the ratios compare)."""
        ordered = sorted(self.loads, key=lambda load: load.e2e_rate)
        return ordered[len(ordered) // 2]

    def rates(self, rate: Callable[[LoadResult], float]) -> str:
        return "/".join(f"{rate(load):.0f}" for load in self.loads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000, help="messages per load run")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions")
    parser.add_argument("--size", type=int, default=4096, help="message body bytes")
    parser.add_argument("--rounds", type=int, default=3,
                        help="load runs per system, interleaved; the median is reported")
    parser.add_argument("--latency-messages", type=int, default=500,
                        help="messages sent one at a time for the latency percentiles")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 300 messages, 4 sessions, 50 latency messages, "
                             "1 round")
    parser.add_argument("--reuse-connections", action="store_true",
                        help="smtp-source -d: several messages per connection")
    parser.add_argument("--postfix-only", action="store_true")
    parser.add_argument("--tiermail-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds any one phase may take before the run fails")
    parser.add_argument("--redis-db", type=int, default=13,
                        help="Redis database for the tiermail stack (keys get a unique prefix)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--scanning", action="store_true",
                        help="tiermail only, with real rspamd and clamd: accepted msg/s and "
                             "the latency scanning adds (bench/scanbench.py)")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.sessions, args.latency_messages, args.rounds = 300, 4, 50, 1
    if args.postfix_only and args.tiermail_only:
        parser.error("--postfix-only and --tiermail-only exclude each other")
    return args


def warm_up(port: int, count_delivered: Callable[[], int], args: argparse.Namespace) -> None:
    """A few messages first, so that process start-up and first-use costs are not measured."""
    measure_load(port, count_delivered, min(50, args.messages), min(2, args.sessions),
                 args.size, args.timeout, poll_interval=0.05)


def log_load(system: str, load: LoadResult) -> None:
    log(f"{system}: {load.smtp_rate:.0f} msg/s accepted, {load.e2e_rate:.0f} msg/s end to end")
    if load.cpu is not None:
        log(f"{system}: {load.cpu.summary()}")


class PostfixSystem:
    name = "Postfix 3.7 (defaults, virtual(8) to Maildir)"

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = PostfixStack(root, free_port())

    def start(self) -> LatencyResult:
        args, stack = self.args, self.stack
        log(f"postfix: starting on 127.0.0.1:{stack.port} (config {stack.etc})")
        stack.start()
        warm_up(stack.port, stack.delivered, args)
        log(f"postfix: latency, {args.latency_messages} messages one at a time")
        return measure_latency(stack.port, args.latency_messages, args.size,
                               VisibilityPoller(stack.listing), stack.match, args.timeout)

    def load(self) -> LoadResult:
        args = self.args
        settle()
        load = measure_load(self.stack.port, self.stack.delivered, args.messages, args.sessions,
                            args.size, args.timeout, poll_interval=0.02,
                            reuse_connections=args.reuse_connections, cpu=CpuMeter({}))
        log_load("postfix", load)
        return load

    def explain_failure(self) -> None:
        log("postfix maillog tail:\n" + self.stack.maillog_tail())

    def close(self) -> None:
        self.stack.stop()


class IndexWatcher:
    """Queue ids committed to the user's mailbox index since the watcher was made."""

    def __init__(self, stack: TiermailStack) -> None:
        path = stack.index_path()
        if path is None:
            raise BenchError("the store has no index for the benchmark user yet")
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10,
                                     check_same_thread=False)
        self._since = time.time() - 1

    def visible(self) -> list[str]:
        rows = self._conn.execute("SELECT queue_id FROM delivered WHERE delivered_at >= ?",
                                  (self._since,))
        return [str(r[0]) for r in rows]

    @staticmethod
    def match(run_tag: str, sent: list[SentMessage], seen: dict[str, float]) -> dict[int, str]:
        return {m.seq: m.queue_id for m in sent if m.queue_id}

    def close(self) -> None:
        self._conn.close()


class TiermailSystem:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = TiermailStack(root, args.redis_db)
        self.sent = 0

    def start(self) -> LatencyResult:
        args, stack = self.args, self.stack
        log(f"tiermail: vhost {stack.vhost}, redis db {stack.redis_db} prefix "
            f"{stack.redis_prefix}, data {stack.data_dir}")
        stack.setup()
        stack.start_store()
        stack.start_filter()
        log(f"tiermail: store (POP3 {stack.pop3_port}) and 1 filter (SMTP {stack.smtp_port}) up")
        warm_up(stack.smtp_port, stack.indexed, args)
        log(f"tiermail: latency, {args.latency_messages} messages one at a time")
        watcher = IndexWatcher(stack)
        try:
            latency = measure_latency(stack.smtp_port, args.latency_messages, args.size,
                                      VisibilityPoller(watcher.visible), watcher.match,
                                      args.timeout)
        finally:
            watcher.close()
        self.sent = min(50, args.messages) + args.latency_messages
        return latency

    def load(self, workers: int) -> LoadResult:
        args, stack = self.args, self.stack
        while stack.workers("filter") < workers:
            stack.start_filter()
        while stack.workers("filter") > workers:
            stack.stop_last("filter")
        before = _cpu_of(stack.pids("store"))
        waited = settle()
        log(f"tiermail: machine quiet after {waited:.1f} s (meanwhile the store used "
            f"{_cpu_of(stack.pids('store')) - before:.1f} s of CPU on earlier messages: text "
            f"indexing); load with {workers} filter worker(s), {args.messages} messages over "
            f"{args.sessions} sessions")
        # The cheap index count finds the end; POP3 STAT (in `check`) is the truth.
        load = measure_load(stack.smtp_port, stack.indexed, args.messages, args.sessions,
                            args.size, args.timeout, poll_interval=0.02,
                            reuse_connections=args.reuse_connections, cpu=stack.cpu_meter())
        stack.check_alive()
        self.sent += args.messages
        log_load(f"tiermail ({workers})", load)
        return load

    def check(self, latency: LatencyResult) -> None:
        by_pop3 = self.stack.delivered()
        if by_pop3 != self.sent:
            raise BenchError(f"POP3 STAT shows {by_pop3} messages, expected {self.sent}")
        log(f"tiermail: POP3 STAT confirms {by_pop3} messages; latency p50 "
            f"{latency.p50:.1f} ms p99 {latency.p99:.1f} ms; store RSS "
            f"{self.stack.rss_kib('store') // 1024} MiB, filters "
            f"{self.stack.rss_kib('filter') // 1024} MiB")

    def explain_failure(self) -> None:
        self.stack.log_tails()

    def close(self) -> None:
        self.stack.close()


def _cpu_of(pids: list[int]) -> float:
    return sum(sum(process_cpu_seconds(pid)) for pid in pids)


def run_systems(root: Path, args: argparse.Namespace) -> list[Row]:
    """Both systems up side by side, then `rounds` rounds of load, interleaved so that a slow
    moment of the machine does not fall on one system only."""
    postfix = None if args.tiermail_only else PostfixSystem(root / "postfix", args)
    tiermail = None if args.postfix_only else TiermailSystem(root / "tiermail", args)
    rows: list[Row] = []
    try:
        if postfix is not None:
            rows.append(Row(postfix.name, [], postfix.start()))
        if tiermail is not None:
            latency = tiermail.start()
            rows.append(Row("tiermail, 1 filter worker", [], latency))
            rows.append(Row("tiermail, 2 filter workers", [], None))
        for number in range(1, args.rounds + 1):
            log(f"round {number} of {args.rounds}")
            if postfix is not None:
                rows[0].loads.append(postfix.load())
            if tiermail is not None:
                rows[-2].loads.append(tiermail.load(1))
                rows[-1].loads.append(tiermail.load(2))
        if tiermail is not None:
            tiermail.check(rows[-2].latency)  # type: ignore[arg-type]
        return rows
    except BenchError:
        for system in (postfix, tiermail):
            if system is not None:
                system.explain_failure()
        raise
    finally:
        for system in (tiermail, postfix):
            if system is not None:
                system.close()


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"{benchlib.run_heading()}; {args.messages} messages of {args.size} bytes over "
        f"{args.sessions} smtp-source sessions"
        f"{' (connections reused)' if args.reuse_connections else ''}, {args.rounds} "
        f"interleaved round(s), the median round shown (every round's rate in brackets); "
        f"latency from {args.latency_messages} messages sent one at a time.",
        "",
        "| system | SMTP accepted msg/s | end-to-end msg/s | CPU ms/msg (machine) "
        "| latency p50 ms | latency p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if not row.loads:
            continue
        p50 = f"{row.latency.p50:.1f}" if row.latency else "-"
        p99 = f"{row.latency.p99:.1f}" if row.latency else "-"
        cpu = row.load.cpu
        machine = f"{cpu.per_message_ms(cpu.machine_busy):.2f}" if cpu else "-"
        lines.append(
            f"| {row.system} | {row.load.smtp_rate:.0f} ({row.rates(lambda r: r.smtp_rate)}) "
            f"| {row.load.e2e_rate:.0f} ({row.rates(lambda r: r.e2e_rate)}) | {machine} "
            f"| {p50} | {p99} |")
    postfix = next((r for r in rows if r.system.startswith("Postfix") and r.loads), None)
    if postfix is not None:
        for row in rows:
            if row is postfix or not row.loads:
                continue
            ratio = (f"{row.system} / Postfix: SMTP accept "
                     f"{row.load.smtp_rate / postfix.load.smtp_rate:.2f}x, end to end "
                     f"{row.load.e2e_rate / postfix.load.e2e_rate:.2f}x")
            if row.latency and postfix.latency:
                ratio += f", latency p50 {row.latency.p50 / postfix.latency.p50:.2f}x"
            lines.append("")
            lines.append(ratio)
    cpu_lines = [f"- {row.system}: {row.load.cpu.summary()}" for row in rows
                 if row.loads and row.load.cpu is not None]
    if cpu_lines:
        lines += ["", "Where the CPU went in the median round:", *cpu_lines]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scanning:
        return run_scanning_bench(args)
    if not Path(benchlib.SMTP_SOURCE).exists():
        print(f"{benchlib.SMTP_SOURCE} missing: `make install` (as root) installs postfix",
              file=sys.stderr)
        return 2
    if not args.tiermail_only and os.geteuid() != 0:
        print("the Postfix reference needs root (its own master process); "
              "use --tiermail-only otherwise", file=sys.stderr)
        return 2
    try:
        with terminate_on_sigterm(), temp_root("tiermail-bench-", args.keep) as root:
            rows = run_systems(root, args)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(markdown(rows, args))
    return 0


def run_scanning_bench(args: argparse.Namespace) -> int:
    import scanbench

    try:
        with terminate_on_sigterm(), temp_root("tiermail-scanbench-", args.keep) as root:
            results = scanbench.run_scanning(root, args.messages, args.sessions, args.size,
                                             args.latency_messages, args.timeout,
                                             args.redis_db)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(scanbench.markdown(results, args.messages, args.sessions, args.size,
                             args.latency_messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
