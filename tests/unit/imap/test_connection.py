"""The IMAP connection's writes after the client has gone, under the event loop the store
runs (uvloop): its transport refuses them with RuntimeError, not ConnectionError."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Awaitable

import pytest
import uvloop

from common.settings import Settings
from services.store.imap.disconnect import Disconnect
from services.store.imap.server import Connection


async def _outcome(step: Awaitable[None]) -> str:
    """The reason of the Disconnect `step` raised, or what else happened."""
    try:
        await step
    except Disconnect as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - what the test reports
        return repr(exc)
    return "no error"


async def _write(connection: Connection, data: bytes) -> None:
    await connection.write(data)
    await connection.flush()


async def _write_after_reset() -> str:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(reader, writer, Settings(hostname="test"), None)
        with pytest.raises(ConnectionResetError):
            await reader.read()
        outcome.set_result(await _outcome(_write(connection, b"* OK too late\r\n")))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        # Closed with a reset (RST), as a phone that drops off the network appears.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        return await asyncio.wait_for(outcome, 10)


def test_a_write_after_the_client_reset_the_connection_is_a_lost_connection() -> None:
    assert uvloop.run(_write_after_reset()) == "lost"


async def _io_after_no_route_to_host(step: str) -> str:
    """What `step` (read or flush) of a Connection does once the socket has failed with
    EHOSTUNREACH: uvloop hands the error to the stream, which raises it from the next read
    and drain."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(reader, writer, Settings(hostname="test"), None)
        reader.set_exception(OSError(errno.EHOSTUNREACH, "No route to host"))
        # More than the socket buffers take, so that the flush has to wait to drain.
        outcome.set_result(await _outcome(
            connection.read_more() if step == "read"
            else _write(connection, b"* OK " + b"x" * (16 << 20) + b"\r\n")))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            return await asyncio.wait_for(outcome, 10)


@pytest.mark.parametrize("step", ["read", "flush"])
def test_a_client_with_no_route_to_it_is_a_lost_connection(step: str) -> None:
    """EHOSTUNREACH is an OSError but no ConnectionError: it ended the session as an
    unexpected error, logged with a traceback, for every phone that vanished behind a router
    that answers for it with ICMP errors."""
    assert uvloop.run(_io_after_no_route_to_host(step)) == "lost"
