"""Pure scanner protocol parsing and scan-header formatting: tables plus Hypothesis."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.envelope import Envelope, Recipient
from services.filter.protocol import clamd, rspamd, spamd
from services.filter.protocol.scan_headers import (
    MAX_VALUE,
    authentication_results,
    header_safe,
    spam_headers,
    symbols_value,
)


def envelope(**changes: object) -> Envelope:
    base = Envelope(queue_id="Q1", mail_from="s@remote.test",
                    recipients=(Recipient("a@x.test", ("a@x.test",)),
                                Recipient("b@x.test", ("b@x.test",))),
                    client_ip="192.0.2.1", client_helo="client.remote.test",
                    received_at=0.0, size=10)
    return Envelope(**{**base.__dict__, **changes})  # type: ignore[arg-type]


# rspamd

GTUBE_REPLY = {
    "is_skipped": True, "score": 15.0, "required_score": 15.0, "action": "reject",
    "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, "metric_score": 0.0}},
    "messages": {"smtp_message": "Gtube pattern"}, "message-id": "undef",
}
ADD_HEADER_REPLY = {
    "is_skipped": False, "score": 9.1, "required_score": 15.0, "action": "add header",
    "symbols": {
        "TIERMAIL_TEST_ADD_HEADER": {"name": "TIERMAIL_TEST_ADD_HEADER", "score": 8.0},
        "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1, "options": ["text/plain"]},
        "R_SPF_ALLOW": {"name": "R_SPF_ALLOW", "score": -0.2, "options": ["+ip4:192.0.2.1"]},
    },
    "messages": {}, "milter": {"add_headers": {"X-Spamd-Bar": {"value": "+++", "order": 0}},
                               "remove_headers": {"X-Spam": 0}},
}


def test_rspamd_reply_parsed() -> None:
    result = rspamd.parse_checkv2(json.dumps(ADD_HEADER_REPLY).encode())
    assert result.action == rspamd.ADD_HEADER
    assert (result.score, result.required_score) == (9.1, 15.0)
    assert result.has("R_SPF_ALLOW")
    spf = next(s for s in result.symbols if s.name == "R_SPF_ALLOW")
    assert spf.options == ("+ip4:192.0.2.1",)
    assert result.add_headers == (("X-Spamd-Bar", "+++"),)
    gtube = rspamd.parse_checkv2(json.dumps(GTUBE_REPLY).encode())
    assert (gtube.action, gtube.smtp_message, gtube.skipped) == ("reject", "Gtube pattern", True)


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[]", b'{"action": "explode", "score": 1, "required_score": 2}',
    b'{"action": "reject", "score": "high", "required_score": 15}',
    b'{"action": "reject", "score": 1, "required_score": 15, "symbols": []}',
    b'{"error": "bad request"}',
])
def test_rspamd_garbage_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(rspamd.RspamdProtocolError):
        rspamd.parse_checkv2(raw)


@given(st.binary(max_size=300))
def test_rspamd_random_bytes_never_raise_anything_else(raw: bytes) -> None:
    try:
        rspamd.parse_checkv2(raw)
    except rspamd.RspamdProtocolError:
        pass


def test_rspamd_request_headers_carry_the_envelope() -> None:
    headers = rspamd.request_headers(
        envelope(authenticated_user="alice", client_helo="evil\r\nX-Injected: 1"), "mx.test")
    assert (b"Rcpt", b"a@x.test") in headers and (b"Rcpt", b"b@x.test") in headers
    assert (b"IP", b"192.0.2.1") in headers
    assert (b"Queue-Id", b"Q1") in headers
    assert (b"User", b"alice") in headers
    assert (b"Helo", b"evilX-Injected: 1") in headers  # no CR/LF can split the request
    assert (b"From", b"<>") in rspamd.request_headers(envelope(mail_from=""), "mx.test")
    assert not any(name == b"User" for name, _ in rspamd.request_headers(envelope(), "mx"))
    assert not any(name == b"Settings" for name, _ in rspamd.request_headers(envelope(), "mx"))


def test_rspamd_gets_no_utf8_address_and_smtputf8_mail_its_settings() -> None:
    """rspamd cannot read a UTF-8 address in its request headers (BROKEN_HEADERS, 8) and
    counts RFC 6532 headers as broken (INVALID_FROM_8BIT, 6): SMTPUTF8 mail went to Junk."""
    headers = rspamd.request_headers(
        envelope(mail_from="jörg@beispiel.test", smtputf8=True,
                 recipients=(Recipient("ünï@x.test", ("u@x.test",)),
                             Recipient("b@x.test", ("b@x.test",)))), "mx.test")
    assert [name for name, _ in headers if name in (b"From", b"Rcpt")] == [b"Rcpt"]
    assert (b"Rcpt", b"b@x.test") in headers
    assert (b"Settings", rspamd.SMTPUTF8_SETTINGS) in headers


# clamd

def test_clamd_chunks_frame_and_terminate() -> None:
    frames = list(clamd.chunks(b"a" * 10, size=4))
    assert frames[-1] == b"\0\0\0\0"
    assert [struct.unpack("!I", f[:4])[0] for f in frames] == [4, 4, 2, 0]
    assert b"".join(f[4:] for f in frames) == b"a" * 10
    assert list(clamd.chunks(b"")) == [b"\0\0\0\0"]


@pytest.mark.parametrize(("reply", "signature"), [
    (b"stream: OK\0", None),
    (b"stream: OK", None),
    (b"stream: Tiermail.Test.EICAR.UNOFFICIAL FOUND\0", "Tiermail.Test.EICAR.UNOFFICIAL"),
    (b"stream: Win.Test.EICAR_HDB-1 FOUND\n", "Win.Test.EICAR_HDB-1"),
])
def test_clamd_replies(reply: bytes, signature: str | None) -> None:
    assert clamd.parse_reply(reply).signature == signature


def test_clamd_size_limit_and_errors() -> None:
    with pytest.raises(clamd.ClamdSizeLimit):
        clamd.parse_reply(b"INSTREAM size limit exceeded. ERROR\0")
    # AlertExceedsMax: a scan limit reached inside the message is no virus, and no clean
    with pytest.raises(clamd.ClamdScanLimit) as limit:
        clamd.parse_reply(b"stream: Heuristics.Limits.Exceeded.MaxRecursion FOUND\0")
    assert limit.value.heuristic == "Heuristics.Limits.Exceeded.MaxRecursion"
    for bad in (b"", b"garbage", b"stream: FOUND", b"stream: lstat() failed. ERROR",
                b"UNKNOWN COMMAND"):
        with pytest.raises(clamd.ClamdProtocolError):
            clamd.parse_reply(bad)


@given(st.binary(max_size=200))
def test_clamd_random_bytes_never_raise_anything_else(raw: bytes) -> None:
    try:
        clamd.parse_reply(raw)
    except (clamd.ClamdProtocolError, clamd.ClamdSizeLimit):
        pass


# spamd

def test_spamd_reply_parsed() -> None:
    reply = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 17\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"
             b"GTUBE,MISSING_DATE")
    result = spamd.parse_reply(reply)
    assert (result.spam, result.score, result.threshold) == (True, 1000.0, 5.0)
    assert result.symbols == ("GTUBE", "MISSING_DAT")  # Content-length is obeyed
    ham = spamd.parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.5 / 5.0\r\n\r\n")
    assert (ham.spam, ham.score, ham.symbols) == (False, -0.5, ())


@pytest.mark.parametrize("raw", [
    b"", b"SPAMD/1.1 0 EX_OK\r\n", b"SPAMD/1.1 76 Bad header line\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n", b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n",
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",
    # an error status is an error whatever follows it (a verdict after it is not one)
    b"SPAMD/1.1 76 Bad header line\r\nSpam: True ; 15.0 / 5.0\r\n\r\n",
    b"SPAMD/1.1 74 EX_IOERR\r\nSpam: False ; 0.0 / 5.0\r\n\r\n",
])
def test_spamd_garbage(raw: bytes) -> None:
    with pytest.raises(spamd.SpamdProtocolError):
        spamd.parse_reply(raw)


@given(st.binary(max_size=200))
def test_spamd_random_bytes_never_raise_anything_else(raw: bytes) -> None:
    try:
        spamd.parse_reply(raw)
    except spamd.SpamdProtocolError:
        pass


def test_spamd_request() -> None:
    request = spamd.symbols_request(b"Subject: x\r\n\r\nhi\r\n", user="al ice\r\n")
    assert request.startswith(b"SYMBOLS SPAMC/1.5\r\nContent-length: 18\r\nUser: alice\r\n\r\n")


# Headers

def test_authentication_results_only_methods_present() -> None:
    assert authentication_results("mx.test", ["R_SPF_ALLOW", "MIME_GOOD"]) == \
        ("Authentication-Results", "mx.test; spf=pass")
    assert authentication_results(
        "mx.test", ["R_SPF_SOFTFAIL", "R_DKIM_REJECT", "R_DKIM_ALLOW", "DMARC_POLICY_REJECT"]
    ) == ("Authentication-Results", "mx.test; spf=softfail; dkim=fail; dmarc=fail")
    assert authentication_results("mx.test", ["R_SPF_NA", "R_DKIM_NA", "DMARC_NA"]) == \
        ("Authentication-Results", "mx.test; spf=none; dkim=none; dmarc=none")
    assert authentication_results("mx.test", ["DMARC_POLICY_QUARANTINE", "R_SPF_FAIL"]) == \
        ("Authentication-Results", "mx.test; spf=fail; dmarc=fail")
    assert authentication_results("mx.test", ["GTUBE"]) is None
    assert authentication_results("mx\r\n.test", ["R_SPF_NEUTRAL"]) == \
        ("Authentication-Results", "mx.test; spf=neutral")


def test_spam_headers_format() -> None:
    headers = dict(spam_headers(9.1, 15.0, [("B", 1.0), ("A", 8.0), ("C", None)]))
    assert headers["X-Spam"] == "Yes"
    assert headers["X-Spam-Score"] == "9.10 / 15.00"
    assert headers["X-Spam-Symbols"] == "A(8.00), B(1.00), C"


def test_symbols_value_is_bounded() -> None:
    value = symbols_value([(f"SYMBOL_{i}", float(i)) for i in range(500)])
    assert len(value) <= MAX_VALUE
    assert value.endswith("...")
    assert value.startswith("SYMBOL_499(499.00)")


@given(st.lists(st.tuples(st.text(), st.one_of(st.none(), st.floats(-1e6, 1e6))), max_size=60),
       st.floats(-1e3, 1e3), st.floats(-1e3, 1e3))
def test_arbitrary_symbols_never_break_a_header(
        symbols: list[tuple[str, float | None]], score: float, required: float) -> None:
    for name, value in spam_headers(score, required, symbols):
        assert "\r" not in value and "\n" not in value
        assert all(0x20 <= ord(c) < 0x7f for c in value)
        assert len(name) + 2 + len(value) <= 998


@given(st.text(), st.integers(min_value=3, max_value=1000))
def test_header_safe(text: str, limit: int) -> None:
    value = header_safe(text, limit)
    assert len(value) <= limit
    assert all(0x20 <= ord(c) < 0x7f for c in value)
