"""Helpers for filter conversation tests: the real server in the test's event loop, the real
RabbitMQ and Redis from the `settings` fixture, and smtplib clients run in threads."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiormq
import pytest
import redis.asyncio
from pamqp.commands import Basic

from common.directory import Directory, DirectorySnapshot
from common.envelope import Envelope
from common.settings import Settings
from common.topology import envelope_from_properties
from services.filter.main import FilterWorker, open_worker
from tests.support import delivery_queues

DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
TEAM = f"team@{DOMAIN}"
SENDER = "sender@remote.test"


async def publish_directory(settings: Settings) -> None:
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        await Directory(client, settings.redis_prefix).publish(
            DirectorySnapshot(
                domains={DOMAIN},
                users={ALICE, BOB},
                aliases={TEAM: (ALICE, BOB)},
            )
        )
    finally:
        await client.aclose()


@pytest.fixture
async def directory(settings: Settings) -> Settings:
    await publish_directory(settings)
    return settings


@contextlib.asynccontextmanager
async def running_filter(settings: Settings, **kwargs: Any) -> AsyncIterator[FilterWorker]:
    async with open_worker(settings, **kwargs) as worker:
        yield worker


@pytest.fixture
async def worker(directory: Settings) -> AsyncIterator[FilterWorker]:
    async with running_filter(directory) as running:
        yield running


@dataclass
class Queued:
    body: bytes
    envelope: Envelope


@contextlib.asynccontextmanager
async def amqp_channel(settings: Settings) -> AsyncIterator[Any]:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await settings.topology.declare(channel)
        yield channel
    finally:
        await connection.close()


async def drain_queue(settings: Settings) -> list[Queued]:
    """Take every message out of the delivery queues (they are in them: 250 came after the
    confirm), the deliver queue's first."""
    found: list[Queued] = []
    async with amqp_channel(settings) as channel:
        for queue in delivery_queues(settings):
            while True:
                message = await channel.basic_get(queue, no_ack=True)
                if not isinstance(message.delivery, Basic.GetOk):
                    break  # Basic.GetEmpty
                envelope = envelope_from_properties(message.header.properties)
                found.append(Queued(bytes(message.body), envelope))
                if not message.delivery.message_count:
                    break
    return found


async def queue_depth(settings: Settings) -> int:
    async with amqp_channel(settings) as channel:
        depth = 0
        for queue in delivery_queues(settings):
            ok = await channel.queue_declare(queue, passive=True)
            depth += int(ok.message_count or 0)
        return depth


def connect(port: int, timeout: float = 30.0) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.test",
                          timeout=timeout)
    client.ehlo()
    return client


def unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def send(port: int, message: bytes, rcpts: list[str], sender: str = SENDER,
         mail_options: tuple[str, ...] = (), starttls: bool = False) -> dict[str, Any]:
    """One transaction; returns the refused recipients (smtplib semantics) or raises."""
    with connect(port) as client:
        if starttls:
            client.starttls(context=unverified_context())
            client.ehlo()
        return client.sendmail(sender, rcpts, message, mail_options=list(mail_options))


class RawClient:
    """A byte-exact SMTP client for edge cases (smuggling, timeouts)."""

    def __init__(self, port: int, timeout: float = 30.0, source: str = "",
                 buffers: int = 0) -> None:
        """`source`: the loopback address to connect from (127.0.0.2 is another client);
        `buffers`: the socket's send and receive buffer sizes (0: the kernel's)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if buffers:  # before connecting: the receive window is agreed then
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        self.sock.settimeout(timeout)
        try:
            if source:
                self.sock.bind((source, 0))
            self.sock.connect(("127.0.0.1", port))
        except BaseException:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + "".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    def command(self, data: bytes) -> str:
        self.sock.sendall(data)
        return self.reply()

    def start_tls(self) -> None:
        """The TLS handshake on this connection (after the server's 220 to STARTTLS)."""
        self.file.close()
        self.sock = unverified_context().wrap_socket(self.sock, server_hostname="mx.test.invalid")
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        """True when the server has closed the connection (reads EOF)."""
        try:
            return self.file.read() is not None
        except OSError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def message(subject: str = "hello", body: bytes = b"Hello, world.\r\n") -> bytes:
    return (
        b"From: Sender <" + SENDER.encode() + b">\r\n"
        b"To: Alice <" + ALICE.encode() + b">\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + subject.encode().replace(b" ", b".") + b"@remote.test>\r\n"
        b"\r\n" + body
    )


def split_received(body: bytes) -> tuple[bytes, bytes]:
    """(the Received header we added, the rest) of a queued message."""
    assert body.startswith(b"Received: ")
    end = 0
    while True:
        end = body.index(b"\r\n", end) + 2
        if body[end:end + 1] not in (b"\t", b" "):
            return body[:end], body[end:]


async def in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(func, *args, **kwargs)
