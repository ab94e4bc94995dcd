"""Hostile messages through every path FETCH, SEARCH, SORT and THREAD take (hostile_mime.py):
no exception, well-formed answers, sections that are slices of the stored octets, the
full-text index agreeing with a scan, and work that grows linearly with the input (counted
in executed steps, not measured in seconds)."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.store.backends.textindex import message_text
from services.store.imap.protocol import mime
from services.store.imap.protocol.command import Section
from services.store.imap.search import Headers
from services.store.imap.sort import base_subject, display_name, mailbox_part
from tests.unit.imap.hostile_mime import (
    check_index,
    exercise,
    hostile_message,
    nested_messages,
    nested_multiparts,
)

# Moderate counts: these run in CI on shared cores (the campaign that found the defects ran
# tens of thousands of examples).
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(hostile_message())
@example(b"")
@example(b"\r\n")
@example(b"Subject: no separator and no line end")
@example(b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n--a\r\n--a--")
@example(b"Content-Type: multipart/mixed; boundary=a\r\rSubject: x\r\r--a\rx\r--a--\r")
@example(b"Content-Type: text\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=\r\n--a")
@example(b'Content-Type: multipart/mixed; boundary="a"\r\r--a\r\r\n\r--a--\r')  # no blank line
def test_hostile_messages_get_well_formed_answers_everywhere(raw: bytes) -> None:
    exercise(raw)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_message(), min_size=1, max_size=4))
def test_the_full_text_index_answers_as_a_scan_does(raws: list[bytes]) -> None:
    check_index(raws)


@pytest.mark.parametrize("raw", [
    pytest.param(nested_multiparts(2000), id="multiparts-2000-deep"),
    pytest.param(nested_multiparts(1000, "same"), id="one-boundary-1000-deep"),
    pytest.param(nested_multiparts(1000, "a{}"), id="prefix-boundaries-1000-deep"),
    pytest.param(nested_messages(3000), id="rfc822-3000-deep"),
    pytest.param(b"Content-Type: multipart/digest; boundary=d\r\n\r\n" + b"--d\r\n\r\n" * 1000,
                 id="digest-of-empty-messages"),
])
def test_thousands_deep_nesting_needs_no_deep_recursion(raw: bytes) -> None:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)  # far below the nesting: only bounded recursion gets through
    try:
        exercise(raw)
    finally:
        sys.setrecursionlimit(limit)


# --- growth -------------------------------------------------------------------------------


def steps(work: Callable[[], object]) -> int:
    """Python lines executed and functions called (Python and C) by `work`: a count that,
    unlike time, does not depend on the machine or its load. Work inside one C call (a
    regular expression, bytes.find) is not seen: those inputs are chosen so that a quadratic
    search would need a Python loop around it."""
    count = 0

    def trace(_frame: FrameType, _event: str, _arg: Any) -> Any:  # itself, the local tracer
        nonlocal count
        count += 1
        return trace

    def profile(_frame: FrameType, event: str, _arg: object) -> None:
        nonlocal count
        if event == "c_call":
            count += 1

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return count


def everything(raw: bytes) -> None:
    """What FETCH and SEARCH/SORT/THREAD compute for one message."""
    root = mime.parse_message(raw)
    mime.bodystructure(root, extended=True)
    mime.envelope(root)
    message_text(raw)
    headers = Headers(raw)
    base_subject(headers.get_all("subject")[0] if headers.get_all("subject") else "")
    display_name(headers, "from")
    mailbox_part(headers, "to")


GROWING: dict[str, Callable[[int], bytes]] = {
    "header fields": lambda n: b"X-A: b\r\n" * n + b"\r\nbody",
    "folded lines": lambda n: b"Subject: x" + b"\r\n y" * n + b"\r\n\r\nbody",
    "addresses": lambda n: b"From: " + b"a@b, " * n + b"\r\nTo: " + b"g: <a@b>;" * n + b"\r\n\r\n",
    "open comments": lambda n: b"From: " + b"(" * n + b"\r\n\r\n",
    "open angles": lambda n: b"To: " + b"<" * n + b"\r\n\r\n",
    "encoded words": lambda n: b"Subject: " + b"=?utf-8?b?QUJD?= " * n + b"\r\n\r\n",
    "parameters": lambda n: b"Content-Type: text/plain" + b'; a="b;' * n + b"\r\n\r\n",
    "continuations": lambda n: (b"Content-Type: text/plain"
                                + b"".join(b"; name*%d*=a" % i for i in range(n, 0, -1))
                                + b"\r\n\r\n"),
    "parts": lambda n: b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + b"--x\r\n" * n,
    "dash lines": lambda n: (b"Content-Type: multipart/mixed; boundary=a\r\n\r\n"
                             + b"".join(b"--%s\r\n" % (b"a" * (i % 50)) for i in range(n))),
    "subject leaders": lambda n: b"Subject: " + b"Re: [x] " * n + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", GROWING)
def test_work_grows_linearly_with_the_input(name: str) -> None:
    make = GROWING[name]
    small, large = steps(lambda: everything(make(500))), steps(lambda: everything(make(2000)))
    # Four times the input: about four times the steps when linear, sixteen when quadratic.
    assert large <= 5 * small + 1000, (small, large)


def _many_fields(count: int, end: bytes = b"\r\nbody\r\n") -> bytes:
    return (b"Subject: first\r\n" + b"X-A: b\r\n" * (count - 1)
            + b"X-Late: c\r\n continued\r\n" + b"X-B: d\r\n" * 3 + end)


def test_header_fields_past_the_cap_stay_in_the_header_but_are_no_fields() -> None:
    raw = _many_fields(mime.MAX_HEADER_FIELDS)
    root = mime.parse_message(raw)
    assert len(root.fields) == mime.MAX_HEADER_FIELDS
    assert (root.fields[0].name, root.fields[-1].name) == ("Subject", "X-A")
    assert raw[root.body_start:] == b"body\r\n"
    assert mime.section(raw, root, Section(text="HEADER")) == raw[:root.body_start]
    assert mime.section(raw, root, Section(text="HEADER.FIELDS", fields=("X-LATE",))) == b"\r\n"
    assert mime.section(raw, root, Section(text="TEXT")) == b"body\r\n"
    unended = _many_fields(mime.MAX_HEADER_FIELDS, end=b"")
    assert mime.parse_message(unended).body_start == len(unended)
    # One field fewer: the late one is parsed, continuation line and all.
    root = mime.parse_message(_many_fields(mime.MAX_HEADER_FIELDS - 1))
    assert root.header("X-Late") == "c continued"


def test_parsing_stops_counting_fields_at_the_cap() -> None:
    """2.2 million fields (17.6 MB) took 10 s of CPU in a store thread, pausing the event
    loop up to 0.84 s; past the cap, the rest of the header is one search in C."""
    cap = mime.MAX_HEADER_FIELDS
    small = steps(lambda: mime.parse_header_only(_many_fields(2 * cap)))
    large = steps(lambda: mime.parse_header_only(_many_fields(20 * cap)))
    assert large <= small + 100, (small, large)


def test_the_delimiter_index_keeps_no_object_per_line() -> None:
    """A message of 1.5 million dash lines (15 MB) made a tuple per line; freeing them held
    the interpreter lock, and every session of the store, for 0.15-0.2 s. The index keeps
    flat arrays: a few octets a line."""
    raw = b"--a\r\n" * 100_000 + b"--a--\r\n" * 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = mime._delimiter_index(raw)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 40 * 300_000  # 300,000 entries: "a" twice for each line, "a--" once
    assert len(index) == 2
    budget = mime._Budget(raw)
    assert sum(close for _, _, close in budget.delimiter_lines(0, len(raw), b"a")) == 100_000


def test_charset_names_no_codec_knows_leave_nothing_behind() -> None:
    # codecs.lookup remembers every name it is asked about, found or not, for the life of
    # the process: a 1 MB header of encoded words in 40,000 made-up charsets kept 7 MB.
    def hostile(batch: int) -> bytes:
        words = " ".join(f"=?x-{batch}-{i}?q?a?=" for i in range(5000))
        return (f"Subject: {words}\r\nContent-Type: text/plain; charset=x-{batch}\r\n\r\n"
                "=?x-y?q?z?=\r\n").encode()

    message_text(hostile(0))  # what is allocated once, on first use
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in (1, 2):
            message_text(hostile(batch))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 100_000  # before the fix: 2 MB
