"""Start and stop real rspamd, clamd and spamd with the project's own configuration.

Development and test infrastructure only (`tiermail up`, tests/conftest.py): a deployment runs
the scanners as services of their own (docs/operations.md, "Scanners"). Each `start_*` function
runs one scanner in the foreground in its own process group, on the given loopback port or
socket, with pid file, logs and state in the given runtime directory, and returns only once the
scanner answers its protocol's ping; otherwise it stops what it started and raises
`ScannerError` carrying the scanner's log tail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from urllib.parse import unquote, urlsplit

from services.devscanners.devdns import DnsStub

log = logging.getLogger(__name__)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "scanners"
RSPAMD_CONF_DIR = DEPLOY / "rspamd"
RSPAMD_TEST_RULES = RSPAMD_CONF_DIR / "test.d"
CLAMD_TEMPLATE = DEPLOY / "clamav" / "clamd.conf.in"
CLAMD_SIGNATURES = DEPLOY / "clamav" / "signatures"
SPAMASSASSIN_LOCAL_CF = DEPLOY / "spamassassin" / "local.cf"
SPAMASSASSIN_SYSTEM_PRE = Path("/etc/spamassassin")  # Debian's plugin-loading *.pre files

# A first rspamd start compiles its Hyperscan databases (about 10 s on 2 cores); with the
# cache kept between runs it starts in about 1 s. spamd compiles its rules in about 1 s.
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
PROBE_TIMEOUT = 1.0
LOG_TAIL_LINES = 30
MIB = 1024 * 1024


class ScannerError(RuntimeError):
    """A scanner is not installed, would not start, or did not answer in time."""


@dataclass
class Scanner:
    """One running scanner: its process group, where clients reach it, and its logs."""

    name: str
    address: str  # rspamd: its URL; clamd: host:port or a socket path; spamd: host:port
    process: subprocess.Popen[bytes]
    logs: list[Path]
    cleanup: list[Path] = field(default_factory=list)  # directories removed on stop
    record: Path | None = None  # its process group, for a later `up` (LeftRunning)
    controller_url: str = ""  # rspamd only: the controller worker (learning, /stat)
    controller_password: str = ""  # rspamd only: generated at start unless given

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to the scanner's whole process group (workers included), then SIGKILL."""
        if self.alive:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
        # Workers may outlive a main process that exited on its own.
        _signal_group(self.process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.logs, lines)

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Probes: one request of each scanner's own protocol, True when it answers as expected.

def rspamd_ping(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """GET /ping on rspamd's normal worker answers "pong"."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 11333,
                                      timeout=timeout)
    try:
        conn.request("GET", "/ping")
        response = conn.getresponse()
        return response.status == 200 and response.read().strip() == b"pong"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def clamd_ping(address: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """clamd(8): "zPING\\0" is answered with "PONG\\0"."""
    return _exchange(address, b"zPING\0", timeout).rstrip(b"\0") == b"PONG"


def spamd_ping(address: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """The spamc protocol's PING: "SPAMD/1.5 0 PONG"."""
    return _exchange(address, b"PING SPAMC/1.5\r\n\r\n", timeout).startswith(b"SPAMD/1.5 0 PONG")


def _exchange(address: str, request: bytes, timeout: float) -> bytes:
    try:
        with connect(address, timeout) as sock:
            sock.sendall(request)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
                if reply.endswith((b"\0", b"\r\n")):
                    break
            return reply
    except OSError:
        return b""


def connect(address: str, timeout: float) -> socket.socket:
    """A connected socket to "host:port" or to a unix socket path (anything with a slash)."""
    if "/" in address:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


# Starting each scanner.

def start_dns_stub(port: int = 0) -> DnsStub:
    """The NXDOMAIN-for-everything resolver rspamd is pointed at (services/devscanners/devdns)."""
    return DnsStub(port).start()


def start_rspamd(runtime_dir: Path, *, port: int, controller_port: int, dns_address: str,
                 cache_dir: Path | None = None, test_rules: bool = True,
                 controller_password: str | None = None, bayes_redis_url: str | None = None,
                 max_message: int | None = None, timeout: float = STARTUP_TIMEOUT) -> Scanner:
    """rspamd with deploy/scanners/rspamd/rspamd.conf: normal worker on 127.0.0.1:port
    (/checkv2), controller on 127.0.0.1:controller_port, every DNS query to dns_address.

    cache_dir keeps the compiled Hyperscan databases between runs (default
    ~/.cache/tiermail/rspamd); test_rules loads deploy/scanners/rspamd/test.d/. The controller
    asks for `controller_password` (a random one when None; on the returned Scanner either
    way). bayes_redis_url ("redis://host:port/db") is where the Bayes statistics live; without
    it rspamd scans but cannot learn. max_message: the largest message it scans, octets
    (TIERMAIL_RSPAMD_MAX_MESSAGE; None: local.d/options.inc's).
    """
    binary = _require_binary("rspamd", "rspamd")
    runtime_dir = _ensure_dir(runtime_dir)
    db_dir = _ensure_dir(runtime_dir / "db")
    cache = cache_dir or Path.home() / ".cache" / "tiermail" / "rspamd"
    cache.mkdir(parents=True, exist_ok=True)
    password = controller_password or secrets.token_urlsafe(24)
    runtime_conf = write_rspamd_runtime_config(runtime_dir / "conf.d", password,
                                               bayes_redis_url, max_message)
    variables = {
        "LOCAL_CONFDIR": RSPAMD_CONF_DIR,
        "RUNDIR": runtime_dir,
        "DBDIR": db_dir,
        "LOGDIR": runtime_dir,
        "HS_CACHE_DIR": cache,
        "NORMAL_BIND": f"127.0.0.1:{port}",
        "CONTROLLER_BIND": f"127.0.0.1:{controller_port}",
        "DNS_SERVER": dns_address,
        "RUNTIME_CONFDIR": runtime_conf,
    }
    if test_rules:
        variables["TEST_RULES_DIR"] = RSPAMD_TEST_RULES
    argv = [binary, "-f", "-c", str(RSPAMD_CONF_DIR / "rspamd.conf")]
    if os.geteuid() == 0:
        # rspamd will not run its workers as root without -i; there is no rspamd user to
        # drop to in a container, and these instances only listen on loopback.
        argv += ["-u", "root", "-g", "root", "-i"]
    argv += [f"--var={name}={value}" for name, value in variables.items()]
    url = f"http://127.0.0.1:{port}"
    scanner = _launch("rspamd", argv, runtime_dir, url, lambda: rspamd_ping(url),
                      [runtime_dir / "rspamd.log"], timeout)
    scanner.controller_url = f"http://127.0.0.1:{controller_port}"
    scanner.controller_password = password
    return scanner


def write_rspamd_runtime_config(folder: Path, controller_password: str,
                                bayes_redis_url: str | None, max_message: int | None = None
                                ) -> Path:
    """The files deploy/scanners/rspamd includes from $RUNTIME_CONFDIR: the controller's
    password and the Bayes classifier's Redis (secrets, so mode 0600 in a 0700 folder), and
    options overriding local.d/options.inc (max_message). Rewritten on every start."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    quoted = json.dumps(controller_password)  # a UCL string is a JSON string
    _write_private(folder / "controller-password.inc",
                   f"password = {quoted};\nenable_password = {quoted};\n")
    _write_private(folder / "bayes-redis.conf",
                   rspamd_redis_options(bayes_redis_url) if bayes_redis_url else "")
    _write_private(folder / "options.inc",
                   f"max_message = {max_message};\n" if max_message is not None else "")
    return folder


def read_controller_password(folder: Path) -> str | None:
    """The controller password write_rspamd_runtime_config left in `folder`, if any: an
    rspamd started from there may still be running (its `tiermail up` was SIGKILLed)."""
    try:
        text = (folder / "controller-password.inc").read_text()
    except OSError:
        return None
    match = re.match(r"password = (\".*\");\n", text)
    return json.loads(match.group(1)) if match else None


def rspamd_redis_options(redis_url: str) -> str:
    """rspamd's Redis options (servers, db, password) for a redis:// URL."""
    parts = urlsplit(redis_url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ScannerError(f"rspamd needs a redis://host:port/db URL, not {redis_url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    lines = [f"servers = {json.dumps(f'{host}:{parts.port or 6379}')};"]
    db = parts.path.strip("/") or "0"
    lines.append(f"db = {json.dumps(db)};")
    if parts.password:
        lines.append(f"password = {json.dumps(unquote(parts.password))};")
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    path.chmod(0o600)


def start_clamd(runtime_dir: Path, *, address: str, stream_max: int = 100 * MIB,
                database_dir: Path = CLAMD_SIGNATURES,
                timeout: float = STARTUP_TIMEOUT) -> Scanner:
    """clamd from deploy/scanners/clamav/clamd.conf.in on address ("127.0.0.1:PORT" or a
    unix socket path) with the repository's EICAR-only signature database."""
    binary = _require_binary("clamd", "clamav-daemon")
    runtime_dir = _ensure_dir(runtime_dir)
    (runtime_dir / "tmp").mkdir(exist_ok=True)
    if "/" in address:
        socket_path = Path(address)
        try:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            socket_path.unlink(missing_ok=True)  # a stale socket from a killed run
        except OSError as exc:
            raise ScannerError(f"cannot prepare clamd's socket {socket_path}: {exc}") from exc
        socket_lines = f"LocalSocket {socket_path}\nLocalSocketMode 660"
    else:
        host, _, port = address.rpartition(":")
        socket_lines = f"TCPSocket {int(port)}\nTCPAddr {host}"
    config = runtime_dir / "clamd.conf"
    config.write_text(Template(CLAMD_TEMPLATE.read_text()).substitute(
        runtime_dir=runtime_dir, database_dir=database_dir, socket_lines=socket_lines,
        stream_max=stream_max))
    return _launch("clamd", [binary, "-c", str(config)], runtime_dir, address,
                   lambda: clamd_ping(address), [runtime_dir / "clamd.log"], timeout)


def start_spamd(runtime_dir: Path, *, port: int, max_children: int = 2,
                timeout: float = STARTUP_TIMEOUT) -> Scanner:
    """spamd on 127.0.0.1:port with local tests only (-L) and our local.cf."""
    binary = _require_binary("spamd", "spamd")
    runtime_dir = _ensure_dir(runtime_dir)
    cleanup: list[Path] = []
    if os.geteuid() == 0:
        # As root spamd drops to "nobody" before it reads its configuration, so that must be
        # readable by nobody: a pytest tmp_path (mode 0700 parents) is not.
        home = Path(tempfile.mkdtemp(prefix="tiermail-spamd-"))
        home.chmod(0o755)
        cleanup.append(home)
        user = ["-u", "nobody"]
    else:
        home, user = runtime_dir, []
    site = home / "site"
    site.mkdir(exist_ok=True)
    # The system's *.pre files load the plugins the stock rules need; local.cf is ours.
    for pre in sorted(SPAMASSASSIN_SYSTEM_PRE.glob("*.pre")):
        (site / pre.name).symlink_to(pre)
    shutil.copyfile(SPAMASSASSIN_LOCAL_CF, site / "local.cf")
    site.chmod(0o755)
    (site / "local.cf").chmod(0o644)
    log_file = home / "spamd.log"
    address = f"127.0.0.1:{port}"
    argv = [binary, f"--listen={address}", "--local", "--nouser-config",
            f"--siteconfigpath={site}", f"--helper-home-dir={home}",
            f"--max-children={max_children}", "--min-children=1",
            f"--pidfile={home / 'spamd.pid'}", f"--syslog={log_file}", *user]
    return _launch("spamd", argv, runtime_dir, address, lambda: spamd_ping(address),
                   [log_file], timeout, cleanup)


# Shared machinery.

def _launch(name: str, argv: list[str], runtime_dir: Path, address: str,
            ready: Callable[[], bool], logs: list[Path], timeout: float,
            cleanup: Iterable[Path] = ()) -> Scanner:
    output = runtime_dir / f"{name}.out"
    started = time.monotonic()
    with open(output, "ab") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    record = runtime_dir / f"{name}.group"
    record.write_text(f"{process.pid} {Path(shutil.which(argv[0]) or argv[0]).resolve().name}\n")
    scanner = Scanner(name, address, process, [*logs, output], list(cleanup), record)
    deadline = started + timeout
    try:
        while not ready():
            if not scanner.alive:
                raise ScannerError(f"{name} exited with status {process.returncode} before "
                                   f"answering on {address}:\n{scanner.log_tail()}")
            if time.monotonic() > deadline:
                raise ScannerError(f"{name} did not answer on {address} within "
                                   f"{timeout:.0f}s:\n{scanner.log_tail()}")
            time.sleep(0.05)
    except BaseException:
        # Also a stop (SIGTERM, Ctrl-C) while it starts, rspamd's first start taking
        # seconds: in a session of its own, the scanner gets no signal of the terminal and
        # was left running, and later stacks took it for one of theirs and never stopped it.
        scanner.stop()
        raise
    log.info("%s is up on %s after %.2fs (logs in %s)", name, address,
             time.monotonic() - started, runtime_dir)
    return scanner


@dataclass
class LeftRunning:
    """A scanner an earlier `tiermail up` of the same data directory started and left
    running when it was killed (SIGKILL: its own stop never ran). The `up` that finds it
    answering uses it, and stops it when it stops, as the earlier one would have."""

    name: str
    group: int
    record: Path

    @classmethod
    def find(cls, name: str, runtime_dir: Path) -> LeftRunning | None:
        """The scanner `name` recorded in `runtime_dir`, if its process still runs the same
        program (a process id is reused once the process has gone)."""
        record = runtime_dir / f"{name}.group"
        try:
            pid_text, program = record.read_text().split()
            group = int(pid_text)
            # The executable, not the command line: rspamd retitles itself "rspamd: main
            # process".
            running = Path(os.readlink(f"/proc/{group}/exe")).name
        except (OSError, ValueError):
            return None
        return cls(name, group, record) if running == program else None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.group, sig)
            deadline = time.monotonic() + timeout
            while _runs(self.group) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.record.unlink(missing_ok=True)


def _runs(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def log_tail(paths: Iterable[Path], lines: int = LOG_TAIL_LINES) -> str:
    parts = []
    for path in paths:
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts) or "(no log output)"


def _require_binary(program: str, package: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None:
        raise ScannerError(f"{program} is not installed (Debian package {package}); "
                           "`make install` runs scripts/install-system.sh")
    return found


def _ensure_dir(path: Path) -> Path:
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    # start_new_session made the scanner the leader of a process group of its own.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
