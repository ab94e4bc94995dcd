"""The internet's side of the failure contract, with a real sending MTA: a Postfix of the
test's own (tests/postfix.py) relays example.org to the filter tier, over STARTTLS.

What the contract promises senders: a 4xx when tiermail cannot take the message safely, so
the sender keeps it and tries again, and a 5xx only when the message can never be
delivered. Here Postfix meets both: with the broker unreachable the filter answers 451
4.3.0 at MAIL FROM (before the message is sent), Postfix defers and retries, and once the
broker is back every message arrives exactly once; a message for an unknown user gets 550
5.1.1 and is bounced at once, not retried.
"""

from __future__ import annotations

import os
import smtplib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from common.settings import Settings
from tests.e2e.test_failure_contract import (
    USER,
    mail_from_code,
    start_with_broker_behind_proxy,
    stored_message_ids,
)
from tests.postfix import POSTFIX, PostfixRelay
from tests.support import TierProcess, require_client, show_on_failure, wait_until


@pytest.fixture
def relay_to(request: pytest.FixtureRequest) -> Iterator[Callable[[int], PostfixRelay]]:
    require_client(POSTFIX, "postfix")
    if os.geteuid() != 0:
        # Not an install step: CI and `make test` on a new machine run as root.
        message = "Postfix's master starts its daemons as the postfix user: needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    relays: list[PostfixRelay] = []

    def start(filter_port: int) -> PostfixRelay:
        relay = PostfixRelay(domain="example.org", next_hop_port=filter_port)
        relays.append(relay)
        show_on_failure(request.node, f"Postfix relay to port {filter_port} maillog", relay.log)
        relay.start()
        return relay

    yield start
    for relay in relays:
        relay.stop()


def submit(relay: PostfixRelay, recipient: str = USER) -> str:
    """Hand one message to Postfix (which answers 250 itself and queues it)."""
    msgid = f"<{uuid.uuid4().hex}@sender.example.net>"
    data = (f"From: sender@example.net\r\nTo: {recipient}\r\nSubject: via Postfix\r\n"
            f"Message-ID: {msgid}\r\n\r\nRelayed by a real MTA.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as smtp:
        smtp.sendmail("sender@example.net", [recipient], data)
    return msgid


def statuses(relay: PostfixRelay, recipient: str) -> list[tuple[str, str]]:
    return [(status, detail) for to, status, detail in relay.deliveries() if to == recipient]


def test_postfix_retries_a_451_and_bounces_a_550(
        settings: Settings, run_tier: Callable[..., TierProcess],
        relay_to: Callable[[int], PostfixRelay]) -> None:
    broker = start_with_broker_behind_proxy(settings, run_tier)
    relay = relay_to(settings.smtp_port)

    first = submit(relay)
    wait_until(lambda: first in stored_message_ids(settings), timeout=60,
               what="the first relayed message in the mailbox")
    assert "TLS connection established to 127.0.0.1" in relay.log()

    broker.cut()
    try:
        # The filter learns of the cut when its AMQP connection drops, a moment after the
        # cut; a message that reaches it before then is refused after the upload instead.
        wait_until(lambda: mail_from_code(settings.smtp_port) == 451, timeout=30,
                   what="the filter to notice the broker is gone")
        held = [submit(relay) for _ in range(3)]
        wait_until(lambda: len([s for s in statuses(relay, USER) if s[0] == "deferred"]) >= 3,
                   timeout=60, what="Postfix to defer the messages")
        # Refused before the upload: the filter knows the broker is gone.
        assert all("451 4.3.0" in detail and "in reply to MAIL FROM command" in detail
                   for status, detail in statuses(relay, USER) if status == "deferred"), \
            relay.log()
        assert relay.queued() == 3  # Postfix keeps them
        assert stored_message_ids(settings) == [first]
    finally:
        broker.start()

    # Postfix retries on its own (every second here). Its queue manager can, though, take a
    # deferred message up while the delivery agent that deferred it still holds its lock
    # ("skipped, still being delivered", seen under load): it then puts it aside and
    # rescans it only when other mail or a flush arrives. So after 10 s, a flush (what an
    # operator would run) covers that case.
    wait_until(lambda: mail_from_code(settings.smtp_port) == 250, timeout=60,
               what="the filter to take mail again")
    waiting_since = time.monotonic()

    def retried() -> bool:
        if relay.queued() == 0:
            return True
        if time.monotonic() - waiting_since > 10:
            relay.flush()
        return False

    wait_until(retried, timeout=90, interval=1.0, what="Postfix's retries to succeed")
    # Postfix's queue empties at the filter's 250, when the message is in RabbitMQ; the
    # store writes it a moment later.
    wait_until(lambda: len(stored_message_ids(settings)) >= 4, timeout=60,
               what="the retried messages in the mailbox")
    stored = stored_message_ids(settings)
    assert sorted(stored) == sorted([first, *held])  # each exactly once

    unknown = "nobody@example.org"
    submit(relay, unknown)
    wait_until(lambda: statuses(relay, unknown), timeout=60, what="Postfix to try nobody@")
    status, detail = statuses(relay, unknown)[0]
    assert status == "bounced" and "550 5.1.1" in detail, relay.log()
