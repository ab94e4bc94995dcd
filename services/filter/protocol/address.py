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
    rf"\s*<({_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})*)>(.*)", re.DOTALL
)


def parse_simple_path(arg: str) -> tuple[str, str] | None:
    """(address, rest of the line) for a plain `<local@domain>` path, else None."""
    match = _SIMPLE_PATH.fullmatch(arg)
    if match is None:
        return None
    return match.group(1), match.group(2).lstrip()
