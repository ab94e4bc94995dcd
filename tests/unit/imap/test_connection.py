"""The IMAP connection's writes after the client has gone, under the event loop the store
runs (uvloop): its transport refuses them with RuntimeError, not ConnectionError."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import uvloop

from common.settings import Settings
from services.store.imap.disconnect import Disconnect
from services.store.imap.server import Connection


async def _write_after_reset() -> str:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(reader, writer, Settings(hostname="test"), None)
        with pytest.raises(ConnectionResetError):
            await reader.read()
        try:
            await connection.write(b"* OK too late\r\n")
            await connection.flush()
        except Disconnect as exc:
            outcome.set_result(exc.reason)
        except Exception as exc:  # noqa: BLE001 - what the test reports
            outcome.set_result(repr(exc))
        else:
            outcome.set_result("written")

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
