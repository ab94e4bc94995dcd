"""RFC conformance of the filter's SMTP dialogue, one test per requirement not covered by the
other filter tests. docs/smtp-conformance.md lists every requirement with the test that
covers it."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

from common.settings import Settings
from services.filter.main import FilterWorker
from services.filter.protocol import replies
from tests.integration.filter.conftest import (
    ALICE,
    SENDER,
    RawClient,
    drain_queue,
    in_thread,
    message,
    queue_depth,
    running_filter,
    send,
    split_received,
)
from tests.integration.filter.test_refusals import raw_dialog
from tests.support import TierProcess, wait_until

# RFC 2034 section 4 and RFC 3463: a reply code, then an enhanced code of the same class.
ENHANCED = re.compile(r"^([245])\d\d [245]\.\d{1,3}\.\d{1,3} ")


def codes(answers: list[str]) -> list[str]:
    return [answer[:9] for answer in answers]


async def test_reply_codes_per_command(worker: FilterWorker) -> None:
    """RFC 5321 4.3.2 (the replies of each command), 4.1.1 (arguments each command takes), 2.4
    (verbs in any case) and
    RFC 2034 section 4 (every 2xx/4xx/5xx reply but the greeting and HELO/EHLO's 250 has an
    enhanced code of its own class)."""
    mail = f"MAIL FROM:<{SENDER}>".encode()
    lines = [
        b"EHLO", b"HELO", mail, b"RCPT TO:<" + ALICE.encode() + b">", b"DATA",
        b"EHLO client.remote.test", b"NOOP ignored argument", b"RSET now", b"QUIT now",
        b"VRFY", b"EXPN staff", b"HELP", b"STARTTLS now", b"AUTH PLAIN", b"TURN",
        b"mail from:<" + SENDER.encode() + b">", b"DATA", b"rcpt to:<" + ALICE.encode() + b">",
        b"DATA now", b"RSET",
        b"RCPT TO:<" + ALICE.encode() + b">",
    ]
    answers = await in_thread(raw_dialog, worker.ports[0], lines)
    assert [answer[:3] for answer in answers] == [
        "501", "501", "503", "503", "503",
        "250", "250", "501", "501",
        "501", "502", "214", "501", "502", "500",
        "250", "503", "250", "501", "250",
        "503",
    ], answers
    for line, answer in zip(lines, answers, strict=True):
        last = answer.splitlines()[-1]
        if line.startswith(b"EHLO ") and last.startswith("250"):
            continue  # RFC 2034 4: the EHLO reply has none
        match = ENHANCED.match(last)
        assert match is not None and last[4] == match.group(1), (line, answer)


async def test_a_non_ascii_ehlo_argument_is_501_and_the_received_header_stays_ascii(
        worker: FilterWorker) -> None:
    """RFC 6531 3.7.1: SMTPUTF8 is not negotiated yet when EHLO is sent, so its domain is
    ASCII (an IDN as A-labels); RFC 5321 4.1.2: a command with characters a domain may not
    have MUST get 501. A UTF-8 EHLO or HELO name was taken (250), and then the Received header
    showed it as "?"s, or, in an SMTPUTF8 transaction, raw. Now 501 5.5.2; the A-label form
    is taken and is what the Received header shows."""
    lines = [
        "EHLO bücher.example".encode(),
        "HELO bücher.example".encode(),
        b"EHLO xn--bcher-kva.example",
        b"MAIL FROM:<" + SENDER.encode() + b"> SMTPUTF8",
        b"RCPT TO:<" + ALICE.encode() + b">",
        b"DATA", message("a-label helo") + b".",
    ]
    answers = await in_thread(raw_dialog, worker.ports[0], lines)
    assert codes(answers[:2]) == ["501 5.5.2", "501 5.5.2"], answers
    assert [answer[:3] for answer in answers[2:]] == ["250", "250", "250", "354", "250"]
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.client_helo == "xn--bcher-kva.example"
    assert split_received(queued.body)[0].startswith(
        b"Received: from xn--bcher-kva.example ([127.0.0.1])")


async def test_a_malformed_sender_is_5_1_7_and_a_malformed_recipient_5_1_3(
        worker: FilterWorker) -> None:
    """RFC 3463 3.2: X.1.7 is a bad sender's address syntax, X.1.3 a bad destination's.
    Both were 553 5.1.3 (aiosmtpd's one text for MAIL and RCPT)."""
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test",
        b"MAIL FROM:<a b@remote.test>",
        b"MAIL FROM:<" + SENDER.encode() + b">",
        b"RCPT TO:<a b@example.test>",
    ])
    assert answers[1:] == [replies.BAD_SENDER_SYNTAX, replies.SENDER_OK,
                           "553 5.1.3 Error: malformed address"], answers


async def test_a_bare_postmaster_is_a_recipient_never_a_sender(worker: FilterWorker) -> None:
    """RFC 5321 4.1.1.2: a reverse-path is a mailbox with a domain or <>; the bare
    <Postmaster> is in RCPT's grammar only (4.1.1.3). The sender <postmaster> was taken,
    and the mailbox got `Return-Path: <postmaster>`, while <abuse> was refused (found in
    review)."""
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test",
        b"MAIL FROM:<postmaster>",
        b"MAIL FROM:<POSTMASTER> SIZE=10",
        b"MAIL FROM:<postmaster@remote.test>",
    ])
    assert answers[1:] == [replies.BAD_SENDER_SYNTAX, replies.BAD_SENDER_SYNTAX,
                           replies.SENDER_OK], answers


async def test_a_mail_inside_a_transaction_is_503_whatever_its_path(
        worker: FilterWorker) -> None:
    """RFC 5321 3.3 and 4.1.4: MAIL inside a transaction is a bad sequence, 503. aiosmtpd
    reads the path before it looks for a transaction: a malformed one got 553 5.1.3, a
    recipient's syntax code (RFC 3463 3.2) on a MAIL reply. The transaction is left as it
    was."""
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test",
        b"MAIL FROM:<" + SENDER.encode() + b">",
        b"MAIL FROM:<a b@remote.test>",
        b"MAIL FROM:<\xff@remote.test>",
        b"MAIL FROM:<" + SENDER.encode() + b">",
        b"MAIL FROM:<>",
        b"RCPT TO:<" + ALICE.encode() + b">",
    ])
    assert answers[1:] == [replies.SENDER_OK, *[replies.NESTED_MAIL] * 4,
                           replies.RECIPIENT_OK], answers


async def test_body_values_of_extensions_not_offered_are_555(worker: FilterWorker) -> None:
    """RFC 6152: BODY=7BIT and BODY=8BITMIME. RFC 3030: BODY=BINARYMIME only with BINARYMIME
    (and CHUNKING) advertised, which we do not: a parameter we cannot implement, 555
    (RFC 5321 4.1.1.11; it was aiosmtpd's 501 syntax error). A value no extension defines
    stays 501. RFC 6531 3.4: SMTPUTF8 takes no value (501); RCPT has no SMTPUTF8 (555)."""
    mail = b"MAIL FROM:<" + SENDER.encode() + b"> "
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test",
        mail + b"BODY=BINARYMIME", mail + b"body=binarymime", mail + b"BODY=NONSENSE",
        mail + b"SMTPUTF8=yes",
        mail + b"BODY=7BIT", b"RSET", mail + b"BODY=8BITMIME SMTPUTF8",
        b"RCPT TO:<" + ALICE.encode() + b"> SMTPUTF8",
    ])
    ehlo_keywords = answers[0].splitlines()
    assert not [k for k in ehlo_keywords if k[4:] in ("CHUNKING", "BINARYMIME")], ehlo_keywords
    assert codes(answers[1:]) == [
        "555 5.5.4", "555 5.5.4", "501 5.5.4", "501 5.5.4",
        "250 2.1.0", "250 2.0.0", "250 2.1.0", "555 5.5.4"], answers


async def test_starttls_forgets_what_the_client_said_before(worker: FilterWorker) -> None:
    """RFC 3207 4.2: after the handshake the server discards what it knew from the client,
    the EHLO argument among it, and the transaction: MAIL needs a new EHLO first (503), a
    sender given before TLS is gone (RCPT: 503), and the Received header and envelope carry
    the EHLO name given inside TLS. STARTTLS with an argument is 501 (RFC 3207 4)."""
    def dialog() -> list[str]:
        client = RawClient(worker.ports[0])
        try:
            client.reply()
            answers = [client.command(b"EHLO before.remote.test\r\n").splitlines()[-1],
                       client.command(f"MAIL FROM:<{SENDER}>\r\n".encode()),
                       client.command(b"STARTTLS now\r\n"),
                       client.command(b"STARTTLS\r\n")]
            client.start_tls()
            for line in (f"MAIL FROM:<{SENDER}>", "EHLO after.remote.test",
                         f"RCPT TO:<{ALICE}>", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{ALICE}>",
                         "DATA"):
                answers.append(client.command(f"{line}\r\n".encode()).splitlines()[-1])
            answers.append(client.command(message("after starttls") + b".\r\n"))
            return answers
        finally:
            client.close()

    answers = await in_thread(dialog)
    assert codes(answers[:4]) == ["250 ENHAN", "250 2.1.0", "501 5.5.4", "220 2.0.0"]
    assert codes(answers[4:7]) == ["503 5.5.1", "250 ENHAN", "503 5.5.1"], answers
    assert [answer[:3] for answer in answers[7:]] == ["250", "250", "354", "250"], answers
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.client_helo == "after.remote.test"
    assert split_received(queued.body)[0].startswith(b"Received: from after.remote.test ")


async def test_a_command_line_of_512_octets_is_taken_a_longer_one_is_500(
        worker: FilterWorker) -> None:
    """RFC 5321 4.5.3.1.4: a command line of 512 octets, its CRLF included, is within the
    limit; a longer one is refused (4.5.3.1.9: 500) and the session goes on."""
    at_limit = b"NOOP " + b"x" * (512 - len(b"NOOP ") - 2)
    assert len(at_limit + b"\r\n") == 512
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test", at_limit, at_limit + b"x", b"NOOP " + b"x" * 600, b"NOOP"])
    assert answers[1:] == [replies.OK, replies.COMMAND_TOO_LONG, replies.COMMAND_TOO_LONG,
                           replies.OK], answers


async def test_100_recipients_are_taken(directory: Settings) -> None:
    """RFC 5321 4.5.3.1.8: at least 100 recipients per transaction (the default limit); the
    101st is 452 4.5.3 (4.5.3.1.10). All in one pipelined group (RFC 2920)."""
    async with running_filter(directory) as worker:
        assert worker.settings.max_recipients == 100

        def dialog() -> tuple[list[str], str]:
            client = RawClient(worker.ports[0])
            try:
                client.reply()
                client.command(b"EHLO client.remote.test\r\n")
                group = [f"MAIL FROM:<{SENDER}>", *[f"RCPT TO:<{ALICE}>"] * 101, "DATA"]
                client.sock.sendall("".join(line + "\r\n" for line in group).encode())
                answers = [client.reply() for _ in group]
                return answers[1:], client.command(message("100") + b".\r\n")
            finally:
                client.close()

        rcpt_answers, queued = await in_thread(dialog)
    assert rcpt_answers[:100] == [replies.RECIPIENT_OK] * 100
    assert rcpt_answers[100] == replies.TOO_MANY_RECIPIENTS
    assert rcpt_answers[101].startswith("354 "), rcpt_answers[101]
    assert queued.startswith("250 2.0.0 Ok: queued as "), queued


async def test_starttls_without_a_certificate_is_not_implemented(directory: Settings) -> None:
    """Without a certificate STARTTLS is not advertised (RFC 5321 2.2.2: no keyword for
    what we refuse), and asked for anyway it is 502, a command recognised but not
    implemented (RFC 5321 4.2.4); it was aiosmtpd's 454 "TLS not available", which RFC 3207
    4 reserves for a temporary reason. The session goes on."""
    async with running_filter(directory.replace(tls_cert="", tls_key="")) as worker:
        answers = await in_thread(raw_dialog, worker.ports[0], [
            b"EHLO client.remote.test", b"STARTTLS", b"NOOP"])
    assert "STARTTLS" not in answers[0], answers
    assert answers[1:] == [replies.STARTTLS_NOT_OFFERED, replies.OK], answers


async def test_no_reply_line_is_longer_than_512_octets(worker: FilterWorker) -> None:
    """RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, its CRLF included. aiosmtpd
    echoed an unknown command, which may itself be 510 octets long, into its 500 reply."""
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test", b"X" * 505, b"HELP " + b"Y" * 500,
        b"MAIL FROM:<" + SENDER.encode() + b"> " + b"Z" * 250 + b" " + b"Z" * 250])
    assert answers[1] == replies.UNKNOWN_COMMAND, answers
    assert all(len(line) + 2 <= 512 for answer in answers for line in answer.splitlines())


async def test_lines_that_begin_with_a_dot_arrive_unstuffed(worker: FilterWorker) -> None:
    """RFC 5321 4.5.2: the client doubles a leading dot (smtplib does), the server takes one
    off; a line of one dot in the content is not the end of it."""
    raw = message("dots", b".\r\n.hidden\r\n..two\r\n...\r\nlast.\r\n")
    assert await in_thread(send, worker.ports[0], raw, [ALICE]) == {}
    [queued] = await drain_queue(worker.settings)
    assert split_received(queued.body)[1] == raw


def injected_behind_starttls(port: int) -> list[str]:
    """HELP and MAIL sent in the packet of STARTTLS, then NOOP, EHLO and RCPT inside TLS."""
    client = RawClient(port)
    try:
        client.reply()
        client.command(b"EHLO client.remote.test\r\n")
        answers = [client.command(
            b"STARTTLS\r\nHELP\r\nMAIL FROM:<injected@remote.test>\r\n")]
        client.start_tls()
        for line in (b"NOOP", b"EHLO client.remote.test", b"RCPT TO:<" + ALICE.encode() + b">"):
            answers.append(client.command(line + b"\r\n").splitlines()[-1])
        return answers
    finally:
        client.close()


async def test_starttls_injection_is_discarded_by_the_real_process_too(
        directory: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """CVE-2011-0411 (RFC 3207 4.2, 6) in the `tiermail filter` process, which runs on uvloop,
    whose transports are not asyncio's (the in-process tests run on asyncio's loop): the
    plaintext behind STARTTLS is dropped, so the first reply inside TLS is NOOP's (not HELP's
    214) and the injected sender is not in effect."""
    process = run_tier(directory, "filter")
    await in_thread(process.wait_for_port, directory.smtp_port)
    answers = await in_thread(injected_behind_starttls, directory.smtp_port)
    assert answers[0] == replies.READY_FOR_TLS, answers
    assert answers[1:] == [replies.OK, "250 ENHANCEDSTATUSCODES", replies.NEED_MAIL], answers


async def test_an_http_request_ends_the_connection_before_its_body_runs(
        directory: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """An HTTP request on the SMTP port (a scanner's probe, or a web application made to
    post to it) is answered 421 at its request line and the connection closed, with one
    WARNING line, as Postfix's smtpd_forbidden_commands do: SMTP commands in the request's
    body never run (unknown commands otherwise only count against the error limit, which
    a few header lines do not reach)."""
    process = run_tier(directory, "filter")
    await in_thread(process.wait_for_port, directory.smtp_port)
    commands = (f"EHLO web.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n"
                "Subject: from a web form\r\n\r\nbody\r\n.\r\nQUIT\r\n").encode()
    request = (b"POST / HTTP/1.1\r\nHost: mx.test.invalid\r\nContent-Type: text/plain\r\n"
               b"Content-Length: %d\r\n\r\n" % len(commands)) + commands

    def post() -> tuple[str, bytes]:
        client = RawClient(directory.smtp_port)
        try:
            client.reply()
            client.sock.sendall(request)
            answer = client.reply()
            rest = b""
            with contextlib.suppress(ConnectionResetError):  # closed with our input unread
                while chunk := client.sock.recv(4096):
                    rest += chunk
            return answer, rest
        finally:
            client.close()

    answer, rest = await in_thread(post)
    assert answer == replies.NON_SMTP_COMMAND and rest == b"", (answer, rest)
    for verb in (b"GET", b"CONNECT"):
        answers = await in_thread(raw_dialog, directory.smtp_port, [verb + b" / HTTP/1.1"])
        assert answers == [replies.NON_SMTP_COMMAND], answers
    await in_thread(wait_until, lambda: process.output().count("non-SMTP command") == 3,
                    timeout=10, what="the filter's warnings")
    smtp_lines = [line for line in process.output().splitlines()
                  if " mail.log " in line or "non-SMTP" in line]
    assert len(smtp_lines) == 3 and all(" WARNING " in line for line in smtp_lines), smtp_lines
    assert await queue_depth(directory) == 0
