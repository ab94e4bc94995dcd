"""rspamd's HTTP protocol (/checkv2): the request headers and the JSON reply, parsed.

Pure: no I/O. The reply fields are described in rspamd's protocol documentation
(doc/developers/protocol.md): action, score, required_score, symbols{name, score, options},
messages.smtp_message, milter.add_headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.envelope import Envelope

CHECK_PATH = "/checkv2"
PING_PATH = "/ping"

# rspamd's actions (the names it sends).
NO_ACTION = "no action"
GREYLIST = "greylist"
ADD_HEADER = "add header"
REWRITE_SUBJECT = "rewrite subject"
SOFT_REJECT = "soft reject"
REJECT = "reject"
# Without a score threshold: only an operator's rule (force_actions, multimap) gives them,
# once the actions are declared in rspamd's actions.conf.
DISCARD = "discard"
QUARANTINE = "quarantine"
ACTIONS = frozenset({NO_ACTION, GREYLIST, ADD_HEADER, REWRITE_SUBJECT, SOFT_REJECT, REJECT,
                     DISCARD, QUARANTINE})

_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")

# rspamd 3.4 scores UTF-8 in addresses and headers as broken (INVALID_FROM_8BIT alone is
# 6, its add-header threshold), which RFC 6531/6532 make valid in an SMTPUTF8 transaction:
# without these, mail in German or Chinese with a UTF-8 address went to Junk.
SMTPUTF8_SETTINGS = (b'{symbols_disabled = ["INVALID_FROM_8BIT", "INVALID_RCPT_8BIT", '
                     b'"FROM_INVALID", "TO_INVALID", "FROM_NEEDS_ENCODING", '
                     b'"TO_NEEDS_ENCODING", "SUBJECT_NEEDS_ENCODING"]}')


class RspamdProtocolError(ValueError):
    """The reply is not what rspamd sends."""


@dataclass(frozen=True)
class Symbol:
    name: str
    score: float
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class RspamdResult:
    action: str
    score: float
    required_score: float
    symbols: tuple[Symbol, ...] = ()
    smtp_message: str | None = None
    add_headers: tuple[tuple[str, str], ...] = ()  # milter.add_headers, as rspamd gives them
    skipped: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def has(self, symbol: str) -> bool:
        return any(s.name == symbol for s in self.symbols)


def _header_value(text: str) -> bytes:
    return _HEADER_UNSAFE.sub("", text).encode("utf-8")


def request_headers(envelope: Envelope, hostname: str) -> list[tuple[bytes, bytes]]:
    """The envelope as rspamd request headers; Rcpt repeats once per recipient.

    No `Hostname` header: rspamd means the client's reverse-DNS name by it, which the filter
    does not look up; our own name goes in `MTA-Name`. An address with UTF-8 in it is left
    out: rspamd cannot read one there and scores the message BROKEN_HEADERS (8). An SMTPUTF8
    transaction gets `Settings` turning off the symbols that count RFC 6532 headers as
    broken (SMTPUTF8_SETTINGS; it takes the place of rspamd's settings rules for it).
    """
    headers: list[tuple[bytes, bytes]] = [(b"Queue-Id", _header_value(envelope.queue_id))]
    if envelope.client_ip:
        headers.append((b"IP", _header_value(envelope.client_ip)))
    if envelope.client_helo:
        headers.append((b"Helo", _header_value(envelope.client_helo)))
    # An empty reverse-path (bounces) is sent as "<>", which rspamd understands.
    if envelope.mail_from.isascii():
        headers.append((b"From", _header_value(envelope.mail_from or "<>")))
    for rcpt in envelope.recipients:
        if rcpt.address.isascii():
            headers.append((b"Rcpt", _header_value(rcpt.address)))
    if envelope.smtputf8:
        headers.append((b"Settings", SMTPUTF8_SETTINGS))
    if envelope.authenticated_user:
        headers.append((b"User", _header_value(envelope.authenticated_user)))
    if hostname:
        headers.append((b"MTA-Name", _header_value(hostname)))
    return headers


def parse_checkv2(data: bytes) -> RspamdResult:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RspamdProtocolError(f"reply is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise RspamdProtocolError("reply is not a JSON object")
    if "error" in raw and "action" not in raw:
        raise RspamdProtocolError(f"rspamd error: {str(raw['error'])[:200]}")
    action = raw.get("action")
    if action not in ACTIONS:
        raise RspamdProtocolError(f"unknown action {str(action)[:50]!r}")
    messages = raw.get("messages")
    smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
    return RspamdResult(
        action=action,
        score=_number(raw, "score"),
        required_score=_number(raw, "required_score"),
        symbols=_symbols(raw.get("symbols")),
        smtp_message=smtp_message if isinstance(smtp_message, str) else None,
        add_headers=_add_headers(raw.get("milter")),
        skipped=bool(raw.get("is_skipped", False)),
    )


def _number(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RspamdProtocolError(f"{key} is not a number")
    return float(value)


def _symbols(raw: Any) -> tuple[Symbol, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise RspamdProtocolError("symbols is not an object")
    out: list[Symbol] = []
    for key, value in raw.items():
        if not isinstance(value, dict):
            raise RspamdProtocolError("a symbol is not an object")
        name = value.get("name", key)
        score = value.get("score", 0.0)
        options = value.get("options", ())
        if not isinstance(name, str) or isinstance(score, bool) \
                or not isinstance(score, int | float):
            raise RspamdProtocolError("a symbol has no name or score")
        if not isinstance(options, list | tuple):
            options = ()
        out.append(Symbol(name, float(score), tuple(str(o) for o in options)))
    return tuple(out)


def _add_headers(milter: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(milter, dict):
        return ()
    add = milter.get("add_headers")
    if not isinstance(add, dict):
        return ()
    out: list[tuple[str, str]] = []
    for name, spec in add.items():
        value = spec.get("value") if isinstance(spec, dict) else spec
        if isinstance(name, str) and isinstance(value, str):
            out.append((name, value))
    return tuple(out)
