"""What the store's protocol servers (IMAP, POP3) share about their listening sockets."""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol

CLOSE_TIMEOUT = 5.0  # seconds for a client to take our close before the socket is reset


class SessionOwner(Protocol):
    """A listener that knows its open sessions."""

    def cancel_sessions(self) -> None: ...

    async def wait_sessions(self) -> None: ...

    def session_count(self) -> int:
        """Sessions open on this listener's port."""
        ...


class SessionEndingServer(asyncio.AbstractServer):
    """An asyncio server that also ends its open sessions when closed.

    Python 3.11's Server.close() leaves accepted connections running; on shutdown each
    protocol ends its sessions its own way (IMAP `* BYE`, POP3 without UPDATE, RFC 1939
    section 6), so mailboxes are unlocked and nothing touches the store after it is closed.
    """

    def __init__(self, server: asyncio.Server, listener: SessionOwner) -> None:
        self._server = server
        self._listener = listener

    @property
    def sessions(self) -> int:
        return self._listener.session_count()

    @property
    def sockets(self) -> tuple[object, ...]:
        return tuple(self._server.sockets)

    def close(self) -> None:
        self._server.close()
        self._listener.cancel_sessions()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
        await self._listener.wait_sessions()


async def close_connection(writer: asyncio.StreamWriter, abort: bool) -> None:
    """Close a client connection (reset it when `abort`), never waiting more than
    CLOSE_TIMEOUT for a client that does not take the close (or the TLS close_notify)."""
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except (ConnectionError, ssl.SSLError):
        pass
