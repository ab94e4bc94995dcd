"""Every reply the filter sends carries an enhanced status code (RFC 2034)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.filter.protocol import replies
from services.filter.protocol.replies import enhance, is_client_error

# (what aiosmtpd writes, what goes on the wire)
TABLE = [
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    ("454 TLS not available", "454 4.7.0 TLS not available"),
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("503 Error: nested MAIL command", "503 5.5.1 Error: nested MAIL command"),
    ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
    ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
    ("501 Syntax: EHLO hostname", "501 5.5.4 Syntax: EHLO hostname"),
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ('500 Error: command "FOO" not recognized', '500 5.5.2 Error: command "FOO" not recognized'),
    # RFC 5321 2.3.8 and 4.2: no bare CR, NUL or escape sequences echoed into a reply.
    ('500 Error: command "FOO\rBAR" not recognized', "500 5.5.2 Error: command not recognized"),
    ('500 Error: command "X\x00\x1b[2J" not recognized',
     "500 5.5.2 Error: command not recognized"),
    # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; an unknown command may be 510.
    ('500 Error: command "' + "X" * 510 + '" not recognized',
     "500 5.5.2 Error: command not recognized"),
    ('500 Error: command "' + "X" * 64 + '" not recognized',
     '500 5.5.2 Error: command "' + "X" * 64 + '" not recognized'),
    ("500 Command line too long", replies.COMMAND_TOO_LONG),
    ("500 Line too long (see RFC5321 4.5.3.1.6)", replies.LINE_TOO_LONG),
    ("552 Error: Too much mail data", replies.MESSAGE_TOO_BIG),
    ("552 Error: message size exceeds fixed maximum message size", replies.SIZE_EXCEEDED),
    ("555 MAIL FROM parameters not recognized or not implemented",
     "555 5.5.4 MAIL FROM parameters not recognized or not implemented"),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ("252 Cannot VRFY user, but will accept message and attempt delivery",
     "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
    ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
    ("554 Command refused due to lack of security",
     "554 5.7.0 Command refused due to lack of security"),
    ("421 4.7.0 MAIL sent too many times", "421 4.7.0 MAIL sent too many times"),
    ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
    ("599 Something new", "599 5.0.0 Something new"),
    ("499 Something new", "499 4.0.0 Something new"),
    # Internal details never go out, and never as a permanent failure.
    ("500 Error: (KeyError) 'secret'", replies.INTERNAL_ERROR),
    ("500 Error: Cannot describe error", replies.INTERNAL_ERROR),
    # aiosmtpd's hang-up after unknown commands: closing the connection is a 421.
    # No enhanced codes: greeting and intermediate replies.
    ("220 mx.example.test ESMTP tiermail", "220 mx.example.test ESMTP tiermail"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
]


@pytest.mark.parametrize(("raw", "expected"), TABLE)
def test_enhance_table(raw: str, expected: str) -> None:
    assert enhance(raw) == expected


def test_multiline_reply_gets_codes_on_every_line() -> None:
    assert enhance("550-first\r\n550 second") == "550-5.0.0 first\r\n550 5.0.0 second"


ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")
CONSTANTS = [
    value for name, value in vars(replies).items()
    if name.isupper() and isinstance(value, str) and value[:1] in "245" and name != "QUEUED"
]


@pytest.mark.parametrize("constant", CONSTANTS)
def test_every_constant_has_a_matching_enhanced_code(constant: str) -> None:
    assert ENHANCED.match(constant), constant
    assert constant[0] == constant[4]  # reply class and enhanced class agree
    assert enhance(constant) == constant


@pytest.mark.parametrize("constant", [
    replies.NO_MEMORY_FOR_DATA, replies.QUEUE_UNAVAILABLE, replies.MAILBOX_FULL,
    replies.SCANNER_UNAVAILABLE])
def test_our_own_trouble_is_temporary_and_not_the_clients_error(constant: str) -> None:
    """A 5xx would make senders bounce good mail; counted as the client's error, a relay
    flushing its queue during our memory crunch was cut off at smtp_max_errors."""
    assert constant.startswith("4") and not is_client_error(constant)


def test_queued_reply() -> None:
    assert replies.queued("ABC") == "250 2.0.0 Ok: queued as ABC"


@given(st.integers(200, 599), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126)))
def test_enhance_is_idempotent_and_keeps_the_code(code: int, text: str) -> None:
    once = enhance(f"{code} {text}")
    assert once[:3] == str(code) or once == replies.INTERNAL_ERROR
    assert enhance(once) == once


def test_ehlo_lines() -> None:
    assert replies.ehlo_lines("mx.test", ["SIZE 100", "PIPELINING"]) == [
        "250-mx.test", "250-SIZE 100", "250 PIPELINING"]
    assert replies.ehlo_lines("mx.test", []) == ["250 mx.test"]
