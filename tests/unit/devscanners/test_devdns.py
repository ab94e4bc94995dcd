"""The development DNS stub answers every query at once with NXDOMAIN (RFC 1035 4.1.1)."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.devscanners.devdns import DnsStub, answer

HEADER = struct.Struct("!HHHHHH")
QTYPE_A, QTYPE_PTR, QTYPE_TXT, QCLASS_IN = 1, 12, 16, 1


def query(ident: int, name: str, qtype: int, edns: bool = False) -> bytes:
    """A standard recursive query as a resolver sends it, optionally with an EDNS OPT record."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    packet = HEADER.pack(ident, 0x0100, 1, 0, 0, 1 if edns else 0)
    packet += qname + struct.pack("!HH", qtype, QCLASS_IN)
    if edns:  # RFC 6891 6.1.2: root name, TYPE OPT (41), UDP size, no options
        packet += b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return packet


def parse_reply(reply: bytes) -> tuple[int, int, int, int, bytes]:
    ident, flags, qdcount, ancount, _, _ = HEADER.unpack_from(reply)
    return ident, flags, qdcount, ancount, reply[HEADER.size:]


@pytest.mark.parametrize(("name", "qtype", "edns"), [
    ("example.org", QTYPE_A, False),
    ("10.2.0.192.in-addr.arpa", QTYPE_PTR, True),
    ("_dmarc.example.org", QTYPE_TXT, True),
])
def test_nxdomain_echoes_the_question(name: str, qtype: int, edns: bool) -> None:
    packet = query(0xBEEF, name, qtype, edns)
    ident, flags, qdcount, ancount, rest = parse_reply(answer(packet) or b"")
    assert ident == 0xBEEF
    assert flags & 0x8000  # QR: a response
    assert flags & 0x0100  # RD copied
    assert flags & 0x000F == 3  # NXDOMAIN
    assert (qdcount, ancount) == (1, 0)
    assert rest == query(0, name, qtype)[HEADER.size:]  # the question, without the OPT record


def test_garbage_gets_formerr_and_responses_get_nothing() -> None:
    bad = HEADER.pack(7, 0x0100, 1, 0, 0, 0) + b"\x05ab"  # a label running off the end
    assert parse_reply(answer(bad) or b"")[1] & 0x000F == 1
    assert answer(b"\x00\x01") is None
    assert answer(HEADER.pack(7, 0x8180, 0, 0, 0, 0)) is None


@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    reply = answer(data)
    assert reply is None or len(reply) <= len(data)


def test_stub_answers_over_udp() -> None:
    with DnsStub() as stub, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(2)
        for ident in (1, 2):
            client.sendto(query(ident, "mail.example.org", QTYPE_A), ("127.0.0.1", stub.port))
            reply_ident, flags, *_ = parse_reply(client.recv(512))
            assert reply_ident == ident
            assert flags & 0x000F == 3
