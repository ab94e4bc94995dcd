"""Which TLS the tiers run with: a configured certificate that is missing or unusable stops
the start with a clear error; none configured and none at the default place means no TLS."""

import asyncio
import os
import re
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from common.settings import Settings, SettingsError
from common.tls import (
    describe_handshake_failure,
    ensure_dev_certificate,
    refusal_alerts,
    server_context,
)
from tests.support import tls_1_1_only


def test_no_certificate_anywhere_means_no_tls(tmp_path: Path) -> None:
    assert server_context(Settings(data_dir=tmp_path)) is None


def test_the_default_place_is_used(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "cert.pem").write_bytes(cert.read_bytes())
    (tmp_path / "tls" / "key.pem").write_bytes(key.read_bytes())
    assert server_context(Settings(data_dir=tmp_path)) is not None


def test_nothing_older_than_tls_1_2_is_spoken(tmp_path: Path,
                                               tls_files: tuple[Path, Path]) -> None:
    """Set by us, not left to the OpenSSL build's policy (Debian's refuses TLS 1.0 and 1.1
    at its default security level; other builds do not)."""
    cert, key = tls_files
    context = server_context(Settings(data_dir=tmp_path, tls_cert=str(cert), tls_key=str(key)))
    assert context is not None and context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_configured_certificate_that_is_missing_stops_the_start(
        tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    typo = tmp_path / "cert.pme"
    with pytest.raises(SettingsError, match=str(typo)):
        server_context(Settings(data_dir=tmp_path, tls_cert=str(typo), tls_key=str(key)))
    with pytest.raises(SettingsError, match="key.pem"):
        server_context(Settings(data_dir=tmp_path, tls_cert=str(cert)))  # key: default place


def test_a_configured_certificate_that_cannot_be_loaded_stops_the_start(
        tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match="not a usable certificate"):
        server_context(Settings(data_dir=tmp_path, tls_cert=str(garbage), tls_key=str(key)))
    with pytest.raises(SettingsError, match="not a usable certificate"):  # key of another cert
        server_context(Settings(data_dir=tmp_path, tls_cert=str(cert), tls_key=str(garbage)))


def test_the_development_certificate_is_a_server_certificate_not_a_ca(
        tls_files: tuple[Path, Path]) -> None:
    """openssl's -x509 makes a CA certificate unless told otherwise, and Thunderbird and
    Firefox refuse a CA certificate as a server's even after the user accepted it
    (MOZILLA_PKIX_ERROR_CA_CERT_USED_AS_END_ENTITY); the Thunderbird test meets it first."""
    text = subprocess.run(["openssl", "x509", "-in", str(tls_files[0]), "-noout", "-text"],
                          check=True, capture_output=True, text=True).stdout
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    assert re.search(r"Extended Key Usage:\s+TLS Web Server Authentication", text)
    assert re.search(r"Subject Alternative Name:\s+DNS:mx.test.invalid, DNS:localhost, "
                     r"IP Address:127.0.0.1", text)


def test_a_machine_named_localhost_gets_each_name_once(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert ensure_dev_certificate(cert, key, "LocalHost")
    names = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext",
                            "subjectAltName"], check=True, capture_output=True,
                           text=True).stdout.splitlines()[-1].strip()
    assert names == "DNS:localhost, IP Address:127.0.0.1"


def _expired_pair(folder: Path, hostname: str) -> tuple[Path, Path]:
    """A certificate for `hostname` valid through 2024 only."""
    return _dated_pair(folder, hostname, "20240101000000Z", "20250101000000Z")


def _dated_pair(folder: Path, hostname: str, start: str, end: str) -> tuple[Path, Path]:
    """A certificate for `hostname` valid from `start` to `end` (openssl ca -selfsign, the
    one way openssl 3.0 takes dates other than from now on)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nserial = serial\n"
        "new_certs_dir = .\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(folder / "req.csr"), "-subj", f"/CN={hostname}"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ca", "-batch", "-config", "ca.cnf", "-keyfile", str(key),
                    "-in", "req.csr", "-out", str(cert), "-selfsign", "-startdate", start,
                    "-enddate", end],
                   check=True, capture_output=True, cwd=folder)
    return cert, key


def test_an_expired_or_misnamed_development_certificate_is_made_anew(tmp_path: Path) -> None:
    """`tiermail up` kept a development certificate 825 days old, or one made for another
    TIERMAIL_HOSTNAME, and clients refused it with nothing in our logs (found in review)."""
    cert, key = _expired_pair(tmp_path / "tls", "mx.test.invalid")
    assert ensure_dev_certificate(cert, key, "mx.test.invalid")  # expired: made anew
    assert not ensure_dev_certificate(cert, key, "mx.test.invalid")  # valid: kept
    assert ensure_dev_certificate(cert, key, "mail.other.test")  # another name: made anew
    subject = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-subject"],
                             check=True, capture_output=True, text=True).stdout
    assert "mail.other.test" in subject


def test_a_development_certificate_not_valid_yet_is_made_anew(tmp_path: Path) -> None:
    """A clock set back (or a certificate copied from a machine whose clock ran ahead):
    clients refuse it until its start."""
    cert, key = _dated_pair(tmp_path / "tls", "mx.test.invalid", "20990101000000Z",
                            "21000101000000Z")
    assert ensure_dev_certificate(cert, key, "mx.test.invalid")
    assert not ensure_dev_certificate(cert, key, "mx.test.invalid")


def test_an_expired_configured_certificate_is_said_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = _expired_pair(tmp_path / "tls", "mx.test.invalid")
    settings = Settings(data_dir=tmp_path, tls_cert=str(cert), tls_key=str(key))
    assert server_context(settings) is not None  # served all the same: the operator decides
    assert "is expired or not yet valid" in caplog.text


def test_a_failed_handshake_is_told_in_words() -> None:
    refused = ssl.SSLError(1, "[SSL: NO_SHARED_CIPHER] no shared cipher (_ssl.c:1006)")
    refused.reason = "NO_SHARED_CIPHER"
    assert describe_handshake_failure(refused) == (
        "NO_SHARED_CIPHER: the client offers no cipher this server accepts")
    unknown = ssl.SSLError(1, "[SSL: SOMETHING_NEW] x")
    unknown.reason = "SOMETHING_NEW"
    assert describe_handshake_failure(unknown) == "SOMETHING_NEW"  # OpenSSL's words, as they are
    assert describe_handshake_failure(TimeoutError()) == "the handshake did not finish in time"
    assert describe_handshake_failure(ConnectionAbortedError(
        "SSL handshake is taking longer than 30.0 seconds: aborting the connection")
    ) == "the handshake did not finish in time"
    assert describe_handshake_failure(ConnectionResetError()) == (
        "the client closed the connection during the handshake")
    assert describe_handshake_failure(BrokenPipeError()) == "BrokenPipeError"


def _old_client() -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TLS 1.1 client over memory, its ClientHello made: (client, incoming, outgoing)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = tls_1_1_only().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return client, incoming, outgoing


def _server(tmp_path: Path, tls_files: tuple[Path, Path]
            ) -> tuple[ssl.SSLObject, ssl.MemoryBIO]:
    cert, key = tls_files
    context = server_context(Settings(data_dir=tmp_path, tls_cert=str(cert), tls_key=str(key)))
    assert context is not None
    incoming = ssl.MemoryBIO()
    return context.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True), incoming


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_refused_handshake_tells_the_client_why(
        tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """OpenSSL's alert reaches the connection although the handshake's exception comes
    wrapped (as aiosmtpd raises it), and the client reads `protocol version` in it."""
    client, client_in, client_out = _old_client()
    server, server_in = _server(tmp_path, tls_files)
    server_in.write(client_out.read())
    ours, theirs = socket.socketpair()
    with ours, theirs:
        descriptors = _open_descriptors()
        with pytest.raises(RuntimeError), refusal_alerts(ours):
            try:
                server.do_handshake()
            except ssl.SSLError as exc:
                assert exc.reason == "UNSUPPORTED_PROTOCOL"
                raise RuntimeError("the handshake failed") from exc
        assert _open_descriptors() == descriptors  # the duplicate is closed again
        theirs.settimeout(5)
        client_in.write(theirs.recv(4096))
    with pytest.raises(ssl.SSLError) as told:
        client.do_handshake()
    assert told.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_a_handshake_under_way_or_failing_without_an_alert_sends_nothing(
        tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    server, server_in = _server(tmp_path, tls_files)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        descriptors = _open_descriptors()
        with refusal_alerts(ours), pytest.raises(ssl.SSLWantReadError):
            server.do_handshake()  # nothing from the client yet
        server_in.write(b"a NOOP\r\n")  # plain text: refused, and OpenSSL makes no alert
        with pytest.raises(ssl.SSLError, match="WRONG_VERSION_NUMBER"), \
                refusal_alerts(ours):
            server.do_handshake()
        with pytest.raises(TimeoutError), refusal_alerts(ours):
            raise TimeoutError  # the handshake's timeout: no alert to send
        assert _open_descriptors() == descriptors
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(4096)


def test_a_connection_closed_before_its_handshake_goes_without_the_alert(
        tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """No descriptor to duplicate (uvloop's socket of a closed transport says -1): the
    handshake's own error comes through, not one about the duplicate."""
    client, _, client_out = _old_client()
    server, server_in = _server(tmp_path, tls_files)
    server_in.write(client_out.read())
    ours, theirs = socket.socketpair()
    ours.close()
    theirs.close()
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL"), refusal_alerts(ours):
        server.do_handshake()


def test_a_handshake_cancelled_gives_its_duplicate_back() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        descriptors = _open_descriptors()
        with pytest.raises(asyncio.CancelledError), refusal_alerts(ours):
            raise asyncio.CancelledError  # a BaseException: a session ended by shutdown
        assert _open_descriptors() == descriptors


def test_the_server_context_is_the_standard_one(
        tmp_path: Path, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours is a subclass made by hand; what it negotiates is what the ssl module's default
    server context would, but for our minimum version."""
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    cert, key = tls_files
    ours = server_context(Settings(data_dir=tmp_path, tls_cert=str(cert), tls_key=str(key)))
    standard = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert ours is not None
    for setting in ("options", "verify_mode", "verify_flags", "maximum_version",
                    "num_tickets", "security_level", "check_hostname", "post_handshake_auth",
                    "keylog_filename", "protocol"):
        assert getattr(ours, setting) == getattr(standard, setting), setting
    assert ours.get_ciphers() == standard.get_ciphers()
    assert ours.get_ca_certs() == standard.get_ca_certs() == []
    assert ours.minimum_version == ssl.TLSVersion.TLSv1_2
