"""A client whose TLS handshake fails, on each of the five ways into a TLS session (SMTP
STARTTLS, IMAP STARTTLS, POP3 STLS, IMAPS, POP3S), with real clients (smtplib, imaplib,
poplib): the tier logs why, in words an operator can act on, and where OpenSSL refuses the
client it is told why too, by OpenSSL's alert (asyncio and uvloop drop it; we send it)."""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import smtplib
import socket
import ssl
from collections.abc import Callable

import pytest

from common.settings import Settings
from tests.e2e.test_inbound_spine import provision
from tests.e2e.test_status import status
from tests.support import TierProcess, tls_1_1_only, wait_until

OLD_TLS = "TLS handshake failed: UNSUPPORTED_PROTOCOL: the client offers only TLS versions " \
          "older than 1.2"
UNTRUSTED = "TLS handshake failed: TLSV1_ALERT_UNKNOWN_CA: the client does not trust the " \
            "certificate's issuer (self-signed?)"
PLAINTEXT = "TLS handshake failed: WRONG_VERSION_NUMBER: the client did not start with a " \
            "TLS handshake (plain text on a TLS port?)"
NO_CIPHER = "TLS handshake failed: NO_SHARED_CIPHER: the client offers no cipher this server " \
            "accepts"
HTTP = "TLS handshake failed: HTTP_REQUEST: the client sent an HTTP request, not a TLS " \
       "handshake"


def no_cipher_in_common() -> ssl.SSLContext:
    """A TLS 1.2 client that offers one suite without forward secrecy, which we do not take."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-SHA256")
    return context


def verifying() -> ssl.SSLContext:
    """A client that checks the certificate against the system's CAs: the test
    certificate is self-signed."""
    return ssl.create_default_context()


def refused_everywhere(settings: Settings, context: ssl.SSLContext,
                       told: str | None = None) -> None:
    """Each of the five ways, each expected to fail in the handshake; with `told`, the
    client's SSLError must carry that reason (the alert it got from us)."""
    attempts: list[Callable[[], object]] = [
        lambda: _smtp_starttls(settings.smtp_port, context),
        lambda: imaplib.IMAP4("127.0.0.1", settings.imap_port, timeout=30).starttls(
            ssl_context=context),
        lambda: poplib.POP3("127.0.0.1", settings.pop3_port, timeout=30).stls(context),
        lambda: imaplib.IMAP4_SSL("127.0.0.1", settings.imaps_port, ssl_context=context,
                                  timeout=30),
        lambda: poplib.POP3_SSL("127.0.0.1", settings.pop3s_port, context=context,
                                timeout=30),
    ]
    for attempt in attempts:
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)) as refusal:
            attempt()
        if told is not None:
            assert isinstance(refusal.value, ssl.SSLError), refusal.value
            assert refusal.value.reason == told, refusal.value


def _smtp_starttls(port: int, context: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.starttls(context=context)


def say_plainly(port: int, words: bytes) -> bytes:
    """Send `words` unencrypted to an implicit-TLS port; what comes back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(words)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
        return received


def test_a_failed_handshake_is_logged_with_its_reason_by_every_tls_service(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    provision(settings)
    store = run_tier(settings, "store")
    store.wait_for_port(settings.pop3s_port)
    smtp = run_tier(settings, "filter")
    smtp.wait_for_port(settings.smtp_port)
    # From here on: the port probes above end their connections in the handshake too.
    store_before, smtp_before = len(store.output()), len(smtp.output())
    descriptors_before = {tier: open_descriptors(tier) for tier in (store, smtp)}

    refused_everywhere(settings, tls_1_1_only(), told="TLSV1_ALERT_PROTOCOL_VERSION")
    refused_everywhere(settings, no_cipher_in_common(), told="SSLV3_ALERT_HANDSHAKE_FAILURE")
    refused_everywhere(settings, verifying())
    for port in (settings.imaps_port, settings.pop3s_port):
        assert say_plainly(port, b"a NOOP\r\n") == b""
        assert say_plainly(port, b"GET / HTTP/1.0\r\n\r\n") == b""

    def store_logged_all() -> bool:
        return store.output()[store_before:].count("TLS handshake failed") >= 16

    wait_until(store_logged_all, timeout=15, what="the store to log every failed handshake")
    logged = store.output()[store_before:]
    smtp_logged = smtp.output()[smtp_before:]
    for event in ("imap-tls-failed", "pop3-tls-failed", "imaps-tls-failed", "pop3s-tls-failed"):
        lines = [line for line in logged.splitlines() if f"event={event}" in line]
        implicit = event.endswith("s-tls-failed")
        expected = [OLD_TLS, NO_CIPHER, UNTRUSTED] + ([PLAINTEXT, HTTP] if implicit else [])
        assert len(lines) == len(expected), (event, lines)
        for line, reason in zip(lines, expected, strict=True):
            assert reason in line, (event, line)
    filter_lines = [line for line in smtp_logged.splitlines() if "TLS handshake" in line]
    assert len(filter_lines) == 3, filter_lines
    for line, reason in zip(filter_lines, [OLD_TLS, NO_CIPHER, UNTRUSTED], strict=True):
        assert reason in line, line
    assert "Traceback" not in logged + smtp_logged

    def no_session_left() -> bool:  # every failed handshake gave its connection slot back
        _, report = status(settings)
        beats = {beat["tier"]: beat for beat in report["redis"]["processes"]}
        store_beat, filter_beat = beats.get("store", {}), beats.get("filter", {})
        return (store_beat.get("imap_sessions"), store_beat.get("pop3_sessions"),
                filter_beat.get("active")) == (0, 0, 0)

    wait_until(no_session_left, timeout=20, interval=0.5, what="every session to be gone")

    def descriptors_given_back() -> bool:  # each handshake's duplicate closed (a pooled
        # connection opened meanwhile may add one or two; a leak adds one per refusal)
        return all(open_descriptors(tier) - before < 3
                   for tier, before in descriptors_before.items())

    wait_until(descriptors_given_back, timeout=10, what="the tiers' descriptors to be closed")


def open_descriptors(tier: TierProcess) -> int:
    return len(os.listdir(f"/proc/{tier.proc.pid}/fd"))
