"""TLS server contexts, and a self-signed development certificate when none exists."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from common.settings import Settings


def ensure_dev_certificate(cert: Path, key: Path, hostname: str) -> bool:
    """Create a self-signed certificate for `hostname` unless both files exist.

    Returns True when a certificate was generated. Used by `make run` / `tiermail up` and the
    tests; production deployments bring their own certificate (TIERMAIL_TLS_CERT/KEY).
    """
    if cert.exists() and key.exists():
        return False
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "825",
            "-subj", f"/CN={hostname}",
            "-addext", f"subjectAltName=DNS:{hostname},DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    return True


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side context, or None when no certificate is configured or present."""
    cert, key = settings.tls_cert_path, settings.tls_key_path
    if not (cert.exists() and key.exists()):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context
