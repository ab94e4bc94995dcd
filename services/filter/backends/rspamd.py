"""rspamd client: POST /checkv2 on the normal worker, over a pooled keep-alive connection.

httpx rather than an HTTP/1.1 client of our own: it keeps a connection pool (rspamd's normal
worker keeps connections alive, which saves a TCP handshake per message), handles
Content-Length and chunked replies, and is widely used and maintained; the protocol itself
(headers, JSON) lives in services/filter/protocol/rspamd.py.
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


class RspamdClient:
    name = NAME

    def __init__(self, url: str, timeout: float, hostname: str = "",
                 max_connections: int = 64) -> None:
        self._timeout = timeout
        self._hostname = hostname
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            trust_env=False,  # never an HTTP proxy from the environment
        )
        self.availability = Availability(NAME)

    async def check(self, envelope: Envelope, content: bytes) -> RspamdResult:
        with self.availability.watch():
            return await self._check(envelope, content)

    async def _check(self, envelope: Envelope, content: bytes) -> RspamdResult:
        headers = request_headers(envelope, self._hostname)
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.post(CHECK_PATH, content=content, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # httpx keeps the socket's error as context, not as the cause
            raise ScannerUnavailable(NAME, _describe(exc, self._timeout), reached=False) from exc
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise ScannerUnavailable(NAME, _describe(exc, self._timeout)) from exc
        if response.status_code != 200:
            raise ScannerUnavailable(NAME, f"HTTP {response.status_code}")
        try:
            return parse_checkv2(response.content)
        except RspamdProtocolError as exc:
            raise ScannerUnavailable(NAME, str(exc)) from exc

    async def ping(self) -> bool:
        answered = await self._ping()
        self.availability.record(answered=answered)
        return answered

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(min(self._timeout, 5.0)):
                response = await self._http.get(PING_PATH)
        except (httpx.HTTPError, OSError, TimeoutError):
            return False
        return response.status_code == 200 and response.content.strip() == b"pong"

    async def aclose(self) -> None:
        await self._http.aclose()


def _describe(exc: BaseException, timeout: float) -> str:
    # httpx's own timeout (the same length) may fire before asyncio's.
    if isinstance(exc, httpx.TimeoutException):
        exc = TimeoutError()
    return failure_reason(exc, timeout)
