"""Deferred scanning with its drainers SIGKILLed: every accepted message is scanned and then
delivered or quarantined, none is lost, none lands twice, none reaches a mailbox unscanned.

Mail (ham, GTUBE spam, EICAR) arrives under TIERMAIL_SCAN_FAILURE=defer while rspamd and
clamd are away (the intake worker's settings point at closed ports): all of it waits in the
scan queue. Then two `tiermail filter` processes that reach the real scanners drain it, each
talking to RabbitMQ through an AckTrap, while the test SIGKILLs one of them again and again
and starts it anew: at random moments, and aimed, when a worker has published a scanned
message (confirmed) and its ack on the scan queue is on the wire, once for an infected, a
spam and a ham message. Only the count afterwards matters: in the user's mailbox every ham
in INBOX and every spam in Junk exactly once, each with the scan's headers; every infected
message in the quarantine (listed once, with the copies that crashes left there), and in the
mailbox exactly once after an operator releases the quarantine; scan queue and dead letters
empty.
"""

from __future__ import annotations

import json
import random
import re
import smtplib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.settings import Settings
from services.filter.protocol.scan_headers import NOT_SCANNED_HEADER, VIRUS_HEADER
from tests.e2e.test_inbound_spine import provision
from tests.e2e.test_scanning_to_mailboxes import USER, folder, header, scanning
from tests.integration.scanning.conftest import closed_address, eicar_attachment, gtube, ham
from tests.support import (
    AckTrap,
    TierProcess,
    broker_at,
    dead_letter_depth,
    free_port,
    queue_depth,
    run_cli,
    wait_until,
)

COUNT = 1000  # drained at some 75 a second: long enough for several kills and restarts
MAKERS = {"ham": ham, "gtube": gtube, "eicar": eicar_attachment}
# Killed where a crash is worst for the drainer: the scan's result published, its ack not
# (held back by the trap); and once with the ack passed on, which loses nothing only if the
# result was published (confirmed) before the ack.
AIMED = ("eicar", "gtube", "ham", "ham acked")
RANDOM_KILLS = 4
DUPLICATE = re.compile(r"already delivered queue_id=(\S+) .*event=duplicate")


def kind_of(n: int) -> str:
    """40 EICAR and 100 GTUBE among 860 ham, spread over the queue."""
    return "eicar" if n % 25 == 7 else "gtube" if n % 10 == 3 else "ham"


def message_id(kind: str, n: int) -> str:
    return f"<{kind}.{n}@remote.test>"  # what the scanning conftest's makers put in


@dataclass(frozen=True)
class Sent:
    kind: str
    message_id: str


def send_all(port: int) -> dict[str, Sent]:
    """COUNT messages over one connection, each answered 250; queue id -> what it was."""
    sent: dict[str, Sent] = {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net",
                      timeout=60) as client:
        client.ehlo()
        for n in range(COUNT):
            kind = kind_of(n)
            assert client.mail("sender@example.net")[0] == 250
            assert client.rcpt(USER)[0] == 250
            code, text = client.data(MAKERS[kind](f"{kind} {n}"))
            assert code == 250, (kind, code, text)
            sent[text.decode().rsplit(" ", 1)[1]] = Sent(kind, message_id(kind, n))
    return sent


@dataclass
class Drainer:
    """A filter worker whose broker connections go through its own AckTrap."""

    settings: Settings
    trap: AckTrap
    start: Callable[..., TierProcess]
    process: TierProcess | None = None

    def restart(self) -> TierProcess:
        self.process = self.start(self.settings, "filter")
        self.process.wait_for_port(self.settings.smtp_port)
        return self.process

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()


def drainers(live: Settings, run_tier: Callable[..., TierProcess]) -> list[Drainer]:
    broker_port = int(live.amqp_url.rsplit("/", 1)[0].rsplit(":", 1)[1])
    pair = []
    for _ in range(2):
        trap = AckTrap(broker_port)
        own = broker_at(live, trap.port, smtp_port=free_port(), submission_port=free_port())
        pair.append(Drainer(own, trap, run_tier))
    return pair


def kill_while_draining(pair: list[Drainer], sent: dict[str, Sent],
                        chance: random.Random) -> dict[str, str]:
    """SIGKILL and restart the drainers: aimed at an ack of each kind in AIMED (first, while
    every kind is still in the queue), then at RANDOM_KILLS random moments; the queue ids
    whose acks the aimed kills held back, by kind."""
    caught: dict[str, str] = {}
    settings = pair[0].settings
    rounds: list[str | None] = [*chance.sample(AIMED, len(AIMED)), *([None] * RANDOM_KILLS)]
    for aim in rounds:
        if aim is None and queue_depth(settings, settings.topology.scan_queue) == 0:
            break  # drained: a kill now would test nothing
        victim = chance.choice(pair)
        assert victim.process is not None
        if aim is None:
            time.sleep(chance.uniform(0.05, 1.5))  # a random moment, not a wait for an event
            victim.kill()
        else:
            kind, _, acked = aim.partition(" ")
            victim.trap.arm(victim.process.proc.pid,
                            lambda queue_id, kind=kind: sent[queue_id].kind == kind
                            if queue_id in sent else False, hold=not acked)
            wait_until(victim.trap.sprung.is_set, timeout=60,
                       what=f"worker {victim.settings.smtp_port} to ack a {aim} message")
            victim.kill()
            caught[aim] = victim.trap.caught
        victim.restart()
    return caught


def settle_drainers(pair: list[Drainer]) -> None:
    """Stop the drainers with the scan queue empty, not even a message held unacked by one
    (a drainer stopped while holding messages gives them back: then they run again)."""
    settings = pair[0].settings
    for _ in range(5):
        wait_until(lambda: queue_depth(settings, settings.topology.scan_queue) == 0,
                   timeout=120, what="the scan queue to empty")
        for drainer in pair:
            assert drainer.process is not None
            drainer.process.stop()
        if queue_depth(settings, settings.topology.scan_queue) == 0:
            return
        for drainer in pair:
            drainer.restart()
    raise AssertionError("the drainers kept giving messages back")


def settle_store(live: Settings, store: TierProcess, run_tier: Callable[..., TierProcess]
                 ) -> None:
    """Stop the store with nothing left in the delivery queues, not even held unacked by it
    (a store stopped while holding messages gives them back: then it runs again)."""
    for _ in range(5):
        wait_until(lambda: queue_depth(live) == 0, timeout=60, what="the deliver queue to empty")
        store.stop()
        if queue_depth(live) == 0:
            return
        store = run_tier(live, "store")
        store.wait_for_port(live.pop3_port)
    raise AssertionError("the store kept giving messages back")


def deduplicated_by_store(logs: Path) -> set[str]:
    """Queue ids the store found already delivered (its `event=duplicate` log lines)."""
    found = set()
    for log in logs.glob("store-*.log"):
        found |= set(DUPLICATE.findall(log.read_text(errors="replace")))
    return found


def by_message_id(messages: list[bytes]) -> Counter[str]:
    return Counter(header(raw, "Message-ID") or "" for raw in messages)


def store_and_intake(settings: Settings, run_tier: Callable[..., TierProcess], rspamd: str,
                     clamd: str) -> tuple[Settings, TierProcess, Settings, TierProcess]:
    """Settings that scan under `defer` and a store running with them; the settings of a
    filter worker whose scanners are away and that worker running: what it accepts waits
    in the scan queue, and it drains nothing."""
    live = scanning(settings, rspamd, clamd, policy="defer")
    provision(live)
    store = run_tier(live, "store")
    store.wait_for_port(live.pop3_port)
    away = live.replace(rspamd_url=f"http://{closed_address()}", clamd_address=closed_address())
    intake = run_tier(away, "filter")
    intake.wait_for_port(away.smtp_port)
    return live, store, away, intake


def test_drainers_killed_mid_drain_deliver_and_quarantine_each_message_once(
        settings: Settings, run_tier: Callable[..., TierProcess], rspamd: str, clamd: str,
        tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown when the test fails, to replay the same kills
    chance = random.Random(seed)
    live, store, away, intake = store_and_intake(settings, run_tier, rspamd, clamd)
    sent = send_all(away.smtp_port)
    intake.stop()
    topology = live.topology
    assert queue_depth(live, topology.scan_queue) == COUNT and queue_depth(live) == 0

    pair = drainers(live, run_tier)
    try:
        for drainer in pair:
            drainer.restart()
        caught = kill_while_draining(pair, sent, chance)
        settle_drainers(pair)
    finally:
        for drainer in pair:
            drainer.trap.cut()
    settle_store(live, store, run_tier)
    assert dead_letter_depth(live) == 0

    expected = {kind: Counter(s.message_id for s in sent.values() if s.kind == kind)
                for kind in MAKERS}
    inbox, junk = folder(live, "INBOX"), folder(live, "Junk")
    assert by_message_id(inbox) == expected["ham"], "each ham in INBOX exactly once"
    assert by_message_id(junk) == expected["gtube"], "each spam in Junk exactly once"
    for raw in inbox:
        assert (header(raw, "X-Spam-Status") or "").startswith("No, "), raw[:400]
        assert header(raw, NOT_SCANNED_HEADER) is None and header(raw, VIRUS_HEADER) is None
    for raw in junk:
        assert header(raw, "X-Spam") == "Yes" and header(raw, "X-Spam-Score"), raw[:400]
        assert header(raw, NOT_SCANNED_HEADER) is None and header(raw, VIRUS_HEADER) is None

    listing = run_cli(live, "quarantine", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    held = json.loads(listing.stdout)["messages"]
    eicars = {queue_id for queue_id, s in sent.items() if s.kind == "eicar"}
    assert sorted(m["queue_id"] for m in held) == sorted(eicars), "each listed once"
    assert all(m["reason"].startswith("virus ") for m in held), held
    # The aimed kills did land between a publish and its ack: those messages went out twice.
    copies = {m["queue_id"]: m["copies"] for m in held}
    assert copies[caught["eicar"]] >= 2, "the quarantine keeps a crash's duplicate"
    assert {caught["gtube"], caught["ham"]} <= deduplicated_by_store(tmp_path)

    released = run_cli(live, "quarantine", "release", "--all")
    assert released.returncode == 0, released.stderr
    store = run_tier(live, "store")
    store.wait_for_port(live.pop3_port)
    settle_store(live, store, run_tier)
    assert by_message_id(folder(live, "INBOX")) == expected["ham"] + expected["eicar"]
    assert queue_depth(live, topology.quarantine_queue) == 0
