"""What a filter worker says and refuses as it starts (services/filter/main.py open_worker)."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable

import pytest

from common.settings import Settings
from tests.integration.filter.conftest import ALICE, DOMAIN, running_filter
from tests.support import TierProcess, low_open_file_limit, wait_until

POSTMASTER_EVENTS = ("no-postmaster", "bad-postmaster")


async def _start_events(settings: Settings, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The postmaster warnings a worker logs as it starts with these settings."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="services.filter.main"):
        async with running_filter(settings):
            pass
    return [getattr(record, "event", "") for record in caplog.records
            if getattr(record, "event", "") in POSTMASTER_EVENTS]


async def test_a_start_says_when_postmaster_mail_would_be_refused(
        directory: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """RFC 5321 4.5.1 wants postmaster mail accepted: a filter started without
    TIERMAIL_POSTMASTER, or with one that is no local mailbox, says so; one naming a user
    says nothing."""
    assert await _start_events(directory, caplog) == ["no-postmaster"]
    assert await _start_events(directory.replace(postmaster=f"nobody@{DOMAIN}"),
                               caplog) == ["bad-postmaster"]
    assert await _start_events(directory.replace(postmaster="someone@remote.test"),
                               caplog) == ["bad-postmaster"]
    assert await _start_events(directory.replace(postmaster=ALICE), caplog) == []


def test_a_filter_of_another_stack_on_the_port_is_refused(
        directory: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Sharing a port with SO_REUSEPORT, a second stack's filter would take half of the
    first's connections: it exits 3 with one line instead (docs/operations.md, 'Scaling')."""
    first = run_tier(directory, "filter")
    first.wait_for_port(directory.smtp_port)
    other = run_tier(directory.replace(redis_prefix=directory.redis_prefix + "other:"),
                     "filter")
    wait_until(lambda: not other.alive, what="the other stack's filter to exit")
    assert other.proc.returncode == 3, other.output()
    assert "filters of another stack serve port" in other.output()
    assert first.alive


def test_a_filter_stopped_with_ctrl_c_exits_0(
        directory: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Ctrl-C (SIGINT) stops a worker as SIGTERM does, as docs/operations.md's exit codes
    say (0: stopped by SIGTERM or Ctrl-C), not as an interrupted command (130)."""
    worker = run_tier(directory, "filter")
    worker.wait_for_port(directory.smtp_port)
    worker.kill(signal.SIGINT)
    assert worker.proc.returncode == 0, worker.output()
    assert "shutting down" in worker.output()


def test_clients_past_a_low_open_file_limit_are_all_greeted(
        directory: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Started with a soft open-file limit below TIERMAIL_SMTP_MAX_CONNECTIONS (Debian's
    1024 under the default 200 per worker is fine; a container's may not be), the filter
    raises it to the hard limit: every client up to its connection limit is greeted."""
    with low_open_file_limit(1024):
        worker = run_tier(directory, "filter")  # inherits the low soft limit
    worker.wait_for_port(directory.smtp_port)
    clients = [socket.create_connection(("127.0.0.1", directory.smtp_port), timeout=30)
               for _ in range(directory.smtp_max_connections - 10)]
    try:
        assert all(client.recv(200).startswith(b"220 ") for client in clients)
    finally:
        for client in clients:
            client.close()
