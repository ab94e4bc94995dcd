"""The message envelope that travels with every message from the filter tier to the store.

Immutable, versioned and encoded explicitly as JSON (never pickle). aiosmtpd's mutable
Envelope is converted to this at the edge of the filter tier.

On the queue the raw message bytes are the AMQP body and the encoded envelope rides in a
header (see common.topology), so a 20 MB message is never base64-inflated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

SCHEMA_VERSION = 1


class EnvelopeError(ValueError):
    """An envelope could not be decoded; the message must be dead-lettered, not retried."""


@dataclass(frozen=True)
class Recipient:
    """One accepted RCPT TO and the local mailboxes it resolved to (aliases expanded)."""

    address: str
    mailboxes: tuple[str, ...]


@dataclass(frozen=True)
class Envelope:
    queue_id: str
    mail_from: str
    recipients: tuple[Recipient, ...]
    client_ip: str
    client_helo: str
    received_at: float
    size: int
    tls: str | None = None
    authenticated_user: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    junk: bool = False  # a spam verdict: the store files the message into the Junk folder
    schema: int = field(default=SCHEMA_VERSION)

    @property
    def mailboxes(self) -> tuple[str, ...]:
        """Every distinct local mailbox this message goes to, in first-seen order.

        An alias and its target named in one transaction get one copy, as in Postfix.
        """
        seen: dict[str, None] = {}
        for rcpt in self.recipients:
            for mailbox in rcpt.mailboxes:
                seen.setdefault(mailbox, None)
        return tuple(seen)

    def split(self, most_octets: int) -> tuple[Envelope, ...]:
        """This envelope as parts whose encodings each fit in `most_octets`, for a message
        whose aliases expand to more mailboxes than one AMQP header frame carries.

        Each distinct mailbox is in exactly one part and every part has the same queue id;
        the store's idempotence is per queue id and mailbox, so the parts deliver as the
        whole would. Raises EnvelopeError if even one mailbox does not fit beside the rest.
        """
        if len(self.encode()) <= most_octets:
            return (self,)
        bare = len(replace(self, recipients=()).encode())
        parts: list[list[Recipient]] = [[]]
        size = bare
        for address, mailbox in self._addressed_mailboxes():
            current = parts[-1]
            grows_last = bool(current) and current[-1].address == address
            cost = _json_length(mailbox) + 1
            if not grows_last:
                cost += _json_length(address) + RECIPIENT_OVERHEAD
            if current and size + cost > most_octets:
                parts.append([])
                current, grows_last = parts[-1], False
                size = bare + _json_length(address) + RECIPIENT_OVERHEAD + _json_length(mailbox)
            else:
                size += cost
            if grows_last:
                current[-1] = Recipient(address, (*current[-1].mailboxes, mailbox))
            else:
                current.append(Recipient(address, (mailbox,)))
        result = tuple(replace(self, recipients=tuple(part)) for part in parts)
        if any(len(part.encode()) > most_octets for part in result):
            raise EnvelopeError(f"envelope does not fit in {most_octets} octets")
        return result

    def _addressed_mailboxes(self) -> list[tuple[str, str]]:
        """(recipient address, mailbox) for each distinct mailbox, first seen first."""
        seen: dict[str, str] = {}
        for rcpt in self.recipients:
            for mailbox in rcpt.mailboxes:
                seen.setdefault(mailbox, rcpt.address)
        return [(address, mailbox) for mailbox, address in seen.items()]

    def encode(self) -> bytes:
        return json.dumps(self.as_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    def as_dict(self) -> dict[str, Any]:
        """The JSON form; field by field, because dataclasses.asdict deep-copies every value
        and costs more than the encoding itself on the filter's per-message path."""
        return {
            "queue_id": self.queue_id,
            "mail_from": self.mail_from,
            "recipients": [{"address": r.address, "mailboxes": list(r.mailboxes)}
                           for r in self.recipients],
            "client_ip": self.client_ip,
            "client_helo": self.client_helo,
            "received_at": self.received_at,
            "size": self.size,
            "tls": self.tls,
            "authenticated_user": self.authenticated_user,
            "smtputf8": self.smtputf8,
            "body_8bit": self.body_8bit,
            "junk": self.junk,
            "schema": self.schema,
        }

    @classmethod
    def decode(cls, data: bytes | str) -> Envelope:
        """The envelope, or EnvelopeError for anything a broken or hostile publisher could
        send: every field checked for its type and range, text for being Unicode that UTF-8
        can carry (JSON escapes can name lone surrogates)."""
        try:
            raw = json.loads(data, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise EnvelopeError(f"envelope is not JSON: {type(exc).__name__}") from None
        if not isinstance(raw, dict):
            raise EnvelopeError("envelope is not a JSON object")
        if raw.get("schema") != SCHEMA_VERSION:
            raise EnvelopeError(f"unsupported envelope schema {raw.get('schema')!r}")
        try:
            return cls(
                queue_id=_text(raw, "queue_id"),
                mail_from=_text(raw, "mail_from", allow_empty=True),
                recipients=tuple(_recipient(r) for r in raw["recipients"]),
                client_ip=_text(raw, "client_ip", allow_empty=True),
                client_helo=_text(raw, "client_helo", allow_empty=True),
                received_at=_number(raw, "received_at", LATEST_TIME),
                size=int(_number(raw, "size", MAX_SIZE)),
                tls=_optional_text(raw, "tls"),
                authenticated_user=_optional_text(raw, "authenticated_user"),
                smtputf8=_flag(raw, "smtputf8"),
                body_8bit=_flag(raw, "body_8bit"),
                junk=_flag(raw, "junk"),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise EnvelopeError(f"malformed envelope: {exc!r}") from None


# {"address":,"mailboxes":[]}, beside a recipient's quoted address and mailboxes
RECIPIENT_OVERHEAD = len('{"address":,"mailboxes":[]},')


def _json_length(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode())


# Until the end of year 9999 (IMAP's INTERNALDATE has four digits); a size a signed 64-bit
# integer holds.
LATEST_TIME = 253402300799.0
MAX_SIZE = 2**63 - 1


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number an envelope may hold")


def _number(raw: dict[str, Any], key: str, most: float) -> float:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 <= value <= most:
        raise EnvelopeError(f"envelope field {key} must be a number from 0 to {most:.0f}")
    return float(value) if isinstance(value, float) else value


def _flag(raw: dict[str, Any], key: str) -> bool:
    """A JSON true or false (absent: false). Not any value Python finds true: "false" would
    be, and a broken publisher's `"junk": "false"` would file the message as Junk."""
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise EnvelopeError(f"envelope field {key} must be true or false")
    return value


def _text(raw: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = raw[key]
    if not isinstance(value, str) or (not value and not allow_empty):
        raise EnvelopeError(f"envelope field {key} must be a non-empty string")
    return _utf8(value, key)


def _optional_text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise EnvelopeError(f"envelope field {key} must be a string or null")
    return value if value is None else _utf8(value, key)


def _utf8(value: str, key: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EnvelopeError(f"envelope field {key} is not valid Unicode") from None
    return value


def _recipient(raw: Any) -> Recipient:
    if not isinstance(raw, dict):
        raise EnvelopeError("recipient must be an object")
    mailboxes = raw.get("mailboxes")
    if not isinstance(mailboxes, list) or not all(isinstance(m, str) and m for m in mailboxes):
        raise EnvelopeError("recipient mailboxes must be a list of strings")
    return Recipient(address=_text(raw, "address"),
                     mailboxes=tuple(_utf8(m, "mailboxes") for m in mailboxes))
