"""MIME structure, ENVELOPE, BODY/BODYSTRUCTURE and sections (protocol/mime.py).

Expected structures are written by hand from RFC 3501 7.4.2 and its examples (upper-case type,
subtype, parameter names and encoding, as the RFC shows them)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.store.imap.protocol import mime
from services.store.imap.protocol.command import Section

# --- a reader for IMAP response data, to check output is well formed ----------------------


class Atom(bytes):
    """An atom or number in parsed response data (strings come back as plain bytes)."""


Data = bytes | None | list["Data"]

_LITERAL_RE = re.compile(rb"\{(\d+)\}\r\n")


def read_data(data: bytes, i: int = 0) -> tuple[Data, int]:
    """One IMAP value at data[i:]: list, quoted string, literal, NIL or atom (an atom may hold
    a bracketed section with spaces, as FETCH item names do)."""
    c = data[i : i + 1]
    if c == b"(":
        items: list[Data] = []
        i += 1
        while data[i : i + 1] != b")":
            if i >= len(data):
                raise ValueError("unterminated list")
            if data[i : i + 1] == b" ":
                i += 1
                continue
            value, i = read_data(data, i)
            items.append(value)
        return items, i + 1
    if c == b'"':
        out = bytearray()
        i += 1
        while True:
            ch = data[i : i + 1]
            if ch in (b"", b"\r", b"\n", b"\x00"):
                raise ValueError("bad quoted string")
            if ch == b"\\":
                escaped = data[i + 1 : i + 2]
                if escaped not in (b"\\", b'"'):
                    raise ValueError("bad escape")
                out += escaped
                i += 2
                continue
            if ch == b'"':
                return bytes(out), i + 1
            out += ch
            i += 1
    if c == b"{":
        match = _LITERAL_RE.match(data, i)
        if not match:
            raise ValueError("bad literal")
        start = match.end()
        end = start + int(match.group(1))
        if end > len(data):
            raise ValueError("short literal")
        return data[start:end], end
    j = i
    depth = 0
    while j < len(data):
        ch = data[j : j + 1]
        if ch == b"[":
            depth += 1
        elif ch == b"]":
            depth -= 1
        elif depth == 0 and ch in (b" ", b"(", b")"):
            break
        j += 1
    if j == i:
        raise ValueError(f"unexpected {c!r} at {i}")
    word = data[i:j]
    return (None if word == b"NIL" else Atom(word)), j


def read_all(data: bytes) -> Data:
    value, end = read_data(data)
    assert end == len(data), f"trailing data: {data[end:]!r}"
    return value


# --- messages -----------------------------------------------------------------------------

# RFC 3501 7.4.2's ENVELOPE example, as the header it was made from.
RFC3501_HEADER = (
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US,\r\n"
    b"  John Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
)
RFC3501_ENVELOPE = (
    b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'((NIL NIL "imap" "cac.washington.edu")) '
    b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
    b'NIL NIL "<B27397-0100000@cac.washington.edu>")'
)

SIMPLE = RFC3501_HEADER + b"\r\nHello\r\nWorld\r\n"

# The shape of RFC 3501's multipart BODYSTRUCTURE example, with smaller bodies.
RFC3501_MULTIPART = (
    b'Content-Type: multipart/mixed; boundary="=_b"\r\n'
    b"\r\n"
    b"This is the preamble.\r\n"
    b"--=_b\r\n"
    b"Content-Type: text/plain; charset=US-ASCII\r\n"
    b"\r\n"
    b"first part\r\n"
    b"--=_b\r\n"
    b"Content-Type: TEXT/PLAIN; charset=US-ASCII; name=cc.diff\r\n"
    b"Content-ID: <960723163407.20117h@cac.washington.edu>\r\n"
    b"Content-Description: Compiler diff\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"SGVsbG8=\r\n"
    b"--=_b--\r\n"
    b"This is the epilogue.\r\n"
)

ALTERNATIVE = (
    b"Subject: alt\r\n"
    b"Content-Type: multipart/alternative;\r\n"
    b'\tboundary="alt-1"\r\n'
    b"\r\n"
    b"--alt-1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe\r\n"
    b"--alt-1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Gr&uuml;&szlig;e <b>bold</b></p>\r\n"
    b"--alt-1--\r\n"
)

ATTACHMENT = (
    b"Content-Type: multipart/mixed; boundary=mix\r\n"
    b"Content-Language: en\r\n"
    b"\r\n"
    b"--mix\r\n"
    b'Content-Type: text/plain (comment); charset="iso-8859-1"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xe9\r\n"
    b"--mix\r\n"
    b'Content-Type: application/pdf; name="report q1.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="report q1.pdf"; size=3\r\n'
    b"Content-Language: en, de\r\n"
    b"Content-Location: http://example.com/r.pdf\r\n"
    b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n"
    b"\r\n"
    b"JVBE\r\n"
    b"Rg==\r\n"
    b"--mix--\r\n"
)

NESTED = (
    b"Content-Type: multipart/mixed; boundary=outer\r\n"
    b"\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"\r\n"
    b"text\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html\r\n"
    b"\r\n"
    b"<i>text</i>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: image/png\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"iVBORw0K\r\n"
    b"--outer--\r\n"
)

INNER_MESSAGE = (
    b"From: b@example.org\r\n"
    b"Subject: inner\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"\r\n"
    b"plain\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html\r\n"
    b"\r\n"
    b"<p>html</p>\r\n"
    b"--inner--"
)
FORWARD = (
    b"From: a@example.com\r\n"
    b"Subject: fwd\r\n"
    b"Content-Type: multipart/mixed; boundary=outer\r\n"
    b"\r\n"
    b"--outer\r\n"
    b"\r\n"
    b"see attached\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n" + INNER_MESSAGE + b"\r\n--outer--\r\n"
)


def structure(raw: bytes, extended: bool = False) -> bytes:
    return mime.bodystructure(mime.parse_message(raw), extended)


# --- BODY / BODYSTRUCTURE -----------------------------------------------------------------

TEXT_US_ASCII = b'"TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT"'


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        pytest.param(SIMPLE, b"(" + TEXT_US_ASCII + b" 14 2)", id="simple"),
        pytest.param(
            RFC3501_MULTIPART,
            b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 10 1)'
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
            b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 8 1) "MIXED")',
            id="rfc3501-multipart",
        ),
        pytest.param(
            ALTERNATIVE,
            b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 15 1)'
            b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 35 1) "ALTERNATIVE")',
            id="alternative",
        ),
        pytest.param(
            NESTED,
            b"(((" + TEXT_US_ASCII + b' 4 1)("TEXT" "HTML" ("CHARSET" "US-ASCII") NIL NIL'
            b' "7BIT" 11 1) "ALTERNATIVE")("IMAGE" "PNG" NIL NIL NIL "BASE64" 8) "MIXED")',
            id="nested",
        ),
        pytest.param(
            FORWARD,
            b"(("
            + TEXT_US_ASCII
            + b' 12 1)("MESSAGE" "RFC822" NIL NIL NIL "7BIT" '
            + b"%d" % len(INNER_MESSAGE)
            + b' (NIL "inner" ((NIL NIL "b" "example.org")) ((NIL NIL "b" "example.org")) '
            b'((NIL NIL "b" "example.org")) NIL NIL NIL NIL NIL) '
            b"((" + TEXT_US_ASCII + b' 5 1)("TEXT" "HTML" ("CHARSET" "US-ASCII") NIL NIL '
            b'"7BIT" 11 1) "ALTERNATIVE") 12) "MIXED")',
            id="message-rfc822",
        ),
        pytest.param(
            # multipart/digest parts default to message/rfc822 (RFC 2046 5.1.5).
            b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
            b"--d\r\n\r\nSubject: one\r\n\r\nbody1\r\n--d--\r\n",
            b'(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 21 (NIL "one" NIL NIL NIL NIL NIL NIL NIL '
            b"NIL) (" + TEXT_US_ASCII + b' 5 1) 3) "DIGEST")',
            id="digest",
        ),
        pytest.param(
            # No boundary parameter: not splittable, shown as the text it is.
            b"Content-Type: multipart/mixed\r\n\r\n--x\r\nhello\r\n",
            b"(" + TEXT_US_ASCII + b" 12 2)",
            id="missing-boundary",
        ),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno delimiter here\r\n",
            b"(" + TEXT_US_ASCII + b" 19 1)",
            id="no-delimiter-line",
        ),
        pytest.param(
            # The last part has no close delimiter: it runs to the end of the message.
            b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
            b"--q\r\n\r\nfirst\r\n--q\r\n\r\nsecond\r\nruns off",
            b"((" + TEXT_US_ASCII + b" 5 1)(" + TEXT_US_ASCII + b' 16 2) "MIXED")',
            id="unterminated",
        ),
        pytest.param(
            b"Subject: only a header\r\nFrom: a@b",
            b"(" + TEXT_US_ASCII + b" 0 0)",
            id="header-only",
        ),
        pytest.param(b"", b"(" + TEXT_US_ASCII + b" 0 0)", id="empty"),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=a\n\n--a\n\none\n--a\n"
            b"Content-Type: text/x-thing; charset=utf-8\n\ntwo\nlines\n--a--\n",
            b"((" + TEXT_US_ASCII + b' 3 1)("TEXT" "X-THING" ("CHARSET" "utf-8") NIL NIL '
            b'"7BIT" 9 2) "MIXED")',
            id="bare-lf",
        ),
        pytest.param(
            b"Content-Type: text\r\n\r\nx",  # invalid: the default applies (RFC 2045 5.2)
            b"(" + TEXT_US_ASCII + b" 1 1)",
            id="invalid-content-type",
        ),
        pytest.param(
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA",
            b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "BASE64" 4)',
            id="encoded-message-rfc822",
        ),
    ],
)
def test_body(raw: bytes, body: bytes) -> None:
    assert structure(raw) == body


def test_bodystructure_extension_data_of_parts_and_multipart() -> None:
    assert structure(ATTACHMENT, extended=True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "iso-8859-1") NIL NIL "8BIT" 4 1 NIL NIL NIL NIL)'
        b'("APPLICATION" "PDF" ("NAME" "report q1.pdf") NIL NIL "BASE64" 10 '
        b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("ATTACHMENT" ("FILENAME" "report q1.pdf" "SIZE" "3")) '
        b'("en" "de") "http://example.com/r.pdf") '
        b'"MIXED" ("BOUNDARY" "mix") NIL "en" NIL)'
    )


def test_bodystructure_of_simple_text_has_nil_extensions() -> None:
    assert structure(SIMPLE, extended=True) == b"(" + TEXT_US_ASCII + b" 14 2 NIL NIL NIL NIL)"


def test_bodystructure_of_encapsulated_message_is_extended_too() -> None:
    value = read_all(structure(FORWARD, extended=True))
    assert isinstance(value, list)
    message_part = value[1]
    assert isinstance(message_part, list)
    inner_body = message_part[8]
    assert isinstance(inner_body, list)
    assert inner_body[2:] == [b"ALTERNATIVE", [b"BOUNDARY", b"inner"], None, None, None]


def test_eight_bit_parameter_values_are_literals() -> None:
    raw = 'Content-Type: application/pdf; name="résumé.pdf"\r\n\r\nx'.encode()
    assert structure(raw) == (
        b'("APPLICATION" "PDF" ("NAME" {12}\r\nr\xc3\xa9sum\xc3\xa9.pdf) NIL NIL "7BIT" 1)'
    )


@pytest.mark.parametrize(("params", "shown"), [
    # RFC 2231 3: continuations are one parameter, as Dovecot shows them.
    (b'name*0="long"; name*1="name.pdf"; x=y', b'("NAME" "longname.pdf" "X" "y")'),
    (b"name*0*=utf-8''%C3%A9t; name*1*=%C3%A9.pdf", b'("NAME*" "utf-8\'\'%C3%A9t%C3%A9.pdf")'),
    # a plain section after an encoded one is percent-encoded into the single value
    (b"name*0*=utf-8''a%20; name*1=\" b\"", b'("NAME*" "utf-8\'\'a%20%20b")'),
    # sections that do not run 0, 1, ... stay as sent
    (b'name*1="b"; name*2="c"', b'("NAME*1" "b" "NAME*2" "c")'),
    (b"name*=utf-8''%C3%A9", b'("NAME*" "utf-8\'\'%C3%A9")'),
])
def test_parameter_continuations_are_joined(params: bytes, shown: bytes) -> None:
    raw = b"Content-Type: application/pdf; " + params + b"\r\n\r\nx"
    assert structure(raw) == b'("APPLICATION" "PDF" ' + shown + b' NIL NIL "7BIT" 1)'


# --- ENVELOPE -----------------------------------------------------------------------------


def envelope(header: bytes) -> bytes:
    return mime.envelope(mime.parse_message(header + b"\r\nbody\r\n"))


def test_envelope_rfc3501_example() -> None:
    assert envelope(RFC3501_HEADER) == RFC3501_ENVELOPE


def test_envelope_of_message_without_header_fields_is_all_nil() -> None:
    assert mime.envelope(mime.parse_message(b"\r\nbody")) == b"(" + b" ".join([b"NIL"] * 10) + b")"


def test_envelope_sender_and_reply_to_default_to_from_when_absent_or_empty() -> None:
    value = read_all(envelope(b"From: a@b.c\r\nSender:\r\nReply-To: r@b.c\r\n"))
    assert isinstance(value, list)
    assert value[2] == value[3] == [[None, None, b"a", b"b.c"]]
    assert value[4] == [[None, None, b"r", b"b.c"]]


def test_envelope_reply_to_without_any_address_is_from() -> None:
    value = read_all(envelope(b"From: a@b.c\r\nReply-To: , ,\r\n"))
    assert isinstance(value, list)
    assert value[4] == [[None, None, b"a", b"b.c"]]


def test_envelope_drops_nul_octets() -> None:
    value = read_all(envelope(b"Subject: a\x00b\r\n"))
    assert isinstance(value, list)
    assert value[1] == b"ab"


def test_envelope_keeps_encoded_words_encoded() -> None:
    header = (
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus\r\n"
        b"From: =?iso-8859-1?q?Andr=E9?= Muster <andre@example.com>\r\n"
    )
    value = read_all(envelope(header))
    assert isinstance(value, list)
    assert value[1] == b"=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus"
    assert value[2] == [[b"=?iso-8859-1?q?Andr=E9?= Muster", None, b"andre", b"example.com"]]


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        pytest.param(
            b'friends: a@b.c, "Joe Q. Public" <joe@x.y>;, solo@z.z',
            b'((NIL NIL "friends" NIL)(NIL NIL "a" "b.c")("Joe Q. Public" NIL "joe" "x.y")'
            b'(NIL NIL NIL NIL)(NIL NIL "solo" "z.z"))',
            id="group-then-address",
        ),
        pytest.param(
            b"undisclosed-recipients:;",
            b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))',
            id="empty-group",
        ),
        pytest.param(
            b"open group: a@b.c",
            b'((NIL NIL "open group" NIL)(NIL NIL "a" "b.c")(NIL NIL NIL NIL))',
            id="unclosed-group",
        ),
        pytest.param(b"<@r1,@r2:u@h>", b'((NIL "@r1,@r2" "u" "h"))', id="source-route"),
        pytest.param(b"u@h (Real Name)", b'(("Real Name" NIL "u" "h"))', id="comment-name"),
        pytest.param(b'"john doe"@h', b'((NIL NIL "\\"john doe\\"" "h"))', id="quoted-local"),
        pytest.param(b'"john"@h', b'((NIL NIL "john" "h"))', id="needless-quotes"),
        pytest.param(b"u@[192.0.2.1]", b'((NIL NIL "u" "[192.0.2.1]"))', id="domain-literal"),
        pytest.param(b"localonly", b'((NIL NIL "localonly" "MISSING_DOMAIN"))', id="no-domain"),
        pytest.param(
            b"A <a@b>, , B <b@c>", b'(("A" NIL "a" "b")("B" NIL "b" "c"))', id="empty-item"
        ),
        pytest.param(b"", b"NIL", id="empty"),
        pytest.param(b"Mr. X <x@y>", b'(("Mr. X" NIL "x" "y"))', id="dot-in-phrase"),
        # Outlook's separator: not RFC 5322, but every recipient is kept, and no group ends.
        pytest.param(b"A <a@x>; B <b@y>", b'(("A" NIL "a" "x")("B" NIL "b" "y"))',
                     id="semicolons"),
        pytest.param(b"a@x; b@y;", b'((NIL NIL "a" "x")(NIL NIL "b" "y"))', id="semicolon-end"),
        pytest.param(b"G: a@x; b@y", b'((NIL NIL "G" NIL)(NIL NIL "a" "x")(NIL NIL NIL NIL)'
                     b'(NIL NIL "b" "y"))', id="semicolon-after-group"),
    ],
)
def test_envelope_addresses(to: bytes, expected: bytes) -> None:
    value = read_all(envelope(b"To: " + to + b"\r\n"))
    assert isinstance(value, list)
    assert value[5] == read_all(expected)


def test_envelope_eight_bit_headers_are_literals() -> None:
    header = "Subject: Grüße\r\nFrom: Jörg <jörg@bücher.de>\r\n".encode()
    result = envelope(header)
    assert b"{7}\r\nGr\xc3\xbc\xc3\x9fe" in result
    value = read_all(result)
    assert isinstance(value, list)
    assert value[2] == [["Jörg".encode(), None, "jörg".encode(), "bücher.de".encode()]]


def test_envelope_unfolds_folded_subject() -> None:
    value = read_all(envelope(b"Subject: a long\r\n  subject\r\nIn-Reply-To: <p@q>\r\n"))
    assert isinstance(value, list)
    assert value[1] == b"a long  subject"
    assert value[8] == b"<p@q>"


# --- sections -----------------------------------------------------------------------------


def sect(
    raw: bytes, part: tuple[int, ...] = (), text: str | None = None, *fields: str
) -> bytes | None:
    return mime.section(raw, mime.parse_message(raw), Section(part, text, fields))


FORWARD_HEADER = (
    b"From: a@example.com\r\nSubject: fwd\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
)


@pytest.mark.parametrize(
    ("part", "text", "expected"),
    [
        ((), None, FORWARD),
        ((), "HEADER", FORWARD_HEADER),
        ((), "TEXT", FORWARD[len(FORWARD_HEADER) :]),
        ((1,), None, b"see attached"),
        ((1,), "MIME", b"\r\n"),
        ((2,), None, INNER_MESSAGE),
        ((2,), "MIME", b"Content-Type: message/rfc822\r\n\r\n"),
        ((2,), "HEADER", INNER_MESSAGE[: INNER_MESSAGE.index(b"\r\n\r\n") + 4]),
        ((2,), "TEXT", INNER_MESSAGE[INNER_MESSAGE.index(b"\r\n\r\n") + 4 :]),
        ((2, 1), None, b"plain"),
        ((2, 2), None, b"<p>html</p>"),
        ((2, 2), "MIME", b"Content-Type: text/html\r\n\r\n"),
        ((3,), None, None),
        ((0,), None, None),
        # A non-multipart part has a part 1 too, itself (as Dovecot answers), and no other.
        ((1, 1), None, b"see attached"),
        ((1, 2), None, None),
        ((2, 3), None, None),
        ((1,), "HEADER", None),  # HEADER of a part only exists for message/rfc822
        ((2, 1, 1), None, b"plain"),
        ((1, 1, 1), None, None),
        ((2, 2, 1), "MIME", b"Content-Type: text/html\r\n\r\n"),
    ],
)
def test_sections_of_forwarded_message(
    part: tuple[int, ...], text: str | None, expected: bytes | None
) -> None:
    assert sect(FORWARD, part, text) == expected


# A message whose whole body is a message (a forward as attachment with no text, a report
# re-wrapped): part 1 is the encapsulated message, as BODYSTRUCTURE numbers it.
WRAPPED_INNER = b"From: b@y\r\nSubject: inner\r\n\r\ninner body\r\n"
WRAPPED = b"From: a@x\r\nContent-Type: message/rfc822\r\n\r\n" + WRAPPED_INNER
TWICE_WRAPPED = (b"From: a@x\r\nContent-Type: message/rfc822\r\n\r\n"
                 b"From: b@y\r\nContent-Type: message/rfc822\r\n\r\n" + WRAPPED_INNER)


@pytest.mark.parametrize(
    ("raw", "part", "text", "expected"),
    [
        (WRAPPED, (1,), None, WRAPPED_INNER),
        (WRAPPED, (1,), "HEADER", b"From: b@y\r\nSubject: inner\r\n\r\n"),
        (WRAPPED, (1,), "TEXT", b"inner body\r\n"),
        (WRAPPED, (1, 1), None, b"inner body\r\n"),
        (WRAPPED, (2,), None, None),
        (TWICE_WRAPPED, (1, 1), None, WRAPPED_INNER),
        (TWICE_WRAPPED, (1, 1), "HEADER", b"From: b@y\r\nSubject: inner\r\n\r\n"),
        (TWICE_WRAPPED, (1, 1, 1), None, b"inner body\r\n"),
    ],
)
def test_sections_of_a_message_that_is_only_an_attached_message(
    raw: bytes, part: tuple[int, ...], text: str | None, expected: bytes | None
) -> None:
    assert sect(raw, part, text) == expected


def test_header_fields_of_encapsulated_message() -> None:
    assert sect(FORWARD, (2,), "HEADER.FIELDS", "SUBJECT") == b"Subject: inner\r\n\r\n"
    assert sect(FORWARD, (2,), "HEADER.FIELDS.NOT", "SUBJECT", "CONTENT-TYPE") == (
        b"From: b@example.org\r\n\r\n"
    )


def test_part_one_of_a_non_multipart_message_is_its_body() -> None:
    assert sect(SIMPLE, (1,)) == b"Hello\r\nWorld\r\n"
    assert sect(SIMPLE, (2,)) is None
    assert sect(SIMPLE, (1, 1)) is None  # part 1 is the body itself: nothing below it


def test_sections_of_nested_multipart() -> None:
    assert sect(NESTED, (1, 1)) == b"text"
    assert sect(NESTED, (1, 2)) == b"<i>text</i>"
    assert sect(NESTED, (2,)) == b"iVBORw0K"
    assert (
        sect(NESTED, (1,))
        == NESTED[
            NESTED.index(b"--inner\r\n") : NESTED.index(b"\r\n--outer\r\nContent-Type: image")
        ]
    )


def test_header_fields_keep_folded_lines_as_stored_in_order() -> None:
    raw = b"Subject: a\r\n  folded\r\nX-Other: 1\r\nTO: x@y,\r\n\tz@w\r\nsubject: again\r\n\r\nbody"
    assert sect(raw, (), "HEADER.FIELDS", "SUBJECT", "TO") == (
        b"Subject: a\r\n  folded\r\nTO: x@y,\r\n\tz@w\r\nsubject: again\r\n\r\n"
    )
    assert sect(raw, (), "HEADER.FIELDS.NOT", "SUBJECT", "TO") == b"X-Other: 1\r\n\r\n"
    assert sect(raw, (), "HEADER.FIELDS", "MISSING") == b"\r\n"


def test_header_fields_of_messages_without_a_blank_line_have_none() -> None:
    """RFC 3501 6.4.5: "the blank line is included in all header fetches, except in the
    case of a message which has no body and no blank line"; an attached one likewise."""
    raw = b"From: a@example.com\r\nSubject: nobody\r\nMessage-ID: <nb@x>\r\n"
    assert sect(raw, (), "HEADER.FIELDS", "SUBJECT") == b"Subject: nobody\r\n"
    assert sect(raw, (), "HEADER.FIELDS.NOT", "SUBJECT") == (
        b"From: a@example.com\r\nMessage-ID: <nb@x>\r\n")
    assert sect(raw + b"\r\n", (), "HEADER.FIELDS", "SUBJECT") == b"Subject: nobody\r\n\r\n"
    assert sect(b"\r\nbody", (), "HEADER.FIELDS", "SUBJECT") == b"\r\n"
    attached = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n--b--\r\n")
    assert sect(attached, (1,), "HEADER.FIELDS", "SUBJECT") == b"Subject: inner\r\n"
    assert sect(attached, (1,), "HEADER.FIELDS", "CONTENT-TYPE") == b""


def test_header_only_message_sections() -> None:
    raw = b"Subject: x\r\nFrom: a@b"
    assert sect(raw, (), "HEADER") == raw
    assert sect(raw, (), "TEXT") == b""
    assert sect(raw, (1,)) == b""
    # RFC 3501 6.4.5: no blank line for a message with no body and no blank line.
    assert sect(raw, (), "HEADER.FIELDS", "FROM") == b"From: a@b\r\n"


def test_bare_lf_sections_keep_stored_bytes() -> None:
    raw = (
        b"Subject: x\nContent-Type: multipart/mixed; boundary=a\n\n--a\n\none\n--a\n\ntwo\n--a--\n"
    )
    assert sect(raw, (), "HEADER") == b"Subject: x\nContent-Type: multipart/mixed; boundary=a\n\n"
    assert sect(raw, (), "HEADER.FIELDS", "SUBJECT") == b"Subject: x\n\r\n"
    assert sect(raw, (1,)) == b"one"
    assert sect(raw, (2,)) == b"two"


def test_boundary_must_start_a_line_and_end_in_whitespace() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b \t\r\n\r\nnot --b here\r\n--bx is not a delimiter\r\n--b--  \r\n"
    )
    assert sect(raw, (1,)) == b"not --b here\r\n--bx is not a delimiter"
    assert sect(raw, (2,)) is None


def test_a_boundary_may_end_in_dashes() -> None:
    """"--ab--" closes boundary "ab" and delimits boundary "ab--" (RFC 2046 bchars)."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=\"ab--\"\r\n\r\n"
        b"--ab--\r\n\r\none\r\n--ab-- \r\n\r\ntwo\r\n--ab----\r\nepilogue\r\n"
    )
    assert sect(raw, (1,)) == b"one"
    assert sect(raw, (2,)) == b"two"
    assert sect(raw, (3,)) is None


def test_lines_that_begin_with_every_levels_boundary_are_no_delimiters() -> None:
    """Crafted nesting: boundaries a, aa, aaa..., and a body of lines "--aaaa...": each line
    starts like every level's delimiter and is none (one pass over the lines finds that)."""
    depth = 30
    raw = b"Subject: nested\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n"
    for k in range(1, depth + 1):
        raw += b"--" + b"a" * k + b"\r\nContent-Type: multipart/mixed; boundary=" \
            + b"a" * (k + 1) + b"\r\n\r\n"
    raw += b"--" + b"a" * (depth + 1) + b"\r\n\r\n" + (b"--" + b"a" * 60 + b"\r\n") * 100
    node, levels = mime.parse_message(raw), 0
    while node.children:
        [node] = node.children
        levels += 1
    assert levels == depth + 1
    assert node.maintype == "TEXT"
    assert raw[node.body_start:node.end] == (b"--" + b"a" * 60 + b"\r\n") * 100


def test_part_without_header_but_text_starts_body_at_that_line() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\njust text\r\n--b--\r\n"
    root = mime.parse_message(raw)
    assert root.children[0].fields == []
    assert sect(raw, (1,)) == b"just text"


def test_empty_parts_between_adjacent_delimiters() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b\r\n\r\nx\r\n--b--"
    assert sect(raw, (1,)) == b""
    assert sect(raw, (2,)) == b"x"


def test_nesting_beyond_the_limit_is_opaque_not_an_error() -> None:
    depth = mime.MAX_DEPTH + 20
    raw = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    root = mime.parse_message(raw)
    levels = 0
    node = root
    while node.children:
        node = node.children[0]
        levels += 1
    assert levels == mime.MAX_DEPTH
    assert node.maintype == "TEXT"
    read_all(mime.bodystructure(root, True))


def test_part_count_is_bounded() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * (
        mime.MAX_PARTS + 100
    )
    root = mime.parse_message(raw)
    assert len(root.children) < mime.MAX_PARTS


# --- decoding for SEARCH ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Subject: plain", ["plain"]),
        (b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", ["Grüße"]),
        (b"Subject: =?UTF-8?B?R3LDvMOfZQ==?= aus Wien", ["Grüße aus Wien"]),
        # RFC 2047 6.2: white space between adjacent encoded words is dropped.
        (b"Subject: =?utf-8?q?a?= \r\n =?utf-8?q?b?= c", ["ab c"]),
        (b"Subject: =?iso-8859-1?q?caf=E9_au_lait?=", ["café au lait"]),
        (b"Subject: =?utf-8*en?q?lang?=", ["lang"]),
        (b"Subject: =?x-unknown?q?abc?=", ["abc"]),
        (b"Subject: =?utf-8?b?!!!?=", [""]),
        ("Subject: raw Grüße".encode(), ["raw Grüße"]),
        (b"Subject: one\r\nsubject: two", ["one", "two"]),
        (b"X-Other: 1", []),
    ],
)
def test_decoded_header(header: bytes, expected: list[str]) -> None:
    part = mime.parse_message(header + b"\r\n\r\nbody")
    assert mime.decoded_header(part, "Subject") == expected


def test_decoded_text_of_alternative_decodes_qp_charset_and_strips_html() -> None:
    text = mime.decoded_text(ALTERNATIVE, mime.parse_message(ALTERNATIVE))
    assert "Grüße" in text
    assert "bold" in text
    assert "<b>" not in text


def test_decoded_text_names_attachments_without_reading_them() -> None:
    assert mime.decoded_text(ATTACHMENT, mime.parse_message(ATTACHMENT)) == "café\nreport q1.pdf"


def test_decoded_text_reads_delivery_status_and_global_messages() -> None:
    """A bounce's failed recipient and a message/global's text are found by SEARCH BODY;
    both were left out (only text/* leaves and message/rfc822 were read)."""
    raw = (b"Content-Type: multipart/report; report-type=delivery-status; boundary=g\r\n"
           b"\r\n--g\r\nContent-Type: message/global\r\n\r\nFrom: x@example.com\r\n"
           + "Subject: inner kiwifrüit\r\n\r\nglobal pomelo\r\n--g\r\n".encode()
           + b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n"
           b"\r\nFinal-Recipient: rfc822; lostuser@example.net\r\nAction: failed\r\n"
           b"--g--\r\n")
    text = mime.decoded_text(raw, mime.parse_message(raw))
    for words in ("kiwifrüit", "global pomelo", "lostuser@example.net", "Action: failed"):
        assert words in text


def test_decoded_text_reads_forwarded_messages_with_their_header() -> None:
    text = mime.decoded_text(FORWARD, mime.parse_message(FORWARD))
    assert "see attached" in text and "plain" in text and "html" in text
    inner_header = INNER_MESSAGE[: INNER_MESSAGE.index(b"\r\n\r\n")].decode()
    for line in inner_header.split("\r\n"):
        name, _, value = line.partition(":")
        assert f"{name}: {value.strip()}" in text


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ('; filename="plain.pdf"', "plain.pdf"),
        ("; filename*=utf-8''%C3%A9t%C3%A9.pdf", "été.pdf"),
        ("; filename*=iso-8859-1'fr'caf%E9.txt", "café.txt"),
        ('; filename*0="long "; filename*1="name.pdf"', "long name.pdf"),
        ("; filename*0*=utf-8''%C3%A9; filename*1=.pdf", "é.pdf"),
        ('; filename="=?utf-8?q?Gr=C3=BC=C3=9Fe.doc?="', "Grüße.doc"),
        ("", "fallback.bin"),  # no filename: Content-Type's name
    ],
)
def test_attachment_name_forms(params: str, expected: str) -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: application/octet-stream; name=fallback.bin\r\n"
           b"Content-Disposition: attachment" + params.encode() + b"\r\n\r\nAAAA\r\n--b--\r\n")
    part = mime.parse_message(raw).children[0]
    assert mime.attachment_name(part) == expected
    assert mime.decoded_text(raw, mime.parse_message(raw)) == expected


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        ("<p>Ver<b>y</b> important</p>", "Very important"),
        ("<p>one</p>\r\n<p>two</p>", "one\ntwo"),
        ("a<br>b<br/>c", "a\nb\nc"),
        ("wrapped\r\n   line  of\ttext", "wrapped line of text"),
        ("<style>p { color: red }</style><p>shown</p>", "shown"),
        ("<script>var secret = 1;</script>shown<!-- hidden -->", "shown"),
        ("caf&eacute;&nbsp;au&#32;lait &amp; more", "café au lait & more"),
        ("<td>cell</td><td>next</td>", "cell\nnext"),
        ("an unclosed <tag and more", "an unclosed <tag and more"),
    ],
)
def test_html_text_is_what_a_reader_sees(markup: str, expected: str) -> None:
    assert mime.html_text(markup) == expected


def test_html_text_stays_linear_on_unclosed_markup() -> None:
    hostile = "<" * 200_000 + "<!--" * 50_000 + "<style>" * 20_000
    assert mime.html_text(hostile)  # returns at all (a quadratic pattern would not, here)


def test_folded_header_tabs_read_as_spaces() -> None:
    part = mime.parse_message(b"Subject: quarterly\r\n\treport\r\n\r\nbody")
    assert mime.decoded_header(part, "Subject") == ["quarterly report"]
    assert mime.header_lines(part) == "Subject: quarterly report"


@pytest.mark.parametrize("content_type", [b"", b"Content-Type: text/plain\r\n",
                                          b"Content-Type: text/plain; charset=us-ascii\r\n"])
def test_unlabelled_8bit_text_is_read_as_utf8(content_type: bytes) -> None:
    raw = content_type + "\r\nViele Grüße\r\n".encode()
    assert mime.decoded_text(raw, mime.parse_message(raw)).strip() == "Viele Grüße"


def test_decoded_text_base64() -> None:
    raw = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    raw += b"R3LDvMOf\r\nZQ==\r\n"
    assert mime.decoded_text(raw, mime.parse_message(raw)) == "Grüße"
    broken = raw.replace(b"ZQ==", b"Z")
    assert mime.decoded_text(broken, mime.parse_message(broken)).startswith("Grü")


# --- properties ---------------------------------------------------------------------------

_FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b'Content-Type: multipart/alternative; boundary="c"\r\n',
    b"Content-Type: multipart/digest; boundary=b\r\n",
    b"Content-Type: message/rfc822\r\n",
    b'Content-Type: text/html; charset="utf-8\r\n',
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b'Content-Disposition: attachment; filename="a\\"b"\r\n',
    b"Content-Language: en,\r\n",
    b'From: "x" <a@b>, g: c@d;\r\n',
    b'To: <@a:b@c>, (comment) "q\r\n',
    b"Subject: =?utf-8?q?x?=\r\n",
    b" folded\r\n",
    b"--b\r\n",
    b"--b--\r\n",
    b"--c\n",
    b"--c--",
    b"text line\r\n",
    b"=C3=\r\n",
    b"\xff\xfe",
]

messages = st.one_of(
    st.binary(max_size=400),
    st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.binary(max_size=8)), max_size=40).map(
        b"".join
    ),
)


def _walk(
    part: mime.Part, path: tuple[int, ...] = ()
) -> Iterator[tuple[tuple[int, ...], mime.Part]]:
    yield path, part
    for number, child in enumerate(part.children, 1):
        yield from _walk(child, (*path, number))


def _check_ranges(part: mime.Part, start: int, end: int) -> None:
    assert start <= part.start <= part.body_start <= part.end <= end
    for child in part.children:
        _check_ranges(child, part.body_start, part.end)
    if part.message is not None:
        assert (part.message.start, part.message.end) == (part.body_start, part.end)
        _check_ranges(part.message, part.body_start, part.end)


@settings(max_examples=300)
@given(messages)
def test_any_bytes_parse_into_consistent_well_formed_structures(raw: bytes) -> None:
    root = mime.parse_message(raw)
    _check_ranges(root, 0, len(raw))
    read_all(mime.bodystructure(root, extended=False))
    read_all(mime.bodystructure(root, extended=True))
    envelope_value = read_all(mime.envelope(root))
    assert isinstance(envelope_value, list) and len(envelope_value) == 10
    for path, part in _walk(root):
        if path and not part.is_multipart:
            assert mime.section(raw, root, Section(path)) == raw[part.body_start : part.end]
        for text in ("MIME", "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            mime.section(raw, root, Section(path, text, ("SUBJECT",)))
    mime.decoded_text(raw, root)
    mime.decoded_header(root, "Subject")
