"""Shared pieces of the benchmarks: isolated stacks, the load generator, counting, timing.

Everything here starts processes of its own and undoes what it did in `close()` (or at the
end of the `with` block): processes stopped, the AMQP vhost deleted, Redis keys removed,
temporary directories removed. Every wait has a timeout. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import os
import platform
import poplib
import re
import resource
import secrets
import shutil
import signal
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.devscanners.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
DOMAIN = "bench.test"
USER = f"user@{DOMAIN}"
PASSWORD = "bench-password"
# A sender outside the local domain, as for mail arriving from the internet.
SENDER = "sender@client.test"
BENCH_HEADER = "X-Bench-Seq"


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and where its logs are."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> float:
    """Poll until `predicate()` holds; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None,
        input_text: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                            input=input_text, stdin=None if input_text is not None
                            else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                         f"{result.stdout}{result.stderr}")
    return result


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so that `finally` blocks clean up."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Load generation and measurement

@dataclass
class LoadResult:
    messages: int
    smtp_seconds: float  # smtp-source wall time: every message answered 250
    e2e_seconds: float  # from the first connection until the last message is in the mailbox
    cpu: CpuReport | None = None  # where the CPU went during the run, when measured

    @property
    def smtp_rate(self) -> float:
        return self.messages / self.smtp_seconds

    @property
    def e2e_rate(self) -> float:
        return self.messages / self.e2e_seconds


# CPU accounting: where the time goes

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, its threads included (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0, 0.0
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS  # utime, stime


def machine_cpu_seconds() -> tuple[float, float, float]:
    """(busy, idle, stolen) CPU seconds of the whole machine since boot, all cores. Stolen:
    time the hypervisor gave our virtual CPUs to someone else while they wanted to run."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    busy = sum(values[:7]) - idle  # user, nice, system, irq, softirq
    return busy / _CLOCK_TICKS, idle / _CLOCK_TICKS, steal / _CLOCK_TICKS


def settle(limit: float = 120.0, quiet: float = 0.1, window: float = 0.5, *,
           required: bool = False) -> float:
    """Wait until the machine is nearly idle (busy under `quiet` of its CPU over `window`
    seconds), at most `limit` seconds; the seconds waited. Before each load run, so that one
    run's background work (tiermail's text indexing, Postfix's queue manager) does not land
    in the next run. `required`: BenchError if it is still busy after `limit`, for a
    measurement whose CPU figures would otherwise count another process's work."""
    started = time.monotonic()
    cores = os.cpu_count() or 1
    while time.monotonic() - started < limit:
        busy0 = machine_cpu_seconds()[0]
        time.sleep(window)
        if machine_cpu_seconds()[0] - busy0 < quiet * window * cores:
            return time.monotonic() - started
    if required:
        raise BenchError(f"the machine was still busy after {limit:.0f} s of waiting: another "
                         f"process is using the CPU, and the figures would count its work")
    return time.monotonic() - started


def broker_pids() -> list[int]:
    """The RabbitMQ node's own process (as it reports it), not the short-lived Erlang VMs
    that `rabbitmqctl` starts, which share its command name (beam.smp) and, exiting during a
    run, would take their CPU out of the broker's (found in review)."""
    out = run(["rabbitmqctl", "-q", "eval", "list_to_integer(os:getpid())."], timeout=60)
    return [int(out.stdout.strip())]


def pids_named(name: str) -> list[int]:
    """PIDs whose command name (comm) is `name`, e.g. beam.smp for RabbitMQ."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


@dataclass
class CpuReport:
    """CPU milliseconds per message during one load run, per process group and in all."""

    messages: int
    machine_busy: float  # seconds, every process on the machine
    machine_idle: float
    machine_stolen: float  # by the hypervisor (a virtual machine's neighbours)
    groups: dict[str, tuple[float, float]]  # group name -> (user, system) CPU seconds

    def per_message_ms(self, seconds: float) -> float:
        return seconds * 1000 / self.messages

    @property
    def utilisation(self) -> float:
        total = self.machine_busy + self.machine_idle + self.machine_stolen
        return self.machine_busy / total if total else 0.0

    @property
    def stolen_share(self) -> float:
        total = self.machine_busy + self.machine_idle + self.machine_stolen
        return self.machine_stolen / total if total else 0.0

    def summary(self) -> str:
        parts = [f"{name} {self.per_message_ms(user + sys):.2f} "
                 f"({self.per_message_ms(user):.2f} user)"
                 for name, (user, sys) in self.groups.items()]
        rest = self.machine_busy - sum(map(sum, self.groups.values()))
        parts.append(f"everything else {self.per_message_ms(rest):.2f}")
        return (f"CPU ms/msg: machine {self.per_message_ms(self.machine_busy):.2f} "
                f"({self.utilisation:.0%} busy, {self.stolen_share:.0%} stolen by the "
                f"hypervisor); " + ", ".join(parts))


class CpuMeter:
    """Reads CPU counters before and after a run; `groups` maps a name to a PID lister."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self._groups = groups
        self._start: dict[str, dict[int, tuple[float, float]]] = {}
        self._machine: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self._children = (0.0, 0.0)

    def start(self) -> None:
        self._start = {name: {pid: process_cpu_seconds(pid) for pid in pids()}
                       for name, pids in self._groups.items()}
        self._machine = machine_cpu_seconds()
        self._children = _children_cpu_seconds()

    def stop(self, messages: int) -> CpuReport:
        busy, idle, stolen = machine_cpu_seconds()
        groups: dict[str, tuple[float, float]] = {}
        for name, before in self._start.items():
            user = sys = 0.0
            for pid, (user0, sys0) in before.items():
                user1, sys1 = process_cpu_seconds(pid)
                user, sys = user + user1 - user0, sys + sys1 - sys0
            groups[name] = (user, sys)
        user1, sys1 = _children_cpu_seconds()
        groups["smtp-source"] = (user1 - self._children[0], sys1 - self._children[1])
        return CpuReport(messages, busy - self._machine[0], idle - self._machine[1],
                         stolen - self._machine[2], groups)


def _children_cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def run_heading() -> str:
    """The start of a result's first line: when, where, how many cores, which Python."""
    return (f"Run {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node() or 'this machine'}: "
            f"{os.cpu_count()} cores, Python {platform.python_version()}")


def smtp_source(port: int, messages: int, sessions: int, size: int, timeout: float,
                reuse_connections: bool = False, recipient: str = USER) -> float:
    """Send `messages` with Postfix's smtp-source; return the wall time in seconds.

    smtp-source stops at the first reply that is not the expected 2xx/3xx, so a non-zero
    exit means the server refused or deferred something: that is reported, not hidden.
    """
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", "client.test", "-f", SENDER, "-t", recipient, "-S", "bench"]
    if reuse_connections:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"smtp-source exited {result.returncode}: "
                         f"{(result.stdout + result.stderr).strip()[-2000:]}")
    return elapsed


def measure_load(port: int, count_delivered: Callable[[], int], messages: int, sessions: int,
                 size: int, timeout: float, poll_interval: float,
                 reuse_connections: bool = False, cpu: CpuMeter | None = None) -> LoadResult:
    """smtp-source load, then wait until the mailbox holds every message.

    With a CpuMeter, the CPU used from smtp-source's start until the last message is in the
    mailbox is reported (smtp-source's own CPU included, as a child of this process).
    """
    baseline = count_delivered()
    if cpu is not None:
        cpu.start()
    started = time.monotonic()
    smtp_seconds = smtp_source(port, messages, sessions, size, timeout, reuse_connections)
    done = wait_for(lambda: count_delivered() - baseline >= messages, timeout,
                    f"{messages} messages in the mailbox", interval=poll_interval)
    report = cpu.stop(messages) if cpu is not None else None
    delivered = count_delivered() - baseline
    if delivered != messages:
        raise BenchError(f"expected {messages} new messages in the mailbox, found {delivered}")
    return LoadResult(messages, smtp_seconds, done - started, report)


@dataclass
class SentMessage:
    seq: int
    accepted_at: float  # wall clock (time.time()) right after the 250 to DATA
    queue_id: str


@dataclass
class LatencyResult:
    samples_ms: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.samples_ms)
        if not ordered:
            return float("nan")
        # nearest rank: the smallest sample with at least p % of them at or below it (round()
        # rounds halves to even: p50 of 2 samples was the larger, found in review)
        rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
        return ordered[rank - 1]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else float("nan")


_QUEUED_RE = re.compile(r"queued as (\S+)", re.IGNORECASE)


def send_sequential(port: int, count: int, size: int, run_tag: str,
                    timeout: float) -> list[SentMessage]:
    """One client, one message at a time over one connection; record each 250's time."""
    body = ("x" * 76 + "\r\n") * max(1, size // 78)
    sent: list[SentMessage] = []
    deadline = time.monotonic() + timeout
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as smtp:
        smtp.ehlo()
        for seq in range(count):
            if time.monotonic() > deadline:
                raise BenchError(f"latency sender: {seq} of {count} sent after {timeout:.0f}s")
            message = (
                f"From: {SENDER}\r\nTo: {USER}\r\n"
                f"Date: {email.utils.formatdate()}\r\n"
                f"Message-ID: <{run_tag}.{seq}@client.test>\r\n"
                f"Subject: latency {seq}\r\n{BENCH_HEADER}: {run_tag} {seq}\r\n\r\n{body}"
            )
            code, _ = smtp.mail(SENDER)
            if code != 250:
                raise BenchError(f"MAIL FROM answered {code}")
            code, _ = smtp.rcpt(USER)
            if code not in (250, 251):
                raise BenchError(f"RCPT TO answered {code}")
            code, reply = smtp.data(message.encode())
            accepted_at = time.time()
            if code != 250:
                raise BenchError(f"DATA answered {code} {reply!r}")
            match = _QUEUED_RE.search(reply.decode(errors="replace"))
            sent.append(SentMessage(seq, accepted_at, match.group(1) if match else ""))
    return sent


class VisibilityPoller:
    """Records when each key first becomes visible, polling `visible()` in a thread.

    The same method for tiermail (queue ids committed to the mailbox index) and Postfix (file
    names in Maildir/new): resolution is the poll interval plus one poll's duration.
    """

    def __init__(self, visible: Callable[[], Iterable[str]], interval: float = 0.002) -> None:
        self._visible = visible
        self._interval = interval
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="visibility-poller", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> VisibilityPoller:
        for key in self._visible():  # what is there before we start does not count
            self.first_seen[key] = float("nan")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                keys = self._visible()
                now = time.time()
                for key in keys:
                    if key not in self.first_seen:
                        self.first_seen[key] = now
                self._stop.wait(self._interval)
        except BaseException as exc:  # reported by the caller, not lost in the thread
            self.error = exc

    def new_keys(self) -> dict[str, float]:
        return {k: v for k, v in self.first_seen.items() if v == v}  # drop the NaN baseline


Matcher = Callable[[str, list["SentMessage"], dict[str, float]], dict[int, str]]


def measure_latency(port: int, count: int, size: int, poller: VisibilityPoller,
                    match: Matcher, timeout: float) -> LatencyResult:
    """Send `count` messages one by one; latency = first seen in the mailbox - 250 received.

    `match(run_tag, sent, seen)` maps each sent message's sequence number to its poller key.
    """
    run_tag = secrets.token_hex(4)
    with poller:
        sent = send_sequential(port, count, size, run_tag, timeout)
        wait_for(lambda: len(poller.new_keys()) >= count or poller.error is not None, timeout,
                 f"{count} latency messages to become visible", interval=0.05)
    if poller.error is not None:
        raise BenchError(f"visibility poller failed: {poller.error!r}")
    seen = poller.new_keys()
    keys = match(run_tag, sent, seen)
    result = LatencyResult()
    for message in sent:
        key = keys.get(message.seq)
        if key is None or key not in seen:
            raise BenchError(f"message {message.seq} (queue id {message.queue_id}) "
                             "was never seen in the mailbox")
        result.samples_ms.append((seen[key] - message.accepted_at) * 1000)
    return result


def bench_seq(headers: bytes, run_tag: str) -> int | None:
    """The sequence number from our X-Bench-Seq header in a message's header block."""
    match = re.search(rb"^" + BENCH_HEADER.encode() + rb": (\S+) (\d+)\r?$", headers,
                      re.MULTILINE | re.IGNORECASE)
    if match is None or match.group(1).decode() != run_tag:
        return None
    return int(match.group(2))


# Reference: Postfix on loopback

MASTER_CF = """\
# service  type  private unpriv  chroot  wakeup  maxproc command
{listen}   inet  n       -       n       -       -       smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# Written by bench/benchlib.py: a throw-away Postfix instance for benchmarks only.
compatibility_level = 3.6
config_directory = {root}/etc
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
syslog_name = postfix-bench
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{domain}
mydomain = {domain}
myorigin = $mydomain
# Loopback only, and no DNS at all: nothing leaves this machine.
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
relayhost =
default_transport = error:outbound mail is disabled in the benchmark
# The benchmark domain is delivered by virtual(8) to one Maildir under the temp directory.
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/vmail
virtual_mailbox_maps = texthash:{root}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
biff = no
append_dot_mydomain = no
readme_directory = no
"""


class PostfixStack:
    """A Postfix of its own: config, queue, data and Maildir under one temp directory."""

    def __init__(self, root: Path, port: int, domain: str = DOMAIN) -> None:
        self.root = root
        self.port = port
        self.domain = domain
        self.etc = root / "etc"
        self.maildir = root / "vmail" / domain / "user"
        self.started = False

    def start(self, timeout: float = 60) -> None:
        if not Path(POSTFIX).exists():
            raise BenchError("postfix is not installed; run `make install` as root")
        nobody = _uid_gid("nobody")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # postfix and the delivery uid must reach their directories
        self.etc.mkdir()
        (self.root / "queue").mkdir()
        (self.root / "data").mkdir()
        vmail = self.root / "vmail"
        vmail.mkdir()
        os.chown(vmail, *nobody)
        data = self.root / "data"
        os.chown(data, *_uid_gid("postfix"))
        (self.etc / "main.cf").write_text(MAIN_CF.format(
            root=self.root, domain=self.domain, uid=nobody[0], gid=nobody[1]))
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        (self.etc / "vmailbox").write_text(f"{USER} {self.domain}/user/\n")
        env = dict(os.environ, MAIL_CONFIG=str(self.etc))
        run([POSTFIX, "-c", str(self.etc), "check"], env=env, timeout=timeout)
        run([POSTFIX, "-c", str(self.etc), "start"], env=env, timeout=timeout)
        self.started = True
        wait_for(lambda: port_open(self.port), timeout, f"postfix on port {self.port}")

    def delivered(self) -> int:
        try:
            return sum(1 for _ in os.scandir(self.maildir / "new"))
        except FileNotFoundError:
            return 0

    def listing(self) -> list[str]:
        """File names in Maildir/new: what a Maildir reader sees."""
        try:
            return os.listdir(self.maildir / "new")
        except FileNotFoundError:
            return []

    def match(self, run_tag: str, sent: list[SentMessage],
              seen: dict[str, float]) -> dict[int, str]:
        """Sequence number -> Maildir file name, read from our X-Bench-Seq header."""
        keys: dict[int, str] = {}
        for name in seen:
            with open(self.maildir / "new" / name, "rb") as f:
                head = f.read(16384)
            seq = bench_seq(re.split(rb"\r?\n\r?\n", head, maxsplit=1)[0], run_tag)
            if seq is not None:
                keys[seq] = name
        return keys

    def maillog_tail(self, lines: int = 30) -> str:
        path = self.root / "maillog"
        if not path.exists():
            return "(no maillog)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if not self.started:
            return
        env = dict(os.environ, MAIL_CONFIG=str(self.etc))
        result = run([POSTFIX, "-c", str(self.etc), "stop"], env=env, timeout=60, check=False)
        if result.returncode != 0:
            run([POSTFIX, "-c", str(self.etc), "abort"], env=env, timeout=60, check=False)
        pid_file = self.root / "queue" / "pid" / "master.pid"
        with contextlib.suppress(BenchError):
            wait_for(lambda: not _pid_alive(pid_file), 30, "postfix master to exit")
        self.started = False


def _uid_gid(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# tiermail: an isolated stack of its own

def tiermail_command() -> list[str]:
    script = Path(sys.executable).parent / "tiermail"
    if script.exists():
        return [str(script)]
    found = shutil.which("tiermail")
    if found:
        return [found]
    return [sys.executable, "-m", "services.cli"]


def _profiled(tier: str) -> list[str] | None:
    """With TIERMAIL_BENCH_PROFILE_<TIER>=FILE in the bench's environment, that tier runs
    under cProfile, which writes FILE when it stops (for `python -m pstats FILE`). It slows
    the profiled tier, so such a run's numbers are not results."""
    path = os.environ.get(f"TIERMAIL_BENCH_PROFILE_{tier.upper()}")
    if not path:
        return None
    command = tiermail_command()
    if command[0] == sys.executable:  # no console script: run the module
        command = ["-m", *command[2:]]
    return [sys.executable, "-m", "cProfile", "-o", path, *command, tier]


def rabbitmqctl(*args: str) -> str:
    return run(["rabbitmqctl", "-q", *args], timeout=120).stdout


class TiermailStack:
    """tiermail with its own AMQP vhost, Redis db and key prefix, data dir and ports."""

    def __init__(self, root: Path, redis_db: int, log_level: str = "INFO") -> None:
        self.root = root
        self.tag = secrets.token_hex(4)
        self.vhost = f"tiermail-bench-{self.tag}"
        self.redis_db = redis_db
        self.redis_prefix = f"tiermail-bench-{self.tag}:"
        self.smtp_port = free_port()
        self.pop3_port = free_port()
        self.imap_port = free_port()
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TIERMAIL_")}
        self.env.update({
            "TIERMAIL_BIND": "127.0.0.1",
            "TIERMAIL_SMTP_PORT": str(self.smtp_port),
            "TIERMAIL_SUBMISSION_PORT": str(free_port()),
            "TIERMAIL_IMAP_PORT": str(self.imap_port),
            "TIERMAIL_IMAPS_PORT": str(free_port()),
            "TIERMAIL_POP3_PORT": str(self.pop3_port),
            "TIERMAIL_POP3S_PORT": str(free_port()),
            "TIERMAIL_WEBMAIL_PORT": str(free_port()),
            "TIERMAIL_AMQP_URL": f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}",
            "TIERMAIL_REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
            "TIERMAIL_REDIS_PREFIX": self.redis_prefix,
            "TIERMAIL_DATA_DIR": str(self.data_dir),
            "TIERMAIL_SPAM": "off",
            "TIERMAIL_VIRUS": "off",
            "TIERMAIL_LOG_LEVEL": log_level,
            "TIERMAIL_LOG_FORMAT": "text",
        })
        self.processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.vhost_created = False

    def create_vhost(self) -> None:
        rabbitmqctl("add_vhost", self.vhost)
        self.vhost_created = True
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    def setup(self) -> None:
        """Vhost, then the benchmark domain and user through the CLI, as an operator would."""
        self.create_vhost()
        self.cli("domain", "add", DOMAIN)
        self.cli("user", "add", USER, "--password-stdin", input_text=PASSWORD)

    def cli(self, *args: str, input_text: str | None = None) -> str:
        return run([*tiermail_command(), *args], env=self.env, input_text=input_text,
                   timeout=120).stdout

    # Lines the tiers log once they serve (services/filter/main.py, services/store/main.py).
    READY_MARKERS = {"filter": "event=ready", "store": "event=started"}

    def start(self, tier: str, timeout: float = 60) -> None:
        """Start one `tiermail <tier>` process and wait until it logs that it is ready."""
        number = sum(1 for name, _, _ in self.processes if name == tier) + 1
        log_path = self.logs / f"{tier}-{number}.log"
        # Only what this start writes counts: with --tiermail-data a log of an earlier run
        # held the marker already (found in review).
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(_profiled(tier) or [*tiermail_command(), tier],
                                    env=self.env, cwd=self.root,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.processes.append((tier, proc, log_path))
        marker = self.READY_MARKERS[tier]

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"tiermail {tier} exited {proc.returncode}; log {log_path}:\n"
                                 f"{tail(log_path)}")
            with log_path.open("rb") as written:
                written.seek(offset)
                return marker.encode() in written.read()

        wait_for(ready, timeout, f"tiermail {tier} to log {marker!r}", interval=0.1)

    def start_store(self) -> None:
        self.start("store")
        wait_for(lambda: port_open(self.pop3_port), 30, f"POP3 on port {self.pop3_port}")

    def start_filter(self) -> None:
        """Another filter worker on the same SMTP port (SO_REUSEPORT spreads connections)."""
        self.start("filter")
        wait_for(lambda: port_open(self.smtp_port), 30, f"SMTP on port {self.smtp_port}")

    def pids(self, tier: str) -> list[int]:
        return [proc.pid for name, proc, _ in self.processes
                if name == tier and proc.poll() is None]

    def cpu_meter(self) -> CpuMeter:
        """CPU of each tier, the broker and Redis during a load run."""
        return CpuMeter({
            "filter": lambda: self.pids("filter"),
            "store": lambda: self.pids("store"),
            "rabbitmq": broker_pids,
            "redis": lambda: pids_named("redis-server"),
        })

    def stop_last(self, tier: str) -> None:
        """Stop the most recently started process of `tier` (SIGTERM: it finishes in-flight
        transactions and exits)."""
        for index in range(len(self.processes) - 1, -1, -1):
            name, proc, _ = self.processes[index]
            if name == tier and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
                del self.processes[index]
                return
        raise BenchError(f"no running {tier} process to stop")

    def workers(self, tier: str) -> int:
        return sum(1 for name, proc, _ in self.processes
                   if name == tier and proc.poll() is None)

    def log_tails(self) -> None:
        """Print the end of every process log: what to read when a run fails."""
        for path in sorted(self.logs.glob("*.log")):
            log(f"{path.name} tail:\n{tail(path)}")

    def check_alive(self) -> None:
        for name, proc, log_path in self.processes:
            if proc.poll() is not None:
                raise BenchError(f"tiermail {name} exited {proc.returncode}; log {log_path}:\n"
                                 f"{tail(log_path)}")

    def delivered(self, user: str = USER) -> int:
        """Messages in the user's mailbox, by POP3 STAT: what a client would see."""
        pop = poplib.POP3("127.0.0.1", self.pop3_port, timeout=30)
        try:
            pop.user(user)
            pop.pass_(PASSWORD)
            count, _ = pop.stat()
            return int(count)
        finally:
            with contextlib.suppress(poplib.error_proto, OSError):
                pop.quit()

    def index_path(self) -> Path | None:
        """The user's mailbox index (services/store/backends/maildb.py layout)."""
        found = sorted((self.data_dir / "store" / "mail").glob(f"*/{USER}/index.sqlite"))
        return found[0] if found else None

    def indexed(self) -> int:
        """Messages committed to the user's index: a cheap poll (no login, no argon2)."""
        path = self.index_path()
        if path is None:
            return 0
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return int(conn.execute("SELECT count(*) FROM message").fetchone()[0])
        except sqlite3.OperationalError:  # created but the schema is not there yet
            return 0
        finally:
            conn.close()

    def delivered_queue_ids(self) -> dict[str, float]:
        """Queue id -> delivered_at, as the store recorded it inside the index transaction."""
        path = self.index_path()
        if path is None:
            return {}
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return {str(q): float(t) for q, t in
                    conn.execute("SELECT queue_id, delivered_at FROM delivered")}
        except sqlite3.OperationalError:
            return {}
        finally:
            conn.close()

    def rss_kib(self, tier: str) -> int:
        total = 0
        for name, proc, _ in self.processes:
            if name == tier and proc.poll() is None:
                total += process_rss_kib(proc.pid)
        return total

    def close(self) -> None:
        for _, proc, _ in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        self.processes.clear()
        if self.vhost_created:
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                rabbitmqctl("delete_vhost", self.vhost)
            self.vhost_created = False
        with contextlib.suppress(Exception):
            self._delete_redis_keys()

    def _delete_redis_keys(self) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, db=self.redis_db,
                             socket_timeout=10)
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=self.redis_prefix + "*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.delete(*batch)
                    batch = []
            if batch:
                client.delete(*batch)
        finally:
            client.close()


def process_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@contextlib.contextmanager
def temp_root(prefix: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # Postfix's daemons run as other users and must reach their dirs
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
