"""Header fields that carry scan results: X-Spam-*, Authentication-Results, not-scanned notices.

Pure formatting, no I/O. Every value put into a header goes through `header_safe`: scanner
output (symbol names, options, signature names) is untrusted text and must never produce CR,
LF or other control characters (a header-injection vector), nor a line longer than RFC 5322
2.1.1 allows (998 octets; we never fold, so values are bounded well below that).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

Header = tuple[str, str]

# RFC 5322 2.1.1: 998 octets per line. Name, colon and space fit in the rest.
MAX_VALUE = 900
_UNSAFE = re.compile(r"[^\x20-\x7e]+")
_SPACES = re.compile(r" {2,}")
_SYMBOL_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
ELLIPSIS = "..."


def header_safe(text: str, limit: int = MAX_VALUE) -> str:
    """One line of printable ASCII, at most `limit` characters (cut with "...")."""
    cleaned = _SPACES.sub(" ", _UNSAFE.sub(" ", text)).strip()
    if len(cleaned) > limit:
        cleaned = cleaned[: max(0, limit - len(ELLIPSIS))].rstrip() + ELLIPSIS
    return cleaned


def symbol_name(name: str) -> str:
    """A scanner symbol name reduced to [A-Za-z0-9_.-] (anything else becomes '_')."""
    return _SYMBOL_UNSAFE.sub("_", name)[:100] or "_"


def format_score(score: float) -> str:
    return f"{score:.2f}"


def symbols_value(symbols: Iterable[tuple[str, float | None]], limit: int = MAX_VALUE) -> str:
    """`NAME(score), ...` (or `NAME` when the scanner gives no score), highest score first,
    cut at whole entries to fit `limit`."""
    ordered = sorted(symbols, key=lambda item: (-(item[1] or 0.0), item[0]))
    parts: list[str] = []
    used = 0
    for name, score in ordered:
        part = symbol_name(name) if score is None else \
            f"{symbol_name(name)}({format_score(score)})"
        extra = len(part) + (2 if parts else 0)
        if used + extra > limit - len(", " + ELLIPSIS):
            parts.append(ELLIPSIS)
            break
        parts.append(part)
        used += extra
    return ", ".join(parts)


def spam_headers(score: float, required: float, symbols: Sequence[tuple[str, float | None]]
                 ) -> tuple[Header, ...]:
    """Headers of a message judged spam (filed into Junk)."""
    headers: list[Header] = [
        ("X-Spam", "Yes"),
        ("X-Spam-Status", f"Yes, score={format_score(score)} required={format_score(required)}"),
        ("X-Spam-Score", f"{format_score(score)} / {format_score(required)}"),
    ]
    if symbols:
        headers.append(("X-Spam-Symbols", symbols_value(symbols)))
    return tuple(headers)


def ham_headers(score: float, required: float) -> tuple[Header, ...]:
    return (("X-Spam-Status",
             f"No, score={format_score(score)} required={format_score(required)}"),)


NOT_SCANNED_HEADER = "X-Tiermail-Scan"

# The scan results' fields as a sender may have written them, to be removed before ours are
# added (a client rule or Sieve test matching `X-Spam: No` would take the sender's word):
# ours always, the X-Spam family where the spam scanner writes its own.
OUR_FIELDS = re.compile(rb"^X-Tiermail-(?:Scan|Virus)[ \t]*:", re.IGNORECASE | re.MULTILINE)
SPAM_FIELDS = re.compile(rb"^(?:X-Tiermail-(?:Scan|Virus)|X-Spam(?:-Status|-Score|-Symbols"
                         rb"|-Flag|-Level|-Report)?)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def not_scanned_header(scanner: str) -> Header:
    return (NOT_SCANNED_HEADER, header_safe(f"not scanned ({scanner} unavailable)"))


VIRUS_HEADER = "X-Tiermail-Virus"


def virus_header(signature: str) -> Header:
    return (VIRUS_HEADER, header_safe(signature, 200))


# RFC 8601: Authentication-Results. rspamd's symbols for each method, in precedence order:
# when several appear (a message with two DKIM signatures), the first listed wins.
AUTH_METHODS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("spf", (
        ("R_SPF_FAIL", "fail"),
        ("R_SPF_SOFTFAIL", "softfail"),
        ("R_SPF_PERMFAIL", "permerror"),
        ("R_SPF_DNSFAIL", "temperror"),
        ("R_SPF_NEUTRAL", "neutral"),
        ("R_SPF_ALLOW", "pass"),
        ("R_SPF_NA", "none"),
    )),
    ("dkim", (
        ("R_DKIM_REJECT", "fail"),
        ("R_DKIM_PERMFAIL", "permerror"),
        ("R_DKIM_TEMPFAIL", "temperror"),
        ("R_DKIM_ALLOW", "pass"),
        ("R_DKIM_NA", "none"),
    )),
    ("dmarc", (
        ("DMARC_POLICY_REJECT", "fail"),
        ("DMARC_POLICY_QUARANTINE", "fail"),
        ("DMARC_POLICY_SOFTFAIL", "fail"),
        ("DMARC_BAD_POLICY", "permerror"),
        ("DMARC_DNSFAIL", "temperror"),
        ("DMARC_POLICY_ALLOW", "pass"),
        ("DMARC_POLICY_ALLOW_WITH_FAILURES", "pass"),
        ("DMARC_NA", "none"),
    )),
)
AUTH_RESULTS_HEADER = "Authentication-Results"
_AUTHSERV_UNSAFE = re.compile(r"[^A-Za-z0-9.\-]")


@functools.cache  # asked for every message, with the one host name
def our_authserv_id(hostname: str) -> str:
    """The authserv-id our Authentication-Results carry: the host name, in the characters an
    RFC 2045 `value` token allows."""
    return _AUTHSERV_UNSAFE.sub("", hostname) or "localhost"


def authentication_results(authserv_id: str, symbols: Iterable[str]) -> Header | None:
    """RFC 8601 section 2.2 `authserv-id; method=result; ...` for the methods whose symbols
    appear; None when none do (then there is nothing to say)."""
    present = set(symbols)
    results: list[str] = []
    for method, table in AUTH_METHODS:
        for symbol, result in table:
            if symbol in present:
                results.append(f"{method}={result}")
                break
    if not results:
        return None
    return (AUTH_RESULTS_HEADER, "; ".join([our_authserv_id(authserv_id), *results]))
