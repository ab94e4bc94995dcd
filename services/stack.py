"""`tiermail up`: one filter, the store and the spam learner as child processes, in the
foreground.

Before the tiers it starts the scanners the settings ask for (rspamd and clamd by default,
spamd for spam=spamassassin) from the project's own configuration in deploy/scanners/, with
their state under data_dir/scanners; a scanner already answering on the configured address is
used as it is. rspamd's controller (spam learning) listens on rspamd_controller_url's port
with TIERMAIL_RSPAMD_CONTROLLER_PASSWORD, or with a password made up for this run and handed
to the tiers; its Bayes statistics go to TIERMAIL_REDIS_URL's database. A child that dies is
restarted after a short pause (the broker keeps the mail meanwhile); Ctrl-C or SIGTERM stops
the tiers, then the scanners. This is the development stack that `make run` starts; real
deployments run each tier on its own (compose/, docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from common import listen
from common.redisconn import check_redis_url
from common.settings import Settings, is_loopback
from common.tls import ensure_dev_certificate, server_context
from services.devscanners import runner
from services.filter.main import shutdown_grace
from services.store.learning import broker_attempt_limit

log = logging.getLogger(__name__)

TIERS = ("store", "filter")
LEARNER = "learner"  # when settings.learns_spam
RESTART_DELAY = 2.0
PAUSE_STEP = 0.05  # seconds: how soon a stop asked during RESTART_DELAY is seen
STORE_STOP_GRACE = 30.0  # seconds; see stop_grace
# A tier that exits with these cannot start as configured (services/cli.py: a bad setting, a
# port or data directory in use); restarting it would only fail again, every 2 s.
FATAL_EXITS = {2: "a bad setting", 3: "it cannot start"}


def endpoints(settings: Settings) -> list[str]:
    def at(port: int) -> str:
        return listen.format_address(settings.bind, port)

    return [
        f"SMTP (filter)    {at(settings.smtp_port)}  STARTTLS",
        f"IMAP (store)     {at(settings.imap_port)}  STARTTLS; IMAPS {at(settings.imaps_port)}",
        f"POP3 (store)     {at(settings.pop3_port)}  STLS; POP3S {at(settings.pop3s_port)}",
        f"RabbitMQ         {settings.amqp_url.rsplit('@', 1)[-1]}",
        f"Redis            {settings.redis_url.rsplit('@', 1)[-1]}",
        f"spam scanning    {settings.spam}"
        + {"rspamd": f" {settings.rspamd_url}",
           "spamassassin": f" spamd {settings.spamd_address}"}.get(settings.spam, ""),
        "spam learning    "
        + (f"rspamd {settings.rspamd_controller_url}" if settings.learns_spam else "off"),
        f"virus scanning   {settings.virus}"
        + (f" {settings.clamd_address}" if settings.virus == "clamd" else ""),
        f"data             {settings.data_dir.resolve()}",
    ]


def run_stack(settings: Settings) -> int:
    # SIGTERM while the scanners start (rspamd's first start takes ~10 s) unwinds like
    # Ctrl-C, stopping the scanners already started instead of leaving them running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    check_free(settings)
    # Held while the stack runs: two `up`s started at once both passed the checks above,
    # and the loser printed "tiermail is up" (its port check answered by the winner's store)
    # before its own store found the data directory taken.
    with listen.lock_directory(settings.data_dir, "tiermail up"):
        return _run_stack(settings)


def _run_stack(settings: Settings) -> int:
    if settings.spam == "rspamd" and not settings.rspamd_controller_password:
        settings = settings.replace(rspamd_controller_password=controller_password(settings))
    # Only where no certificate is configured: one configured but missing (a mistyped path,
    # a volume not mounted) stops the tiers with a bad setting instead of being made up.
    configured = settings.tls_cert or settings.tls_key
    if not configured and ensure_dev_certificate(settings.tls_cert_path, settings.tls_key_path,
                                                 settings.hostname):
        log.info("generated a self-signed development certificate at %s", settings.tls_cert_path)
    # What would stop every tier with a bad setting (exit 2) stops `up` here, before the
    # scanners start and "tiermail is up" is printed, in one line instead of one per tier.
    server_context(settings)
    asyncio.run(check_redis_url(settings))
    with contextlib.ExitStack() as scanners:
        try:
            start_scanners(settings, scanners)
        except runner.ScannerError as exc:
            log.error("cannot start the scanners: %s", exc)
            return 1
        return _run_tiers(settings)


def controller_password(settings: Settings) -> str:
    """rspamd's controller password when TIERMAIL_RSPAMD_CONTROLLER_PASSWORD is empty: made
    up per run, never written to the repository or a config file (the children get it
    through their environment). An rspamd already answering keeps the password it started
    with: the one in this data directory when an earlier `up` of it left rspamd running
    (SIGKILLed), else unknown here (another stack's), and the learner would be refused."""
    if runner.rspamd_ping(settings.rspamd_url):
        kept = runner.read_controller_password(_scanners_dir(settings) / "rspamd" / "conf.d")
        if kept:
            return kept
        if settings.learns_spam:
            log.warning("rspamd on %s was not started by a stack on this data directory: "
                        "spam learning needs its controller's password in "
                        "TIERMAIL_RSPAMD_CONTROLLER_PASSWORD", settings.rspamd_url)
    return secrets.token_urlsafe(24)


def _scanners_dir(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "scanners"


def check_free(settings: Settings) -> None:
    """Refuse to start beside a stack that already uses these ports or this data directory
    (another `tiermail up`): its filter would share the SMTP port with that stack's (they
    open it with SO_REUSEPORT) and its store would fail to start, again and again."""
    for setting in ("smtp_port", "imap_port", "imaps_port", "pop3_port", "pop3s_port"):
        listen.check_free(settings.bind, getattr(settings, setting), setting)
    listen.lock_directory(settings.store_dir, "store").close()


def start_scanners(settings: Settings, stack: contextlib.ExitStack) -> None:
    """Start what settings.spam and settings.virus name, each stopped when `stack` closes.

    rspamd listens on rspamd_url's port with its controller on rspamd_controller_url's; clamd on
    clamd_address (a unix socket path or host:port); spamd on spamd_address (host:port).
    """
    base = _scanners_dir(settings)
    if settings.spam == "rspamd":
        parts = urlsplit(settings.rspamd_url)
        port = parts.port or 11333
        if _needs_start("rspamd", settings.rspamd_url, parts.hostname or "",
                        runner.rspamd_ping(settings.rspamd_url)):
            dns = runner.start_dns_stub()
            stack.callback(dns.stop)
            controller_port = urlsplit(settings.rspamd_controller_url).port or port + 1
            stack.enter_context(runner.start_rspamd(
                base / "rspamd", port=port, controller_port=controller_port,
                dns_address=dns.address,
                controller_password=settings.rspamd_controller_password or None,
                bayes_redis_url=settings.redis_url, max_message=settings.rspamd_max_message))
        else:
            _stop_with_this_stack("rspamd", base / "rspamd", stack)
    elif settings.spam == "spamassassin":
        host, _, port_text = settings.spamd_address.rpartition(":")
        if "/" in settings.spamd_address or not port_text.isdigit():
            raise runner.ScannerError("tiermail up runs spamd on host:port only, not "
                                      f"{settings.spamd_address!r}")
        if _needs_start("spamd", settings.spamd_address, host,
                        runner.spamd_ping(settings.spamd_address)):
            stack.enter_context(runner.start_spamd(base / "spamd", port=int(port_text)))
        else:
            _stop_with_this_stack("spamd", base / "spamd", stack)
    if settings.virus == "clamd":
        address = settings.clamd_address
        host = "127.0.0.1" if "/" in address else address.rpartition(":")[0]
        if _needs_start("clamd", address, host, runner.clamd_ping(address)):
            stack.enter_context(runner.start_clamd(
                base / "clamd", address=address, stream_max=settings.clamd_stream_max))
        else:
            _stop_with_this_stack("clamd", base / "clamd", stack)


def _stop_with_this_stack(name: str, runtime_dir: Path, stack: contextlib.ExitStack) -> None:
    """The scanner that answers was started by an earlier `up` of this data directory,
    killed before it could stop it: this one stops it when it stops."""
    left = runner.LeftRunning.find(name, runtime_dir)
    if left is not None:
        log.info("%s was left running by an earlier tiermail up of this data directory; it "
                 "stops with this one", name)
        stack.callback(left.stop)


def _needs_start(name: str, address: str, host: str, answering: bool) -> bool:
    if answering:
        log.info("%s already answers on %s; using it", name, address)
        return False
    if not is_loopback(host.strip("[]")):
        log.warning("%s at %s is not answering and is not on this machine; not starting it",
                    name, address)
        return False
    return True


def _run_tiers(settings: Settings) -> int:
    env = {**os.environ, **settings.as_env()}
    tiers = (*TIERS, LEARNER) if settings.learns_spam else TIERS
    children = {tier: _spawn(tier, env) for tier in tiers}
    # "is up" once the tiers answer: printed at the spawn, it came before the store had
    # published the directory, and a `domain add` right after it could be refused.
    waiting = _client_ports(settings)

    stopping = False
    result = 0
    asked = 0  # Ctrl-Cs and SIGTERMs
    hurry = threading.Event()  # asked twice: kill what is still stopping

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping, asked
        asked += 1
        if asked > 1:
            hurry.set()
        stopping = True

    def asked_to_stop() -> bool:
        return stopping

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        if waiting:
            waiting = [(host, port) for host, port in waiting if not _answers(host, port)]
            if not waiting:
                _announce(settings)
        for tier, child in children.items():
            code = child.poll()
            if code is None or stopping:
                continue
            if code in FATAL_EXITS:
                log.error("%s exited with %s (%s, said above); stopping the stack", tier, code,
                          FATAL_EXITS[code])
                stopping, result = True, code
                break
            log.error("%s exited with %s; restarting in %.0fs", tier, code, RESTART_DELAY)
            if _paused(RESTART_DELAY, asked_to_stop):
                children[tier] = _spawn(tier, env)
            else:
                log.info("not restarting %s: the stack is stopping", tier)
        time.sleep(0.2)
    _stop_children(children, {tier: stop_grace(tier, settings) for tier in children}, hurry)
    return result


def _paused(seconds: float, stopping: Callable[[], bool]) -> bool:
    """Wait `seconds` in short steps; False as soon as `stopping()` holds. A signal handler
    cannot end a plain time.sleep (PEP 475 resumes it), and a tier that died as the stack
    was asked to stop (a Ctrl-C reaches the whole process group) would hold the stop for
    the whole pause."""
    deadline = time.monotonic() + seconds
    while not stopping():
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, PAUSE_STEP))
    return False


def _client_ports(settings: Settings) -> list[tuple[str, int]]:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.bind,
                                                                     settings.bind)
    return [(host, settings.smtp_port), (host, settings.pop3_port), (host, settings.imap_port)]


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def _announce(settings: Settings) -> None:
    print("tiermail is up:", *endpoints(settings), sep="\n  ", flush=True)
    print("Add mail accounts in another terminal, e.g.\n"
          "  .venv/bin/tiermail domain add example.org\n"
          "  printf 'secret\\n' | .venv/bin/tiermail user add alice@example.org "
          "--password-stdin\n"
          "Ctrl-C stops the stack (a second Ctrl-C kills what is still stopping).",
          flush=True)


def stop_grace(tier: str, settings: Settings) -> float:
    """Seconds a tier gets from SIGTERM to exit before it is killed: the longest its own
    stop takes (compose/ gives each the same stop_grace_period). A filter answers the
    messages it is publishing (250, or 451 once the publish times out); a learner gives up a
    broker that does not answer; a store stores and acks the batch in flight, for up to
    services/store/main.py CONSUMER_STOP_WAIT (killing it would lose nothing either: what
    it had not acknowledged is delivered again, once)."""
    if tier == "filter":
        return shutdown_grace(settings) + 5.0
    if tier == LEARNER:
        return broker_attempt_limit() + 10.0
    return STORE_STOP_GRACE


def _stop_children(children: dict[str, subprocess.Popen[bytes]], grace: dict[str, float],
                   hurry: threading.Event) -> None:
    """SIGTERM to every child at once, then each waited for up to its own grace, all at the
    same time, and killed (with a line saying so) when it runs out or `hurry` is set."""
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    started = time.monotonic()
    running = dict(children)
    while running:
        for tier, child in list(running.items()):
            if child.poll() is None:
                why = _kill_reason(tier, hurry.is_set(), time.monotonic() - started,
                                   grace[tier])
                if why is None:
                    continue
                log.error("%s", why)
                child.kill()
                child.wait()
            del running[tier]
        time.sleep(0.05)


def _kill_reason(tier: str, hurried: bool, waited: float, grace: float) -> str | None:
    if hurried:
        return f"{tier} killed: asked twice to stop"
    if waited > grace:
        return f"{tier} did not stop within {grace:g}s of SIGTERM; killed"
    return None


def _spawn(tier: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--parent", str(os.getpid()), tier], env=env)
