"""The edge conversion from aiosmtpd's Envelope to tiermail's, and the EHLO lines."""

from __future__ import annotations

from aiosmtpd.smtp import Envelope as SMTPEnvelope

from common.envelope import Envelope, Recipient
from services.filter.convert import mail_options, peer_ip, tls_description, to_envelope


def smtp_envelope(mail_from: str, options: list[str], smtp_utf8: bool = False) -> SMTPEnvelope:
    env = SMTPEnvelope()
    env.mail_from = mail_from
    env.mail_options = options
    env.smtp_utf8 = smtp_utf8
    env.rcpt_tos = ["alice@example.test"]
    return env


def convert(env: SMTPEnvelope, tls: str | None = None) -> Envelope:
    return to_envelope(
        env,
        queue_id="QID",
        recipients=[Recipient("alice@example.test", ("alice@example.test",))],
        client_ip="192.0.2.1",
        helo="client.test",
        tls=tls,
        received_at=1700000000.5,
        size=1234,
    )


def test_plain_envelope() -> None:
    env = convert(smtp_envelope("s@remote.test", []))
    assert env == Envelope(
        queue_id="QID",
        mail_from="s@remote.test",
        recipients=(Recipient("alice@example.test", ("alice@example.test",)),),
        client_ip="192.0.2.1",
        client_helo="client.test",
        received_at=1700000000.5,
        size=1234,
    )
    assert Envelope.decode(env.encode()) == env


def test_options_and_tls() -> None:
    env = convert(
        smtp_envelope("s@remote.test", ["BODY=8BITMIME", "SMTPUTF8", "SIZE=10"], True),
        tls="TLSv1.3 TLS_AES_128_GCM_SHA256",
    )
    assert env.body_8bit and env.smtputf8
    assert env.tls == "TLSv1.3 TLS_AES_128_GCM_SHA256"


def test_null_sender() -> None:
    assert convert(smtp_envelope("<>", [])).mail_from == ""


def test_mail_options() -> None:
    assert mail_options([]) == (False, False)
    assert mail_options(["BODY=7BIT"]) == (False, False)
    assert mail_options(["BODY=8BITMIME"]) == (False, True)
    assert mail_options(["SMTPUTF8"]) == (True, False)


def test_peer_ip() -> None:
    assert peer_ip(("127.0.0.1", 4242)) == "127.0.0.1"
    assert peer_ip(("::1", 4242, 0, 0)) == "::1"
    assert peer_ip(None) == ""


def test_tls_description() -> None:
    assert tls_description(None) is None
    assert tls_description({}) is None
    assert tls_description({"cipher": ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)}) == (
        "TLSv1.3 TLS_AES_256_GCM_SHA384"
    )
