"""FETCH response rendering (protocol/fetch.py)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.store.imap.protocol import fetch, mime, wire
from services.store.imap.protocol.command import FetchAtt, Section
from services.store.mailbox import MessageInfo
from tests.imapgrammar import check_response
from tests.unit.imap.test_mime import FORWARD, FORWARD_HEADER, INNER_MESSAGE, messages, read_all

RAW = (
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"Subject: hello\r\n"
    b"  folded\r\n"
    b"\r\n"
    b"0123456789\r\n"
)
HEADER = RAW[: RAW.index(b"\r\n\r\n") + 4]
TEXT = b"0123456789\r\n"


def info_for(raw: bytes, flags: frozenset[str] = frozenset({"\\Seen"})) -> MessageInfo:
    return MessageInfo(
        uid=42, guid="g", size=len(raw), internaldate=837596665.0, flags=flags, modseq=7
    )


INFO = info_for(RAW)


def body(
    section: Section | None = None,
    *,
    peek: bool = False,
    partial: tuple[int, int] | None = None,
) -> FetchAtt:
    return FetchAtt("BODY[]", section=section or Section(), peek=peek, partial=partial)


def render(*atts: FetchAtt, raw: bytes | None = RAW, **kwargs: object) -> bytes:
    return fetch.render_fetch(3, INFO, atts, raw, **kwargs)  # type: ignore[arg-type]


# --- whole lines --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("atts", "expected"),
    [
        ([FetchAtt("FLAGS")], b"FLAGS (\\Seen)"),
        ([FetchAtt("UID")], b"UID 42"),
        ([FetchAtt("MODSEQ")], b"MODSEQ (7)"),
        ([FetchAtt("RFC822.SIZE")], b"RFC822.SIZE %d" % len(RAW)),
        ([FetchAtt("INTERNALDATE")], b'INTERNALDATE "17-Jul-1996 09:44:25 +0000"'),
        ([FetchAtt("FLAGS"), FetchAtt("UID"), FetchAtt("FLAGS")], b"FLAGS (\\Seen) UID 42"),
        ([FetchAtt("RFC822")], b"RFC822 {%d}\r\n" % len(RAW) + RAW),
        ([FetchAtt("RFC822.HEADER")], b"RFC822.HEADER {%d}\r\n" % len(HEADER) + HEADER),
        ([FetchAtt("RFC822.TEXT")], b"RFC822.TEXT {12}\r\n" + TEXT),
        ([body()], b"BODY[] {%d}\r\n" % len(RAW) + RAW),
        ([body(peek=True)], b"BODY[] {%d}\r\n" % len(RAW) + RAW),
        ([body(Section(text="TEXT"))], b"BODY[TEXT] {12}\r\n" + TEXT),
        (
            [body(Section(text="HEADER"), peek=True)],
            b"BODY[HEADER] {%d}\r\n" % len(HEADER) + HEADER,
        ),
        ([body(Section((1,)))], b"BODY[1] {12}\r\n" + TEXT),
        (
            [body(Section(text="HEADER.FIELDS", fields=("SUBJECT", "TO")), peek=True)],
            b"BODY[HEADER.FIELDS (SUBJECT TO)] {57}\r\n"
            b"To: imap@cac.washington.edu\r\nSubject: hello\r\n  folded\r\n\r\n",
        ),
        (
            [body(Section(text="HEADER.FIELDS.NOT", fields=("SUBJECT", "TO")))],
            b"BODY[HEADER.FIELDS.NOT (SUBJECT TO)] {46}\r\n"
            b"From: Terry Gray <gray@cac.washington.edu>\r\n\r\n",
        ),
        # A part that does not exist reads as an empty string.
        ([body(Section((2,)))], b"BODY[2] {0}\r\n"),
        ([body(Section((1, 2), "MIME"))], b"BODY[1.2.MIME] {0}\r\n"),
        (
            [FetchAtt("BODY")],
            b'BODY ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 12 1)',
        ),
        (
            [FetchAtt("BODYSTRUCTURE")],
            b'BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 12 1 '
            b"NIL NIL NIL NIL)",
        ),
        (
            [FetchAtt("ENVELOPE")],
            b'ENVELOPE (NIL "hello  folded" (("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'((NIL NIL "imap" "cac.washington.edu")) NIL NIL NIL NIL)',
        ),
    ],
)
def test_items(atts: list[FetchAtt], expected: bytes) -> None:
    assert render(*atts) == b"* 3 FETCH (" + expected + b")\r\n"


@pytest.mark.parametrize(
    ("partial", "echo", "data"),
    [
        ((0, 10), b"<0>", RAW[:10]),
        ((5, 3), b"<5>", RAW[5:8]),
        ((len(RAW) - 4, 100), b"<%d>" % (len(RAW) - 4), RAW[-4:]),
        ((len(RAW), 10), b"<%d>" % len(RAW), b""),
        ((len(RAW) + 50, 10), b"<%d>" % (len(RAW) + 50), b""),
        ((0, 0), b"<0>", b""),
    ],
)
def test_partial_fetch_echoes_origin_and_slices(
    partial: tuple[int, int], echo: bytes, data: bytes
) -> None:
    line = render(body(partial=partial))
    assert line == b"* 3 FETCH (BODY[]" + echo + b" {%d}\r\n" % len(data) + data + b")\r\n"


def test_partial_of_a_section() -> None:
    line = render(body(Section(text="TEXT"), peek=True, partial=(2, 5)))
    assert line == b"* 3 FETCH (BODY[TEXT]<2> {5}\r\n23456)\r\n"


@pytest.mark.parametrize(
    ("att", "expected"),
    [
        (body(Section((1,)), partial=(0, 10)), b"BODY[1]<0> {10}\r\n0123456789"),
        (body(Section((1,)), partial=(4, 100)), b"BODY[1]<4> {8}\r\n456789\r\n"),
        (body(Section(text="HEADER"), partial=(5, 20)),
         b"BODY[HEADER]<5> {20}\r\n Terry Gray <gray@ca"),
        (body(Section(text="TEXT"), partial=(0, 3)), b"BODY[TEXT]<0> {3}\r\n012"),
        (body(Section(text="TEXT"), partial=(20, 3)), b"BODY[TEXT]<20> {0}\r\n"),
        # HEADER.FIELDS(.NOT) are lines chosen from the header, built on request
        (body(Section(text="HEADER.FIELDS", fields=("SUBJECT",)), partial=(2, 12)),
         b"BODY[HEADER.FIELDS (SUBJECT)]<2> {12}\r\nbject: hello"),
        (body(Section(text="HEADER.FIELDS.NOT", fields=("FROM", "TO")), partial=(9, 100)),
         b"BODY[HEADER.FIELDS.NOT (FROM TO)]<9> {19}\r\nhello\r\n  folded\r\n\r\n"),
        (body(Section(text="HEADER.FIELDS", fields=("SUBJECT",)), partial=(40, 5)),
         b"BODY[HEADER.FIELDS (SUBJECT)]<40> {0}\r\n"),
    ],
)
def test_a_partial_of_a_section_is_a_slice_of_that_section(att: FetchAtt,
                                                           expected: bytes) -> None:
    """RFC 3501 6.4.5: the origin counts from the section's first octet, not the message's,
    and the count stops at the section's end; an origin past it gives an empty string."""
    assert render(att) == b"* 3 FETCH (" + expected + b")\r\n"


def test_sections_of_a_forwarded_message() -> None:
    info = info_for(FORWARD)
    atts = [
        body(Section((2,), "HEADER.FIELDS", ("SUBJECT",))),
        body(Section((2, 2))),
        body(Section((2,), "TEXT"), partial=(0, 7)),
        FetchAtt("RFC822.HEADER"),
    ]
    line = fetch.render_fetch(9, info, atts, FORWARD)
    assert line == (
        b"* 9 FETCH (BODY[2.HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: inner\r\n\r\n"
        b" BODY[2.2] {11}\r\n<p>html</p>"
        b" BODY[2.TEXT]<0> {7}\r\n--inner"
        b" RFC822.HEADER {%d}\r\n" % len(FORWARD_HEADER) + FORWARD_HEADER + b")\r\n"
    )
    assert INNER_MESSAGE.startswith(b"From: b@example.org")


def test_extra_flags_are_added_to_flags() -> None:
    line = render(FetchAtt("FLAGS"), extra_flags=frozenset({"\\Recent"}))
    assert line == b"* 3 FETCH (FLAGS (\\Recent \\Seen))\r\n"


def test_uid_and_modseq_are_added_first_when_the_session_asks() -> None:
    line = render(FetchAtt("FLAGS"), raw=None, include_uid=True, include_modseq=True)
    assert line == b"* 3 FETCH (UID 42 MODSEQ (7) FLAGS (\\Seen))\r\n"


def test_uid_and_modseq_asked_for_are_not_repeated() -> None:
    line = render(
        FetchAtt("FLAGS"),
        FetchAtt("MODSEQ"),
        FetchAtt("UID"),
        include_uid=True,
        include_modseq=True,
    )
    assert line == b"* 3 FETCH (FLAGS (\\Seen) MODSEQ (7) UID 42)\r\n"


def test_literal_bodies_keep_bare_lf_bytes() -> None:
    raw = b"Subject: x\n\nline one\nline two\n"
    line = fetch.render_fetch(1, info_for(raw), [body(Section(text="TEXT"))], raw)
    assert line == b"* 1 FETCH (BODY[TEXT] {18}\r\nline one\nline two\n)\r\n"


# --- needs_body / sets_seen -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("atts", "needs", "seen"),
    [
        ([FetchAtt("FLAGS"), FetchAtt("UID"), FetchAtt("INTERNALDATE")], False, False),
        ([FetchAtt("RFC822.SIZE"), FetchAtt("MODSEQ")], False, False),
        ([FetchAtt("ENVELOPE")], True, False),
        ([FetchAtt("BODY")], True, False),
        ([FetchAtt("BODYSTRUCTURE")], True, False),
        ([FetchAtt("RFC822.HEADER")], True, False),
        ([FetchAtt("RFC822.TEXT")], True, True),
        ([FetchAtt("RFC822")], True, True),
        ([body(Section(text="HEADER"), peek=True)], True, False),
        ([body(Section(text="HEADER"))], True, True),
        ([FetchAtt("FLAGS"), body(Section((1,)))], True, True),
    ],
)
def test_needs_body_and_sets_seen(atts: list[FetchAtt], needs: bool, seen: bool) -> None:
    assert fetch.needs_body(atts) is needs
    assert fetch.sets_seen(atts) is seen


@pytest.mark.parametrize(
    ("atts", "header_only"),
    [
        ([FetchAtt("FLAGS"), FetchAtt("UID")], False),  # no message bytes at all
        ([FetchAtt("UID"), FetchAtt("ENVELOPE"), FetchAtt("RFC822.SIZE")], True),
        ([FetchAtt("RFC822.HEADER")], True),
        ([body(Section(text="HEADER.FIELDS", fields=("FROM",)), peek=True)], True),
        ([body(Section(text="HEADER"), peek=True), FetchAtt("FLAGS")], True),
        ([FetchAtt("ENVELOPE"), FetchAtt("BODYSTRUCTURE")], False),
        ([body(Section(text="TEXT"), peek=True)], False),
        ([body(Section((1,), text="HEADER"), peek=True)], False),  # a part's header
        ([body(Section(), peek=True)], False),
    ],
)
def test_needs_header_only(atts: list[FetchAtt], header_only: bool) -> None:
    assert fetch.needs_header_only(atts) is header_only


@pytest.mark.parametrize("raw", [FORWARD, INNER_MESSAGE, b"Subject: no body, no blank line"])
def test_header_items_are_the_same_from_the_header_section_alone(raw: bytes) -> None:
    atts = [FetchAtt("ENVELOPE"), FetchAtt("RFC822.HEADER"),
            body(Section(text="HEADER.FIELDS", fields=("SUBJECT", "FROM")), peek=True)]
    assert fetch.needs_header_only(atts)
    cut = raw.find(b"\r\n\r\n")
    header = raw if cut < 0 else raw[:cut + 4] + b"trailing body octets are ignored"
    info = info_for(raw)
    assert fetch.render_fetch(1, info, atts, header) == fetch.render_fetch(1, info, atts, raw)


# --- parsing at most once ---------------------------------------------------------------------


@pytest.fixture
def parse_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real = mime.parse_message

    def counting(raw: bytes) -> mime.Part:
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(mime, "parse_message", counting)
    return calls


def test_structure_is_parsed_once_per_render(parse_calls: list[bytes]) -> None:
    render(
        FetchAtt("ENVELOPE"),
        FetchAtt("BODYSTRUCTURE"),
        FetchAtt("BODY"),
        body(Section((1,))),
        body(Section(text="HEADER")),
    )
    assert len(parse_calls) == 1


def test_header_sections_do_not_parse_the_structure(parse_calls: list[bytes]) -> None:
    line = render(
        FetchAtt("RFC822.HEADER"),
        FetchAtt("RFC822.TEXT"),
        body(Section(text="HEADER.FIELDS", fields=("FROM",)), peek=True),
        body(),
    )
    assert parse_calls == []
    assert b"From: Terry Gray" in line


# --- properties -----------------------------------------------------------------------------

ALL_ATTS = (
    FetchAtt("FLAGS"),
    FetchAtt("MODSEQ"),
    FetchAtt("INTERNALDATE"),
    FetchAtt("RFC822.SIZE"),
    FetchAtt("RFC822"),
    FetchAtt("RFC822.HEADER"),
    FetchAtt("RFC822.TEXT"),
    FetchAtt("ENVELOPE"),
    FetchAtt("BODY"),
    FetchAtt("BODYSTRUCTURE"),
    body(),
    body(Section(text="HEADER")),
    body(Section(text="TEXT"), partial=(3, 9)),
    body(Section(text="HEADER.FIELDS", fields=("SUBJECT", "X-A")), peek=True),
    body(Section(text="HEADER.FIELDS.NOT", fields=("FROM",))),
    body(Section((1,))),
    body(Section((1,), "MIME")),
    body(Section((2, 1))),
    body(Section((2,), "HEADER")),
    body(Section((2,), "TEXT")),
    body(Section((1, 2, 3), "MIME"), partial=(1, 1)),
)


@settings(max_examples=200)
@given(messages)
@example(b"Content-Transfer-Encoding\t:\xb5")  # str.upper() made it U+039C, not latin-1
def test_any_message_renders_a_well_formed_fetch_line(raw: bytes) -> None:
    line = fetch.render_fetch(5, info_for(raw), ALL_ATTS, raw, include_uid=True)
    prefix = b"* 5 FETCH "
    assert line.startswith(prefix) and line.endswith(b"\r\n")
    items = read_all(line[len(prefix) : -2])
    assert isinstance(items, list)
    names = items[0::2]
    assert names[0] == b"UID"
    assert len(names) == len(ALL_ATTS) + 1
    values = dict(zip(names, items[1::2], strict=True))
    sent = wire.literal_octets(raw)  # the same octets, NUL as 0x80
    assert values[b"RFC822"] == sent
    assert values[b"BODY[]"] == sent


@given(st.binary(max_size=200), st.integers(0, 300), st.integers(0, 300))
def test_partial_is_a_slice_of_the_section(raw: bytes, origin: int, count: int) -> None:
    whole = fetch.render_fetch(1, info_for(raw), [body()], raw)
    part = fetch.render_fetch(1, info_for(raw), [body(partial=(origin, count))], raw)
    sent = wire.literal_octets(raw)
    assert whole == b"* 1 FETCH (BODY[] {%d}\r\n" % len(raw) + sent + b")\r\n"
    expected = sent[origin : origin + count]
    assert part == b"* 1 FETCH (BODY[]<%d> {%d}\r\n" % (origin, len(expected)) + expected + b")\r\n"


# --- streamed pieces (a large message sent from its file) ---------------------------------

_STREAMABLE = st.sampled_from([
    FetchAtt("FLAGS"), FetchAtt("UID"), FetchAtt("RFC822.SIZE"), FetchAtt("INTERNALDATE"),
    FetchAtt("MODSEQ"), FetchAtt("RFC822"), FetchAtt("BODYSTRUCTURE"), FetchAtt("ENVELOPE"),
    body(), body(peek=True), FetchAtt("BODY[]", section=None),
])
_PARTIALS = st.builds(lambda origin, count: body(peek=True, partial=(origin, count)),
                      st.integers(0, 200), st.integers(0, 200))


def filled(pieces: list[fetch.Piece], raw: bytes) -> bytes:
    """The response as the session sends it: each Span's octets through literal_octets."""
    return b"".join(p if isinstance(p, bytes)
                    else wire.literal_octets(raw[p.start:p.start + p.length]) for p in pieces)


@given(atts=st.lists(st.one_of(_STREAMABLE, _PARTIALS), min_size=1, max_size=5),
       uid=st.booleans(), modseq=st.booleans())
@settings(max_examples=300)
def test_pieces_with_the_file_octets_filled_in_are_the_whole_response(
        atts: list[FetchAtt], uid: bool, modseq: bool) -> None:
    derived = fetch.derive(["BODYSTRUCTURE", "ENVELOPE"], RAW)
    assert fetch.streamable(atts, derived)
    pieces = fetch.render_pieces(3, INFO, atts, len(RAW), include_uid=uid,
                                 include_modseq=modseq, derived=derived)
    expected = fetch.render_fetch(3, INFO, atts, RAW, include_uid=uid, include_modseq=modseq,
                                  derived=derived)
    assert filled(pieces, RAW) == expected
    assert all(0 <= p.start <= len(RAW) and p.start + p.length <= len(RAW)
               for p in pieces if isinstance(p, fetch.Span))
    assert not any(isinstance(a, bytes) and isinstance(b, bytes)
                   for a, b in zip(pieces, pieces[1:], strict=False))


def test_the_whole_message_is_one_span_after_its_literal_length() -> None:
    pieces = fetch.render_pieces(3, INFO, [FetchAtt("UID"), body(peek=True)], 30_000_000)
    assert pieces == [b"* 3 FETCH (UID 42 BODY[] {30000000}\r\n", fetch.Span(0, 30_000_000),
                      b")\r\n"]


@pytest.mark.parametrize("atts", [
    [body(Section(text="TEXT"))], [body(Section(part=(1,)))], [FetchAtt("RFC822.HEADER")],
    [FetchAtt("RFC822.TEXT")], [FetchAtt("BODYSTRUCTURE")], [FetchAtt("ENVELOPE"), body()],
])
def test_items_that_need_the_message_parsed_are_not_streamable(atts: list[FetchAtt]) -> None:
    assert not fetch.streamable(atts, {})


_SECTIONS = st.sampled_from([
    body(), body(Section(text="TEXT")), body(Section(text="HEADER")), body(Section(part=(1,))),
    body(Section(part=(1, 1))), body(Section(part=(2,))), body(Section(part=(2,), text="MIME")),
    body(Section(part=(2,), text="TEXT")), body(Section(part=(9,))),
    body(Section(text="HEADER.FIELDS", fields=("SUBJECT",))),
    FetchAtt("RFC822.TEXT"), FetchAtt("RFC822.HEADER"), FetchAtt("RFC822"),
    FetchAtt("BODYSTRUCTURE"), FetchAtt("ENVELOPE"), FetchAtt("FLAGS"),
])


@given(atts=st.lists(_SECTIONS, min_size=1, max_size=4),
       partial=st.none() | st.tuples(st.integers(0, 300), st.integers(0, 300)),
       spans_over=st.integers(0, 64), raw=st.one_of(messages, st.sampled_from([FORWARD, RAW])))
@settings(max_examples=300)
def test_spans_for_long_runs_filled_in_are_the_whole_response(
        atts: list[FetchAtt], partial: tuple[int, int] | None, spans_over: int,
        raw: bytes) -> None:
    if partial is not None:
        atts = [FetchAtt(a.name, a.section, a.peek, partial) if a.name == "BODY[]" else a
                for a in atts]
    pieces = fetch.render_pieces(3, info_for(raw), atts, raw, spans_over=spans_over)
    assert filled(pieces, raw) == fetch.render_fetch(3, info_for(raw), atts, raw)
    assert all(p.length > spans_over for p in pieces if isinstance(p, fetch.Span))


def test_nul_in_a_message_goes_as_0x80_in_every_literal() -> None:
    # RFC 3501 9: a literal holds CHAR8 (%x01-ff), never NUL; literal8 needs BINARY (RFC
    # 3516), which the server does not offer. The octet count, and every offset, stay.
    raw = b"Subject: a\x00b\r\n\r\n\x00body\x00\r\n"
    atts = [body(), body(Section(text="HEADER")), body(Section(text="TEXT")),
            body(Section((1,))), body(partial=(0, 12)), FetchAtt("RFC822"),
            FetchAtt("RFC822.HEADER"), FetchAtt("RFC822.TEXT")]
    line = fetch.render_fetch(1, info_for(raw), atts, raw)
    check_response(line)
    sent = raw.replace(b"\x00", b"\x80")
    values = dict(zip(*[iter(read_all(line[len(b"* 1 FETCH "):-2]))] * 2, strict=True))
    assert values[b"BODY[]"] == values[b"RFC822"] == sent
    assert values[b"BODY[TEXT]"] == values[b"BODY[1]"] == sent.partition(b"\r\n\r\n")[2]
    assert values[b"BODY[]<0>"] == sent[:12]
