"""Ending a client connection (services/store/listening.py) under the store's own event loop."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time

import pytest
import uvloop

from services.store import listening
from services.store.listening import ClientUnreachable, client_io, hang_up
from services.store.pop3.server import read_line


def _send_then_reset(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(data)
        time.sleep(0.05)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _hang_up_after_an_unseen_reset() -> BaseException | None:
    ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.transport.pause_reading()  # the reset arrives while nothing reads
        await asyncio.sleep(0.3)
        try:
            await hang_up(reader, writer)
        except BaseException as exc:  # noqa: BLE001 - what the test reports
            ended.set_result(exc)
        else:
            ended.set_result(None)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await asyncio.to_thread(_send_then_reset, port, b"a LOGOUT\r\n")
        async with asyncio.timeout(10):
            return await ended
    finally:
        server.close()


def test_hanging_up_on_a_client_that_reset_after_our_last_read_ends_quietly() -> None:
    """uvloop half-closes with shutdown(), which fails with ENOTCONN once the client's reset
    is in; the error came out of the close as an OSError that is no ConnectionError, and the
    IMAP and POP3 servers logged it as an unhandled exception with a traceback (13 times in
    two minutes of fuzzing a `make run` stack)."""
    assert uvloop.run(_hang_up_after_an_unseen_reset()) is None


def test_socket_errors_that_are_no_connection_errors_are_a_client_gone() -> None:
    with pytest.raises(ClientUnreachable) as raised, client_io():
        raise OSError(errno.EHOSTUNREACH, "No route to host")
    assert raised.value.errno == errno.EHOSTUNREACH


@pytest.mark.parametrize("error", [TimeoutError(), ConnectionResetError(), ValueError("x")])
def test_other_errors_pass_as_they_are(error: Exception) -> None:
    with pytest.raises(type(error)), client_io():
        raise error


async def _pop3_read_after_no_route_to_host() -> None:
    reader = asyncio.StreamReader()
    reader.set_exception(OSError(errno.ENETUNREACH, "Network is unreachable"))
    await read_line(reader)


def test_the_pop3_server_reads_no_route_to_host_as_a_client_gone() -> None:
    """Pop3Listener ends a session that raises a ConnectionError as a lost connection (INFO);
    any other error is logged as unexpected, with a traceback."""
    with pytest.raises(ClientUnreachable):
        asyncio.run(_pop3_read_after_no_route_to_host())


class _NeverClosed:
    """A connection whose client never takes our close (a full receive window, no reply to
    TLS close_notify): `wait_closed` never returns."""

    def __init__(self) -> None:
        self.aborted = False
        self.transport = self

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        await asyncio.Event().wait()

    def abort(self) -> None:
        self.aborted = True


async def test_a_close_the_client_never_takes_is_cut_after_the_close_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Or its descriptor and kernel buffers stay for good after its session ended and its
    slot was freed; enough of them run the process out of descriptors."""
    monkeypatch.setattr(listening, "CLOSE_TIMEOUT", 0.05)
    writer = _NeverClosed()
    await listening.close_connection(writer, abort=False)  # type: ignore[arg-type]
    assert writer.aborted
