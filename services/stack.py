"""`tiermail up`: one filter and the store as child processes, in the foreground.

A child that dies is restarted after a short pause (the broker keeps the mail meanwhile);
Ctrl-C or SIGTERM stops both. This is the development stack that `make run` starts; real
deployments run each tier on its own (compose/, docs/operations.md).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from common.settings import Settings
from common.tls import ensure_dev_certificate

log = logging.getLogger(__name__)

TIERS = ("store", "filter")
RESTART_DELAY = 2.0


def endpoints(settings: Settings) -> list[str]:
    host = settings.bind
    return [
        f"SMTP (filter)    {host}:{settings.smtp_port}  STARTTLS",
        f"POP3 (store)     {host}:{settings.pop3_port}  STLS; POP3S {host}:{settings.pop3s_port}",
        f"RabbitMQ         {settings.amqp_url.rsplit('@', 1)[-1]}",
        f"Redis            {settings.redis_url.rsplit('@', 1)[-1]}",
        f"data             {settings.data_dir.resolve()}",
    ]


def run_stack(settings: Settings) -> int:
    if ensure_dev_certificate(settings.tls_cert_path, settings.tls_key_path, settings.hostname):
        log.info("generated a self-signed development certificate at %s", settings.tls_cert_path)
    env = {**os.environ, **settings.as_env()}
    children = {tier: _spawn(tier, env) for tier in TIERS}
    print("tiermail is up:", *endpoints(settings), sep="\n  ", flush=True)
    print("Add mail accounts in another terminal, e.g.\n"
          "  .venv/bin/tiermail domain add example.org\n"
          "  printf 'secret\\n' | .venv/bin/tiermail user add alice@example.org "
          "--password-stdin\n"
          "Ctrl-C stops the stack.", flush=True)

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for tier, child in children.items():
            code = child.poll()
            if code is not None and not stopping:
                log.error("%s exited with %s; restarting in %.0fs", tier, code, RESTART_DELAY)
                time.sleep(RESTART_DELAY)
                children[tier] = _spawn(tier, env)
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children.values():
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def _spawn(tier: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "services.cli", tier], env=env)
