"""Fast parsing of the common MAIL FROM / RCPT TO path, `<dot-atom@domain> params`.

aiosmtpd parses every path with the email package's RFC 5322 header parser, which was the
largest single cost of a short SMTP transaction. Nearly every real path is a plain dot-atom
address in angle brackets; this recognises exactly that shape and gives up (None) on anything
else, so unusual paths (quoted local parts, source routes, UTF-8, the null path `<>`) still go
through aiosmtpd's full parser. The unit tests check both agree wherever this answers.
"""

from __future__ import annotations

import re

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE_PATH = re.compile(
    rf"\s*<({_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})*)>(?:\s+(.*)|)", re.DOTALL
)


def is_utf8(arg: str) -> bool:
    """Whether a command argument arrived as UTF-8. aiosmtpd decodes arguments with
    surrogateescape, so other octets (Latin-1, say) become lone surrogates, which no
    envelope, log line or Redis key can carry."""
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_simple_path(arg: str) -> tuple[str, str] | None:
    """(address, rest of the line) for a plain `<local@domain>` path, else None."""
    match = _SIMPLE_PATH.fullmatch(arg)
    if match is None:
        return None
    return match.group(1), match.group(2) or ""


# Everything else, by RFC 5321 4.1.2's grammar (with RFC 6531's UTF-8 in local parts and
# domains). The email package's RFC 5322 parser, which aiosmtpd uses, is far more lenient
# and rewrites what it accepts: `<a b@x>` became `"a b"@x` and `<a(c)b@x>` the same, a comment
# being read as a space. A path is taken exactly as written here, or refused (553 5.1.3).
_UTF8 = "\u0080-\U0010ffff"
_ATEXT_UTF8 = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8}-]"
_DOT_STRING = rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_LET_DIG = rf"[A-Za-z0-9{_UTF8}]"
_SUB_DOMAIN = rf"{_LET_DIG}(?:[A-Za-z0-9{_UTF8}-]*{_LET_DIG})?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # IPv4, IPv6:..., or a tagged literal
_MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:{_DOMAIN}|{_ADDRESS_LITERAL})"
_SOURCE_ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"  # RFC 5321 4.1.2: accepted and ignored
_PATH = re.compile(
    rf"\s*<(?:(?:{_SOURCE_ROUTE})?({_MAILBOX})|(postmaster)|)>(?:\s+(.*)|)", re.DOTALL | re.I)
# Without angle brackets: not RFC 5321, but common in scripts; Postfix takes it too.
_BARE_MAILBOX = re.compile(rf"\s*({_MAILBOX})(?:\s+(.*)|)", re.DOTALL)


def parse_path(arg: str, *, sender: bool = False) -> tuple[str, str] | None:
    """(address, parameters) of a MAIL FROM (`sender`) or RCPT TO argument, else None. The
    null path gives "<>" (as aiosmtpd has it); `<postmaster>` without a domain is allowed as
    a recipient only (RFC 5321 4.1.1.3, 4.5.1: a reverse-path has a domain, 4.1.1.2); a
    source route is dropped."""
    match = _PATH.fullmatch(arg)
    if match is not None:
        if sender and match.group(2):
            return None
        address = match.group(1) or match.group(2) or "<>"
        return _unquoted(address), match.group(3) or ""
    match = _BARE_MAILBOX.fullmatch(arg)
    if match is not None:
        return _unquoted(match.group(1)), match.group(2) or ""
    return None


# Sender addresses outside that grammar that real mail still comes from: dots doubled,
# leading or trailing in a local part (old Japanese mobile carriers' addresses), "_" in a
# domain label (hosts named under Windows). Postfix takes them by default
# (strict_rfc821_envelopes = no), so a sender that reaches every other system would get a
# permanent 553 from us alone. As a reverse-path only: recipients are our own addresses.
_LEGACY_LOCAL = rf"\.*{_ATEXT_UTF8}(?:{_ATEXT_UTF8}|\.)*"
_LEGACY_LABEL = rf"[A-Za-z0-9_{_UTF8}](?:[A-Za-z0-9_{_UTF8}-]*[A-Za-z0-9_{_UTF8}])?"
_LEGACY_SENDER = re.compile(
    rf"\s*<({_LEGACY_LOCAL}@{_LEGACY_LABEL}(?:\.{_LEGACY_LABEL})*)>(?:\s+(.*)|)", re.DOTALL)


def parse_legacy_sender(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of a MAIL FROM path that only the leniency above takes, else
    None; the address exactly as written."""
    match = _LEGACY_SENDER.fullmatch(arg)
    if match is None:
        return None
    return match.group(1), match.group(2) or ""


_DOT_STRING_RE = re.compile(_DOT_STRING)
_QUOTED_PAIR_RE = re.compile(r"\\(.)")


def _unquoted(address: str) -> str:
    """`"user"@x` is `user@x` (RFC 5321 4.1.2: the same local part; the quotes were not
    needed), so it finds the same mailbox; a local part that needs its quotes keeps them."""
    if not address.startswith('"'):
        return address
    quoted, _, domain = address.rpartition("@")
    inner = _QUOTED_PAIR_RE.sub(r"\1", quoted[1:-1])
    return f"{inner}@{domain}" if _DOT_STRING_RE.fullmatch(inner) else address
