"""A loopback DNS stub that answers every query at once with NXDOMAIN (RFC 1035 4.1.1).

rspamd resolves the client IP's PTR name for every message, and SPF/DMARC look up TXT
records; with no internet each of those would wait for the resolver's timeout. Pointed at this
stub, they fail in microseconds and the checks yield their "no record" symbols (R_SPF_NA,
DMARC_NA...). Development and tests only.

    python -m services.devscanners.devdns --port 5354
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
QR = 0x8000
OPCODE_MASK = 0x7800
RD = 0x0100
RA = 0x0080
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
POLL_INTERVAL = 0.2  # how soon stop() is noticed
MAX_UDP = 512  # RFC 1035 2.3.4; we echo only the question, so replies stay well below


def answer(query: bytes) -> bytes | None:
    """The reply to one query datagram: NXDOMAIN echoing the question, FORMERR for a
    question we cannot parse, None for something that is not a query at all."""
    if len(query) < HEADER.size:
        return None
    ident, flags, qdcount, _, _, _ = HEADER.unpack_from(query)
    if flags & QR:
        return None  # a response, not a query: never answer those (loops)
    reply_flags = QR | (flags & OPCODE_MASK) | (flags & RD) | RA
    end = _question_end(query, HEADER.size) if qdcount == 1 else None
    if end is None:
        return HEADER.pack(ident, reply_flags | RCODE_FORMERR, 0, 0, 0, 0)
    return HEADER.pack(ident, reply_flags | RCODE_NXDOMAIN, 1, 0, 0, 0) + query[HEADER.size:end]


def _question_end(packet: bytes, offset: int) -> int | None:
    """Offset just past one question entry (QNAME labels, QTYPE, QCLASS), or None."""
    while offset < len(packet):
        length = packet[offset]
        if length == 0:
            end = offset + 1 + 4
            return end if end <= len(packet) else None
        if length & 0xC0:
            return None  # compression pointers do not occur in a question we must echo
        offset += 1 + length
    return None


class DnsStub:
    """The stub on 127.0.0.1:port (0 picks a free port) in a daemon thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._sock.settimeout(POLL_INTERVAL)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve, name="devdns", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> DnsStub:
        if self._thread.ident is None:  # not started yet (start_dns_stub() then `with`)
            self._thread.start()
        return self

    def serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, peer = self._sock.recvfrom(MAX_UDP * 8)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = answer(query)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendto(reply, peer)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> DnsStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="answer every DNS query with NXDOMAIN")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5354)
    args = parser.parse_args(argv)
    stub = DnsStub(args.port, args.host)
    print(f"devdns: NXDOMAIN for everything on {stub.address} (UDP)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stub.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
