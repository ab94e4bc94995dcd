"""SpamAssassin client: one SPAMC/1.5 SYMBOLS request per connection to spamd (TCP or unix).

A client of our own (about 40 lines with the pure protocol module) instead of aiospamc: the
protocol is one request and one reply, and this keeps the failure handling the same as the
other scanners'.
"""

from __future__ import annotations

import asyncio

from services.filter.backends.availability import Availability
from services.filter.backends.errors import ScannerUnavailable, failure_reason
from services.filter.backends.streams import close_stream, open_stream
from services.filter.protocol.spamd import (
    SpamdProtocolError,
    SpamdResult,
    parse_reply,
    symbols_request,
)

NAME = "spamd"
MAX_REPLY = 1024 * 1024


class SpamdClient:
    name = NAME

    def __init__(self, address: str, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self.availability = Availability(NAME)

    async def check(self, content: bytes, user: str | None = None) -> SpamdResult:
        with self.availability.watch():
            return await self._check(content, user)

    async def _check(self, content: bytes, user: str | None = None) -> SpamdResult:
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._exchange(symbols_request(content, user))
        except (OSError, TimeoutError, ValueError) as exc:
            raise ScannerUnavailable(NAME, failure_reason(exc, self._timeout)) from exc
        try:
            return parse_reply(reply)
        except SpamdProtocolError as exc:
            raise ScannerUnavailable(NAME, str(exc)) from exc

    async def _exchange(self, request: bytes) -> bytes:
        reader, writer = await open_stream(self._address)
        try:
            writer.write(request)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            data = b""
            while len(data) < MAX_REPLY and (piece := await reader.read(65536)):
                data += piece
            return data
        finally:
            await close_stream(writer)

    async def ping(self) -> bool:
        answered = await self._ping()
        self.availability.record(answered=answered)
        return answered

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(min(self._timeout, 5.0)):
                reply = await self._exchange(b"PING SPAMC/1.5\r\n\r\n")
        except (OSError, TimeoutError):
            return False
        return reply.startswith(b"SPAMD/") and b"PONG" in reply

    async def aclose(self) -> None:
        """One connection per request: nothing to close."""
