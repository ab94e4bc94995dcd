"""Pure tests of the POP3 grammar: parsing, reply formatting, dot-stuffing, TOP, SASL PLAIN."""

from __future__ import annotations

import base64

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.store.imap.protocol import mime
from services.store.mailbox import line_end_padding
from services.store.pop3 import protocol as p


@pytest.mark.parametrize(
    ("line", "keyword", "args"),
    [
        (b"STAT\r\n", "STAT", ()),
        (b"stat\r\n", "STAT", ()),
        (b"LIST 2\r\n", "LIST", ("2",)),
        (b"TOP 1 10\r\n", "TOP", ("1", "10")),
        (b"QUIT\n", "QUIT", ()),  # bare LF tolerated
        (b"NOOP", "NOOP", ()),
        (b"USER alice@example.test\r\n", "USER", ("alice@example.test",)),
        (b"PASS " + b"x" * 100 + b"\r\n", "PASS", ("x" * 100,)),  # passwords may be long
        (b"AUTH PLAIN " + b"A" * 200 + b"\r\n", "AUTH", ("PLAIN", "A" * 200)),
        ("PASS pässwörd\r\n".encode(), "PASS", ("pässwörd",)),
        # RFC 2449 section 4: 255-octet commands, so arguments over RFC 1939's 40 characters
        (b"LIST " + b"9" * 41 + b"\r\n", "LIST", ("9" * 41,)),
    ],
)
def test_parse_valid(line: bytes, keyword: str, args: tuple[str, ...]) -> None:
    parsed = p.parse_command(line)
    assert isinstance(parsed, p.Command)
    assert parsed.keyword == keyword
    assert parsed.args == args


def test_pass_keeps_spaces_in_rest() -> None:
    parsed = p.parse_command(b"PASS correct horse battery\r\n")
    assert isinstance(parsed, p.Command)
    assert parsed.rest == "correct horse battery"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"\r\n", "empty command"),
        (b"", "empty command"),
        (b"ST\r\n", "unknown command"),  # RFC 2449: keywords are 3 or 4 characters
        (b"STATS\r\n", "unknown command"),
        (b"ST4T\r\n", "unknown command"),
        (b" STAT\r\n", "empty command"),
        (b"RETR " + b"1" * 300 + b"\r\n", "command line too long"),  # RFC 2449: 255 octets
        (b"STAT\rX\r\n", "invalid characters in command line"),
        (b"STAT\x00\r\n", "invalid characters in command line"),
        (b"USER \xff\xfe\r\n", "command line is not valid UTF-8"),
    ],
)
def test_parse_invalid(line: bytes, reason: str) -> None:
    assert p.parse_command(line) == p.BadCommand(reason)


def test_line_limit_is_inclusive_of_crlf() -> None:
    exact = b"PASS " + b"a" * (p.MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(exact) == p.MAX_COMMAND_LINE
    assert isinstance(p.parse_command(exact), p.Command)
    assert p.parse_command(exact[:-2] + b"a\r\n") == p.BadCommand("command line too long")


def test_user_names_may_be_long_addresses() -> None:
    address = "firstname.lastname@a-rather-long-department.example.test"
    assert len(address) > 40  # RFC 1939 section 3's limit, lifted by RFC 2449 section 4
    assert p.parse_command(f"USER {address}\r\n".encode()) == p.Command(
        "USER", (address,), address)


@given(st.binary(max_size=400))
def test_parser_never_raises(data: bytes) -> None:
    result = p.parse_command(data)
    assert isinstance(result, p.Command | p.BadCommand)


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (p.OK_NOOP, b"+OK\r\n"),
        (p.ERR_AUTH_FAILED, b"-ERR [AUTH] invalid credentials\r\n"),
        (p.ERR_IN_USE, b"-ERR [IN-USE] mailbox locked by another session\r\n"),
        (p.ERR_INTERNAL, b"-ERR [SYS/TEMP] internal error\r\n"),
        (p.ERR_STORAGE_PERM, b"-ERR [SYS/PERM] mailbox unavailable\r\n"),
        (p.OK_STAT.format(count=2, octets=320), b"+OK 2 320\r\n"),
        (p.ERR_DELETED.format(number=3), b"-ERR message 3 already deleted\r\n"),
        (p.OK_LIST_ALL.format(count=1, octets=120), b"+OK 1 message (120 octets)\r\n"),
        (p.OK_LIST_ALL.format(count=2, octets=320), b"+OK 2 messages (320 octets)\r\n"),
        (p.OK_RSET.format(count=0, octets=0), b"+OK maildrop has 0 messages (0 octets)\r\n"),
        (p.OK_BYE_UPDATED.format(count=1),
         b"+OK tiermail POP3 server signing off (1 message left)\r\n"),
    ],
)
def test_reply_encoding(reply: p.Reply, wire: bytes) -> None:
    assert reply.encode() == wire


def test_format_multiline_stuffs_and_terminates() -> None:
    assert p.format_multiline(p.OK_CAPA, ["TOP", ".hidden", b"UIDL"]) == (
        b"+OK capability list follows\r\nTOP\r\n..hidden\r\nUIDL\r\n.\r\n"
    )


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),  # last line completed
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
        (b"a\n.b\n", b"a\r\n..b\r\n.\r\n"),  # bare LF made CRLF, then stuffed
        (b"a\r", b"a\r\n.\r\n"),
        (b"x\r\n\r\n.", b"x\r\n\r\n..\r\n.\r\n"),
    ],
)
def test_stuff_table(body: bytes, wire: bytes) -> None:
    assert p.stuff(body) == wire


def _crlf_text() -> st.SearchStrategy[bytes]:
    line = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    return st.lists(line, max_size=20).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@given(_crlf_text())
def test_stuff_unstuff_round_trip(body: bytes) -> None:
    wire = p.stuff(body)
    assert p.unstuff(wire) == body
    # Nothing in the body can look like the terminator.
    assert b"\r\n.\r\n" not in (b"\r\n" + wire)[: -len(p.TERMINATOR)]


# Bodies made of the octets stuffing is about: random bytes alone seldom put a "." at a cut
# in the middle of a line, the case where stuffing by chunk start would corrupt the message.
STUFFING_OCTETS = st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b"\r\n."]),
                           max_size=80).map(b"".join)


@given(st.one_of(st.binary(max_size=300), STUFFING_OCTETS),
       st.lists(st.integers(min_value=1, max_value=40), max_size=10))
@example(b"a.b\r\n", [1])  # a chunk (RETR reads 256 KiB at a time) starting mid-line with "."
@example(b"a\r.b", [2])
def test_stuffing_in_chunks_equals_whole(body: bytes, cuts: list[int]) -> None:
    stuffer = p.DotStuffer()
    out, pos = [], 0
    for size in cuts:
        out.append(stuffer.feed(body[pos : pos + size]))
        pos += size
    out.append(stuffer.feed(body[pos:]))
    out.append(stuffer.finish())
    assert b"".join(out) == p.stuff(body)


@given(st.binary(max_size=300))
def test_stuffed_output_is_well_formed(body: bytes) -> None:
    wire = p.stuff(body)
    assert wire.endswith(b".\r\n")
    lines = wire[:-3].split(b"\r\n")
    assert lines[-1] == b""
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)


@given(st.binary(max_size=300))
def test_line_end_padding_is_what_stuffing_adds(body: bytes) -> None:
    """POP3's sizes are the stored size plus `line_end_padding` (RFC 1939 LIST gives the
    exact size): exactly what a client holds after taking RETR's lines apart."""
    assert len(p.unstuff(p.stuff(body))) == len(body) + line_end_padding(body)


@pytest.mark.parametrize(("body", "padding"), [
    (b"", 0), (b"a\r\n", 0), (b"no line end", 2), (b"lone CR\r", 1), (b"a\nb\r\n", 1),
    (b"a\r\r\n", 0), (b"a\n\n", 2),
])
def test_line_end_padding_table(body: bytes, padding: int) -> None:
    assert line_end_padding(body) == padding


MESSAGE = b"From: a@x\r\nSubject: hi\r\n\r\nline 1\r\nline 2\r\nline 3\r\n"


@pytest.mark.parametrize(
    ("message", "n", "expected"),
    [
        (MESSAGE, 0, b"From: a@x\r\nSubject: hi\r\n\r\n"),
        (MESSAGE, 2, b"From: a@x\r\nSubject: hi\r\n\r\nline 1\r\nline 2\r\n"),
        (MESSAGE, 10, MESSAGE),
        (b"Subject: x\n\nbody\nmore\n", 1, b"Subject: x\n\nbody\n"),  # bare LF
        (b"Subject: no body", 3, b"Subject: no body"),
        (b"\r\nbody only\r\nline\r\n", 1, b"\r\nbody only\r\n"),  # empty header
        # The header ends before a line that is no field, as IMAP's BODY[HEADER] does (it
        # was all header to TOP: found in review).
        (b"From: a\r\nnot a field\r\nbody2\r\n", 0, b"From: a\r\n"),
        (b"From: a\r\nnot a field\r\nbody2\r\n", 1, b"From: a\r\nnot a field\r\n"),
        (b"just body\r\nsecond\r\n", 0, b""),
        (b"just body\r\nsecond\r\n", 1, b"just body\r\n"),
        (b"From: a\r\n folded\r\nX : y\r\n\r\nb\r\n", 0, b"From: a\r\n folded\r\nX : y\r\n\r\n"),
        (b" leading blank\r\nx\r\n", 0, b""),  # no field before: no continuation
        (b": no name\r\n", 0, b""),
        (b"Subject: x\r\nlastline", 0, b"Subject: x\r\n"),
        (b"Subject: x\r\nlastline", 1, b"Subject: x\r\nlastline"),
    ],
)
def test_top_table(message: bytes, n: int, expected: bytes) -> None:
    assert p.top(message, n) == expected


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=5),
       st.integers(min_value=1, max_value=17))
def test_top_in_chunks_equals_whole(message: bytes, n: int, size: int) -> None:
    extractor = p.TopExtractor(n)
    out = []
    for pos in range(0, len(message), size):
        if extractor.done:
            break
        out.append(extractor.feed(message[pos : pos + size]))
    out.append(extractor.finish())
    assert b"".join(out) == p.top(message, n)
    assert message.startswith(p.top(message, n))


header_lines = st.lists(st.sampled_from([
    b"From: a@x\r\n", b"Subject : s\n", b" folded\r\n", b"\tfolded\r\n", b"\r\n", b"\n",
    b"no field\r\n", b"x\r\n", b": empty\r\n", b"a b: c\r\n", b"\r", b"X-\xff: 8bit\r\n",
    b"line", b"body line\r\n"]), max_size=8).map(b"".join)


@given(header_lines, st.integers(min_value=0, max_value=4))
def test_top_ends_the_header_where_imap_does(message: bytes, n: int) -> None:
    """TOP's header is IMAP's BODY[HEADER] (services/store/imap/protocol/mime.py), then at
    most n lines of what IMAP calls the body."""
    _, body_start = mime._parse_header(message, 0, len(message))
    expected = message[:body_start] + b"".join(_lf_lines(message[body_start:])[:n])
    assert p.top(message, n) == expected


@pytest.mark.parametrize("after", [b"nonfield\r\nbody2\r\n", b"nonfield\r\n\r\nbody\r\n",
                                   b"\r\nbody\r\n"])
def test_top_past_imaps_field_limit_ends_the_header_where_imap_does(after: bytes) -> None:
    """Past mime.MAX_HEADER_FIELDS fields IMAP reads no more fields and runs the header to
    the next blank line; TOP stopped at the first line that is no field (found in review)."""
    message = b"".join(b"X-F%d: v\r\n" % i for i in range(mime.MAX_HEADER_FIELDS + 2)) + after
    _, body_start = mime._parse_header(message, 0, len(message))
    for n in (0, 1):
        assert p.top(message, n) == message[:body_start] + b"".join(
            _lf_lines(message[body_start:])[:n])


def test_a_long_line_that_may_be_a_field_name_is_read_once() -> None:
    """Each chunk rescanned the whole held line: TOP of a 12 MB line took 15 s (found in
    review). Counted, not timed: the octets the scan looks at stay near the line's size."""
    line = b"A" * (4 * 1024 * 1024)
    extractor = p.TopExtractor(0)
    looked = 0
    real_scan = extractor._scan

    def counting(pos: int) -> object:
        nonlocal looked
        looked += len(extractor._held) - pos
        return real_scan(pos)

    extractor._scan = counting  # type: ignore[method-assign]
    for start in range(0, len(line), 65536):
        extractor.feed(line[start:start + 65536])
    assert extractor.feed(b"\r\n") == b"" and extractor.done
    assert looked <= len(line) + 2


def _lf_lines(data: bytes) -> list[bytes]:
    """Lines ending at LF (a lone CR is no line end), the last one possibly without."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return [line for line in lines if line]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("response", "initial", "expected"),
    [
        (_b64(b"\x00alice@example.test\x00secret"), True, b"\x00alice@example.test\x00secret"),
        (" " + _b64(b"x") + " ", False, b"x"),
        ("=", True, b""),  # RFC 5034 4: an empty initial response
        ("=", False, None),  # no base64 as a response to a challenge
        ("", False, b""),  # an empty response to a challenge
        ("not base64!", True, None),
        ("YQ", True, None),  # unpadded
    ],
)
def test_decode_sasl_response(response: str, initial: bool, expected: bytes | None) -> None:
    assert p.decode_sasl_response(response, initial=initial) == expected


@given(st.text(max_size=100), st.booleans())
def test_decode_sasl_response_never_raises(response: str, initial: bool) -> None:
    p.decode_sasl_response(response, initial=initial)


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (b"PASS hunter2\r\n", "PASS ****"),
        (b"PASS\thunter2\r\n", "PASS ****"),
        (b"AUTH\tPLAIN\tAGFsaWNlAHNlY3JldA==\r\n", "AUTH PLAIN ****"),
        (b"pass two words\r\n", "pass ****"),
        (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "AUTH PLAIN ****"),
        (b"AUTH PLAIN\r\n", "AUTH PLAIN"),
        (b"USER alice\r\n", "USER alice"),
        (b"RETR 1\r\n", "RETR 1"),
    ],
)
def test_redact(line: bytes, logged: str) -> None:
    assert p.redact(line) == logged


@pytest.mark.parametrize(
    ("text", "number"),
    [("1", 1), ("42", 42), ("0", None), ("-1", None), ("1a", None), ("", None),
     ("١", None), ("99999999999", None)],
)
def test_parse_message_number(text: str, number: int | None) -> None:
    assert p.parse_message_number(text) == number


@pytest.mark.parametrize(
    ("text", "lines"),
    [("0", 0), ("10", 10), ("4294967296", 4294967296), ("-1", None), ("1a", None), ("", None),
     ("١", None), ("99999999999999999999", 10**10)],  # more lines than any message: all
)
def test_parse_line_count(text: str, lines: int | None) -> None:
    assert p.parse_line_count(text) == lines
