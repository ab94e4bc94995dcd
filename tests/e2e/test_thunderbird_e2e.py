"""Thunderbird writes mail through the filter tier and reads it from the store: real
`tiermail filter` and `tiermail store` processes, the real broker and Redis.

alice's Thunderbird sends to bob and to a group alias over STARTTLS to the filter (local
recipients: no login needed), and saves its copy in Sent over IMAP. bob's mailbox holds the
message once, byte for byte what Thunderbird composed plus the headers the filter and the
store add; alice's Sent holds the same message; the alias reached both.
"""

from __future__ import annotations

import email
import email.policy
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from common.settings import Settings
from tests.e2e.test_inbound_spine import PASSWORD, provision
from tests.integration.thunderbird import THUNDERBIRD, Thunderbird, outgoing_prefs
from tests.support import TierProcess, require_client, wait_until

ALICE, BOB, TEAM = "alice@example.org", "bob@example.org", "team@example.org"
SUBJECT = "Grüße über Thunderbird"
BODY = "Hallo Bob,\n\ndiese Nachricht kam über den Filter.\n"
TRACE = re.compile(r"Return-Path: <alice@example\.org>\r\nDelivered-To: bob@example\.org\r\n"
                   r"Received: from [^\r]+\r\n(\t[^\r]+\r\n)+")


@pytest.fixture
def stack(settings: Settings, run_tier: Callable[..., TierProcess]) -> Settings:
    require_client(THUNDERBIRD, "thunderbird")
    provision(settings)  # alice and bob; team@ -> both
    run_tier(settings, "store").wait_for_port(settings.imap_port)
    run_tier(settings, "filter").wait_for_port(settings.smtp_port)
    return settings


@pytest.fixture
def thunderbird(stack: Settings, tmp_path: Path) -> Iterator[Thunderbird]:
    client = Thunderbird(tmp_path / "thunderbird", port=stack.imap_port, user=ALICE,
                         extra_prefs=outgoing_prefs(stack.smtp_port))
    client.start()
    try:
        pem = Path(stack.tls_cert).read_text()
        client.trust_certificate(pem)
        client.trust_certificate(pem, port=stack.smtp_port)
        client.login(PASSWORD)
        yield client
    finally:
        client.stop()


def messages(settings: Settings, user: str, folder: str) -> list[bytes]:
    with IMAPClient("127.0.0.1", settings.imap_port, ssl=False, timeout=30) as imap:
        imap.login(user, PASSWORD)
        imap.select_folder(folder, readonly=True)
        fetched = imap.fetch(imap.search("ALL"), ["BODY.PEEK[]"])
        return [data[b"BODY[]"] for _, data in sorted(fetched.items())]


def decoded_subject(message: bytes) -> str:
    return str(email.message_from_bytes(message, policy=email.policy.default)["Subject"])


def test_thunderbird_sends_through_the_filter_and_files_in_sent(
        stack: Settings, thunderbird: Thunderbird) -> None:
    marker = uuid.uuid4().hex
    thunderbird.step("send", to=f"Bob <{BOB}>", subject=f"{SUBJECT} {marker}", body=BODY)

    wait_until(lambda: len(messages(stack, BOB, "INBOX")) == 1, timeout=60,
               what="Thunderbird's message in bob's INBOX")
    [received] = messages(stack, BOB, "INBOX")
    [sent] = messages(stack, ALICE, "Sent")
    assert decoded_subject(sent) == f"{SUBJECT} {marker}"
    # bob got exactly what Thunderbird composed and filed in Sent, below the trace headers
    # added on the way: Return-Path and Delivered-To by the store, Received by the filter.
    assert received.endswith(sent)
    trace = received[:-len(sent)].decode()
    assert TRACE.fullmatch(trace), trace
    assert "with ESMTPS (TLS" in trace  # it used STARTTLS
    assert "from [127.0.0.1] ([127.0.0.1])" in trace  # its address-literal EHLO, kept

    thunderbird.step("send", to=TEAM, subject=f"to the team {marker}", body="Hello, team.\n")
    for user in (ALICE, BOB):
        wait_until(lambda user=user: any(decoded_subject(m) == f"to the team {marker}"
                                         for m in messages(stack, user, "INBOX")),
                   timeout=60, what=f"the alias's copy for {user}")
