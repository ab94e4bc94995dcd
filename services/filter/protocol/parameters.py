"""MAIL FROM and RCPT TO parameters (RFC 5321 4.1.2 `esmtp-param`) and what we take of them.

aiosmtpd reads a parameter keyword with str.isalnum, so `MT-PRIORITY=3` (RFC 6710), whose
keyword has the hyphen the grammar allows, got the 501 of a syntax error where an unknown
parameter gets 555 (RFC 5321 4.1.1.11); and it kept the last of a keyword given twice.
Pure functions and constants only: no I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"),
# esmtp-value = 1*(%d33-60 / %d62-126), to which RFC 6531 3.3 adds UTF8-non-ascii.
_PARAMETER = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?")

# What HELP shows (RFC 5321 4.1.1.8); the EHLO keywords SIZE, 8BITMIME and SMTPUTF8 offer the
# MAIL parameters, and no RCPT parameter is offered (DSN is not).
MAIL_SYNTAX = ("MAIL FROM:<address> [SIZE=<octets>] [BODY=7BIT|8BITMIME] [SMTPUTF8]"
               " (parameters after EHLO only)")
RCPT_SYNTAX = "RCPT TO:<address> (no parameters)"


def parse_parameters(words: Sequence[str]) -> dict[str, str | bool] | None:
    """keyword -> value (True for a keyword without one), as aiosmtpd's _getparams has them;
    None when a word is not an esmtp-param (aiosmtpd then answers its 501 syntax reply)."""
    result: dict[str, str | bool] = {}
    for word in words:
        match = _PARAMETER.fullmatch(word)
        if match is None:
            return None
        keyword, value = match.groups()
        result[keyword] = True if value is None else value
    return result


def repeated_keyword(words: Sequence[str]) -> str | None:
    """The first keyword that comes twice among a command's parameters (in any case), else
    None. No extension defines a parameter given twice, and which one would hold is
    anybody's guess (two SIZEs, BODY=8BITMIME and BODY=7BIT)."""
    seen: set[str] = set()
    for word in words:
        keyword = word.partition("=")[0].upper()
        if keyword in seen:
            return keyword
        seen.add(keyword)
    return None
