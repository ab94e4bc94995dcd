"""Authentication-Results in our name (RFC 8601 section 5), and the scan result fields only we
write, removed from incoming mail."""

from __future__ import annotations

import pytest

from services.filter.protocol.auth_results import (
    authserv_id_of,
    claimed_by,
    without_claimed_results,
    without_fields,
)
from services.filter.protocol.message import HEADER_SCAN
from services.filter.protocol.scan_headers import OUR_FIELDS, SPAM_FIELDS

OURS = claimed_by("mx.test.invalid", ["example.test", "bücher.example"])
BODY = b"\r\nAuthentication-Results: mx.test.invalid; dmarc=pass\r\n"


def head(*fields: bytes) -> bytes:
    return b"From: a@remote.test\r\n" + b"".join(fields) + b"Subject: hi\r\n"


def test_a_message_without_the_field_is_returned_as_it_is() -> None:
    content = head() + BODY
    cleaned, removed = without_claimed_results(content, OURS)
    assert cleaned is content and removed == 0


@pytest.mark.parametrize("field", [
    b"Authentication-Results: mx.test.invalid; dmarc=pass\r\n",
    b"authentication-results:MX.Test.Invalid.; spf=pass\r\n",
    b"Authentication-Results : (comment (nested)) mx.test.invalid 1; dkim=pass\r\n",
    b'Authentication-Results: "mx.test.invalid"; dkim=pass\r\n',
    b"Authentication-Results: mx.test.invalid;\r\n\tspf=pass smtp.mailfrom=a@b\r\n dmarc=pass\r\n",
    b"Authentication-Results: example.test; dmarc=pass\r\n",
    b"Authentication-Results: mail.example.test; none\r\n",
    b"Authentication-Results: xn--bcher-kva.example; dmarc=pass\r\n",
    b"Authentication-Results: a.mx.test.invalid; spf=pass\r\n",
])
def test_a_field_in_our_name_is_removed_whole(field: bytes) -> None:
    cleaned, removed = without_claimed_results(head(field) + BODY, OURS)
    assert (cleaned, removed) == (head() + BODY, 1)


@pytest.mark.parametrize("field", [
    b"Authentication-Results: mx.google.com; dmarc=pass\r\n",
    b"Authentication-Results: notexample.test; dmarc=pass\r\n",
    b"Authentication-Results: test.invalid; spf=pass\r\n",
    b"Authentication-Results: ; spf=pass\r\n",
    b"Authentication-Results:\r\n",
    b"X-Authentication-Results: mx.test.invalid; spf=pass\r\n",
])
def test_fields_of_others_stay(field: bytes) -> None:
    content = head(field) + BODY
    assert without_claimed_results(content, OURS) == (content, 0)


def test_only_ours_go_among_several_and_the_body_is_not_touched() -> None:
    foreign = b"Authentication-Results: mx.google.com; spf=pass\r\n"
    ours = b"Authentication-Results: mx.test.invalid; dmarc=pass\r\n"
    content = ours + head(foreign, ours) + ours + BODY
    cleaned, removed = without_claimed_results(content, OURS)
    assert (cleaned, removed) == (head(foreign) + BODY, 3)


def test_a_message_that_is_all_header() -> None:
    content = b"Subject: x\r\nAuthentication-Results: mx.test.invalid; spf=pass"
    assert without_claimed_results(content, OURS) == (b"Subject: x\r\n", 1)


def test_a_message_with_no_header_section_is_all_body() -> None:
    """It starts with the empty line: the field after it is body text and stays."""
    assert without_claimed_results(BODY + b"more\r\n", OURS) == (BODY + b"more\r\n", 0)


@pytest.mark.parametrize(("value", "identifier"), [
    (b" mx.test.invalid; spf=pass", "mx.test.invalid"),
    (b" (a \\) b) MX.test.invalid. 1; none", "mx.test.invalid"),
    (b' "mx\\".test"; none', 'mx".test'),
    (b"\r\n mx.test.invalid; none", "mx.test.invalid"),
    (b" (unclosed", ""),
    (b' "unclosed', "unclosed"),
    (b"", ""),
    # 8 million folds before it: skipped in C (walked a character at a time, they held the
    # worker for seconds: found in review)
    (b"\r\n " * 100_000 + b"MX.test.invalid; none", "mx.test.invalid"),
])
def test_authserv_id_of(value: bytes, identifier: str) -> None:
    assert authserv_id_of(value) == identifier


def test_the_scan_fields_we_write_are_removed_and_no_others() -> None:
    head = (b"X-Spam: No\r\nX-Spammer: kept\r\nx-spam-status: No,\r\n\tscore=-100\r\n"
            b"X-Spam-Flag : NO\r\nX-Tiermail-Scan: clean\r\nSubject: X-Spam: in a value\r\n")
    cleaned, removed = without_fields(head + BODY, SPAM_FIELDS, lambda _value: True)
    assert (cleaned, removed) == (b"X-Spammer: kept\r\nSubject: X-Spam: in a value\r\n" + BODY,
                                  4)
    cleaned, removed = without_fields(head + BODY, OUR_FIELDS, lambda _value: True)
    assert removed == 1 and b"X-Tiermail-Scan" not in cleaned and b"X-Spam: No" in cleaned


def test_a_field_of_many_continuation_lines_is_removed_whole() -> None:
    folded = b"Authentication-Results: mx.test.invalid;" + b"\r\n x" * 100_000 + b"\r\n"
    content = b"From: a@b.example\r\n" + folded + b"Subject: s\r\n\r\nbody\r\n"
    assert without_claimed_results(content, OURS) == (
        b"From: a@b.example\r\nSubject: s\r\n\r\nbody\r\n", 1)


def test_without_an_empty_line_only_the_first_octets_are_searched() -> None:
    """A header section of fields with no empty line after it is searched only as far as a
    header section may go (HEADER_SCAN): searched to the end, 25 MB of lines held the
    worker for seconds (found in review). The filter refuses longer header sections."""
    forged = b"Authentication-Results: mx.test.invalid; dkim=pass\r\n"
    near = b"X-F: v\r\n" * 1000 + forged
    far = b"X-F: v\r\n" * (HEADER_SCAN // 8 + 1) + forged
    assert without_claimed_results(near, OURS) == (b"X-F: v\r\n" * 1000, 1)
    assert without_claimed_results(far, OURS) == (far, 0)


@pytest.mark.parametrize("content", [
    b"From: a\r\nno field\r\nAuthentication-Results: mx.test.invalid; dkim=pass\r\n",
    b"no header at all\r\nAuthentication-Results: mx.test.invalid; dkim=pass\r\n\r\nx\r\n",
])
def test_the_header_section_ends_before_a_line_that_is_no_field(content: bytes) -> None:
    """With no empty line after the header, the body started at the first line that is no
    field for the store (IMAP, POP3) but not for this search: a field-like line in the body
    was removed from it (found in review, with Return-Path)."""
    assert without_claimed_results(content, OURS) == (content, 0)
