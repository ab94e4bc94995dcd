"""The failure contract under real faults: a filter SIGKILLed and the broker link cut while
clients are sending. The only thing that counts is the ledger afterwards: every message that
got a 250 is in the mailbox exactly once, and no message got anything but 250 or 4xx."""

from __future__ import annotations

import contextlib
import poplib
import re
import smtplib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field

import pytest
from imapclient import IMAPClient

from common.settings import Settings
from tests.e2e.test_inbound_spine import PASSWORD, provision
from tests.support import (
    PrivateBroker,
    TcpProxy,
    TierProcess,
    broker_at,
    free_port,
    queue_depth,
    redis_at,
    run_cli,
    wait_until,
)

MESSAGE_ID = re.compile(rb"Message-ID: (<[^>]+>)")
USER = "alice@example.org"


@dataclass
class Ledger:
    accepted: set[str] = field(default_factory=set)  # Message-IDs answered 250
    attempted: set[str] = field(default_factory=set)
    codes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, msgid: str, code: int) -> None:
        with self.lock:
            self.codes.append(code)
            if code == 250:
                self.accepted.add(msgid)

    def count(self, code: int) -> int:
        with self.lock:
            return sum(1 for c in self.codes if c == code)


def _one_transaction(smtp: smtplib.SMTP, ledger: Ledger) -> None:
    msgid = f"<{uuid.uuid4().hex}@load.example.net>"
    data = (f"From: load@example.net\r\nTo: {USER}\r\nSubject: load\r\n"
            f"Message-ID: {msgid}\r\n\r\nbody\r\n").encode()
    with ledger.lock:
        ledger.attempted.add(msgid)
    code, _ = smtp.mail("load@example.net")
    if code == 250:
        code, _ = smtp.rcpt(USER)
    if code == 250:
        code, _ = smtp.data(data)
    if code != 250:
        smtp.rset()
    ledger.record(msgid, code)


def sender(port: int, ledger: Ledger, stop: threading.Event) -> None:
    """Send until told to stop, reconnecting whenever the server goes away."""
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.ehlo("load.example.net")
                while not stop.is_set():
                    _one_transaction(smtp, ledger)
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)


Senders = Callable[[int], tuple[Ledger, Callable[[], None]]]


@pytest.fixture
def senders(settings: Settings) -> Iterator[Senders]:
    """Start sending clients; the function returned with their ledger stops them and waits
    for their last transactions to end, so that the ledger is final when it returns."""
    threads: list[threading.Thread] = []
    stop = threading.Event()

    def halt() -> None:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a sender did not finish its transaction"

    def start(port: int, count: int = 4) -> tuple[Ledger, Callable[[], None]]:
        ledger = Ledger()
        for _ in range(count):
            thread = threading.Thread(target=sender, args=(port, ledger, stop), daemon=True)
            thread.start()
            threads.append(thread)
        return ledger, halt

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=60)


def stored_message_ids(settings: Settings) -> list[str]:
    with closing(poplib.POP3("127.0.0.1", settings.pop3_port, timeout=60)) as pop:
        pop.user(USER)
        pop.pass_(PASSWORD)
        ids = []
        for i in range(1, pop.stat()[0] + 1):
            found = MESSAGE_ID.search(b"\r\n".join(pop.top(i, 0)[1]))
            assert found
            ids.append(found.group(1).decode())
        pop.quit()
    return ids


def assert_ledger_holds(settings: Settings, ledger: Ledger) -> None:
    """The ledger (final: its senders have stopped) against the mailbox. An empty queue is
    not yet a written mailbox: the store holds up to its prefetch of messages, unacked and
    not counted in the queue's depth, while it writes them. So the mailbox is read until it
    holds every 250 (or the time is up, and the assertion below names what is missing)."""
    stored: list[str] = []

    def settled() -> bool:
        stored[:] = stored_message_ids(settings)
        return ledger.accepted <= set(stored) and queue_depth(settings) == 0

    with contextlib.suppress(AssertionError):
        wait_until(settled, timeout=120, interval=0.5, what="every accepted message stored")
    assert len(stored) == len(set(stored)), "a message was delivered twice"
    missing = ledger.accepted - set(stored)
    assert not missing, f"{len(missing)} messages got 250 and were lost"
    assert set(stored) <= ledger.attempted
    bad = {c for c in ledger.codes if c != 250 and not 400 <= c < 500}
    assert not bad, f"permanent or odd replies during the fault: {bad}"


def test_filter_killed_mid_traffic_loses_no_accepted_message(
        settings: Settings, run_tier: Callable[..., TierProcess],
        senders: Senders) -> None:
    provision(settings)
    run_tier(settings, "store").wait_for_port(settings.pop3_port)
    first = run_tier(settings, "filter")
    first.wait_for_port(settings.smtp_port)
    ledger, stop = senders(settings.smtp_port)

    wait_until(lambda: len(ledger.accepted) >= 150, timeout=60, what="traffic before the kill")
    first.kill()
    accepted_at_kill = len(ledger.accepted)
    run_tier(settings, "filter").wait_for_port(settings.smtp_port)
    wait_until(lambda: len(ledger.accepted) >= accepted_at_kill + 150, timeout=60,
               what="traffic after the restart")
    stop()
    assert_ledger_holds(settings, ledger)


def ride_out(ledger: Ledger, stop: Callable[[], None], fault: Callable[[], None],
             recover: Callable[[], None]) -> None:
    """Traffic, the fault, 451 replies while it lasts, the cause removed, traffic again (the
    filter reconnects on its own), then the senders stopped."""
    wait_until(lambda: len(ledger.accepted) >= 150, timeout=60, what="traffic before the fault")
    fault()
    wait_until(lambda: ledger.count(451) >= 20, timeout=60, what="451 replies during the fault")
    accepted_during_fault = len(ledger.accepted)
    recover()
    wait_until(lambda: len(ledger.accepted) >= accepted_during_fault + 150, timeout=120,
               what="the filter to reconnect on its own")
    stop()


def start_with_broker_behind_proxy(settings: Settings,
                                   run_tier: Callable[..., TierProcess]) -> TcpProxy:
    """A provisioned store and filter, the filter reaching RabbitMQ through a proxy the test
    can cut (and restore) to take the broker away from it."""
    provision(settings)
    proxy = TcpProxy(5672)
    through_proxy = broker_at(settings, proxy.port, publish_timeout=5.0)
    run_tier(settings, "store").wait_for_port(settings.pop3_port)
    run_tier(through_proxy, "filter").wait_for_port(settings.smtp_port)
    return proxy


def test_broker_link_cut_mid_publish_gives_451_and_loses_nothing(
        settings: Settings, run_tier: Callable[..., TierProcess],
        senders: Senders) -> None:
    proxy = start_with_broker_behind_proxy(settings, run_tier)
    ledger, stop = senders(settings.smtp_port)
    try:
        ride_out(ledger, stop, fault=proxy.cut, recover=proxy.start)
    finally:
        proxy.cut()
    assert_ledger_holds(settings, ledger)


def test_broker_killed_mid_traffic_keeps_every_accepted_message(
        settings: Settings, run_tier: Callable[..., TierProcess],
        senders: Senders) -> None:
    """A 250 means the broker has the message on disk: its Erlang VM SIGKILLed while four
    clients send (publishes unconfirmed, deliveries unacked), then restarted; every message
    that got 250 reaches the mailbox once, and the tiers reconnect on their own."""
    with stack_on_private_broker(settings, run_tier, publish_timeout=5.0) as (own, broker):
        ledger, stop = senders(own.smtp_port)
        ride_out(ledger, stop, fault=broker.kill, recover=broker.start)
        assert_ledger_holds(own, ledger)


@contextlib.contextmanager
def stack_on_private_broker(settings: Settings, run_tier: Callable[..., TierProcess],
                            publish_timeout: float) -> Iterator[tuple[Settings, PrivateBroker]]:
    """A provisioned store and filter on a RabbitMQ node of the test's own, which the test
    may kill or put in an alarm."""
    broker = PrivateBroker()
    broker.start()
    try:
        own = settings.replace(amqp_url=broker.url, publish_timeout=publish_timeout)
        provision(own)
        run_tier(own, "store").wait_for_port(own.pop3_port)
        run_tier(own, "filter").wait_for_port(own.smtp_port)
        yield own, broker
    finally:
        broker.stop()


def mail_from_code(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("client.example.net")
        return smtp.mail("sender@example.net")[0]


def test_a_broker_resource_alarm_refuses_mail_at_once_until_it_clears(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """RabbitMQ blocks publishers while its disk is low (where mail piles up while the store
    is down for long). The first message to meet the alarm waits out its confirm timeout
    for a 451; after it, senders get 451 at MAIL FROM, before the upload, until the broker
    confirms again; then mail flows, and every 250 is in the mailbox once."""
    with stack_on_private_broker(settings, run_tier, publish_timeout=3.0) as (own, broker):
        ledger = Ledger()

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", own.smtp_port, timeout=60) as smtp:
                smtp.ehlo("client.example.net")
                _one_transaction(smtp, ledger)

        send()
        broker.set_disk_alarm(True)
        send()
        assert ledger.codes == [250, 451]
        assert [mail_from_code(own.smtp_port) for _ in range(3)] == [451] * 3
        wait_until(lambda: "does not confirm its publishes" in run_cli(own, "status").stdout,
                   what="tiermail status to name the stalled filter")
        broker.set_disk_alarm(False)
        wait_until(lambda: mail_from_code(own.smtp_port) == 250, timeout=60,
                   what="the filter to take mail again")
        send()
        send()
        assert ledger.codes == [250, 451, 250, 250]
        assert_ledger_holds(own, ledger)


# Redis down (ARCHITECTURE.md, failure contract): RCPT cannot be checked, so the filter answers
# 451 and accepts nothing; IMAP and POP3 keep serving, and mail already in the queue is still
# delivered. Redis is taken away through a proxy twice: gone (connections reset, new ones
# refused) and hung (connections open, nothing answered), which only timeouts can catch.

def rcpt_reply(settings: Settings) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example.net")
        code, reply = smtp.mail("sender@example.net")
        assert code == 250, reply
        return smtp.rcpt(USER)


def send_one(settings: Settings, sent: list[str]) -> None:
    msgid = f"<{uuid.uuid4().hex}@redis.example.net>"
    data = (f"From: sender@example.net\r\nTo: {USER}\r\nSubject: redis away\r\n"
            f"Message-ID: {msgid}\r\n\r\nbody\r\n").encode()
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=60) as smtp:
        smtp.sendmail("sender@example.net", [USER], data)
    sent.append(msgid)


def mailboxes_serve(settings: Settings, expected: int) -> None:
    """Log in over IMAP and POP3, read every message, append one over IMAP (then delete it).
    First the mailbox must hold `expected`: the store writes the last messages it took after
    the queue is empty."""
    wait_until(lambda: len(stored_message_ids(settings)) >= expected, timeout=60,
               what=f"{expected} messages in the mailbox")
    with IMAPClient("127.0.0.1", settings.imap_port, ssl=False, timeout=60) as imap:
        imap.login(USER, PASSWORD)
        assert imap.select_folder("INBOX")[b"EXISTS"] == expected
        bodies = imap.fetch(imap.search("ALL"), ["BODY.PEEK[]"])
        assert len(bodies) == expected
        appended = imap.append("Drafts", b"Subject: draft\r\n\r\nwritten while Redis is away\r\n")
        assert b"APPENDUID" in appended
        imap.select_folder("Drafts")
        imap.delete_messages(imap.search("ALL"))
        imap.expunge()
    with closing(poplib.POP3("127.0.0.1", settings.pop3_port, timeout=60)) as pop:
        pop.user(USER)
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == expected
        assert pop.retr(expected)[0].startswith(b"+OK")
        pop.quit()


def test_redis_away_means_451_while_mailboxes_and_delivery_go_on(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    provision(settings)
    proxy = TcpProxy(6379)
    through_proxy = redis_at(settings, proxy.port)
    sent: list[str] = []
    try:
        run_tier(through_proxy, "filter").wait_for_port(settings.smtp_port)
        store = run_tier(through_proxy, "store")
        store.wait_for_port(settings.pop3_port)
        send_one(settings, sent)
        store.stop()
        for _ in range(5):
            send_one(settings, sent)  # queued in RabbitMQ while the store is down

        proxy.cut()  # Redis gone
        wait_until(lambda: rcpt_reply(settings)[0] == 451, timeout=60, what="451 at RCPT")
        code, reply = rcpt_reply(settings)
        assert (code, reply[:5]) == (451, b"4.3.0"), reply
        restarted = run_tier(through_proxy, "store")  # starts without Redis
        restarted.wait_for_port(settings.pop3_port)
        restarted.wait_for_port(settings.imap_port)
        wait_until(lambda: queue_depth(settings) == 0, timeout=60, what="the queue to drain")
        mailboxes_serve(settings, expected=len(sent))

        proxy.start()  # Redis back: everything recovers on its own
        wait_until(lambda: rcpt_reply(settings)[0] == 250, timeout=60, what="250 at RCPT")
        send_one(settings, sent)

        proxy.hang()  # Redis hung
        wait_until(lambda: rcpt_reply(settings)[0] == 451, timeout=120, what="451 at RCPT")
        wait_until(lambda: queue_depth(settings) == 0, timeout=60, what="the queue to drain")
        mailboxes_serve(settings, expected=len(sent))

        proxy.resume()
        wait_until(lambda: rcpt_reply(settings)[0] == 250, timeout=60, what="250 at RCPT")
        send_one(settings, sent)
        wait_until(lambda: queue_depth(settings) == 0, timeout=60, what="the queue to drain")
        with contextlib.suppress(AssertionError):  # written after the queue is empty
            wait_until(lambda: len(stored_message_ids(settings)) >= len(sent), timeout=60,
                       what="the last message in the mailbox")
    finally:
        proxy.cut()
        proxy.resume()
    stored = stored_message_ids(settings)
    assert sorted(stored) == sorted(sent), "a 250 message lost or one delivered twice"


@pytest.mark.parametrize("retried_at", ["replacement", "running sibling"])
def test_a_retry_of_a_message_its_filter_was_killed_publishing_is_one_copy(
        settings: Settings, run_tier: Callable[..., TierProcess], retried_at: str) -> None:
    """The worst moment for a filter to die: the broker has persisted the publish, the
    confirm is on its way, the client has no reply. The client sends the message again
    (RFC 5321 4.5.4.1); the filter that takes the retry must publish it under the first
    attempt's queue id (services/filter/inflight.py), so the store delivers one copy.
    Before, the retry was a second copy. The killed worker's file is adopted by a
    replacement at its start, and by a worker already running within ADOPT_INTERVAL."""
    provision(settings)
    proxy = TcpProxy(5672)
    store = run_tier(settings, "store")
    store.wait_for_port(settings.pop3_port)
    first = run_tier(broker_at(settings, proxy.port, publish_timeout=30.0), "filter")
    first.wait_for_port(settings.smtp_port)
    sibling_settings = settings.replace(smtp_port=free_port())
    if retried_at == "running sibling":
        sibling = run_tier(sibling_settings, "filter")
        sibling.wait_for_port(sibling_settings.smtp_port)
    content = (f"From: sender@example.net\r\nTo: {USER}\r\nSubject: retried\r\n"
               f"Date: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
               f"Message-ID: <{uuid.uuid4().hex}@example.net>\r\n\r\nbody\r\n").encode()

    def send(port: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            return smtp.sendmail("sender@example.net", [USER], content) and 0 or 250

    outcome: list[BaseException] = []

    def first_attempt() -> None:
        try:
            send(settings.smtp_port)
        except BaseException as exc:  # noqa: BLE001 - what the client saw is the result
            outcome.append(exc)

    try:
        proxy.hold_replies()
        attempt = threading.Thread(target=first_attempt, daemon=True)
        attempt.start()
        wait_until(lambda: len(stored_message_ids(settings)) == 1, timeout=60,
                   what="the first attempt persisted and stored, its confirm held")
        first.kill()
        attempt.join(timeout=60)
        assert outcome and isinstance(outcome[0], smtplib.SMTPServerDisconnected), outcome
    finally:
        proxy.cut()
    if retried_at == "running sibling":
        wait_until(lambda: "inflight-adopted" in sibling.output(), timeout=60,
                   what="the killed worker's file adopted by the running worker")
    else:
        run_tier(sibling_settings, "filter").wait_for_port(sibling_settings.smtp_port)
    assert send(sibling_settings.smtp_port) == 250
    wait_until(lambda: "already delivered" in store.output(), timeout=60,
               what="the retry seen by the store")
    assert len(stored_message_ids(settings)) == 1
