"""clamd client: INSTREAM over a unix socket or TCP, one connection per scan.

The size check comes first: a message larger than `stream_max` (which must match clamd's
StreamMaxLength) raises StreamTooLarge before a byte is sent, and so does clamd's own
"INSTREAM size limit exceeded" if the two disagree, and a Heuristics.Limits.Exceeded finding
(clamd with AlertExceedsMax stopped at one of its scan limits: an archive bomb, deep nesting).
Never a silent pass.
"""

from __future__ import annotations

import asyncio
import socket

from services.filter.backends.availability import Availability
from services.filter.backends.errors import (
    ScannerUnavailable,
    StreamTooLarge,
    failure_reason,
)
from services.filter.backends.streams import open_socket
from services.filter.protocol.clamd import (
    CLEAN,
    INSTREAM,
    MAX_REPLY,
    PING,
    PONG,
    ClamdProtocolError,
    ClamdResult,
    ClamdScanLimit,
    ClamdSizeLimit,
    chunks,
    parse_reply,
)

NAME = "clamd"


class ClamdClient:
    name = NAME

    def __init__(self, address: str, timeout: float, stream_max: int) -> None:
        self._address = address
        self._timeout = timeout
        self._stream_max = stream_max
        self.availability = Availability(NAME)

    async def scan(self, content: bytes) -> ClamdResult:
        if len(content) > self._stream_max:
            raise StreamTooLarge(len(content), self._stream_max)
        with self.availability.watch():
            return await self._scan(content)

    async def _scan(self, content: bytes) -> ClamdResult:
        progress = _Progress()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._instream(content, progress)
        except (OSError, TimeoutError, ClamdProtocolError) as exc:
            # ClamdProtocolError here: clamd closed without answering (it crashed or was
            # stopped mid-scan).
            raise ScannerUnavailable(NAME, failure_reason(exc, self._timeout),
                                     reached=progress.connected or None) from exc
        try:
            result = parse_reply(reply)
        except ClamdScanLimit as exc:
            raise StreamTooLarge(len(content), self._stream_max,
                                 beyond_limits=exc.heuristic) from exc
        except ClamdSizeLimit as exc:
            raise StreamTooLarge(len(content), self._stream_max, by_scanner=True) from exc
        except ClamdProtocolError as exc:
            raise ScannerUnavailable(NAME, str(exc)) from exc
        if progress.cut_short and result == CLEAN:
            # clamd said OK without having read the whole stream (found in review: a clamd
            # that answered OK at once and closed passed a 5 MB message it never saw). To a
            # stream it stopped reading, clamd answers with a limit or an error, not OK.
            raise ScannerUnavailable(NAME, "clamd answered OK to a stream it did not read "
                                     "whole", reached=True)
        return result

    async def _instream(self, content: bytes, progress: _Progress) -> bytes:
        # A plain socket, not a stream: when the stream exceeds clamd's limit, clamd answers
        # and closes while we are still sending, and our send fails. A stream's transport
        # then closes at once and the answer, already received, is lost (the scan looked
        # unavailable: a 451 where the policy for too big applies); the socket keeps it.
        loop = asyncio.get_running_loop()
        sock = await open_socket(self._address)
        progress.connected = True
        try:
            try:
                await loop.sock_sendall(sock, INSTREAM)
                for frame in chunks(content):
                    await loop.sock_sendall(sock, frame)
            except (BrokenPipeError, ConnectionResetError):
                progress.cut_short = True  # clamd stopped reading: its answer says why
            return await _receive_reply(loop, sock)
        finally:
            sock.close()

    async def ping(self) -> bool:
        answered = await self._ping()
        self.availability.record(answered=answered)
        return answered

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(min(self._timeout, 5.0)):
                loop = asyncio.get_running_loop()
                sock = await open_socket(self._address)
                try:
                    await loop.sock_sendall(sock, PING)
                    return (await _receive_reply(loop, sock)).rstrip(b"\0\n") == PONG
                finally:
                    sock.close()
        except (OSError, TimeoutError, ClamdProtocolError):
            return False

    async def aclose(self) -> None:
        """Nothing pooled: one connection per scan (clamd forks no process per connection,
        and a unix socket connect costs microseconds)."""


class _Progress:
    """How far one scan got: connected (a timeout after it is the scanner's failing scan,
    not an unreachable scanner), and whether clamd stopped reading the stream early."""

    def __init__(self) -> None:
        self.connected = False
        self.cut_short = False


async def _receive_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = b""
    while b"\0" not in data and len(data) < MAX_REPLY:
        try:
            piece = await loop.sock_recv(sock, MAX_REPLY)
        except ConnectionResetError:
            if data:
                break  # the answer came before the reset
            raise
        if not piece:
            break
        data += piece
    if not data:
        raise ClamdProtocolError("clamd closed the connection without a reply")
    return data.split(b"\0", 1)[0]
