"""A filter worker SIGKILLed after quarantining a message and before acking it on the scan
queue: the scan queue gives the message again, it is scanned and quarantined again, and the
quarantine holds it twice under one queue id. The operator's commands take the copies as one
message: `quarantine list` shows it once, `release` sends one copy for delivery (the store
finds no duplicate to skip) and removes the other, `drop` removes both.

Real `tiermail filter` and `tiermail store` processes, the real rspamd, clamd and RabbitMQ;
the kill is aimed with an AckTrap in front of the draining worker's broker connections.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from pathlib import Path

from common.settings import Settings
from tests.e2e.test_deferred_drain_killed import (
    by_message_id,
    deduplicated_by_store,
    settle_store,
    store_and_intake,
)
from tests.e2e.test_scanning_to_mailboxes import USER, folder
from tests.integration.scanning.conftest import eicar_attachment
from tests.support import (
    AckTrap,
    TierProcess,
    broker_at,
    free_port,
    queue_depth,
    run_cli,
    wait_until,
)


def send_one(settings: Settings, data: str) -> str:
    """One message for USER, answered 250; its queue id."""
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, local_hostname="client.example.net",
                      timeout=60) as client:
        client.ehlo()
        assert client.mail("sender@example.net")[0] == 250
        assert client.rcpt(USER)[0] == 250
        code, text = client.data(data)
        assert code == 250, (code, text)
        return text.decode().rsplit(" ", 1)[1]


def quarantined_twice(intake: Settings, drainer: Settings, trap: AckTrap,
                      process: TierProcess, start: Callable[..., TierProcess],
                      name: str) -> tuple[str, TierProcess]:
    """Send an infected message; the drainer is SIGKILLed at its ack on the scan queue (the
    quarantined copy confirmed, the ack held back) and started again, which quarantines the
    redelivered message a second time. Its queue id and the drainer now running."""
    depth = queue_depth(drainer, drainer.topology.quarantine_queue)
    trap.arm(process.proc.pid, lambda queue_id: True, hold=True)
    queue_id = send_one(intake, eicar_attachment(name))
    wait_until(trap.sprung.is_set, timeout=120, what="the drainer to ack the scanned message")
    assert trap.caught == queue_id
    process.kill()
    process = start(drainer, "filter")
    process.wait_for_port(drainer.smtp_port)
    wait_until(lambda: queue_depth(drainer, drainer.topology.quarantine_queue) == depth + 2,
               timeout=120, what="the redelivered message quarantined again")
    return queue_id, process


def test_a_message_a_crash_quarantined_twice_is_listed_released_and_dropped_as_one(
        settings: Settings, run_tier: Callable[..., TierProcess], rspamd: str, clamd: str,
        tmp_path: Path) -> None:
    live, store, away, intake = store_and_intake(settings, run_tier, rspamd, clamd)
    broker_port = int(live.amqp_url.rsplit("/", 1)[0].rsplit(":", 1)[1])
    trap = AckTrap(broker_port)
    drainer = broker_at(live, trap.port, smtp_port=free_port(), submission_port=free_port())
    try:
        process = run_tier(drainer, "filter")
        process.wait_for_port(drainer.smtp_port)
        released_id, process = quarantined_twice(away, drainer, trap, process, run_tier,
                                                 "released twice")
        dropped_id, process = quarantined_twice(away, drainer, trap, process, run_tier,
                                                "dropped twice")
        wait_until(lambda: queue_depth(live, live.topology.scan_queue) == 0, timeout=60,
                   what="the scan queue empty")
        process.stop()
        intake.stop()
    finally:
        trap.cut()
    quarantine = live.topology.quarantine_queue
    assert queue_depth(live, quarantine) == 4

    listing = run_cli(live, "quarantine", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    report = json.loads(listing.stdout)
    assert report["total"] == 2
    assert [(m["queue_id"], m["copies"]) for m in report["messages"]] == [
        (released_id, 2), (dropped_id, 2)]
    text = run_cli(live, "quarantine", "list")
    assert text.stdout.count(released_id) == 1 and text.stdout.count(dropped_id) == 1
    assert text.stdout.endswith(
        "2 quarantined messages (2 duplicate copies in the queue, each listed once)\n")

    released = run_cli(live, "quarantine", "release", released_id)
    assert released.returncode == 0, released.stderr
    assert released.stdout == (f"{released_id} sent for delivery\n"
                               "1 message sent for delivery (1 duplicate copy removed)\n")
    dropped = run_cli(live, "quarantine", "drop", dropped_id)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout == (f"{dropped_id} dropped\n"
                              "1 message dropped (1 duplicate copy dropped too)\n")
    assert queue_depth(live, quarantine) == 0
    for action in ("release", "drop", "show"):  # gone, copies and all
        again = run_cli(live, "quarantine", action, released_id)
        assert again.returncode == 1 and f"{released_id}: not quarantined" in again.stderr

    settle_store(live, store, run_tier)
    assert by_message_id(folder(live, "INBOX")) == {"<released.twice@remote.test>": 1}
    assert released_id not in deduplicated_by_store(tmp_path), "a copy was sent twice"
