"""SASL PLAIN messages (RFC 4616), for every protocol that takes them (IMAP AUTHENTICATE, POP3
AUTH, later SMTP AUTH). Pure: no I/O.

Each protocol decodes its own base64 and answers undecodable base64 or a cancel ("*") as a
protocol error (RFC 3501 6.2.2 and RFC 9051 6.2.2: BAD; RFC 5034 4: -ERR). What decodes but is
no PLAIN message is a failed authentication instead (RFC 4422 3.6: the exchange fails): an
empty response (RFC 4959 3 and RFC 5034 4 spell it "=" on the command line), a missing or
extra NUL, text that is not UTF-8, an empty authcid or password.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlainCredentials:
    authzid: str  # "" when the client asked for none (act as the authcid)
    authcid: str
    password: str


def parse_plain(message: bytes) -> PlainCredentials | None:
    """The credentials in a PLAIN message ([authzid] NUL authcid NUL passwd, RFC 4616 2);
    None when it is none (the authentication fails)."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        return None
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        return None
    if not authcid or not password:
        return None
    return PlainCredentials(authzid, authcid, password)
