"""Accepted mail reaches the deliver queue byte for byte, with a correct envelope."""

from __future__ import annotations

import socket
import time

import redis.asyncio

from common.directory import Directory
from common.envelope import Recipient
from services.filter.main import FilterWorker
from services.filter.protocol import replies
from tests.integration.filter.conftest import (
    ALICE,
    BOB,
    SENDER,
    TEAM,
    connect,
    drain_queue,
    in_thread,
    message,
    send,
    split_received,
    unverified_context,
)


async def test_plain_message_is_queued_with_exact_bytes(worker: FilterWorker) -> None:
    before = time.time()
    raw = message("plain")
    refused = await in_thread(send, worker.ports[0], raw, [ALICE])
    assert refused == {}
    [queued] = await drain_queue(worker.settings)
    received, rest = split_received(queued.body)
    assert rest == raw
    env = queued.envelope
    assert env.mail_from == SENDER
    assert env.recipients == (Recipient(ALICE, (ALICE,)),)
    assert env.client_ip == "127.0.0.1"
    assert env.client_helo == "client.remote.test"
    assert env.tls is None
    assert env.smtputf8 is False and env.body_8bit is False
    assert env.size == len(queued.body)
    assert before <= env.received_at <= time.time()
    assert f"id {env.queue_id}".encode() in received
    assert f"for <{ALICE}>".encode() in received
    assert b"by mx.test.invalid (tiermail) with ESMTP " in received
    assert worker.stats.accepted == 1


async def test_authentication_results_in_our_name_are_removed(worker: FilterWorker) -> None:
    """RFC 8601 section 5: a field claiming our authserv-id (the host name) or the domain the
    mail is for is deleted before the message is queued, so no client shows a sender's own
    `dmarc=pass` as ours; another ADMD's field stays, byte for byte, as does the body."""
    foreign = b"Authentication-Results: mx.remote.test; spf=pass smtp.mailfrom=remote.test\r\n"
    by_host = b"Authentication-Results: mx.test.invalid; dmarc=pass\r\n"
    by_domain = (b"Authentication-Results: (ours?) example.test;\r\n"
                 b"\tdkim=pass header.d=bank.test\r\n")
    body = b"Authentication-Results: mx.test.invalid; spf=pass\r\n"
    raw = message("forged results", body)
    headers, _, _ = raw.partition(b"\r\n\r\n")
    sent = by_host + headers + b"\r\n" + foreign + by_domain + b"\r\n" + body
    assert await in_thread(send, worker.ports[0], sent, [ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    _, rest = split_received(queued.body)
    assert rest == headers + b"\r\n" + foreign + b"\r\n" + body
    assert queued.envelope.size == len(queued.body)


async def test_results_in_the_name_of_the_mailboxes_domain_are_removed_via_an_alias(
        worker: FilterWorker) -> None:
    """Sent to an alias whose mailbox is in another of our domains, a sender's `dmarc=pass`
    in that domain's name reached the mailbox: only the RCPT addresses' domains counted
    (found in review; so with a bare `postmaster`)."""
    client = redis.asyncio.Redis.from_url(worker.settings.redis_url)
    try:
        directory = Directory(client, worker.settings.redis_prefix)
        await directory.add_domain("other.test")
        await directory.add_user("eve@other.test")
        await directory.set_alias("fwd@example.test", ["eve@other.test"])
    finally:
        await client.aclose()
    forged = (b"Authentication-Results: other.test; dmarc=pass\r\n"
              b"Authentication-Results: mx.other.test; dkim=pass\r\n")
    foreign = b"Authentication-Results: mx.remote.test; spf=pass\r\n"
    raw = message("forged via an alias")
    assert await in_thread(send, worker.ports[0], forged + foreign + raw,
                           ["fwd@example.test"]) == {}
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.recipients == (Recipient("fwd@example.test", ("eve@other.test",)),)
    _, rest = split_received(queued.body)
    assert rest == foreign + raw


async def test_a_return_path_the_sender_wrote_is_removed(worker: FilterWorker) -> None:
    """RFC 5321 4.4: the final delivery adds Return-Path (the store), an originating system
    should send none; the sender's stood below ours (found in review)."""
    raw = message("forged return path", b"Return-Path: <in the body stays>\r\n")
    forged = b"Return-Path: <forged@evil.test>\r\nreturn-path :\r\n <x@evil.test>\r\n"
    assert await in_thread(send, worker.ports[0], forged + raw, [ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    _, rest = split_received(queued.body)
    assert rest == raw
    # The header ends before a line that is no field, blank line or not: one in the body
    # stays (it was removed: found in review).
    unblank = b"Subject: s\r\nno field here\r\nReturn-Path: <body@stays.test>\r\n"
    assert await in_thread(send, worker.ports[0], unblank, [ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    assert split_received(queued.body)[1] == unblank


async def test_scan_fields_only_we_write_are_removed(worker: FilterWorker) -> None:
    """A sender's `X-Tiermail-Scan: scanned clean` went through, ahead of what a client rule
    might test (found in review). Ours are removed from every message; with no spam scanner
    here, X-Spam-* are not ours to remove (an upstream filter's, if any)."""
    forged = (b"X-Tiermail-Scan: scanned\r\n clean\r\nx-tiermail-virus: none\r\n"
              b"X-Spam-Status: No, score=-100 required=5\r\n")
    body = b"X-Tiermail-Scan: in the body stays\r\n"
    raw = message("forged scan", body)
    headers, _, _ = raw.partition(b"\r\n\r\n")
    assert await in_thread(send, worker.ports[0], forged + headers + b"\r\n\r\n" + body,
                           [ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    _, rest = split_received(queued.body)
    assert rest == (b"X-Spam-Status: No, score=-100 required=5\r\n" + headers
                    + b"\r\n\r\n" + body)


async def test_a_body_that_starts_with_fields_we_remove_stays_whole_after_a_removal(
        worker: FilterWorker) -> None:
    """Each removal stops at the header's end, moved up by what the removals before it
    took: left where it was, the next one reached into the body by as much and took a
    Return-Path or scan field line from it."""
    forged = b"Authentication-Results: mx.test.invalid; dmarc=pass\r\n"
    raw = message("a removal, then the body",
                  b"Return-Path: <body@stays.test>\r\nX-Tiermail-Scan: in the body\r\n")
    assert await in_thread(send, worker.ports[0], forged + raw, [ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    assert split_received(queued.body)[1] == raw


async def test_reply_is_queued_with_the_queue_id(worker: FilterWorker) -> None:
    def transaction() -> tuple[int, bytes]:
        with connect(worker.ports[0]) as client:
            client.mail(SENDER)
            client.rcpt(ALICE)
            return client.data(message("reply"))

    code, text = await in_thread(transaction)
    [queued] = await drain_queue(worker.settings)
    assert f"{code} {text.decode()}" == replies.queued(queued.envelope.queue_id)


async def test_alias_expands_to_mailboxes_and_two_recipients(worker: FilterWorker) -> None:
    raw = message("alias")
    assert await in_thread(send, worker.ports[0], raw, [TEAM, ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    env = queued.envelope
    assert env.recipients == (Recipient(TEAM, (ALICE, BOB)), Recipient(ALICE, (ALICE,)))
    assert env.mailboxes == (ALICE, BOB)
    received, rest = split_received(queued.body)
    assert rest == raw
    assert b"for <" not in received  # only named for a single recipient


async def test_8bit_body_passes_unchanged(worker: FilterWorker) -> None:
    raw = message("8bit", "Grüße aus Köln — ça va?\r\n".encode() + bytes(range(128, 256)) + b"\r\n")
    refused = await in_thread(
        send, worker.ports[0], raw, [ALICE], mail_options=("BODY=8BITMIME",)
    )
    assert refused == {}
    [queued] = await drain_queue(worker.settings)
    assert split_received(queued.body)[1] == raw
    assert queued.envelope.body_8bit is True
    assert queued.envelope.smtputf8 is False


async def test_smtputf8_sender_and_headers(worker: FilterWorker) -> None:
    sender = "jürgen@bücher.test"
    raw = (
        f"From: Jürgen <{sender}>\r\nTo: {ALICE}\r\nSubject: Grüße\r\n\r\nHallo\r\n"
    ).encode()
    refused = await in_thread(
        send, worker.ports[0], raw, [ALICE], sender=sender,
        mail_options=("SMTPUTF8", "BODY=8BITMIME"),
    )
    assert refused == {}
    [queued] = await drain_queue(worker.settings)
    received, rest = split_received(queued.body)
    assert rest == raw
    assert b" with UTF8SMTP " in received
    assert queued.envelope.mail_from == sender
    assert queued.envelope.smtputf8 is True


async def test_an_internationalized_domain_is_found_in_either_form(
        worker: FilterWorker) -> None:
    """The domain is stored in its xn-- form; an SMTPUTF8 client may name it in Unicode.
    Before, `x@bücher.example` was "not local" and got 554 5.7.1: a bounce for our mail."""
    client = redis.asyncio.Redis.from_url(worker.settings.redis_url)
    try:
        directory = Directory(client, worker.settings.redis_prefix)
        await directory.add_domain("Bücher.example")
        await directory.add_user("x@bücher.example")
    finally:
        await client.aclose()
    raw = message("idn")
    refused = await in_thread(send, worker.ports[0], raw,
                              ["x@bücher.example", "x@XN--BCHER-KVA.example"],
                              mail_options=("SMTPUTF8",))
    assert refused == {}
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.mailboxes == ("x@xn--bcher-kva.example",)


async def test_null_sender_is_accepted(worker: FilterWorker) -> None:
    assert await in_thread(send, worker.ports[0], message("bounce"), [ALICE], sender="<>") == {}
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.mail_from == ""


async def test_20_megabyte_message_end_to_end(worker: FilterWorker) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-=+.,:;!?/()[]\r\n"
    body = line * (20 * 1024 * 1024 // len(line) + 1)
    body = body.replace(b"\r\n0123", b"\r\n.123", 1000)  # some lines that need dot-stuffing
    raw = message("big", body)
    assert len(raw) > 20 * 1024 * 1024
    assert await in_thread(send, worker.ports[0], raw, [ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    received, rest = split_received(queued.body)
    assert len(rest) == len(raw) and rest == raw
    assert queued.envelope.size == len(queued.body)


async def test_starttls_sets_envelope_tls(worker: FilterWorker) -> None:
    def transaction() -> tuple[set[str], set[str]]:
        with connect(worker.ports[0]) as client:
            before = set(client.esmtp_features)
            code, _ = client.starttls(context=unverified_context())
            assert code == 220
            client.ehlo()
            after = set(client.esmtp_features)
            client.sendmail(SENDER, [ALICE], message("tls"))
            return before, after

    before, after = await in_thread(transaction)
    assert "starttls" in before
    assert "starttls" not in after and "auth" not in after
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.tls is not None and queued.envelope.tls.startswith("TLSv1.")
    assert b" with ESMTPS (TLSv1." in split_received(queued.body)[0]


async def test_ehlo_advertises_extensions(worker: FilterWorker) -> None:
    def ehlo() -> tuple[int, bytes]:
        with connect(worker.ports[0]) as client:
            return client.ehlo()

    code, text = await in_thread(ehlo)
    assert code == 250
    lines = text.decode().split("\n")
    assert lines[0] == "mx.test.invalid"
    assert lines[1:] == [
        f"SIZE {worker.settings.max_message_size}", "8BITMIME", "SMTPUTF8", "STARTTLS",
        "PIPELINING", "ENHANCEDSTATUSCODES",
    ]


def _half_closed_session(port: int, commands: bytes) -> list[bytes]:
    """Send a whole session in one write, close the sending side (what `printf ... | nc -N`
    does), and read every reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(commands)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(65536):
            received += data
    return [line[:3] for line in received.split(b"\r\n") if line[3:4] == b" "]


async def test_a_client_that_half_closes_still_gets_its_replies(worker: FilterWorker) -> None:
    """The commands sent before the EOF are answered, the message queued once, and the 250
    says so (it used to be cut off mid-publish: delivered, unanswered, sent again)."""
    transaction = (f"EHLO client.remote.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\n"
                   "DATA\r\n").encode() + message("half-closed") + b".\r\n"
    with_quit = await in_thread(_half_closed_session, worker.ports[0],
                                transaction + b"QUIT\r\n")
    without_quit = await in_thread(_half_closed_session, worker.ports[0], transaction)
    assert with_quit == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert without_quit == [b"220", b"250", b"250", b"250", b"354", b"250"]
    assert len(await drain_queue(worker.settings)) == 2


async def test_a_client_that_half_closes_mid_data_queues_nothing(worker: FilterWorker) -> None:
    unfinished = (f"EHLO client.remote.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\n"
                  "DATA\r\n").encode() + message("cut short")
    replies_seen = await in_thread(_half_closed_session, worker.ports[0], unfinished)
    partial = await in_thread(_half_closed_session, worker.ports[0], b"EHLO x\r\nNOO")
    assert replies_seen == [b"220", b"250", b"250", b"250", b"354"]
    assert partial == [b"220", b"250"]
    assert await drain_queue(worker.settings) == []
