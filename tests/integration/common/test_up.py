"""`tiermail up`, the single-machine runner, as an operator meets it: a second one started by
mistake, a tier that cannot start, a tier that dies, Ctrl-C and SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from common.broker import close_connection, open_channel
from common.listen import lock_directory
from common.settings import Settings
from tests.support import TierProcess, free_port, port_open, run_cli, wait_until

RunTier = Callable[..., TierProcess]


def _children(pid: int) -> dict[str, int]:
    """The tier processes `tiermail up` (pid) runs: tier name -> pid."""
    found = subprocess.run(["pgrep", "-a", "-P", str(pid)], capture_output=True, text=True)
    return {line.split()[-1]: int(line.split()[0]) for line in found.stdout.splitlines()
            if "services.cli" in line}


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _restarted(up_pid: int, tier: str, old_pid: int) -> bool:
    return _children(up_pid).get(tier) not in (None, old_pid)


def _start_up(run_tier: RunTier, settings: Settings) -> TierProcess:
    up = run_tier(settings, "up")
    for port in (settings.smtp_port, settings.imap_port, settings.pop3s_port):
        up.wait_for_port(port)
    return up


def test_a_second_up_is_refused_and_the_first_goes_on(settings: Settings,
                                                      run_tier: RunTier) -> None:
    """The second `up` on the same settings started a filter that shared the SMTP port with
    the first stack's (SO_REUSEPORT), and a store that swept the first store's mailboxes
    and then failed to listen, restarted every 2 s with a traceback each time, forever."""
    up = _start_up(run_tier, settings)
    before = _children(up.proc.pid)

    second = run_cli(settings, "up")
    assert second.returncode == 3, second.stderr
    assert second.stderr == (f"tiermail: cannot start: cannot listen on 127.0.0.1:"
                             f"{settings.smtp_port} (TIERMAIL_SMTP_PORT): the port is in use "
                             "(another tiermail stack, or another server)\n")

    other_ports = settings.replace(smtp_port=free_port(), imap_port=free_port(),
                                   imaps_port=free_port(), pop3_port=free_port(),
                                   pop3s_port=free_port())
    for command in ("up", "store"):
        same_data = run_cli(other_ports, command)
        assert same_data.returncode == 3, same_data.stderr
        assert same_data.stderr.startswith(
            f"tiermail: cannot start: another store is running on {settings.store_dir} "
            f"(pid {before['store']})"), same_data.stderr
        assert "mail store ready" not in same_data.stderr  # it swept nothing
    assert up.alive and _children(up.proc.pid) == before


def test_an_up_that_loses_the_race_for_the_data_directory_stops_before_it_starts(
        settings: Settings) -> None:
    """Two `up`s started together both passed the port and store checks; the loser printed
    "tiermail is up" (its port check answered by the winner's store) and then stopped when
    its store found the directory taken. Now the first holds the data directory for as long
    as it runs; here the test holds it, as the winner would."""
    with lock_directory(settings.data_dir, "tiermail up"):
        loser = run_cli(settings, "up")
    assert loser.returncode == 3, loser.stderr
    assert loser.stderr == (f"tiermail: cannot start: another tiermail up is running on "
                            f"{settings.data_dir} (pid {os.getpid()}); one tiermail up per "
                            "TIERMAIL_DATA_DIR\n")
    assert "tiermail is up" not in loser.stdout
    assert not port_open("127.0.0.1", settings.smtp_port)


def test_a_tier_that_cannot_start_stops_up_instead_of_restarting(
        settings: Settings, run_tier: RunTier) -> None:
    """A setting only the tiers can find bad (the queues exist with another delivery limit):
    each tier exits with `bad setting`; `up` restarted them every 2 s for ever. (Until
    2026-12-05 this test used an unusable certificate, which `up` now refuses itself.)"""
    async def declare_queues() -> None:
        connection, _ = await open_channel(settings.amqp_url, settings.topology, 10.0,
                                           confirms=False)
        await close_connection(connection)

    asyncio.run(declare_queues())
    up = run_tier(settings.replace(delivery_attempts=settings.delivery_attempts + 5), "up")
    assert up.proc.wait(timeout=60) == 2
    output = up.output()
    assert "tiermail: bad setting: TIERMAIL_DELIVERY_ATTEMPTS" in output
    assert "stopping the stack" in output and "restarting" not in output


def test_what_would_stop_every_tier_stops_up_before_it_starts_anything(
        settings: Settings, tmp_path: Path) -> None:
    """An unusable certificate, a Redis database the server does not have: `up` started the
    scanners and the tiers, printed `tiermail is up:` with the endpoints and how to add
    accounts, and only then stopped with exit 2 and the same `bad setting` line once per
    tier. Now it says it once and starts nothing, as for a port in use."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    refused = [
        (settings.replace(tls_cert=str(cert), tls_key=str(key)),
         f"tiermail: bad setting: TIERMAIL_TLS_CERT={cert} / TIERMAIL_TLS_KEY={key}: "
         "not a usable certificate and key"),
        (settings.replace(redis_url="redis://127.0.0.1:6379/99"),
         "tiermail: bad setting: TIERMAIL_REDIS_URL=redis://127.0.0.1:6379/99: Redis "
         "refuses it: DB index is out of range"),
    ]
    for wrong, said in refused:
        up = run_cli(wrong, "up")
        assert up.returncode == 2, up.stderr
        assert up.stdout == "", up.stdout  # no "tiermail is up:"
        said_lines = [line for line in up.stderr.splitlines() if line.startswith("tiermail:")]
        assert len(said_lines) == 1 and said_lines[0].startswith(said), up.stderr  # not per tier
        assert not (settings.store_dir / "mail").exists()  # no store started


def test_a_configured_certificate_that_is_missing_is_not_made_up(
        settings: Settings, run_tier: RunTier, tmp_path: Path) -> None:
    """`up` generated a self-signed certificate at TIERMAIL_TLS_CERT/KEY when they named no
    file (a mistyped path, a volume not mounted), and the stack served it silently."""
    cert, key = tmp_path / "typo" / "cert.pem", tmp_path / "typo" / "key.pem"
    up = run_tier(settings.replace(tls_cert=str(cert), tls_key=str(key)), "up")
    assert up.proc.wait(timeout=60) == 2
    assert "tiermail: bad setting: TIERMAIL_TLS_CERT" in up.output()
    assert not cert.exists() and not key.exists()


def test_up_says_it_is_up_once_the_tiers_take_connections(settings: Settings,
                                                          run_tier: RunTier) -> None:
    """`tiermail is up:` came the moment the tiers were spawned, seconds before the store
    listened: a client (or a script) that acted on it was refused. It now comes once the
    SMTP, POP3 and IMAP ports answer."""
    up = run_tier(settings, "up")
    wait_until(lambda: "tiermail is up:" in up.output(), what="the banner", timeout=60)
    for port in (settings.smtp_port, settings.pop3_port, settings.imap_port):
        assert port_open("127.0.0.1", port), port
    assert up.output().count("tiermail is up:") == 1
    up.stop()


def test_an_account_command_right_after_the_banner_is_taken(settings: Settings,
                                                           run_tier: RunTier,
                                                           tmp_path: Path) -> None:
    """The store opened its ports before its first publish of the directory. On a data
    directory new to the directory in Redis (a `var/` deleted and made again), an account
    command in that moment was refused as `published from another account database`. The
    store now publishes (or has tried to) before it listens."""
    earlier = settings.replace(data_dir=tmp_path / "earlier-var")
    for domain in ("a.example", "b.example"):
        assert run_cli(earlier, "domain", "add", domain).returncode == 0
    up = run_tier(settings, "up")
    wait_until(lambda: "tiermail is up:" in up.output(), what="the banner", timeout=60)
    added = run_cli(settings, "domain", "add", "example.org")
    assert added.returncode == 0, added.stderr
    shown = up.output()
    published = shown.index("directory published: 0 domains")
    assert published < shown.index("POP3 listening"), shown
    assert published < shown.index("IMAP listening"), shown
    up.stop()


def test_a_dead_tier_is_restarted_and_signals_stop_everything(settings: Settings,
                                                              run_tier: RunTier) -> None:
    for stop_with in (signal.SIGINT, signal.SIGTERM):
        up = _start_up(run_tier, settings)
        first = _children(up.proc.pid)
        assert set(first) == {"store", "filter"}
        subprocess.run(["kill", "-KILL", str(first["store"])], check=True)
        wait_until(functools.partial(_restarted, up.proc.pid, "store", first["store"]))
        up.wait_for_port(settings.imap_port)
        running = _children(up.proc.pid)
        assert running["filter"] == first["filter"]

        up.proc.send_signal(stop_with)
        assert up.proc.wait(timeout=60) == 0
        assert all(_gone(pid) for pid in running.values()), up.output()
        up.stop()


def test_tiers_end_with_up_even_when_it_is_killed(settings: Settings,
                                                  run_tier: RunTier) -> None:
    """SIGKILL (or a crash) of `tiermail up` left its store and filter running, orphaned,
    holding the stack's ports and data directory."""
    up = _start_up(run_tier, settings)
    tiers = _children(up.proc.pid)
    assert set(tiers) == {"store", "filter"}
    up.kill(signal.SIGKILL)
    for pid in tiers.values():
        wait_until(functools.partial(_gone, pid))
