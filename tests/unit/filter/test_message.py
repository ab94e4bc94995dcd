"""Bare newline detection and the Received header."""

from __future__ import annotations

import datetime
import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.filter.protocol.message import (
    MAX_HEADER_FIELDS,
    MAX_HEADER_SECTION,
    ReceivedInfo,
    has_bare_newline,
    header_section_end,
    header_section_too_big,
    protocol_name,
    received_header,
    without_own_received,
)


@pytest.mark.parametrize(
    ("content", "bare"),
    [
        (b"", False),
        (b"Subject: x\r\n\r\nbody\r\n", False),
        (b"no newline at all", False),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\r\n", True),
        (b"a\r\n\n", True),
        (b"a\n\r", True),
        (b"ends with CR\r", True),
        (b"starts\n", True),
        (b"carrier\n.\nMAIL FROM:<x@y>\r\n", True),
        (b"carrier\r.\rMAIL FROM:<x@y>\r\n", True),
        (b"carrier\r\n.\nMAIL FROM:<x@y>\r\n", True),
    ],
)
def test_bare_newline(content: bytes, bare: bool) -> None:
    assert has_bare_newline(content) is bare


def _reference(content: bytes) -> bool:
    """Byte-by-byte definition, to check the counting shortcut against."""
    for index, byte in enumerate(content):
        if byte == 0x0D and content[index + 1:index + 2] != b"\n":
            return True
        if byte == 0x0A and (index == 0 or content[index - 1] != 0x0D):
            return True
    return False


@given(st.binary(max_size=200))
def test_bare_newline_matches_reference(content: bytes) -> None:
    assert has_bare_newline(content) is _reference(content)


@given(st.lists(st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b"."]), max_size=30))
def test_bare_newline_matches_reference_on_newline_soup(parts: list[bytes]) -> None:
    content = b"".join(parts)
    assert has_bare_newline(content) is _reference(content)


WHEN = datetime.datetime(2026, 11, 22, 9, 30, 5, tzinfo=datetime.UTC).timestamp()


def info(**changes: object) -> ReceivedInfo:
    values: dict[str, object] = {
        "helo": "client.remote.test",
        "client_ip": "192.0.2.7",
        "hostname": "mx.example.test",
        "queue_id": "QID123",
        "recipients": ["alice@example.test"],
        "received_at": WHEN,
    }
    values.update(changes)
    return ReceivedInfo(**values)  # type: ignore[arg-type]


def test_received_single_recipient() -> None:
    assert received_header(info()) == (
        b"Received: from client.remote.test ([192.0.2.7])\r\n"
        b"\tby mx.example.test (tiermail) with ESMTP id QID123\r\n"
        b"\tfor <alice@example.test>; Sun, 22 Nov 2026 09:30:05 +0000\r\n"
    )


def test_received_several_recipients_tls_ipv6() -> None:
    header = received_header(info(
        recipients=["a@example.test", "b@example.test"], client_ip="2001:db8::1",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
    ))
    assert header == (
        b"Received: from client.remote.test ([IPv6:2001:db8::1])\r\n"
        b"\tby mx.example.test (tiermail) with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384)"
        b" id QID123;\r\n"
        b"\tSun, 22 Nov 2026 09:30:05 +0000\r\n"
    )


def test_received_date_parses() -> None:
    header = received_header(info()).decode()
    date = header.rsplit(";", 1)[1].strip()
    assert email.utils.parsedate_to_datetime(date).timestamp() == WHEN


def test_received_dates_follow_the_second_of_each_message() -> None:
    # The date text is kept for the last second seen (protocol/message.py, _date).
    for offset in (0, 0.4, 0.999, 1, 61, 1, 0):
        header = received_header(info(received_at=WHEN + offset)).decode()
        date = email.utils.parsedate_to_datetime(header.rsplit(";", 1)[1].strip())
        assert date.timestamp() == WHEN + int(offset)


@pytest.mark.parametrize("code", range(0x80))
def test_received_keeps_exactly_the_printable_ascii_that_is_not_special(code: int) -> None:
    char = chr(code)
    kept = 0x20 < code < 0x7F and char not in '()[]<>;\\"'
    header = received_header(info(helo=f"a{char}b")).decode("ascii")
    assert header.startswith(f"Received: from a{char if kept else '?'}b ")


def test_received_sanitises_hostile_helo() -> None:
    header = received_header(info(helo="evil)\tname\x00(x ü"))
    assert header.startswith(b"Received: from evil??name??x?? ([192.0.2.7])\r\n")
    assert header.count(b"\r\n") == 3


def test_received_utf8() -> None:
    header = received_header(info(helo="bücher.test", recipients=["jürgen@bücher.test"],
                                  smtputf8=True))
    assert "from bücher.test ".encode() in header
    assert "for <jürgen@bücher.test>".encode() in header
    assert b" with UTF8SMTP id " in header


@pytest.mark.parametrize(("helo", "shown"), [
    ("[127.0.0.1]", "[127.0.0.1]"), ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
    ("[ipv6:::1]", "[ipv6:::1]"), ("[2001:db8::1]", "?2001:db8::1?"),
    ("[IPv6:192.0.2.1]", "?IPv6:192.0.2.1?"), ("[999.0.0.1]", "?999.0.0.1?"),
    ("[a] (b)", "?a???b?"),
    # A scope is no part of RFC 5321's IPv6 literal, and Python takes any text after the "%":
    # kept whole, it wrote the client's own trace fields, date and control characters in ours.
    ("[IPv6:fe80::1%x]) by forged; Mon, 1 Jan 2001 00:00:00 +0000 (x]",
     "?IPv6:fe80::1%x???by?forged??Mon,?1?Jan?2001?00:00:00?+0000??x?"),
    ("[IPv6:fe80::1%x\rX-Injected: yes\x00]", "?IPv6:fe80::1%x?X-Injected:?yes??"),
    ("[IPv6:fe80::1%eth0]", "?IPv6:fe80::1%eth0?")])
def test_received_keeps_an_address_literal_helo(helo: str, shown: str) -> None:
    """Clients without a DNS name greet with their address in brackets (Thunderbird does):
    RFC 5321's Received syntax has room for it; anything else in brackets is cleaned."""
    assert received_header(info(helo=helo)).startswith(
        f"Received: from {shown} ([192.0.2.7])\r\n".encode())


def test_received_empty_helo() -> None:
    assert received_header(info(helo="")).startswith(b"Received: from unknown ")


@pytest.mark.parametrize(
    ("esmtp", "tls", "utf8", "name"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "UTF8SMTP"),
        (True, True, True, "UTF8SMTPS"),
    ],
)
def test_protocol_name(esmtp: bool, tls: bool, utf8: bool, name: str) -> None:
    assert protocol_name(esmtp, tls, utf8) == name


@pytest.mark.parametrize(("recipient", "utf8", "shown"), [
    # A catch-all takes any local part: a quoted one could close the "for" clause and write
    # its own date and trace fields.
    ('"x>; Mon, 1 Jan 2001 00:00:00 +0000 by evil"@example.test', False,
     '?x???Mon,?1?Jan?2001?00:00:00?+0000?by?evil?@example.test'),
    ("a\u2028b\u00a0c@bücher.test", True, "a?b?c@bücher.test"),  # separators break lines
])
def test_received_cleans_the_recipient_it_names(recipient: str, utf8: bool, shown: str) -> None:
    header = received_header(info(recipients=[recipient], smtputf8=utf8)).decode()
    assert f"\tfor <{shown}>; " in header


@given(st.text(max_size=100), st.text(max_size=40), st.booleans())
def test_received_never_breaks_the_header(helo: str, recipient: str, utf8: bool) -> None:
    header = received_header(info(helo=helo, recipients=[recipient], smtputf8=utf8))
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert b"\n" not in header.replace(b"\r\n", b"") and b"\r" not in header.replace(b"\r\n", b"")


SENT = (b"Received: from elsewhere\r\n\tby relay.test id OTHER;\r\n\tdate\r\n"
        b"Subject: x\r\n\r\nhi\r\n")


@pytest.mark.parametrize("changes", [
    {}, {"recipients": ["a@example.test", "b@example.test"]}, {"tls": "TLSv1.3 cipher X"},
    {"helo": "[192.0.2.7]", "smtputf8": True, "recipients": ["jürgen@bücher.test"]},
])
def test_without_own_received_gives_back_what_the_client_sent(changes: dict[str, object]) -> None:
    """The deferred scan scans what the scan at DATA did: the content without our header."""
    assert without_own_received(received_header(info(**changes)) + SENT, "QID123") == SENT


@pytest.mark.parametrize("message", [
    SENT,  # no header of ours on top: the client's own Received stays
    received_header(info(queue_id="QID1234")) + SENT,  # another message's id
    b"Received: from x by y id QID123",  # a header that never ends
    b"",
])
def test_without_own_received_leaves_other_messages_whole(message: bytes) -> None:
    assert without_own_received(message, "QID123") == message


@pytest.mark.parametrize(("content", "too_big"), [
    # exactly the limit, then the empty line
    (b"X: " + b"a" * (MAX_HEADER_SECTION - 5) + b"\r\n\r\n" + b"b" * MAX_HEADER_SECTION, False),
    (b"X: " + b"a" * (MAX_HEADER_SECTION - 4) + b"\r\n\r\nbody\r\n", True),
    (b"X: a\r\n" * (MAX_HEADER_SECTION // 6 + 1) + b"\r\nbody\r\n", True),
    (b"X: a\r\n" + b" folded\r\n" * (MAX_HEADER_SECTION // 9) + b"\r\n", True),
    # a body without the empty line before it ends the header section too
    (b"Subject: s\r\nno field here\r\n" + b"b" * (2 * MAX_HEADER_SECTION), False),
    (b"\r\n" + b"X: a\r\n" * MAX_HEADER_SECTION, False),  # no header section at all
    # a continuation line starting right at the limit goes on past it
    (b"X: " + b"a" * (MAX_HEADER_SECTION - 5) + b"\r\n" + b" b\r\n\r\n" + b"c" * 9, True),
])
def test_a_header_section_over_the_limit_is_told(content: bytes, too_big: bool) -> None:
    """Every header field the filter looks at is in the header section: 25 MB of fields
    held the worker for seconds (found in review); more than 1 MiB of them gets 552."""
    assert header_section_too_big(content) is too_big


def test_a_field_whose_name_runs_past_the_search_is_a_field() -> None:
    """A field line starting just under the limit whose colon lay past the search window
    was taken for the body: the message passed the size check and the forged fields after
    it stayed, which the store read as fields (found in review)."""
    filler = b"".join(b"X-Fill-%04d: %s\r\n" % (i, b"v" * 980) for i in range(1052))
    pad = MAX_HEADER_SECTION - 20 - len(filler) - len(b"X-Pad: \r\n")
    head = filler + b"X-Pad: " + b"p" * pad + b"\r\n"
    content = (head + b"X-" + b"N" * 2000 + b": v\r\n"
               + b"Authentication-Results: mx.test.invalid; dkim=pass\r\n\r\nbody\r\n")
    assert len(head) < MAX_HEADER_SECTION < len(head) + 2000
    assert header_section_too_big(content)
    assert header_section_end(content) > len(head)


@pytest.mark.parametrize(("fields", "too_many"), [(MAX_HEADER_FIELDS, False),
                                                   (MAX_HEADER_FIELDS + 1, True)])
def test_more_fields_than_the_store_reads_are_refused(fields: int, too_many: bool) -> None:
    """Past its MAX_HEADER_FIELDS the store's IMAP runs the header on to the next blank
    line, where the filter, which removes forged fields, stopped at the first line that is
    no field: a forged field after one reached the header (found in review)."""
    content = b"".join(b"F%d: v\r\n" % i for i in range(fields)) + b"no field\r\n\r\nb\r\n"
    assert header_section_too_big(content) is too_many
    folded = b"F: v\r\n" + b" folded\r\n" * (2 * MAX_HEADER_FIELDS) + b"\r\nb\r\n"
    assert not header_section_too_big(folded)  # continuation lines are no fields


def test_the_filters_field_limit_leaves_room_for_what_the_store_adds() -> None:
    from services.store.imap.protocol import mime

    added_by_the_tiers = 3  # Received (the filter), Return-Path and Delivered-To (the store)
    assert MAX_HEADER_FIELDS + added_by_the_tiers < mime.MAX_HEADER_FIELDS
