"""Opening a scanner connection from an address: "host:port" (TCP) or a unix socket path."""

from __future__ import annotations

import asyncio
import socket
from typing import Any


def _is_unix(address: str) -> bool:
    return address.startswith("/") or ":" not in address


async def open_stream(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if _is_unix(address):
        return await asyncio.open_unix_connection(address)
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))


async def open_socket(address: str) -> socket.socket:
    """A connected non-blocking socket, for the loop's sock_* calls. Unlike a stream, it
    stays readable after a send fails: what the peer sent before it closed can be read."""
    loop = asyncio.get_running_loop()
    if _is_unix(address):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        return await _connected(loop, sock, address)
    host, _, port = address.rpartition(":")
    infos = await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {address}")
    for family, kind, proto, _, where in infos:
        try:
            return await _connected(loop, socket.socket(family, kind, proto), where)
        except OSError as exc:
            error = exc
    raise error


async def _connected(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     where: tuple[Any, ...] | str) -> socket.socket:
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, where)
    except BaseException:
        sock.close()
        raise
    return sock


async def close_stream(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
