"""Path parsing for MAIL FROM / RCPT TO: the fast path must agree with aiosmtpd's parser
wherever it answers, the full RFC 5321 parser must agree with aiosmtpd on every well-formed
path and refuse what aiosmtpd's lenient RFC 5322 parser would have rewritten."""

import asyncio

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from services.filter.protocol.address import parse_legacy_sender, parse_path, parse_simple_path


def aiosmtpd_parse(arg: str) -> tuple[str | None, str | None]:
    loop = asyncio.new_event_loop()
    try:
        return SMTP(object(), loop=loop)._getaddr(arg)
    finally:
        loop.close()


@pytest.mark.parametrize("arg", [
    "<alice@example.org>", "<Alice.B+tag@Mail.Example.ORG> SIZE=1234 BODY=8BITMIME",
    " <x@y.z>", "<o'brien@example.ie>", "<a@b>  SMTPUTF8",
])
def test_simple_paths_parse_like_aiosmtpd(arg: str) -> None:
    assert parse_simple_path(arg) == aiosmtpd_parse(arg)


@pytest.mark.parametrize("arg", [
    "<>", '<"quoted local"@example.org>', "<@route,@relay:a@example.org>", "alice@example.org",
    "<jörg@exämple.net>", "<a..b@example.org>", "<.a@example.org>", "<a@-bad.example>",
    "<a@example.org", "<a@[192.0.2.1]>", "", "<a(comment)@example.org>",
])
def test_anything_unusual_is_left_to_aiosmtpd(arg: str) -> None:
    assert parse_simple_path(arg) is None


atext = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
local = st.lists(atext, min_size=1, max_size=3).map(".".join)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=3).map(".".join)
params = st.sampled_from(["", " SIZE=10", " BODY=8BITMIME SMTPUTF8", "  NOTIFY=NEVER"])


@given(local, domain, params)
def test_agrees_on_generated_simple_paths(lp: str, dom: str, rest: str) -> None:
    arg = f"<{lp}@{dom}>{rest}"
    assert parse_simple_path(arg) == aiosmtpd_parse(arg)


@given(st.text(max_size=60))
def test_never_disagrees_when_it_answers(arg: str) -> None:
    fast = parse_simple_path(arg)
    if fast is not None:
        assert fast == aiosmtpd_parse(arg)


@given(local, domain, st.sampled_from(["SIZE=10", "x", ">", "<b@c>", "(c)", '"q"']))
def test_a_path_glued_to_what_follows_is_malformed_for_both(lp: str, dom: str,
                                                            glued: str) -> None:
    """`MAIL FROM:<a@b>SIZE=10` was taken (250) by the fast path and refused (553) by the
    full one, so the reply depended on the address's shape (found in review)."""
    arg = f"<{lp}@{dom}>{glued}"
    assert parse_simple_path(arg) is None and parse_path(arg) is None


@given(st.text(max_size=60))
def test_the_fast_path_agrees_with_the_full_parser(arg: str) -> None:
    fast = parse_simple_path(arg)
    if fast is not None:
        assert fast == parse_path(arg)


@pytest.mark.parametrize("arg", [
    "<>", "<> SIZE=10", '<"quoted local"@example.org> BODY=8BITMIME',
    "<@route,@relay:a@example.org>", "<jörg@exämple.net>", "<a@[192.0.2.1]>",
    "<a@[IPv6:2001:db8::1]>", '<"a\\"b"@example.org>', "<postmaster>", "<Postmaster>",
    "<\"alice\"@example.org>", "<\"al\\\\ice\"@example.org>", "<\"a@b\"@example.org>",
    "alice@example.org", "alice@example.org SIZE=5", "<alice@example.org>",
])
def test_well_formed_paths_parse_as_aiosmtpd_did(arg: str) -> None:
    address, rest = aiosmtpd_parse(arg)
    assert parse_path(arg) == (address, (rest or "").strip())  # parameters are split anyway


@pytest.mark.parametrize("arg", [
    "<a b@example.org>",  # aiosmtpd: '"a b"@example.org', another address
    "<a(comment)b@example.org>",  # aiosmtpd: '"a b"@example.org'
    "<a@exa mple.org>", "<a..b@example.org>", "<.a@example.org>", "<a@-bad.example>",
    "<a@example.org", "<a@>", "<@>", "<@example.org>", "<alice>", '<"unclosed@example.org>',
    "<a@example.org>SIZE=1", "<a@[]>", "<a@ex_ample.org>",
    '<"a"b"@example.org>',  # a bare quote inside a quoted string
    '<"a\\\x1bb"@example.org>',  # a quoted-pair of a control character (a terminal escape)
    "<a@example-.org>",  # a label ending in a hyphen
    "<a@[1.2.3.4]]>",  # an address literal with a bracket inside
])
def test_malformed_paths_are_refused(arg: str) -> None:
    assert parse_path(arg) is None


@pytest.mark.parametrize(("arg", "address", "rest"), [
    ("<taro..yamada.@docomo.ne.jp>", "taro..yamada.@docomo.ne.jp", ""),
    ("<.a@example.org> SIZE=10", ".a@example.org", "SIZE=10"),
    ("<bounce@mail_srv.example.com> BODY=8BITMIME", "bounce@mail_srv.example.com",
     "BODY=8BITMIME"),
    ("<_a@_srv.example>", "_a@_srv.example", ""),
])
def test_sloppy_senders_are_taken_as_written(arg: str, address: str, rest: str) -> None:
    assert parse_path(arg) is None
    assert parse_legacy_sender(arg) == (address, rest)


@pytest.mark.parametrize("arg", [
    "<a b@example.org>", "<a(comment)b@example.org>", "<...@example.org>", "<a@>",
    "<a@exa mple.org>", "<a@-bad.example>", "<a@example..org>", "<a@example.org",
    "<a@example.org>SIZE=1", "<>", "<a\r\n@example.org>", "<a@example.org.>",
])
def test_the_sender_leniency_stops_at_dots_and_underscores(arg: str) -> None:
    assert parse_legacy_sender(arg) is None


def test_quoted_pairs_are_undone_so_the_mailbox_is_found() -> None:
    """RFC 5321 4.1.2: `"\\a\\l\\i\\c\\e"@` is alice@, the same mailbox."""
    assert parse_path('<"\\a\\l\\i\\c\\e"@example.org>') == ("alice@example.org", "")
