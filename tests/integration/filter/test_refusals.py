"""Refusals: unknown users, relaying, limits, smuggling. Each keeps the session usable."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket

import pytest

from common.settings import Settings
from services.filter.main import FilterWorker
from services.filter.protocol import replies
from services.filter.protocol.message import MAX_HEADER_SECTION
from services.filter.protocol.parameters import MAIL_SYNTAX, RCPT_SYNTAX
from tests.integration.filter.conftest import (
    ALICE,
    BOB,
    SENDER,
    RawClient,
    connect,
    drain_queue,
    in_thread,
    message,
    queue_depth,
    running_filter,
)


def reply_of(code: int, text: bytes) -> str:
    return f"{code} {text.decode()}"


def still_usable(client: smtplib.SMTP, subject: str) -> None:
    """A complete second transaction on the same connection succeeds."""
    client.rset()
    assert client.sendmail(SENDER, [ALICE], message(subject)) == {}


async def test_unknown_user_550(worker: FilterWorker) -> None:
    def transaction() -> str:
        with connect(worker.ports[0]) as client:
            client.mail(SENDER)
            reply = reply_of(*client.rcpt(f"nobody@{'example.test'}"))
            still_usable(client, "after-unknown")
            return reply

    assert await in_thread(transaction) == replies.UNKNOWN_USER
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.recipients[0].address == ALICE


async def test_octets_that_are_not_utf8_in_helo_and_paths_are_refused_for_good(
        worker: FilterWorker) -> None:
    """Latin-1 and other non-UTF-8 octets in EHLO, MAIL FROM or RCPT TO were accepted (250)
    and then failed every DATA with 451, so the sender retried for days (and at RCPT they
    logged a traceback). Now refused at once with a permanent reply; the session goes on."""
    def dialog() -> list[str]:
        client = RawClient(worker.ports[0])
        client.reply()  # greeting
        answers = [client.command(b"EHLO caf\xe9.example\r\n"),
                   client.command(b"HELO caf\xe9.example\r\n"),
                   client.command(b"EHLO client.example\r\n").splitlines()[0],
                   client.command(b"MAIL FROM:<j\xf6rg@remote.example>\r\n"),
                   client.command(f"MAIL FROM:<{SENDER}>\r\n".encode()),
                   client.command(b"RCPT TO:<\xff@example.test>\r\n"),
                   client.command(f"RCPT TO:<{ALICE}>\r\n".encode()),
                   client.command(b"DATA\r\n"),
                   client.command(message("after-latin1") + b".\r\n")]
        client.sock.close()
        return answers

    answers = await in_thread(dialog)
    assert [answer[:9] for answer in answers] == [
        "501 5.5.2", "501 5.5.2", "250-mx.te", "553 5.1.7", "250 2.1.0", "553 5.1.3",
        "250 2.1.5", "354 End d", "250 2.0.0"], answers
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.client_helo == "client.example"


async def test_octets_that_are_not_utf8_in_a_parameter_blame_the_parameter(
        worker: FilterWorker) -> None:
    """A Latin-1 octet in a MAIL or RCPT parameter is a syntax error in the parameters
    (501 5.5.4, RFC 5321 4.1.1.11), not a malformed address (553 5.1.7 blamed a path that
    was fine); the same parameter in ASCII is one we do not know (555)."""
    def dialog() -> list[str]:
        client = RawClient(worker.ports[0])
        client.reply()  # greeting
        client.command(b"EHLO client.example\r\n")
        answers = [client.command(f"MAIL FROM:<{SENDER}> ENVID=\xe9t\xe9\r\n".encode("latin-1")),
                   client.command(f"MAIL FROM:<{SENDER}> ENVID=x\r\n".encode()),
                   client.command(f"MAIL FROM:<{SENDER}>\r\n".encode()),
                   client.command(f"RCPT TO:<{ALICE}> ORCPT=rfc822;\xe9\r\n".encode("latin-1")),
                   client.command(f"RCPT TO:<{ALICE}>\r\n".encode())]
        client.sock.close()
        return answers

    answers = await in_thread(dialog)
    assert [answer[:9] for answer in answers] == [
        "501 5.5.4", "555 5.5.4", "250 2.1.0", "501 5.5.4", "250 2.1.5"], answers


async def test_relay_denied_554(worker: FilterWorker) -> None:
    def transaction() -> tuple[str, str]:
        with connect(worker.ports[0]) as client:
            client.mail(SENDER)
            first = reply_of(*client.rcpt("someone@elsewhere.test"))
            second = reply_of(*client.rcpt("someone@example.test.evil"))
            return first, second

    assert await in_thread(transaction) == (replies.RELAY_DENIED, replies.RELAY_DENIED)
    assert await queue_depth(worker.settings) == 0


async def test_the_null_path_is_no_recipient(worker: FilterWorker) -> None:
    def transaction() -> str:
        with connect(worker.ports[0]) as client:
            client.mail(SENDER)
            return reply_of(*client.docmd("RCPT TO:<>"))

    assert await in_thread(transaction) == replies.BAD_RECIPIENT_SYNTAX


async def test_postmaster_goes_to_the_configured_address(directory: Settings) -> None:
    """RFC 5321 4.5.1: <postmaster> without a domain, and postmaster@ a local domain in any
    case, MUST be accepted; with TIERMAIL_POSTMASTER they reach that address. Without it,
    and for other domains, nothing changes."""
    def transaction(port: int) -> list[str]:
        with connect(port) as client:
            client.mail(SENDER)
            replies_ = [reply_of(*client.rcpt(address)) for address in
                        ("postmaster", "PostMaster@example.test", "postmaster@elsewhere.test")]
            if replies_[0] == replies.RECIPIENT_OK:
                assert client.data(message("to the postmaster"))[0] == 250
            return replies_

    async with running_filter(directory.replace(postmaster=BOB)) as worker:
        answers = await in_thread(transaction, worker.ports[0])
        assert answers == [replies.RECIPIENT_OK, replies.RECIPIENT_OK, replies.RELAY_DENIED]
        [queued] = await drain_queue(worker.settings)
        assert [(r.address, r.mailboxes) for r in queued.envelope.recipients] == [
            ("postmaster", (BOB,)), ("PostMaster@example.test", (BOB,))]
    async with running_filter(directory) as worker:  # no postmaster configured
        # The bare form is no relay attempt: 550 5.1.1, not 554 5.7.1 Relay access denied.
        assert await in_thread(transaction, worker.ports[0]) == [
            replies.UNKNOWN_USER, replies.UNKNOWN_USER, replies.RELAY_DENIED]


async def test_a_postmaster_setting_that_is_no_local_mailbox_is_said_and_not_relayed(
        directory: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """TIERMAIL_POSTMASTER=admin@elsewhere (not a local domain) started without a word, and
    postmaster@ a local domain got `554 5.7.1 Relay access denied` (found in review). The
    start says so, and postmaster mail gets 550 5.1.1 as with no postmaster set."""
    def transaction(port: int) -> list[str]:
        with connect(port) as client:
            client.mail(SENDER)
            return [reply_of(*client.rcpt(address)) for address in
                    ("postmaster", "postmaster@example.test")]

    caplog.set_level(logging.WARNING)
    for setting, problem in (("admin@elsewhere.test", "not in a local domain"),
                             ("nobody@example.test", "no local mailbox")):
        caplog.clear()
        async with running_filter(directory.replace(postmaster=setting)) as worker:
            assert any(r.message.startswith(f"TIERMAIL_POSTMASTER={setting} is {problem}")
                       for r in caplog.records), caplog.text
            assert await in_thread(transaction, worker.ports[0]) == [replies.UNKNOWN_USER] * 2


async def test_malformed_paths_are_refused_not_rewritten(worker: FilterWorker) -> None:
    """`<a b@x>` is not an address (RFC 5321 4.1.2); a lenient parser once took it as
    `"a b"@x`, a different one. Refused with 553 5.1.3, and the session goes on."""
    def transaction() -> list[int]:
        with connect(worker.ports[0]) as client:
            client.ehlo()
            # docmd: smtplib's own quoting would tidy these up before they are sent
            codes = [client.docmd("MAIL", "FROM:<a b@remote.test>")[0],
                     client.docmd("MAIL", "FROM:<a(c)b@remote.test>")[0]]
            client.mail(SENDER)
            codes += [client.docmd("RCPT", "TO:<alice (x)@example.test>")[0],
                      client.rcpt(ALICE)[0]]
            assert client.data(message("after malformed paths"))[0] == 250
            return codes

    assert await in_thread(transaction) == [553, 553, 553, 250]
    [queued] = await drain_queue(worker.settings)
    assert [r.address for r in queued.envelope.recipients] == [ALICE]


async def test_senders_with_doubled_dots_or_underscores_are_taken_recipients_not(
        worker: FilterWorker) -> None:
    """Real senders outside RFC 5321's grammar (`taro..yamada.@docomo.ne.jp`, a host named
    `mail_srv`) reach every Postfix with its defaults, and got a permanent 553 5.1.7 here.
    Taken as written for MAIL FROM; a recipient so written is still 553 5.1.3."""
    legacy = "taro..yamada.@mail_srv.remote.test"

    def transaction() -> list[int]:
        with connect(worker.ports[0]) as client:
            client.ehlo()
            codes = [client.docmd("MAIL", f"FROM:<{legacy}> BODY=8BITMIME")[0],
                     client.docmd("RCPT", "TO:<alice..x@example.test>")[0],
                     client.rcpt(ALICE)[0]]
            assert client.data(message("from a sloppy sender"))[0] == 250
            return codes

    assert await in_thread(transaction) == [250, 553, 250]
    [queued] = await drain_queue(worker.settings)
    assert queued.envelope.mail_from == legacy


async def test_odd_vrfy_and_size_arguments_get_syntax_replies_not_internal_errors(
        worker: FilterWorker, caplog: pytest.LogCaptureFixture) -> None:
    """A SIZE of digits from outside ASCII ("²", Arabic-Indic) passed aiosmtpd's isdigit and
    then failed int() (451 and a logged traceback) or was taken as a size the quota check then
    ignored; RFC 1870 size-value is ASCII digits: 501. VRFY of octets that are not UTF-8 was
    echoed into a reply that could not be encoded (451 and a traceback); VRFY of a user name
    (RFC 5321 3.5.3 allows one) was 502. We verify nothing: 252 for any name."""
    caplog.set_level(logging.ERROR)

    def dialog() -> list[str]:
        client = RawClient(worker.ports[0])
        try:
            client.reply()
            client.command(b"EHLO client.remote.test\r\n")
            answers = [client.command(line + b"\r\n") for line in (
                b"MAIL FROM:<" + SENDER.encode() + b"> SIZE=\xc2\xb2",
                b"MAIL FROM:<" + SENDER.encode() + b"> SIZE=\xd9\xa1\xd9\xa0",
                b"VRFY <caf\xe9@example.test>",
                b"VRFY alice",
                b"VRFY " + ALICE.encode(),
                b"VRFY nobody@example.test",
                b"MAIL FROM:<" + SENDER.encode() + b"> SIZE=10",
            )]
            return [answer[:9] for answer in answers]
        finally:
            client.close()

    assert await in_thread(dialog) == [
        "501 5.5.4", "501 5.5.4", "501 5.5.2", "252 2.0.0", "252 2.0.0", "252 2.0.0",
        "250 2.1.0"]
    assert not caplog.records, caplog.text


async def test_help_is_214(worker: FilterWorker) -> None:
    """RFC 5321 4.1.1.8: HELP answers 214 (211 for status); a topic it has no help for 504.
    HELP MAIL and HELP RCPT name the parameters we take (HELP MAIL showed none)."""
    def dialog() -> list[tuple[int, bytes]]:
        with connect(worker.ports[0]) as client:
            return [client.docmd("HELP"), client.docmd("HELP", "mail"),
                    client.docmd("HELP", "RCPT"), client.docmd("HELP", "NOSUCH")]

    (all_code, all_text), mail, rcpt, (unknown, _) = await in_thread(dialog)
    assert all_code == 214 and b"MAIL" in all_text and b"RCPT" in all_text
    assert reply_of(*mail) == f"214 2.0.0 Syntax: {MAIL_SYNTAX}"
    assert all(name in MAIL_SYNTAX for name in ("SIZE=", "BODY=7BIT|8BITMIME", "SMTPUTF8"))
    assert reply_of(*rcpt) == f"214 2.0.0 Syntax: {RCPT_SYNTAX}"
    assert unknown == 504


def raw_dialog(port: int, lines: list[bytes]) -> list[str]:
    """The replies to `lines`, one command each, after the greeting."""
    client = RawClient(port)
    try:
        client.reply()
        return [client.command(line + b"\r\n") for line in lines]
    finally:
        client.close()


async def test_non_ascii_addresses_need_smtputf8(worker: FilterWorker) -> None:
    """RFC 6531 3.5: an address that needs SMTPUTF8 in a transaction without it is refused,
    550 5.6.7 at MAIL and 553 5.6.7 at RCPT (both were accepted); a HELO session, which has
    no parameters, cannot send one at all. With SMTPUTF8 the same addresses go through."""
    jorg = "jörg@remote.test".encode()
    lines = [
        b"EHLO client.remote.test",
        b"MAIL FROM:<" + jorg + b">",
        b"MAIL FROM:<" + SENDER.encode() + b">",
        "RCPT TO:<jörg@example.test>".encode(),
        "RCPT TO:<x@bücher.example>".encode(),  # a U-label domain is not ASCII either
        b"RCPT TO:<" + ALICE.encode() + b">",
        b"DATA", message("ascii") + b".",
        b"HELO client.remote.test",
        b"MAIL FROM:<" + jorg + b">",
        b"MAIL FROM:<" + jorg + b"> SMTPUTF8",
        b"EHLO client.remote.test",
        b"MAIL FROM:<" + jorg + b"> SMTPUTF8",
        b"RCPT TO:<" + ALICE.encode() + b">",
        b"DATA", message("utf8") + b".",
    ]
    answers = await in_thread(raw_dialog, worker.ports[0], lines)
    assert [answers[1], answers[3], answers[4], answers[9]] == [
        replies.NON_ASCII_SENDER, replies.NON_ASCII_RECIPIENT, replies.NON_ASCII_RECIPIENT,
        replies.NON_ASCII_SENDER], answers
    assert [answer[:3] for answer in answers] == [
        "250", "550", "250", "553", "553", "250", "354", "250",
        "250", "550", "501", "250", "250", "250", "354", "250"], answers
    queued = await drain_queue(worker.settings)
    assert sorted((q.envelope.mail_from, q.envelope.smtputf8) for q in queued) == [
        ("jörg@remote.test", True), (SENDER, False)]


async def test_a_mail_parameter_given_twice_is_refused(worker: FilterWorker) -> None:
    """`SIZE=10 SIZE=20` and `BODY=8BITMIME BODY=7BIT` were taken (the last one held for
    aiosmtpd, the first for our quota check): now 501 5.5.4, and the session goes on."""
    mail = b"MAIL FROM:<" + SENDER.encode() + b"> "
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test",
        mail + b"SIZE=10 SIZE=20",
        mail + b"BODY=8BITMIME BODY=7BIT",
        mail + b"SMTPUTF8 BODY=8BITMIME smtputf8",
        mail + b"SIZE=10 BODY=8BITMIME SMTPUTF8",
    ])
    assert answers[1:] == [
        replies.REPEATED_PARAMETER.format(keyword="SIZE"),
        replies.REPEATED_PARAMETER.format(keyword="BODY"),
        replies.REPEATED_PARAMETER.format(keyword="SMTPUTF8"),
        replies.SENDER_OK]


async def test_unknown_parameters_are_555_and_malformed_ones_501(worker: FilterWorker) -> None:
    """RFC 5321 4.1.1.11: a MAIL or RCPT parameter not recognised or not implemented gets 555;
    a keyword with a hyphen (RFC 6710's MT-PRIORITY, X-anything) was a 501 syntax error.
    What breaks RFC 5321 4.1.2's esmtp-param grammar stays 501."""
    mail = b"MAIL FROM:<" + SENDER.encode() + b"> "
    rcpt = b"RCPT TO:<" + ALICE.encode() + b"> "
    answers = await in_thread(raw_dialog, worker.ports[0], [
        b"EHLO client.remote.test",
        mail + b"MT-PRIORITY=3", mail + b"FOO", mail + b"X-FOO=bar",
        mail + b"X_Y=1", mail + b"FOO=", mail + b"FOO=a=b", mail + b"SIZE=abc",
        mail + b"SIZE=100",
        rcpt + b"X-FOO=1", rcpt + b"NOTIFY=NEVER", rcpt + b"X_Y", rcpt.rstrip(),
    ])
    assert [answer[:9] for answer in answers[1:]] == [
        "555 5.5.4", "555 5.5.4", "555 5.5.4",
        "501 5.5.4", "501 5.5.4", "501 5.5.4", "501 5.5.4",
        "250 2.1.0",
        "555 5.5.4", "555 5.5.4", "501 5.5.4", "250 2.1.5"], answers


async def test_too_many_recipients_452(directory: Settings) -> None:
    async with running_filter(directory.replace(max_recipients=2)) as worker:
        def transaction() -> tuple[str, tuple[int, bytes]]:
            with connect(worker.ports[0]) as client:
                client.mail(SENDER)
                assert client.rcpt(ALICE)[0] == 250
                assert client.rcpt(BOB)[0] == 250
                third = reply_of(*client.rcpt("team@example.test"))
                return third, client.data(message("two"))

        third, data_reply = await in_thread(transaction)
        assert third == replies.TOO_MANY_RECIPIENTS
        assert data_reply[0] == 250
        [queued] = await drain_queue(worker.settings)
        assert [r.address for r in queued.envelope.recipients] == [ALICE, BOB]


async def test_recipients_over_the_limit_do_not_cost_the_connection(
        directory: Settings) -> None:
    """RFC 5321 4.5.3.1.10: past the recipient limit the client gets 452 and sends the rest in
    a later transaction. Those 452s were counted as client errors, so a client naming many
    more recipients than the limit was hung up on (421) mid-transaction and its message never
    went, not even to the accepted recipients (Postfix does not count them either: its
    smtpd_recipient_overshoot_limit). As many again as the limit are free; two more count as
    errors, still fewer than the limit of errors."""
    limits = directory.replace(max_recipients=3, smtp_max_errors=3)
    extra = [f"extra{n}@example.test" for n in range(5)]
    async with running_filter(limits) as worker:
        def transaction() -> tuple[list[str], str]:
            client = RawClient(worker.ports[0])
            try:
                client.reply()
                client.command(b"EHLO client.remote.test\r\n")
                group = [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{ALICE}>", f"RCPT TO:<{BOB}>",
                         f"RCPT TO:<{ALICE}>", *(f"RCPT TO:<{rcpt}>" for rcpt in extra), "DATA"]
                client.sock.sendall("".join(line + "\r\n" for line in group).encode())
                answers = [client.reply() for _ in group]
                return answers, client.command(message("many") + b".\r\n")
            finally:
                client.close()

        answers, queued = await in_thread(transaction)
        assert answers[4:-1] == [replies.TOO_MANY_RECIPIENTS] * 3 + [
            replies.TOO_MANY_RECIPIENTS_COUNTED] * 2, answers
        assert answers[-1].startswith("354 "), answers
        assert queued.startswith("250 2.0.0 Ok: queued as "), queued
        [message_queued] = await drain_queue(worker.settings)
        assert [r.address for r in message_queued.envelope.recipients] == [ALICE, BOB, ALICE]


async def test_a_client_that_never_stops_past_the_recipient_limit_is_cut_off(
        directory: Settings) -> None:
    """Past twice the recipient limit every further RCPT counts as an error: a client that
    goes on naming recipients is hung up on like any other that keeps erring."""
    limits = directory.replace(max_recipients=2, smtp_max_errors=3)
    async with running_filter(limits) as worker:
        def session() -> list[str]:
            client = RawClient(worker.ports[0])
            try:
                client.reply()
                client.command(b"EHLO client.remote.test\r\n")
                client.command(f"MAIL FROM:<{SENDER}>\r\n".encode())
                answers = [client.command(f"RCPT TO:<{ALICE}>\r\n".encode()) for _ in range(7)]
                return [*answers, client.reply()]  # what follows the third counted error
            finally:
                client.close()

        answers = await in_thread(session)
        assert answers[:2] == [replies.RECIPIENT_OK] * 2, answers
        assert answers[2:4] == [replies.TOO_MANY_RECIPIENTS] * 2, answers
        assert answers[4:7] == [replies.TOO_MANY_RECIPIENTS_COUNTED] * 3, answers
        assert answers[7].startswith("421 4.7.0"), answers


async def test_nothing_pipelined_behind_a_hang_up_runs(
        directory: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """After our 421 the commands the client pipelined behind the last error must not run:
    they did until connection_lost came, and one waiting for Redis then wrote its reply to the
    closed transport, logged as an internal error with a traceback (found in review)."""
    caplog.set_level(logging.DEBUG, logger="services.filter.server")
    async with running_filter(directory.replace(smtp_max_errors=2)) as worker:
        def session() -> list[str]:
            client = RawClient(worker.ports[0])
            try:
                client.reply()
                client.command(b"EHLO client.remote.test\r\n")
                group = [f"MAIL FROM:<{SENDER}>", "RCPT TO:<nobody1@example.test>",
                         "RCPT TO:<nobody2@example.test>", "NOOP", f"RCPT TO:<{ALICE}>"]
                client.sock.sendall("".join(line + "\r\n" for line in group).encode())
                return [client.reply() for _ in range(4)]
            finally:
                client.close()

        answers = await in_thread(session)
        assert answers[1:3] == [replies.UNKNOWN_USER] * 2, answers
        assert answers[3].startswith("421 4.7.0"), answers
    # The worker has stopped: whatever its sessions did is in the log.
    pushed = [record.getMessage() for record in caplog.records
              if record.getMessage().startswith("<< ")]
    assert pushed[-1] == "<< " + replies.UNKNOWN_USER, pushed


async def test_a_header_section_over_1_mib_is_refused_and_the_next_message_goes(
        worker: FilterWorker) -> None:
    """The filter reads every header field a sender may forge (Authentication-Results, scan
    results): 25 MB of them held the worker for seconds (found in review). A header section
    over MAX_HEADER_SECTION gets 552 5.3.4 and is not queued; the session goes on."""
    fields = b"Authentication-Results: x\r\n" * (MAX_HEADER_SECTION // 27 + 1)

    def session() -> tuple[str, str]:
        client = RawClient(worker.ports[0])
        try:
            client.reply()
            client.command(b"EHLO client.remote.test\r\n")
            answers = []
            for content in (fields + b"\r\nbig\r\n", b"Subject: small\r\n\r\nsmall\r\n"):
                client.command(f"MAIL FROM:<{SENDER}>\r\n".encode())
                client.command(f"RCPT TO:<{ALICE}>\r\n".encode())
                client.command(b"DATA\r\n")
                answers.append(client.command(content + b".\r\n"))
            return answers[0], answers[1]
        finally:
            client.close()

    refused, queued = await in_thread(session)
    assert refused == replies.HEADER_TOO_BIG
    assert queued.startswith("250 2.0.0 Ok: queued as "), queued
    [message_queued] = await drain_queue(worker.settings)
    assert message_queued.body.endswith(b"Subject: small\r\n\r\nsmall\r\n")


async def test_size_over_limit_at_mail_552(directory: Settings) -> None:
    async with running_filter(directory.replace(max_message_size=100_000)) as worker:
        def transaction() -> str:
            with connect(worker.ports[0]) as client:
                assert client.esmtp_features["size"] == "100000"
                reply = reply_of(*client.mail(SENDER, ["SIZE=100001"]))
                still_usable(client, "after-size")
                return reply

        assert await in_thread(transaction) == replies.SIZE_EXCEEDED
        assert len(await drain_queue(worker.settings)) == 1


async def test_data_over_limit_552(directory: Settings) -> None:
    async with running_filter(directory.replace(max_message_size=100_000)) as worker:
        def transaction() -> str:
            with connect(worker.ports[0]) as client:
                client.mail(SENDER)  # no SIZE= announced
                client.rcpt(ALICE)
                reply = reply_of(*client.data(message("big", b"x" * 70 + b"\r\n") * 2000))
                still_usable(client, "after-big")
                return reply

        assert await in_thread(transaction) == replies.MESSAGE_TOO_BIG
        [queued] = await drain_queue(worker.settings)
        assert b"Subject: after-big" in queued.body


async def test_line_too_long_500(directory: Settings) -> None:
    async with running_filter(directory.replace(max_line_length=1000)) as worker:
        def transaction() -> tuple[str, tuple[int, bytes]]:
            with connect(worker.ports[0]) as client:
                client.mail(SENDER)
                client.rcpt(ALICE)
                too_long = reply_of(*client.data(message("long", b"y" * 1200 + b"\r\n")))
                client.mail(SENDER)
                client.rcpt(ALICE)
                one_over = reply_of(*client.data(message("one over", b"w" * 999 + b"\r\n")))
                client.mail(SENDER)
                client.rcpt(ALICE)
                # 998 octets + CRLF is the longest legal line (RFC 5321 4.5.3.1.6), also
                # when it starts with a dot (smtplib doubles it: not counted).
                return too_long, one_over, client.data(message(
                    "fits", b"z" * 998 + b"\r\n." + b"d" * 997 + b"\r\n"))

        too_long, one_over, fits = await in_thread(transaction)
        assert too_long == one_over == replies.LINE_TOO_LONG
        assert fits[0] == 250
        [queued] = await drain_queue(worker.settings)
        assert b"z" * 998 + b"\r\n." + b"d" * 997 + b"\r\n" in queued.body


SMUGGLING_PAYLOADS = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
]


@pytest.mark.parametrize("separator", SMUGGLING_PAYLOADS)
async def test_smuggling_is_refused_and_nothing_injected(
    worker: FilterWorker, separator: bytes
) -> None:
    smuggled = (
        b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<" + BOB.encode() + b">\r\nDATA\r\n"
        b"From: evil@remote.test\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
    )
    payload = (
        b"From: " + SENDER.encode() + b"\r\nSubject: carrier\r\n\r\ncarrier" + separator
        + smuggled + b".\r\n"
    )

    def conversation() -> list[str]:
        client = RawClient(worker.ports[0])
        try:
            out = [client.reply(), client.command(b"EHLO client.remote.test\r\n")]
            out.append(client.command(b"MAIL FROM:<" + SENDER.encode() + b">\r\n"))
            out.append(client.command(b"RCPT TO:<" + ALICE.encode() + b">\r\n"))
            out.append(client.command(b"DATA\r\n"))
            out.append(client.command(payload))
            out.append(client.command(b"NOOP\r\n"))  # the session is still usable
            out.append(client.command(b"QUIT\r\n"))
            return out
        finally:
            client.close()

    replies_seen = await in_thread(conversation)
    assert replies_seen[4].startswith("354 ")
    assert replies_seen[5] == replies.BARE_NEWLINE
    assert replies_seen[6] == replies.OK
    assert replies_seen[7] == replies.BYE
    assert await queue_depth(worker.settings) == 0


async def test_pipelined_commands_get_enhanced_replies(worker: FilterWorker) -> None:
    def conversation() -> list[str]:
        client = RawClient(worker.ports[0])
        try:
            greeting = client.reply()
            client.command(b"EHLO client.remote.test\r\n")
            client.sock.sendall(
                b"RCPT TO:<" + ALICE.encode() + b">\r\n"
                b"MAIL FROM:<" + SENDER.encode() + b">\r\n"
                b"MAIL FROM:<" + SENDER.encode() + b">\r\n"
                b"RCPT TO:<" + ALICE.encode() + b">\r\n"
                b"DATA\r\n"
            )
            got = [greeting] + [client.reply() for _ in range(5)]
            got.append(client.command(b"Subject: piped\r\n\r\npiped\r\n.\r\n"))
            got.append(client.command(b"BOGUS\r\n"))
            got.append(client.command(b"VRFY\r\n"))
            got.append(client.command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"))
            got.append(client.command(b"QUIT\r\n"))
            return got
        finally:
            client.close()

    got = await in_thread(conversation)
    assert got[0] == "220 mx.test.invalid ESMTP tiermail"
    assert got[1] == replies.NEED_MAIL
    assert got[2] == replies.SENDER_OK
    assert got[3] == replies.NESTED_MAIL
    assert got[4] == replies.RECIPIENT_OK
    assert got[5].startswith("354 ")
    assert got[6].startswith("250 2.0.0 Ok: queued as ")
    assert got[7].startswith("500 5.5.2 ")
    assert got[8].startswith("501 5.5.4 ")
    assert got[9] == replies.AUTH_UNAVAILABLE
    assert got[10] == replies.BYE
    assert await queue_depth(worker.settings) == 1


async def test_a_client_that_keeps_erring_is_disconnected(directory: Settings) -> None:
    """Like Postfix's smtpd_hard_error_limit: errors cost the client its connection, so a
    broken or hostile client cannot spin on one session forever."""
    limited = directory.replace(smtp_max_errors=5)
    async with running_filter(limited) as worker:
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.ports[0])
        await reader.readline()
        for _ in range(5):
            writer.write(b"RCPT TO:<alice@example.test>\r\n")  # out of sequence: no MAIL
        await writer.drain()
        lines = [await reader.readline() for _ in range(6)]
        assert all(line.startswith(b"503 5.5.1") for line in lines[:5]), lines
        assert lines[5].startswith(replies.TOO_MANY_ERRORS[:9].encode()), lines
        assert await reader.read() == b""
        writer.close()


async def test_a_queued_message_forgives_earlier_errors(directory: Settings) -> None:
    """The error limit is for a client that errs without delivering mail (as Postfix's
    smtpd_hard_error_limit: its errors are forgiven when a message is queued). A relay that
    sends many messages over one connection, each with one stale recipient, was hung up on
    once their 550s added up, in the middle of a transaction."""
    limited = directory.replace(smtp_max_errors=3)
    async with running_filter(limited) as worker:
        def transactions() -> list[dict[str, tuple[int, bytes]]]:
            with connect(worker.ports[0]) as client:
                return [client.sendmail(SENDER, [ALICE, "gone@example.test"],
                                        message(f"relayed {n}")) for n in range(4)]

        refused = await in_thread(transactions)
        assert [list(each) for each in refused] == [["gone@example.test"]] * 4
        assert len(await drain_queue(worker.settings)) == 4


async def test_commands_pipelined_behind_starttls_are_not_run_inside_tls(
        worker: FilterWorker) -> None:
    """CVE-2011-0411: plaintext sent in the same packet as STARTTLS must not count as if it
    had come over TLS (a man in the middle could inject it). The injected MAIL FROM is not
    in effect after the handshake: RCPT still needs a MAIL."""
    def dialog() -> tuple[str, str]:
        client = RawClient(worker.ports[0])
        client.reply()
        client.command(b"EHLO client.remote.test\r\n")
        started = client.command(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
        client.start_tls()
        client.command(b"EHLO client.remote.test\r\n")
        rcpt = client.command(f"RCPT TO:<{ALICE}>\r\n".encode())
        client.close()
        return started, rcpt

    started, rcpt = await in_thread(dialog)
    assert started.startswith("220"), started
    assert rcpt.startswith("503"), rcpt
    assert await queue_depth(worker.settings) == 0


async def test_starttls_inside_tls_is_refused_and_the_session_goes_on(
        worker: FilterWorker) -> None:
    """RFC 3207 4.2: once TLS is up STARTTLS is not offered, and asked for anyway it is
    refused (it was answered 220, and the handshake inside the first broke the connection)."""
    def dialog() -> tuple[str, str]:
        client = RawClient(worker.ports[0])
        client.reply()
        client.command(b"EHLO client.remote.test\r\n")
        client.command(b"STARTTLS\r\n")
        client.start_tls()
        client.command(b"EHLO client.remote.test\r\n")
        again = client.command(b"STARTTLS\r\n")
        noop = client.command(b"NOOP\r\n")
        client.close()
        return again, noop

    again, noop = await in_thread(dialog)
    assert again.startswith("503 5.5.1"), again
    assert noop.startswith("250"), noop


async def test_a_client_that_gives_up_on_the_tls_handshake_is_no_error(
        worker: FilterWorker, caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes, or speaks plaintext, after the 220 to STARTTLS (it does not
    trust the certificate, say) is logged at INFO, not as an internal error; the worker
    serves the next client."""
    caplog.set_level(logging.INFO, logger="services.filter")

    def dialog() -> str:
        for after_220 in (b"", b"NOOP\r\n"):
            client = RawClient(worker.ports[0])
            client.reply()
            client.command(b"EHLO client.remote.test\r\n")
            client.command(b"STARTTLS\r\n")
            client.sock.sendall(after_220)
            client.sock.shutdown(socket.SHUT_WR)
            assert client.closed()
            client.close()
        with connect(worker.ports[0]) as healthy:
            return reply_of(*healthy.noop())

    assert (await in_thread(dialog)).startswith("250")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert caplog.text.count("TLS handshake failed") == 2, caplog.text


async def test_help_does_not_echo_octets_that_are_not_text(worker: FilterWorker) -> None:
    def dialog() -> list[str]:
        client = RawClient(worker.ports[0])
        client.reply()
        answers = [client.command(b"HELP \xff\r\n"), client.command(b"HELP frobnicate\r\n")]
        client.close()
        return answers

    assert await in_thread(dialog) == ["504 5.5.4 No help for that topic",
                                       "504 5.5.4 No help for frobnicate"]


async def test_unknown_commands_count_against_the_error_limit_and_are_forgiven(
        directory: Settings) -> None:
    """Unknown commands are client errors like any other: TIERMAIL_SMTP_MAX_ERRORS of them
    end the connection with 421 (RFC 5321 3.8), and a queued message forgives those before
    it. aiosmtpd hung up after its own 5 per connection, whatever the setting said and
    whatever was queued between them."""
    limited = directory.replace(smtp_max_errors=7)
    async with running_filter(limited) as worker:
        def dialog() -> tuple[list[str], list[str]]:
            client = RawClient(worker.ports[0])
            try:
                client.reply()
                client.command(b"EHLO client.remote.test\r\n")
                before = [client.command(b"FROBNICATE\r\n") for _ in range(6)]
                before.append(client.command(f"MAIL FROM:<{SENDER}>\r\n".encode()))
                before.append(client.command(f"RCPT TO:<{ALICE}>\r\n".encode()))
                before.append(client.command(b"DATA\r\n"))
                before.append(client.command(b"Subject: between\r\n\r\nbody\r\n.\r\n"))
                after = [client.command(b"FROBNICATE\r\n") for _ in range(7)]
                after.append(client.reply())
                assert client.closed()
                return before, after
            finally:
                client.close()

        before, after = await in_thread(dialog)
    assert all(reply.startswith("500 5.5.2 ") for reply in before[:6]), before
    assert before[-1].startswith("250 2.0.0 Ok: queued as "), before
    assert all(reply.startswith("500 5.5.2 ") for reply in after[:7]), after
    assert after[7] == replies.TOO_MANY_ERRORS, after


async def test_data_after_only_refused_recipients_is_554_no_valid_recipients(
        worker: FilterWorker) -> None:
    """RFC 5321 3.3 (and RFC 2920 3.1 for a pipelined group): a DATA whose transaction had
    recipients, all refused, is 554 "no valid recipients", as Postfix answers; one whose
    transaction never named a recipient stays 503 (a command out of sequence)."""
    def dialog() -> list[str]:
        client = RawClient(worker.ports[0])
        try:
            client.reply()
            client.command(b"EHLO client.remote.test\r\n")
            answers = [client.command(f"RCPT TO:<{ALICE}>\r\n".encode())]  # before MAIL
            answers.append(client.command(f"MAIL FROM:<{SENDER}>\r\n".encode()))
            answers.append(client.command(b"DATA\r\n"))  # no RCPT in this transaction
            client.sock.sendall(b"RCPT TO:<nobody@example.test>\r\n"
                                b"RCPT TO:<someone@elsewhere.test>\r\nDATA\r\n")
            answers += [client.reply() for _ in range(3)]
            answers.append(client.command(b"RSET\r\n"))
            answers.append(client.command(f"MAIL FROM:<{SENDER}>\r\n".encode()))
            answers.append(client.command(b"DATA\r\n"))  # a new transaction: none named
            return answers
        finally:
            client.close()

    answers = await in_thread(dialog)
    assert [answer[:9] for answer in answers] == [
        "503 5.5.1", "250 2.1.0", "503 5.5.1", "550 5.1.1", "554 5.7.1",
        "554 5.5.1", "250 2.0.0", "250 2.1.0", "503 5.5.1"], answers
    assert answers[5] == replies.NO_VALID_RECIPIENTS


async def test_every_refused_message_has_a_line_with_its_queue_id(
        directory: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """A message refused once its content had come (too large, a line too long) left no log
    line at all, and one refused by a rule a line without sender and recipients: an
    operator asked why a message never came could not find it. Each now has a `refused`
    line like the `queued` one: queue id, sender, recipients, the reply's codes and why.
    A declared SIZE over the maximum is logged at MAIL."""
    caplog.set_level(logging.INFO, logger="services.filter")
    limits = directory.replace(max_message_size=2000, max_line_length=1000)
    async with running_filter(limits) as worker:
        def transaction() -> tuple[list[str], str]:
            refused = []
            with connect(worker.ports[0]) as client:
                for body in ((b"x" * 70 + b"\r\n") * 40, b"y" * 1200 + b"\r\n",
                             b"bare\nnewline\r\n"):
                    client.mail(SENDER)
                    client.rcpt(ALICE)
                    refused.append(reply_of(*client.data(message("refused", body))))
                declared = reply_of(*client.mail(SENDER, ["SIZE=999999"]))
            return refused, declared

        refused, declared = await in_thread(transaction)
    assert [reply[:9] for reply in refused] == ["552 5.3.4", "500 5.5.2", "554 5.6.0"]
    assert declared.startswith("552 5.3.4"), declared
    lines = [r for r in caplog.records if r.getMessage().startswith("refused ")]
    said = [r.getMessage() for r in lines]
    assert said[:2] == [f"refused from=<{SENDER}> to=<{ALICE}> 552 5.3.4: too much mail data",
                        f"refused from=<{SENDER}> to=<{ALICE}> 500 5.5.2: line too long"]
    assert said[2].startswith(f"refused from=<{SENDER}> to=<{ALICE}> size=")
    assert said[2].endswith(" 554 5.6.0: by rule bare-newline"), said[2]
    assert len({getattr(r, "queue_id", None) for r in lines} - {None}) == 3
    assert "sender refused: its SIZE is over TIERMAIL_MAX_MESSAGE_SIZE (2000)" in caplog.text


async def test_a_sender_cannot_write_fields_into_the_log_line(
        worker: FilterWorker, caplog: pytest.LogCaptureFixture) -> None:
    """A quoted local part may hold spaces: `"x queue_id=... user=..."@remote.test` read as
    further key=value pairs of the `queued` line (a second queue_id for a parser, a match
    for another message's grep). Client-given text is one word in the line now."""
    caplog.set_level(logging.INFO, logger="services.filter")
    forged = '"x queue_id=FORGED user=bob"@remote.test'

    def transaction() -> tuple[int, bytes]:
        with connect(worker.ports[0]) as client:
            assert client.docmd(f"MAIL FROM:<{forged}>")[0] == 250
            client.rcpt(ALICE)
            return client.data(message())

    assert (await in_thread(transaction))[0] == 250
    [queued] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("queued")]
    assert queued.startswith('queued from=<"x\\x20queue_id=FORGED\\x20user=bob"@remote.test> ')
    assert " queue_id=" not in queued and " user=" not in queued


async def test_a_message_starting_with_a_folded_line_is_refused(worker: FilterWorker) -> None:
    """Its first line would have continued our Received header, the sender's text reading
    as part of our trace field after its date. No header section starts that way."""
    def send(client: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
        client.mail(SENDER)
        client.rcpt(ALICE)
        return client.data(data)

    def transactions() -> tuple[list[str], str]:
        with connect(worker.ports[0]) as client:
            folded = [reply_of(*send(client, fold + b"from evil (evil [192.0.2.66]) by mx\r\n"
                                             b"Subject: x\r\n\r\nbody\r\n"))
                      for fold in (b"\t", b" ")]  # RFC 5322 2.2.3: either is folding white space
            fine = reply_of(*send(client, message("after")))
        return folded, fine

    folded, fine = await in_thread(transactions)
    assert folded == [replies.FOLDED_START] * 2
    assert fine.startswith("250 ")
    [queued] = await drain_queue(worker.settings)
    assert b"Subject: after" in queued.body
