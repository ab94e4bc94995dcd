"""The edge between aiosmtpd's mutable objects and tiermail's immutable Envelope."""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Any

from aiosmtpd.smtp import Envelope as SMTPEnvelope

from common.envelope import Envelope, Recipient


def tls_description(ssl_extra: Mapping[str, Any] | None) -> str | None:
    """"TLSv1.3 TLS_AES_256_GCM_SHA384" for a STARTTLS session, None for plaintext.

    `ssl_extra` is aiosmtpd's `session.ssl`: the TLS transport's extra-info mapping.
    """
    if not ssl_extra:
        return None
    sslobj = ssl_extra.get("ssl_object")
    if isinstance(sslobj, ssl.SSLObject | ssl.SSLSocket):
        version, cipher = sslobj.version(), sslobj.cipher()
        if version:
            return f"{version} {cipher[0]}" if cipher else version
    cipher = ssl_extra.get("cipher")
    if cipher:
        return f"{cipher[1]} {cipher[0]}"
    return "TLS"


def peer_ip(peer: Any) -> str:
    """The client address from a transport's peername (a tuple), or "" when unknown."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def mail_options(options: Sequence[str]) -> tuple[bool, bool]:
    """(smtputf8, body_8bit) from the MAIL FROM parameters, as aiosmtpd upper-cased them."""
    smtputf8 = "SMTPUTF8" in options
    body_8bit = "BODY=8BITMIME" in options
    return smtputf8, body_8bit


def to_envelope(
    smtp_envelope: SMTPEnvelope,
    *,
    queue_id: str,
    recipients: Sequence[Recipient],
    client_ip: str,
    helo: str,
    tls: str | None,
    received_at: float,
    size: int,
) -> Envelope:
    mail_from = smtp_envelope.mail_from or ""
    if mail_from == "<>":  # the null reverse-path of bounces (RFC 5321 4.5.5)
        mail_from = ""
    smtputf8, body_8bit = mail_options(smtp_envelope.mail_options)
    return Envelope(
        queue_id=queue_id,
        mail_from=mail_from,
        recipients=tuple(recipients),
        client_ip=client_ip,
        client_helo=helo,
        received_at=received_at,
        size=size,
        tls=tls,
        smtputf8=smtputf8 or bool(smtp_envelope.smtp_utf8),
        body_8bit=body_8bit,
    )
