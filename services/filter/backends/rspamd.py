"""rspamd client: POST /checkv2 on the normal worker, one connection per scan.

httpx rather than an HTTP/1.1 client of our own: it bounds the connections, handles
Content-Length and chunked replies, and is widely used and maintained; the protocol itself
(headers, JSON) lives in services/filter/protocol/rspamd.py.

No keep-alive: nothing in rspamd's reply names the message it is for, and on a reused
connection whatever the server sent beyond one reply was read as the next message's (found
in review: a stray `reject` reply refused the next, clean message with 550). A TCP handshake
to rspamd costs far less than its scan. The reply is read up to MAX_REPLY (a 200 MB reply
held 250 MiB of a worker's memory and its loop for half a second).
"""

from __future__ import annotations

import asyncio

import httpx

from common.envelope import Envelope
from services.filter.backends.availability import Availability
from services.filter.backends.errors import ScannerUnavailable, failure_reason
from services.filter.protocol.rspamd import (
    CHECK_PATH,
    PING_PATH,
    RspamdProtocolError,
    RspamdResult,
    parse_checkv2,
    request_headers,
)

NAME = "rspamd"
MAX_REPLY = 4 * 1024 * 1024  # rspamd's replies are kilobytes: symbols, a few headers


class RspamdClient:
    name = NAME

    def __init__(self, url: str, timeout: float, hostname: str = "",
                 max_connections: int = 64) -> None:
        self._timeout = timeout
        self._hostname = hostname
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
            trust_env=False,  # never an HTTP proxy from the environment
        )
        # Pings on a connection of their own: behind 64 slow scans in the shared pool, a
        # ping waited out its 5 s and marked a busy but healthy rspamd down (found in review).
        self._pings = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=httpx.Timeout(timeout),
                                        limits=httpx.Limits(max_connections=1,
                                                            max_keepalive_connections=0),
                                        trust_env=False)
        self.availability = Availability(NAME)

    async def check(self, envelope: Envelope, content: bytes) -> RspamdResult:
        with self.availability.watch():
            return await self._check(envelope, content)

    async def _check(self, envelope: Envelope, content: bytes) -> RspamdResult:
        headers = request_headers(envelope, self._hostname)
        try:
            async with asyncio.timeout(self._timeout):
                status, reply = await self._post(content, headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # httpx keeps the socket's error as context, not as the cause
            raise ScannerUnavailable(NAME, _describe(exc, self._timeout), reached=False) from exc
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise ScannerUnavailable(NAME, _describe(exc, self._timeout)) from exc
        if status != 200:
            raise ScannerUnavailable(NAME, f"HTTP {status}")
        try:
            return parse_checkv2(reply)
        except RspamdProtocolError as exc:
            raise ScannerUnavailable(NAME, str(exc)) from exc

    async def _post(self, content: bytes,
                    headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        """The reply's status and body, the body read up to MAX_REPLY."""
        async with self._http.stream("POST", CHECK_PATH, content=content,
                                     headers=headers) as response:
            body = bytearray()
            async for piece in response.aiter_bytes():
                body += piece
                if len(body) > MAX_REPLY:
                    raise ScannerUnavailable(NAME, f"a reply over {MAX_REPLY} bytes")
            return response.status_code, bytes(body)

    async def ping(self) -> bool:
        answered = await self._ping()
        self.availability.record(answered=answered)
        return answered

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(min(self._timeout, 5.0)):
                response = await self._pings.get(PING_PATH)
        except (httpx.HTTPError, OSError, TimeoutError):
            return False
        return response.status_code == 200 and response.content.strip() == b"pong"

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._pings.aclose()


def _describe(exc: BaseException, timeout: float) -> str:
    # httpx's own timeout (the same length) may fire before asyncio's.
    if isinstance(exc, httpx.TimeoutException):
        exc = TimeoutError()
    return failure_reason(exc, timeout)
