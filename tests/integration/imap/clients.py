"""Client-side helpers for the IMAP conversation tests: imaplib, imapclient and a byte-level
client for what neither library can express (literals, pipelining, malformed commands).

Every client is blocking; async tests run their dialogs with `asyncio.to_thread` so a server
running in the test's event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import imaplib
import inspect
import re
import socket
import ssl
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from imapclient import IMAPClient
from imapclient.response_parser import parse_response

from services.store.backends.maildb import MailDB
from services.store.mailbox import MessageInfo
from tests.integration.imap.conftest import ALICE, USERS, ImapStack

TIMEOUT = 10.0  # every socket read is bounded: a missing reply fails instead of hanging

TAGGED = re.compile(rb"^(?P<tag>[A-Za-z0-9.]+) (?P<status>OK|NO|BAD)\b ?(?P<text>.*)$", re.S)
LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")


def unverified() -> ssl.SSLContext:
    """The test certificate is self-signed; these tests are about IMAP, not PKI."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def settle(value: Any) -> Any:
    """Await `value` if the fixture handed back an awaitable (async delivery helpers)."""
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass
class Server:
    """Where the server under test listens and who may log in."""

    port: int
    tls_port: int
    users: dict[str, str]

    @classmethod
    def of(cls, stack: ImapStack) -> Server:
        return cls(stack.port, stack.tls_port, dict(USERS))

    def imaplib(self, user: str | None = ALICE) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=TIMEOUT)
        if user is not None:
            client.login(user, self.users[user])
        return client

    def client(self, user: str | None = ALICE, *, use_uid: bool = True) -> IMAPClient:
        client = IMAPClient("127.0.0.1", self.port, ssl=False, use_uid=use_uid, timeout=TIMEOUT)
        if user is not None:
            client.login(user, self.users[user])
        return client

    def raw(self, user: str | None = None) -> Raw:
        raw = Raw.connect(self.port)
        if user is not None:
            raw.ok(f"LOGIN {quote(user)} {quote(self.users[user])}")
        return raw


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Reply:
    """Everything the server said for one command."""

    untagged: list[bytes]
    status: str  # OK | NO | BAD
    text: bytes  # after the status, with the response code if any

    @property
    def code(self) -> bytes:
        """The response code of the tagged reply without brackets, e.g. b"APPENDUID 4 1"."""
        match = re.match(rb"\[([^\]]*)\]", self.text)
        return match.group(1) if match else b""

    def lines(self, keyword: bytes) -> list[bytes]:
        """Untagged lines whose first word after `* ` (or after a number) is `keyword`."""
        found = []
        for line in self.untagged:
            words = line.split(b" ", 3)[1:]
            if words and words[0].isdigit():
                words = words[1:]  # "* 3 EXISTS", "* 2 FETCH (...)"
            if words and words[0].upper() == keyword:
                found.append(line)
        return found

    def parsed(self, keyword: bytes) -> list[tuple[Any, ...]]:
        """Untagged lines of one kind, parsed by imapclient's response parser (without `*`)."""
        return [tuple(parse_response([line[2:]])) for line in self.lines(keyword)]


class Raw:
    """A byte-level IMAP client on a blocking socket; reads are bounded by TIMEOUT."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.deflate: Any = None  # zlib objects once COMPRESS DEFLATE is on (RFC 4978)
        self.inflate: Any = None
        self.tags = (f"r{n}" for n in range(1, 1_000_000))
        self.greeting = self.response()

    @classmethod
    def connect(cls, port: int, tls: bool = False) -> Raw:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if tls:
            sock = unverified().wrap_socket(sock, server_hostname="mx.test.invalid")
        return cls(sock)

    def starttls(self) -> None:
        self.ok("STARTTLS")
        assert not self.buffer, "server sent data after the STARTTLS reply"
        self.sock = unverified().wrap_socket(self.sock, server_hostname="mx.test.invalid")

    def compress(self) -> Reply:
        """COMPRESS DEFLATE; from its OK on, everything both ways is deflated."""
        reply = self.ok("COMPRESS DEFLATE")
        assert not self.buffer, "server sent data after the COMPRESS reply"
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)
        return reply

    def send(self, data: bytes) -> None:
        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            # The server closed after its BYE while we were still sending: our unread data
            # turned its close into a reset. For the reader that is the end of the stream.
            return False
        self.buffer += chunk if self.inflate is None else self.inflate.decompress(chunk)
        return bool(chunk)

    def line(self) -> bytes:
        """One physical line including CRLF; b"" when the server closed the connection."""
        while b"\r\n" not in self.buffer:
            if not self._fill():
                rest, self.buffer = self.buffer, b""
                return rest
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self._fill():
                raise AssertionError("connection closed inside a literal")
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def response(self) -> bytes:
        """One logical response line: literals inside it are read and kept inline, without
        the trailing CRLF. b"" when the connection is closed."""
        out = b""
        while True:
            line = self.line()
            if not line:
                return out
            out += line
            literal = LITERAL_AT_END.search(line)
            if not literal:
                return out[:-2]
            out += self.exactly(int(literal.group(1)))

    def closed(self) -> bool:
        """Read until the server hangs up (after whatever it still had to say); True then.
        A server that keeps the connection open makes the read time out: an error."""
        try:
            while self.response():
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        return True

    def command(self, text: str | bytes, tag: str | None = None) -> Reply:
        tag = tag or next(self.tags)
        data = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + data + b"\r\n")
        return self.reply(tag)

    def reply(self, tag: str) -> Reply:
        untagged: list[bytes] = []
        while True:
            line = self.response()
            if not line:
                raise AssertionError(f"connection closed before the reply to {tag}: {untagged}")
            match = TAGGED.match(line)
            if match and match.group("tag") == tag.encode():
                return Reply(untagged, match.group("status").decode(), match.group("text"))
            untagged.append(line)

    def ok(self, text: str | bytes) -> Reply:
        reply = self.command(text)
        assert reply.status == "OK", (text, reply)
        return reply

    def literal_command(self, head: bytes, literal: bytes, tail: bytes = b"",
                        plus: bool = False) -> Reply:
        """`TAG head {n}` + literal + tail; waits for `+` unless LITERAL+ is used."""
        tag = next(self.tags)
        marker = b"{%d+}" % len(literal) if plus else b"{%d}" % len(literal)
        self.send(tag.encode() + b" " + head + b" " + marker + b"\r\n")
        if not plus:
            continuation = self.response()
            if not continuation.startswith(b"+"):
                match = TAGGED.match(continuation)
                assert match, continuation
                return Reply([], match.group("status").decode(), match.group("text"))
        self.send(literal + tail + b"\r\n")
        return self.reply(tag)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def message(subject: str = "hello", body: str = "Hello.\r\n", *, sender: str = "carol@example.org",
            to: str = ALICE, date: str = "Mon, 02 Mar 2026 10:00:00 +0000",
            message_id: str | None = None, extra: str = "") -> bytes:
    """A small RFC 5322 message; every one gets a unique Message-ID unless given."""
    message_id = message_id or f"<{uuid.uuid4().hex}@test.example.org>"
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
            f"Message-ID: {message_id}\r\n{extra}")
    return (head + "\r\n" + body).encode()


def message_id_of(data: bytes) -> str:
    match = re.search(rb"^Message-ID: (\S+)\r?$", data, re.MULTILINE | re.IGNORECASE)
    assert match, data[:200]
    return match.group(1).decode()


async def stored(maildb: MailDB, user: str, mailbox: str
                 ) -> dict[str, tuple[MessageInfo, bytes]]:
    """Message-ID -> what the store's index says of each message, and its bytes."""
    out = {}
    for info in await maildb.list_messages(user, mailbox):
        with maildb.open_message(user, info.guid) as f:
            data = f.read()
        out[message_id_of(data)] = (info, data)
    return out


def expand(sequence_set: bytes) -> list[int]:
    """b"3:5,9" -> [3, 4, 5, 9] (no `*`: servers answer with numbers)."""
    out: list[int] = []
    for part in sequence_set.decode().split(","):
        low, _, high = part.partition(":")
        a, b = int(low), int(high or low)
        out.extend(range(min(a, b), max(a, b) + 1))
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
             ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def collect_idle(client: IMAPClient, wanted: Callable[[list[Any]], bool],
                 timeout: float = 10.0) -> list[Any]:
    """idle_check until the untagged responses seen so far satisfy `wanted` (bounded)."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while not wanted(seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"IDLE did not report the change within {timeout}s: {seen}")
        seen += client.idle_check(timeout=min(left, 1.0))
    return seen


def numbers(responses: Iterable[Any], keyword: bytes) -> list[int]:
    """Message numbers of `(n, keyword)` untagged responses, as imapclient parses them."""
    return [r[0] for r in responses
            if isinstance(r, tuple) and len(r) >= 2 and r[1] == keyword]


async def in_thread(func: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(func)
