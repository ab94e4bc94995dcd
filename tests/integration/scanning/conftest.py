"""Scanning conversation tests: in-process filter workers (open_worker) with the real rspamd,
clamd and spamd from the session fixtures in tests/conftest.py, and the real RabbitMQ and
Redis from `settings`."""

from __future__ import annotations

import base64
import smtplib
from dataclasses import dataclass

import pytest
from pamqp.commands import Basic

from common.envelope import Envelope
from common.settings import Settings
from common.topology import envelope_from_properties
from tests.integration.filter.conftest import ALICE, SENDER, amqp_channel, publish_directory
from tests.support import GTUBE, eicar_bytes, eventually, free_port

# Re-exported for the test modules.
__all__ = ["ALICE", "SENDER", "eventually"]


@pytest.fixture
async def scan_settings(settings: Settings, rspamd: str, clamd: str) -> Settings:
    """A stack of the test's own with rspamd and clamd on, tempfail on failure."""
    await publish_directory(settings)
    return settings.replace(spam="rspamd", rspamd_url=rspamd, virus="clamd",
                            clamd_address=clamd, scan_timeout=10.0)


def closed_address() -> str:
    """A loopback port nothing listens on: a scanner that is "stopped"."""
    return f"127.0.0.1:{free_port()}"


def message(subject: str, body: bytes = b"Hello Alice, see you at lunch.\r\n",
            extra_headers: bytes = b"") -> bytes:
    return (
        b"From: Sender <" + SENDER.encode() + b">\r\n"
        b"To: Alice <" + ALICE.encode() + b">\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\n"
        b"Message-ID: <" + subject.encode().replace(b" ", b".") + b"@remote.test>\r\n"
        + extra_headers + b"\r\n" + body
    )


def ham(subject: str = "lunch") -> bytes:
    return message(subject)


def gtube(subject: str = "gtube") -> bytes:
    return message(subject, b"This is spam.\r\n" + GTUBE.encode() + b"\r\n")


def add_header_band(subject: str = "suspicious") -> bytes:
    return message(subject, extra_headers=b"X-Tiermail-Test: add-header\r\n")


def eicar_attachment(subject: str = "invoice") -> bytes:
    """EICAR base64-encoded in the second part of a multipart/mixed message."""
    payload = base64.encodebytes(eicar_bytes()).replace(b"\n", b"\r\n")
    body = (
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\nPlease find the invoice attached.\r\n"
        b"--XYZ\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=\"invoice.com\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"--XYZ--\r\n"
    )
    return message(subject, body, b"MIME-Version: 1.0\r\n"
                                  b"Content-Type: multipart/mixed; boundary=\"XYZ\"\r\n")


@dataclass
class Taken:
    body: bytes
    envelope: Envelope

    def header(self, name: str) -> str | None:
        head = self.body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        for line in head.split("\r\n"):
            key, sep, value = line.partition(":")
            if sep and key.lower() == name.lower():
                return value.strip()
        return None


async def take_all(settings: Settings, queue: str) -> list[Taken]:
    """Every message now in `queue`, removed from it."""
    found: list[Taken] = []
    async with amqp_channel(settings) as channel:
        while True:
            got = await channel.basic_get(queue, no_ack=True)
            if not isinstance(got.delivery, Basic.GetOk):
                break
            found.append(Taken(bytes(got.body), envelope_from_properties(got.header.properties)))
    return found


async def depth(settings: Settings, queue: str) -> int:
    async with amqp_channel(settings) as channel:
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)




def send_one(port: int, data: bytes) -> tuple[int, str]:
    """(code, text) of the reply to DATA for one message to Alice."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.test",
                      timeout=60) as client:
        client.ehlo()
        try:
            client.sendmail(SENDER, [ALICE], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return 250, ""
