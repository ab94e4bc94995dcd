"""What the full-text index and the scan read in hostile messages (NUL octets, lone UTF-16
surrogates, charsets that are Python codecs but no MIME charsets): the index holds the same
text the scan reads, and one bad message never keeps others out of the index."""

from __future__ import annotations

from pathlib import Path

from services.store.backends.maildb import user_path
from services.store.backends.textindex import TextIndex, message_text

USER = "alice@example.test"


def index_of(tmp_path: Path, *raws: bytes) -> TextIndex:
    user_path(tmp_path, USER).mkdir(parents=True)
    index = TextIndex(tmp_path)
    index.add(USER, [(f"g{i}", message_text(raw)) for i, raw in enumerate(raws)])
    return index


def test_a_nul_octet_hides_no_later_header_field_or_body_text(tmp_path: Path) -> None:
    # SQLite's FTS5 stopped reading a column at a NUL: every field after it and the body
    # text after it were missing from the index, so SEARCH FROM (whose index look is a
    # prefilter) and SEARCH BODY missed the message once it was indexed.
    raw = (b"Subject: =?utf-8?q?a=00b?=\r\nX-Raw: c\x00d\r\nFrom: Alice <alice@example.org>\r\n"
           b"\r\nbefore\x00after the nul\r\n")
    index = index_of(tmp_path, raw)
    try:
        assert index.lookup(USER, "alice@example", "HEADER")[0] == {"g0"}
        assert index.lookup(USER, "after the nul", "BODY")[0] == {"g0"}
        assert index.lookup(USER, "after the nul", "TEXT")[0] == {"g0"}
    finally:
        index.close()


def test_a_lone_surrogate_from_utf7_keeps_no_message_out_of_the_index(tmp_path: Path) -> None:
    # Python's UTF-7 decoder lets half a surrogate pair through; SQLite refused the text,
    # and the whole batch (the other messages with it) stayed unindexed.
    hostile = (b"Subject: =?utf-7?q?+2AA-?=\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n"
               b"x +2AA- y\r\n")
    fine = b"Subject: quarterly report\r\n\r\nnumbers\r\n"
    index = index_of(tmp_path, hostile, fine)
    try:
        assert index.lookup(USER, "quarterly", "TEXT")[0] == {"g1"}
        assert index.indexed(USER) == {"g0", "g1"}
    finally:
        index.close()


def test_python_codecs_that_are_no_mime_charsets_read_as_utf8() -> None:
    # punycode decoding is quadratic (a 200 KB body took 9 s); the escape codecs read
    # backslashes as escapes and make lone surrogates. None is a MIME charset.
    for charset in (b"punycode", b"idna", b"unicode-escape", b"raw_unicode_escape"):
        raw = (b"Subject: =?" + charset + b"?q?caf\\u00e9-xyz?=\r\nContent-Type: text/plain;"
               b" charset=" + charset + b"\r\n\r\nabc\\ud800-def\r\n")
        text = message_text(raw)
        assert "caf\\u00e9-xyz" in text.header, charset
        assert "abc\\ud800-def" in text.body, charset
