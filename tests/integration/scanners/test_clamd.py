"""The `clamd` fixture: a real clamd with the repository's EICAR-only signatures, spoken to
over INSTREAM (clamd(8)) with a raw socket exchange."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from pathlib import Path

import pytest

from services.devscanners.runner import connect, start_clamd
from services.filter.backends.clamd import ClamdClient
from services.filter.backends.errors import ScannerUnavailable, StreamTooLarge
from tests.support import eicar_bytes, free_port

CHUNK = 64 * 1024


def instream(address: str, data: bytes) -> str:
    """zINSTREAM, then <4-byte big-endian length><bytes> chunks, then a zero-length chunk."""
    with connect(address, timeout=10) as sock:
        sock.sendall(b"zINSTREAM\0")
        for start in range(0, len(data), CHUNK):
            chunk = data[start:start + CHUNK]
            sock.sendall(struct.pack("!I", len(chunk)) + chunk)
        try:
            sock.sendall(struct.pack("!I", 0))
        except OSError:
            pass  # clamd may answer and close early (size limit)
        reply = b""
        while not reply.endswith(b"\0") and (part := sock.recv(4096)):
            reply += part
    return reply.rstrip(b"\0").decode()


def mail_with_attachment(payload: bytes) -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: the file\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nHere it is.\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"test.com\"\r\n\r\n"
            + encoded + b"--b1--\r\n")


def test_eicar_is_found_with_our_signature(clamd: str) -> None:
    reply = instream(clamd, eicar_bytes())
    assert reply.startswith("stream: Tiermail.Test.EICAR") and reply.endswith(".UNOFFICIAL FOUND")


def test_eicar_as_base64_attachment_is_found(clamd: str) -> None:
    started = time.perf_counter()
    reply = instream(clamd, mail_with_attachment(eicar_bytes()))
    print(f"clamd INSTREAM of a mail with EICAR: {(time.perf_counter() - started) * 1000:.1f} ms")
    assert reply.endswith(".UNOFFICIAL FOUND"), reply


def test_ham_is_ok(clamd: str) -> None:
    instream(clamd, b"warm-up")
    started = time.perf_counter()
    reply = instream(clamd, mail_with_attachment(b"just a harmless text file\n" * 150))
    print(f"clamd INSTREAM of a 4 KB ham mail: {(time.perf_counter() - started) * 1000:.1f} ms")
    assert reply == "stream: OK"


def test_stream_above_stream_max_is_refused(clamd: str, tmp_path: Path) -> None:
    with start_clamd(tmp_path / "clamd", address=f"127.0.0.1:{free_port()}",
                     stream_max=4096) as small:
        reply = instream(small.address, b"x" * 10_000)
    assert "size limit exceeded" in reply


def test_unix_socket(clamd: str, tmp_path: Path) -> None:
    path = tmp_path / "clamd.sock"
    with start_clamd(tmp_path / "clamd", address=str(path)) as local:
        assert local.address == str(path)
        assert instream(local.address, eicar_bytes()).endswith(".UNOFFICIAL FOUND")



async def test_our_client_over_tcp_and_a_unix_socket_reads_clamds_own_limit(
        clamd: str, tmp_path: Path) -> None:
    """services/filter/backends/clamd.py against a real clamd whose StreamMaxLength (4 KiB)
    is below what the client allows: a stream over it is answered "size limit exceeded"
    while the client is still sending, and the client reads that answer every time (a
    failed send must not lose it: that turned a too-big message into a 451), on TCP and on
    a unix socket alike. Below the limit, EICAR is found and ham passes."""
    for address in (f"127.0.0.1:{free_port()}", str(tmp_path / "clamd.sock")):
        with start_clamd(tmp_path / f"clamd-{len(address)}", address=address,
                         stream_max=4096) as small:
            client = ClamdClient(small.address, timeout=10.0, stream_max=100 * 1024 * 1024)
            for _ in range(20):
                with pytest.raises(StreamTooLarge) as too_large:
                    await client.scan(b"x" * 3_000_000)
                # clamd's limit, not ours, stopped it: the log line says which to raise
                assert "clamd's StreamMaxLength" in str(too_large.value), too_large.value
            assert (await client.scan(eicar_bytes())).signature is not None
            assert (await client.scan(b"hello\r\n")).signature is None


async def test_an_ok_to_a_stream_clamd_did_not_read_is_no_verdict() -> None:
    """A clamd (or something in its place) that answered `stream: OK` at once and closed:
    the send failed partway, and the reply was taken as the verdict, so a 5 MB message
    nothing had read got 250 (found in review). clamd answers a stream it stops reading
    with a size limit or an error."""
    async def ok_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(b"zINSTREAM\0"))
        writer.write(b"stream: OK\0")
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(ok_at_once, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = ClamdClient(f"127.0.0.1:{port}", timeout=5.0, stream_max=64 * 1024 * 1024)
        with pytest.raises(ScannerUnavailable, match="did not read whole"):
            await client.scan(b"x" * (20 * 1024 * 1024))
    finally:
        server.close()


async def test_a_clamd_that_closes_without_answering_is_unavailable() -> None:
    """Stopped or crashed mid-scan: a temporary failure (the scan failure policy), never
    an error of another kind."""
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = ClamdClient(f"127.0.0.1:{port}", timeout=5.0, stream_max=1024 * 1024)
        with pytest.raises(ScannerUnavailable, match="without a reply|reset|pipe"):
            await client.scan(b"hello\r\n")
        assert not await client.ping()
    finally:
        server.close()
