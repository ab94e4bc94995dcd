#!/usr/bin/env python3
"""Catch-up benchmark: how fast a backlog that built up while delivery was down reaches the
mailboxes, tiermail's store beside Postfix's queue manager and virtual(8).

A benchmark, not a test: it measures and prints, and fails only when something breaks.

The store is the one tiermail tier that does not scale out (it is the only writer of the
mailboxes), so the rate at which it takes mail off the queue is the ceiling of the whole
system's delivery rate, and after an outage it is how long the operator waits for the
backlog to go. For each system:

  1. a stack of its own (tiermail: AMQP vhost, Redis db and key prefix, data dir, ports;
     Postfix: config, queue and Maildirs under a temp directory) with `--users` mailbox
     users, warmed up with a few messages each;
  2. delivery stopped (tiermail: the store process stopped; Postfix: `defer_transports =
     virtual`), then `--messages` messages of `--size` bytes sent with Postfix's
     smtp-source, spread evenly over the users; the backlog is checked to be exactly that
     (tiermail: the delivery queues' depth in `tiermail status`; Postfix: the files in its
     deferred queue);
  3. delivery started again (tiermail: the store started; Postfix: `defer_transports` emptied,
     `postfix reload`, `postqueue -f`); a thread samples every 50 ms the messages in the
     mailboxes (tiermail: rows in the users' indexes; Postfix: files in Maildir/new) and the
     CPU counters (/proc). Rates and CPU per message run from the first sample that saw a
     new message to the first that saw them all, so start-up is apart;
  4. the count is confirmed the way a reader sees it (tiermail: POP3 STAT of every user;
     Postfix: the Maildir files), once the machine is quiet again.

    .venv/bin/python bench/drain_bench.py                            # 10,000 messages, 1 user
    .venv/bin/python bench/drain_bench.py --messages 20000 --users 100
    .venv/bin/python bench/drain_bench.py --quick                    # 1,000 messages
    .venv/bin/python bench/drain_bench.py --tiermail-only            # without Postfix

Needs root for Postfix (it runs its own master). Results and the method are in
docs/benchmarks.md ("Catch-up after an outage").
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import (
    DOMAIN,
    PASSWORD,
    POSTFIX,
    USER,
    BenchError,
    PostfixStack,
    TiermailStack,
    broker_pids,
    free_port,
    log,
    process_cpu_seconds,
    run,
    settle,
    smtp_source,
    temp_root,
    terminate_on_sigterm,
    wait_for,
)

from services.store.main import DELIVERY_QUIET

WARM_UP_MESSAGES = 20  # per user, before the backlog
SAMPLE_INTERVAL = 0.05
# Each end of the window is known to one sample: with fewer than this many in it, a run is a
# smoke run (1 sample at each end is 5 % of 40), not a result.
ENOUGH_SAMPLES = 40
POSTCONF, POSTQUEUE = "/usr/sbin/postconf", "/usr/sbin/postqueue"


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    delivered: int  # messages in the mailboxes
    store_cpu: tuple[float, float]  # (user, system) seconds of tiermail's store process
    rabbitmq_cpu: float  # seconds since boot
    machine_busy: float  # seconds of every core since boot
    own_cpu: float  # seconds this script used (its polling), left out of the machine's


@dataclass
class Drain:
    """From the first sample that saw a new message to the first that saw them all."""

    system: str
    resumed: float  # monotonic: delivery asked to start again
    ready: float  # monotonic: tiermail's store logged that it runs; Postfix reloaded, flushed
    first: Sample
    last: Sample
    # tiermail: the store's CPU seconds from its start until the machine was quiet again,
    # so with the text index of the backlog built (it is built after delivery).
    store_cpu_quiet: float | None = None

    @property
    def messages(self) -> int:
        """Delivered between the two samples."""
        return self.last.delivered - self.first.delivered

    @property
    def rate(self) -> float:
        return self.messages / (self.last.at - self.first.at)

    def per_message_ms(self, seconds: float) -> float:
        return seconds * 1000 / self.messages

    def machine_ms(self) -> float:
        busy = self.last.machine_busy - self.first.machine_busy
        return self.per_message_ms(busy - (self.last.own_cpu - self.first.own_cpu))

    def store_ms(self) -> tuple[float, float]:
        """tiermail's store: (user + system, user) CPU ms per message."""
        user = self.last.store_cpu[0] - self.first.store_cpu[0]
        system = self.last.store_cpu[1] - self.first.store_cpu[1]
        return self.per_message_ms(user + system), self.per_message_ms(user)

    def rabbitmq_ms(self) -> float:
        return self.per_message_ms(self.last.rabbitmq_cpu - self.first.rabbitmq_cpu)

    def index_ms(self) -> float:
        """tiermail: the store's CPU after the last message until the machine was quiet:
        the text index of the backlog (0 for Postfix, which builds none)."""
        if self.store_cpu_quiet is None:
            return 0.0
        return self.per_message_ms(self.store_cpu_quiet - sum(self.last.store_cpu))

    @property
    def samples(self) -> int:
        return round((self.last.at - self.first.at) / SAMPLE_INTERVAL)


class Sampler:
    """Every SAMPLE_INTERVAL seconds, in a thread: the messages delivered and CPU counters."""

    def __init__(self, delivered: Callable[[], int],
                 store_pid: Callable[[], int | None] = lambda: None) -> None:
        self._delivered = delivered
        self._store_pid = store_pid
        self._brokers = broker_pids()
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(SAMPLE_INTERVAL)

    def _sample(self) -> Sample:
        pid = self._store_pid()
        return Sample(
            at=time.monotonic(),
            delivered=self._delivered(),
            store_cpu=process_cpu_seconds(pid) if pid is not None else (0.0, 0.0),
            rabbitmq_cpu=sum(sum(process_cpu_seconds(b)) for b in self._brokers),
            machine_busy=benchlib.machine_cpu_seconds()[0],
            own_cpu=sum(os.times()[:2]),
        )

    def wait_until(self, target: int, timeout: float) -> None:
        wait_for(lambda: bool(self.samples) and self.samples[-1].delivered >= target,
                 timeout, f"{target} messages in the mailboxes", interval=0.02)

    def span(self, baseline: int, target: int) -> tuple[Sample, Sample]:
        first = next(sample for sample in self.samples if sample.delivered > baseline)
        last = next(sample for sample in self.samples if sample.delivered >= target)
        if last is first:
            raise BenchError("every message arrived within one sample: use more --messages")
        return first, last


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000,
                        help="messages queued while delivery is down")
    parser.add_argument("--users", type=int, default=1,
                        help="mailbox users the messages are spread over")
    parser.add_argument("--sessions", type=int, default=10,
                        help="parallel smtp-source sessions filling the queue")
    parser.add_argument("--size", type=int, default=4096, help="message body bytes")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 messages")
    parser.add_argument("--tiermail-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds any one phase may take before the run fails")
    parser.add_argument("--redis-db", type=int, default=13,
                        help="Redis database for the tiermail stack (keys get a unique prefix)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = 1000
    if args.users < 1 or args.messages < args.users:
        parser.error("--users must be at least 1 and at most --messages")
    return args


def user_addresses(count: int) -> list[str]:
    return [USER] + [f"user{number}@{DOMAIN}" for number in range(2, count + 1)]


def send_spread(port: int, users: list[str], messages: int, sessions: int,
                args: argparse.Namespace) -> None:
    """`messages` spread evenly over `users`, one smtp-source run per user."""
    share, extra = divmod(messages, len(users))
    for number, user in enumerate(users):
        count = share + (1 if number < extra else 0)
        if count:
            smtp_source(port, count, sessions, args.size, args.timeout, recipient=user)


def warm_up(port: int, users: list[str], delivered: Callable[[], int],
            args: argparse.Namespace) -> None:
    """WARM_UP_MESSAGES per user, delivered, so first-use costs are not in the drain."""
    count = WARM_UP_MESSAGES * len(users)
    send_spread(port, users, count, 2, args)
    wait_for(lambda: delivered() >= count, args.timeout, "the warm-up messages delivered",
             interval=0.05)


def timed_drain(name: str, delivered: Callable[[], int], resume: Callable[[], None],
                args: argparse.Namespace,
                store_pid: Callable[[], int | None] = lambda: None) -> Drain:
    """Resume delivery and sample until the backlog of `args.messages` is delivered."""
    baseline = delivered()
    target = baseline + args.messages
    settle(required=True)
    with Sampler(delivered, store_pid) as sampler:
        resumed = time.monotonic()
        resume()
        ready = time.monotonic()
        sampler.wait_until(target, args.timeout)
    first, last = sampler.span(baseline, target)
    return Drain(name, resumed, ready, first, last)


class TiermailDrain:
    name = "tiermail store"

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = TiermailStack(root, args.redis_db)
        self.users = user_addresses(args.users)

    def prepare(self) -> None:
        """Users, the directory published by a first store run, the filter up, a warm-up
        through both tiers, then the store stopped."""
        stack = self.stack
        log(f"tiermail: vhost {stack.vhost}, redis db {stack.redis_db} prefix "
            f"{stack.redis_prefix}, data {stack.data_dir}")
        stack.setup()
        for user in self.users[1:]:
            stack.cli("user", "add", user, "--password-stdin", input_text=PASSWORD)
        stack.start_store()
        stack.start_filter()
        warm_up(stack.smtp_port, self.users, self.delivered, self.args)
        stack.stop_last("store")
        log(f"tiermail: {len(self.users)} user(s), warmed up, store stopped")

    def fill(self) -> None:
        args = self.args
        send_spread(self.stack.smtp_port, self.users, args.messages, args.sessions, args)
        depth = self.queue_depth()
        if depth != args.messages:
            raise BenchError(f"the delivery queues hold {depth} messages, expected "
                             f"{args.messages}")
        log(f"tiermail: queue depth {depth}")

    def queue_depth(self) -> int:
        """Messages in both delivery queues, as `tiermail status` shows them to an operator
        (exact: a passive declare; rabbitmqctl's figures lag). It exits 1 while the store
        is down (unhealthy), which is expected here."""
        result = run([*benchlib.tiermail_command(), "status", "--json"], env=self.stack.env,
                     check=False)
        try:
            broker = json.loads(result.stdout)["broker"]
            return sum(int(broker[name]["messages"]) for name in ("deliver", "large"))
        except (ValueError, KeyError) as exc:
            raise BenchError(f"tiermail status --json: {result.stdout}{result.stderr}") from exc

    def delivered(self) -> int:
        """Messages committed to every user's index (no login, no argon2: a cheap poll)."""
        total = 0
        for path in (self.stack.data_dir / "store" / "mail").glob("*/*/index.sqlite"):
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                total += int(conn.execute("SELECT count(*) FROM message").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):  # created, the schema not there yet
                    raise
            finally:
                conn.close()
        return total

    def store_pid(self) -> int | None:
        pids = self.stack.pids("store")
        return pids[0] if pids else None

    def drain(self) -> Drain:
        result = timed_drain(self.name, self.delivered, self.stack.start_store, self.args,
                             self.store_pid)
        # Before the POP3 logins of `check`, whose password checks (argon2) cost the store.
        # The indexer starts once delivery has been quiet for DELIVERY_QUIET: a window of
        # twice that cannot be taken for the end of its work (a first version of this script
        # measured in that pause and missed the index).
        settle(limit=self.args.timeout, window=2 * DELIVERY_QUIET, required=True)
        pid = self.store_pid()
        result.store_cpu_quiet = sum(process_cpu_seconds(pid)) if pid is not None else None
        return result

    def check(self) -> None:
        self.stack.check_alive()
        if self.queue_depth() != 0:
            raise BenchError("the delivery queues are not empty after the drain")
        expected = WARM_UP_MESSAGES * len(self.users) + self.args.messages
        found = sum(self.stack.delivered(user) for user in self.users)
        if found != expected:
            raise BenchError(f"POP3 STAT shows {found} messages in all, expected {expected}")
        log(f"tiermail: POP3 STAT confirms {found} messages over {len(self.users)} user(s); "
            f"store RSS {self.stack.rss_kib('store') // 1024} MiB")

    def explain_failure(self) -> None:
        self.stack.log_tails()

    def close(self) -> None:
        self.stack.close()


class PostfixDrain:
    name = "Postfix 3.7 (qmgr, virtual(8) to Maildir)"

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = PostfixStack(root, free_port())
        self.users = user_addresses(args.users)
        self.env = dict(os.environ, MAIL_CONFIG=str(self.stack.etc))

    def prepare(self) -> None:
        stack = self.stack
        log(f"postfix: starting on 127.0.0.1:{stack.port} (config {stack.etc})")
        stack.start()
        (stack.etc / "vmailbox").write_text("".join(
            f"{user} {DOMAIN}/{user.partition('@')[0]}/\n" for user in self.users))
        self.reload()
        warm_up(stack.port, self.users, self.delivered, self.args)
        self.postconf("defer_transports = virtual")
        log(f"postfix: {len(self.users)} user(s), warmed up, virtual(8) deferred")

    def postconf(self, setting: str) -> None:
        run([POSTCONF, "-c", str(self.stack.etc), "-e", setting], env=self.env)
        self.reload()

    def reload(self) -> None:
        run([POSTFIX, "-c", str(self.stack.etc), "reload"], env=self.env)

    def fill(self) -> None:
        args = self.args
        send_spread(self.stack.port, self.users, args.messages, args.sessions, args)
        wait_for(lambda: self.queued() >= args.messages, args.timeout,
                 f"{args.messages} messages in the deferred queue", interval=0.1)
        if self.queued() != args.messages:
            raise BenchError(f"the deferred queue holds {self.queued()} messages, expected "
                             f"{args.messages}")
        log(f"postfix: deferred queue {self.queued()}")

    def queued(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.stack.root / "queue" / "deferred"))

    def delivered(self) -> int:
        total = 0
        for user in self.users:
            new = self.stack.root / "vmail" / DOMAIN / user.partition("@")[0] / "new"
            try:
                total += sum(1 for _ in os.scandir(new))
            except FileNotFoundError:
                pass
        return total

    def drain(self) -> Drain:
        return timed_drain(self.name, self.delivered, self.resume, self.args)

    def resume(self) -> None:
        self.postconf("defer_transports =")
        run([POSTQUEUE, "-c", str(self.stack.etc), "-f"], env=self.env)

    def check(self) -> None:
        settle(limit=self.args.timeout)
        expected = WARM_UP_MESSAGES * len(self.users) + self.args.messages
        if self.delivered() != expected or self.queued():
            raise BenchError(f"Maildirs hold {self.delivered()} messages, expected "
                             f"{expected}; {self.queued()} still deferred")
        log(f"postfix: the Maildirs hold {expected} messages")

    def explain_failure(self) -> None:
        log("postfix maillog tail:\n" + self.stack.maillog_tail())

    def close(self) -> None:
        self.stack.stop()


def measure(system: TiermailDrain | PostfixDrain) -> Drain:
    try:
        system.prepare()
        log(f"{system.name}: {system.args.messages} messages of {system.args.size} bytes "
            f"over {system.args.sessions} sessions while delivery is down")
        system.fill()
        result = system.drain()
        log(f"{system.name}: {result.rate:.0f} msg/s drained, machine CPU "
            f"{result.machine_ms():.2f} ms/msg")
        system.check()
        return result
    except BaseException:
        system.explain_failure()
        raise
    finally:
        system.close()


def markdown(results: list[Drain], args: argparse.Namespace) -> str:
    lines = [
        f"{benchlib.run_heading()}; {args.messages} messages of {args.size} bytes queued "
        f"while delivery was down, over {args.users} user(s); rate and CPU from the first "
        f"sample that saw a message of the backlog delivered to the first that saw them all "
        f"(every {SAMPLE_INTERVAL * 1000:.0f} ms).",
        "",
        "| system | drained msg/s | resuming | resumed → last message | machine CPU ms/msg "
        "| + text index after | store CPU ms/msg (user) | RabbitMQ CPU ms/msg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        tiermail = result.system.startswith("tiermail")
        store, store_user = result.store_ms()
        lines.append(
            f"| {result.system} | {result.rate:.0f} | {result.ready - result.resumed:.2f} s "
            f"| {result.last.at - result.resumed:.1f} s | {result.machine_ms():.2f} "
            f"| {f'{result.index_ms():.2f}' if tiermail else '-'} "
            f"| {f'{store:.2f} ({store_user:.2f})' if tiermail else '-'} "
            f"| {f'{result.rabbitmq_ms():.2f}' if tiermail else '-'} |")
    if len(results) == 2:
        ours, postfix = results
        with_index = ours.machine_ms() + ours.index_ms()
        lines += ["", f"tiermail / Postfix: {ours.rate / postfix.rate:.2f}x drained msg/s; "
                      f"machine CPU per message {ours.machine_ms() / postfix.machine_ms():.2f}x, "
                      f"{with_index / postfix.machine_ms():.2f}x with tiermail's text index of "
                      f"the backlog"]
    short = [r.system for r in results if r.samples < ENOUGH_SAMPLES]
    if short:
        lines += ["", f"Fewer than {ENOUGH_SAMPLES} samples in the window of "
                      f"{', '.join(short)}: a smoke run, not a result (use more --messages)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(benchlib.SMTP_SOURCE).exists():
        print(f"{benchlib.SMTP_SOURCE} missing: `make install` (as root) installs postfix",
              file=sys.stderr)
        return 2
    if not args.tiermail_only and os.geteuid() != 0:
        print("the Postfix reference needs root (its own master process); "
              "use --tiermail-only otherwise", file=sys.stderr)
        return 2
    results = []
    try:
        with terminate_on_sigterm(), temp_root("tiermail-drain-", args.keep) as root:
            results.append(measure(TiermailDrain(root / "tiermail", args)))
            if not args.tiermail_only:
                results.append(measure(PostfixDrain(root / "postfix", args)))
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
