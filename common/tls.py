"""TLS server contexts, and a self-signed development certificate when none exists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common.settings import Settings, SettingsError

log = logging.getLogger(__name__)


def ensure_dev_certificate(cert: Path, key: Path, hostname: str) -> bool:
    """Create a self-signed certificate for `hostname` unless both files exist and the
    certificate is still valid for a day and names `hostname` (one made 825 days ago, or for
    another TIERMAIL_HOSTNAME, was kept, and clients refused it with nothing in our logs).

    Returns True when a certificate was generated. Used by `make run` / `tiermail up` and the
    tests; production deployments bring their own certificate (TIERMAIL_TLS_CERT/KEY).
    """
    if cert.exists() and key.exists() and _valid_for(cert, DAY, hostname):
        return False
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "825",
            "-subj", f"/CN={hostname}",
            "-addext", f"subjectAltName={_alt_names(hostname)}",
            # A server certificate, not a CA (openssl's default for -x509): Thunderbird and
            # Firefox refuse a CA certificate as a server's, even one the user trusts
            # (MOZILLA_PKIX_ERROR_CA_CERT_USED_AS_END_ENTITY).
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
            "-addext", "extendedKeyUsage=serverAuth",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    return True


DAY = 24 * 3600


def _valid_for(cert: Path, seconds: int, hostname: str = "") -> bool:
    """Whether the certificate is valid now and `seconds` from now (0: now), and names
    `hostname` if one is given: one openssl run for the dates and the name."""
    command = ["openssl", "x509", "-in", str(cert), "-noout", "-startdate", "-enddate"]
    shown = subprocess.run(command + (["-checkhost", hostname] if hostname else []),
                           capture_output=True, text=True)
    fields = dict(line.partition("=")[::2] for line in shown.stdout.splitlines())
    try:
        start = ssl.cert_time_to_seconds(fields["notBefore"])
        end = ssl.cert_time_to_seconds(fields["notAfter"])
    except (KeyError, ValueError):
        return False
    now = time.time()
    named = not hostname or "does match certificate" in shown.stdout
    return shown.returncode == 0 and start <= now and now + seconds < end and named


def _alt_names(hostname: str) -> str:
    """The machine's name, localhost and 127.0.0.1, each once."""
    names = dict.fromkeys([hostname.lower(), "localhost"])
    return ",".join([*(f"DNS:{name}" for name in names), "IP:127.0.0.1"])


# What OpenSSL's reason for a failed server-side handshake means, for the operator reading
# the log (the client is told by OpenSSL's alert, where it makes one: see refusal_alerts).
_HANDSHAKE_REASONS = {
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions older than 1.2",
    "NO_SHARED_CIPHER": "the client offers no cipher this server accepts",
    "HTTP_REQUEST": "the client sent an HTTP request, not a TLS handshake",
    "WRONG_VERSION_NUMBER": "the client did not start with a TLS handshake "
                            "(plain text on a TLS port?)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the certificate's issuer "
                              "(self-signed?)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused the certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused the certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client finds the certificate expired",
}


def describe_handshake_failure(exc: BaseException) -> str:
    """One line on why a client's TLS handshake with us failed: OpenSSL's reason, and what
    it means where that is not plain (`UNSUPPORTED_PROTOCOL: the client offers only TLS
    versions older than 1.2`)."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        meaning = _HANDSHAKE_REASONS.get(reason)
        return f"{reason}: {meaning}" if meaning else reason
    # asyncio and uvloop end a handshake past its timeout with ConnectionAbortedError("SSL
    # handshake is taking longer than N seconds: aborting the connection").
    if isinstance(exc, TimeoutError) or "taking longer than" in str(exc):
        return "the handshake did not finish in time"
    if isinstance(exc, ConnectionResetError):  # (uvloop says so for a plain close too)
        return "the client closed the connection during the handshake"
    return type(exc).__name__


_ALERT = "tiermail_tls_alert"  # the attribute of a handshake's SSLError holding the alert


@contextlib.contextmanager
def refusal_alerts(connection: socket.socket | asyncio.BaseTransport) -> Iterator[None]:
    """Around a server-side TLS handshake on `connection` (an accepted socket, or the plain
    transport STARTTLS starts on): when our context refuses the handshake, the alert OpenSSL
    made for the client (`protocol version`, `handshake failure`) is sent on a duplicate of
    the connection's descriptor. asyncio's and uvloop's TLS layers close the connection at
    once on a failed handshake and leave the alert unsent, so a client too old for TLS 1.2
    saw only an unexpected EOF. The duplicate is held for the handshake only; without one (the
    connection closed already, or no descriptor left) the handshake goes on as before."""
    spare = _duplicate(connection)
    if spare is None:
        yield
        return
    try:
        yield
    except Exception as exc:
        alert = _alert_in(exc)
        if alert:
            with contextlib.suppress(OSError):  # the client is gone already
                os.write(spare, alert)
        raise
    finally:
        os.close(spare)


def _duplicate(connection: socket.socket | asyncio.BaseTransport) -> int | None:
    # (uvloop's transports are not asyncio.BaseTransport subclasses: ask about the socket.)
    sock = (connection if isinstance(connection, socket.socket)
            else connection.get_extra_info("socket"))
    try:
        return os.dup(sock.fileno()) if sock is not None else None
    except OSError:  # closed (uvloop's socket then says -1), or EMFILE
        return None


def _alert_in(exc: BaseException) -> bytes:
    """The alert kept on the handshake's SSLError, which may come wrapped (aiosmtpd raises
    its TLSSetupException from it)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        alert = getattr(seen, _ALERT, b"")
        if alert:
            return bytes(alert)
        seen = seen.__cause__ or seen.__context__
    return b""


class _AlertKeepingSSLObject(ssl.SSLObject):
    """A server-side TLS object whose failed handshake leaves OpenSSL's alert for the client
    on its exception, for refusal_alerts to send."""

    _outgoing: ssl.MemoryBIO

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            outgoing = getattr(self, "_outgoing", None)  # None: not made by our wrap_bio
            if outgoing is not None:
                setattr(exc, _ALERT, outgoing.read())
            raise


class _ServerContext(ssl.SSLContext):
    sslobject_class = _AlertKeepingSSLObject

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        tls = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        assert isinstance(tls, _AlertKeepingSSLObject)
        tls._outgoing = outgoing
        return tls


def _default_server_context() -> ssl.SSLContext:
    """What ssl.create_default_context(Purpose.CLIENT_AUTH) makes (it loads no CA for a
    server that asks for no client certificate; SSLKEYLOGFILE, a debugging aid, is honoured
    as there), of the class that keeps a refused handshake's alert."""
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side context, or None when no certificate is configured and none is at
    the default place (development: the tiers then run without TLS and say so). A
    certificate or key that was configured but is missing or unusable is a SettingsError:
    a mistyped path must stop the start, not quietly turn TLS off."""
    cert, key = settings.tls_cert_path, settings.tls_key_path
    configured = bool(settings.tls_cert or settings.tls_key)
    missing = [str(path) for path in (cert, key) if not path.exists()]
    if missing and not configured:
        return None
    if missing:
        raise SettingsError(f"TIERMAIL_TLS_CERT / TIERMAIL_TLS_KEY: {', '.join(missing)}: "
                            f"no such file")
    context = _default_server_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"TIERMAIL_TLS_CERT={cert} / TIERMAIL_TLS_KEY={key}: "
                            f"not a usable certificate and key: {exc}") from None
    if not _valid_for(cert, 0):
        log.warning("the TLS certificate %s is expired or not yet valid: clients refuse it "
                    "(renew it, then restart the tiers)", cert, extra={"event": "tls-expired"})
    return context
