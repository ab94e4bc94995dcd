"""Helpers for tests that run real tiermail processes against the real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiormq
import pamqp.commands
import pamqp.frame
import pamqp.header
import pytest
from argon2 import PasswordHasher

from common.directory import PRESENT
from common.settings import Settings
from services.devscanners.ports import free_port
from services.store.backends.accounts import AccountDB

REPO = Path(__file__).resolve().parent.parent




def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition") -> None:
    """Poll an event (never a fixed sleep) until it holds; fail with a clear message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def eventually(predicate: Callable[[], object], within: float = 60.0,
                     what: str = "condition") -> None:
    """Async twin of wait_until; the predicate may also return an awaitable."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


# What a failed test shows besides its traceback (tests/conftest.py adds each to the report):
# the last lines of the logs of the processes it started, the tiers' and a Postfix's, since a
# failure seen only in CI can be understood from nothing else.
FAILURE_LOGS = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()
FAILURE_LOG_LINES = 40


def show_on_failure(node: pytest.Item, name: str, read: Callable[[], str]) -> None:
    """Have a failed test's report end with the last lines `read` returns (DEBUG left out)."""
    node.stash.setdefault(FAILURE_LOGS, []).append((name, read))


def log_tail(text: str, lines: int = FAILURE_LOG_LINES) -> str:
    kept = [line for line in text.splitlines() if " DEBUG " not in line]
    return "\n".join(kept[-lines:])


def tier_env(settings: Settings) -> dict[str, str]:
    """This process's environment with its TIERMAIL_* replaced by `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERMAIL_")}
    env.update(settings.as_env())
    return env


def run_cli(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run `tiermail ARGS` as an operator does, with `settings` as its environment."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], input=stdin,
                          env=tier_env(settings), cwd=REPO, capture_output=True, text=True,
                          timeout=60)


async def session_ends_after_a_stalled_handshake(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, server_module: Any,
        port: int, command: bytes, ended: str) -> None:
    """A client that sends its ClientHello a byte at a time must be cut by the handshake
    timeout (`server_module.TLS_HANDSHAKE_TIMEOUT`, 1 s here) and its session must end (its
    log says `ended`): the SMTP filter kept such sessions, and their slots, for good, as
    asyncio's TLS layer tells a session nothing when its handshake is cut."""
    caplog.set_level(logging.INFO, logger=server_module.__name__)
    monkeypatch.setattr(server_module, "TLS_HANDSHAKE_TIMEOUT", 1.0)
    await asyncio.to_thread(stalled_tls_handshake, port, command)
    await eventually(lambda: ended in caplog.text, within=15, what="the session to end")


def stalled_tls_handshake(port: int, command: bytes) -> bytes:
    """Connect, read the greeting, send `command` (STARTTLS, STLS) and read its reply, then
    send one octet of a ClientHello and no more; returns what the server sent until it
    closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.recv(4096)
        sock.sendall(command)
        sock.recv(4096)
        sock.sendall(b"\x16")  # the first octet of a TLS record
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
        return received


def half_a_command_then_eof(port: int, greeting: bytes, sent: bytes) -> bytes:
    """Connect, read the greeting line (it must start with `greeting`), send `sent` (part of
    a command) and end the stream; returns what the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        file = sock.makefile("rb")
        assert file.readline().startswith(greeting)
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        return file.read()


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def pipeline_then_read(port: int, commands: bytes, behind: bytes,
                       session_ended: Callable[[], bool]) -> tuple[bytes, str]:
    """A client that pipelines and reads late: after the greeting it sends `commands` and
    then `behind` (more commands, behind the one the server closes at), waits until the
    server's session has ended, and only then reads all the server said. Returns what was
    read after the greeting and how the sending ended.

    Its receive window is small (4 KiB asked) and the replies to `commands` fill it, so the
    server's last line is still in the server's send queue when it closes, with `behind`
    unread in its receive queue: a plain close then resets the connection, which drops that
    last line (Linux keeps only what had already reached the client)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        greeting = b""
        while not greeting.endswith(b"\r\n"):  # the session is running from here on
            greeting += sock.recv(1)
        try:
            sock.sendall(commands + behind)
            sending = "all sent"
        except OSError as exc:
            sending = type(exc).__name__
        wait_until(session_ended, what="the server's session to end")
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                received += data
    return received, sending


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                            check=True, timeout=120)
    return result.stdout


async def _queue_counts(settings: Settings, queue: str) -> tuple[int, int]:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0), int(ok.consumer_count or 0)
    finally:
        await connection.close()


def delivery_queues(settings: Settings) -> tuple[str, str]:
    """Where mail waits for the store: a message over 1 MiB in the large queue."""
    return settings.topology.deliver_queue, settings.topology.large_queue


def queue_depth(settings: Settings, queue: str | None = None) -> int:
    """Exact count of a queue's ready messages (passive declare; rabbitmqctl's figures lag);
    without `queue`, of both delivery queues (a message over 1 MiB travels in the large one).
    Messages a consumer holds unacked are not counted: 0 does not mean the store has written
    everything (it may be writing up to its prefetch); wait for the mailbox itself."""
    if queue is not None:
        return asyncio.run(_queue_counts(settings, queue))[0]
    return sum(asyncio.run(_queue_counts(settings, q))[0]
               for q in delivery_queues(settings))


def queue_consumers(settings: Settings, queue: str) -> int:
    """How many consumers the broker has on `queue` (passive declare)."""
    return asyncio.run(_queue_counts(settings, queue))[1]


async def _delete_queues(settings: Settings) -> None:
    topology = settings.topology
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for queue in (*delivery_queues(settings), topology.scan_queue,
                      topology.quarantine_queue, topology.dead_queue):
            await channel.queue_delete(queue)
    finally:
        await connection.close()


def delete_queues(settings: Settings) -> None:
    """Remove one test's quorum queues: each is a Raft server in the broker, and hundreds of
    idle ones left until the end of the run only slow it down."""
    with contextlib.suppress(Exception):
        asyncio.run(asyncio.wait_for(_delete_queues(settings), 30))


def dead_letter_depth(settings: Settings) -> int:
    return queue_depth(settings, settings.topology.dead_queue)


class TierProcess:
    """One `tiermail <args>` process with its output kept in a log file for failures."""

    def __init__(self, settings: Settings, args: list[str], log_path: Path,
                 extra_env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None) -> None:
        """`wrapper`: a command that runs tiermail as its child (strace ... --): signals go
        to the child, and the process has ended when the wrapper has."""
        self.args = args
        self.log_path = log_path
        env = {**tier_env(settings), **(extra_env or {})}
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*(wrapper or []), sys.executable, "-m", "services.cli",
                                      *args], env=env, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self._wrapped = wrapper is not None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if not self._wrapped:
            self.proc.send_signal(sig)
            return
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            for child in children.read_text().split():
                os.kill(int(child), sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            self._signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"tiermail {' '.join(self.args)} exited:\n{self.output()}")
            if port_open("127.0.0.1", port):
                return
            time.sleep(0.05)
        raise AssertionError(f"port {port} never opened:\n{self.output()}")


def published_set(client: Any, prefix: str, name: str) -> set[bytes]:
    """A set of the Redis directory (`users`, `domains`) without the PRESENT member every
    publish puts in (common/directory.py)."""
    return set(client.smembers(f"{prefix}dir:{name}")) - {PRESENT.encode()}


def published_aliases(client: Any, prefix: str) -> dict[bytes, bytes]:
    """The Redis directory's aliases without the PRESENT field."""
    aliases = dict(client.hgetall(f"{prefix}dir:aliases"))
    aliases.pop(PRESENT.encode(), None)
    return aliases


def broker_at(settings: Settings, port: int, **changes: Any) -> Settings:
    """These settings with RabbitMQ reached on `port` of loopback (a proxy the test can cut,
    or a closed port), same vhost and credentials."""
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    return settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/{vhost}", **changes)


def redis_at(settings: Settings, port: int) -> Settings:
    """These settings with Redis reached on `port` of loopback (a proxy the test can cut or
    hang), same database."""
    database = urlsplit(settings.redis_url).path
    return settings.replace(redis_url=f"redis://127.0.0.1:{port}{database}")


# The octets passed on, and None, or the seconds after which the connection is cut.
Relayed = tuple[bytes, float | None]


def _close_listener(listener: socket.socket) -> None:
    # close() alone does not wake a thread blocked in accept() on Linux.
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


class TcpProxy:
    """A loopback TCP relay that a test can cut and restore, to take a dependency away
    at the worst moment without touching the shared service itself."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._threading = threading
        self._flowing = threading.Event()  # client -> target
        self._flowing.set()
        self._answering = threading.Event()  # target -> client
        self._answering.set()
        self.start()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close the listener and every relayed connection (the peer sees a reset/EOF)."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            _close_listener(listener)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def hang(self) -> None:
        """Keep every connection open but pass nothing on, in either direction, and accept
        new ones that get nothing either: a dependency that stopped answering (a frozen
        process, a network that drops packets), the case a timeout has to catch."""
        self._flowing.clear()
        self._answering.clear()

    def hold_replies(self) -> None:
        """Pass on what the client sends but hold what comes back: a request that arrives
        and is acted on while its answer is lost (a publish persisted, its confirm not)."""
        self._answering.clear()

    def resume(self) -> None:
        """Pass on again, the held data first."""
        self._flowing.set()
        self._answering.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                cut = self._listener is not listener
                if not cut:
                    self._conns += [client, upstream]
            if cut:  # the cut came while this one was being connected: it goes too
                for conn in (client, upstream):
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                return
            for a, b, gate, to_target in ((client, upstream, self._flowing, True),
                                          (upstream, client, self._answering, False)):
                self._threading.Thread(target=self._pipe, args=(a, b, gate,
                                                                 self._relay(client, to_target)),
                                       daemon=True).start()

    def _relay(self, client: socket.socket, to_target: bool) -> Callable[[bytes], Relayed]:
        """What of each chunk read in one direction of one connection passes on, and whether
        the connection is cut after it; a subclass may watch or hold back the traffic."""
        return lambda data: (data, None)

    def _pipe(self, source: socket.socket, sink: socket.socket, gate: Any,
              relay: Callable[[bytes], Relayed]) -> None:
        try:
            while data := source.recv(65536):
                gate.wait()
                passing, cut_after = relay(data)
                sink.sendall(passing)
                if cut_after is not None:
                    time.sleep(cut_after)
                    break
        except OSError:
            pass
        finally:
            # Nor the end of the stream: a hung peer sends no FIN. (RabbitMQ closes a
            # connection that stays silent past its handshake or heartbeat timeout, and
            # passing that on told the client what a frozen broker never would.)
            gate.wait()
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


class AmqpFrames:
    """Splits one direction of an AMQP 0-9-1 connection into frames (pamqp decodes each):
    feed the octets as they come, get back the complete frames with their raw octets."""

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False

    def feed(self, data: bytes) -> list[tuple[bytes, int, object]]:
        """(raw octets, channel, frame) of every frame completed by `data`."""
        self._buffer += data
        frames: list[tuple[bytes, int, object]] = []
        if not self._started and len(self._buffer) >= 8:
            self._started = True
            if self._buffer.startswith(b"AMQP"):  # the client's protocol header
                frames.append((self._buffer[:8], 0, None))
                self._buffer = self._buffer[8:]
        while self._started and len(self._buffer) >= 7:
            end = int.from_bytes(self._buffer[3:7], "big") + 8  # type, channel, size, frame-end
            if len(self._buffer) < end:
                break
            raw, self._buffer = self._buffer[:end], self._buffer[end:]
            _, channel, frame = pamqp.frame.unmarshal(raw)
            frames.append((raw, channel, frame))
        return frames


class FreezingProxy(TcpProxy):
    """`freeze` makes the connections relayed so far a black hole, both ways, while new
    ones pass: a path (a NAT entry, a firewall's state) that died under one connection."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._frozen: set[int] = set()
        self._relayed: set[int] = set()

    def freeze(self) -> None:
        with self._lock:
            self._frozen |= self._relayed

    def _relay(self, client: socket.socket, to_target: bool) -> Callable[[bytes], Relayed]:
        key = id(client)
        with self._lock:
            self._relayed.add(key)
        return lambda data: (b"" if key in self._frozen else data, None)


class QuietProxy(TcpProxy):
    """In front of RabbitMQ: until `speak`, each new connection gets the broker's replies up
    to the first frame of type `after` and nothing after it (held back): a node that hangs,
    or a path to it that starts dropping, at that step of a connection's set-up."""

    def __init__(self, target_port: int, after: type) -> None:
        super().__init__(target_port)
        self.fell_quiet = 0  # connections that did
        self._after = after
        self._speaking = self._threading.Event()

    def speak(self) -> None:
        """Pass on what was held back, and everything from now on."""
        self._speaking.set()

    def cut(self) -> None:
        self.speak()  # no relay thread left waiting for good
        super().cut()

    def _relay(self, client: socket.socket, to_target: bool) -> Callable[[bytes], Relayed]:
        if to_target or self._speaking.is_set():
            return super()._relay(client, to_target)
        frames = AmqpFrames()
        fell = False

        def watch(data: bytes) -> Relayed:
            nonlocal fell
            if fell:
                self._speaking.wait()
            elif any(isinstance(frame, self._after) for _, _, frame in frames.feed(data)):
                fell = True  # this connection's next replies wait
                self.fell_quiet += 1
            return data, None
        return watch


# RabbitMQ 3.x can ignore an ack that reaches a quorum queue just before its channel closes
# (rabbitmq-server issue 10327): an ack passed on is given this long before the cut.
ACK_GRACE = 1.0


class AckTrap(TcpProxy):
    """A TcpProxy in front of RabbitMQ for one consumer process that kills it at a consumer's
    worst moments: once its basic.ack for a chosen message is on the wire (so all the work it
    does for the message before acking is done), SIGKILL the process, then cut the connection
    with the ack held back (the broker redelivers a message that was already handled) or
    passed on (what the process meant to do only after the ack is never done). Messages are
    told apart by their AMQP message-id (tiermail's queue id), read from the basic.deliver
    (or basic.get-ok: the held-mail commands) and content header frames the broker sends."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._armed: tuple[int | None, Callable[[str], bool], bool, bool] | None = None
        self._delivered: dict[tuple[int, int, int], str] = {}  # (conn, channel, tag) -> id
        self.sprung = self._threading.Event()
        self.caught = ""  # the queue id whose ack was held back

    def arm(self, pid: int | None, chosen: Callable[[str], bool], hold: bool = True,
            shut: bool = False) -> None:
        """SIGKILL `pid` (None: no process) when it acks a message whose queue id is
        `chosen`; `hold`: the broker never gets that ack; `shut`: and from then on the
        broker is out of reach (the proxy takes no new connection)."""
        self.sprung.clear()
        with self._lock:
            self._armed = (pid, chosen, hold, shut)

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def _relay(self, client: socket.socket, to_target: bool) -> Callable[[bytes], Relayed]:
        frames = AmqpFrames()
        connection = id(client)
        if not to_target:
            pending: dict[int, int] = {}  # channel -> delivery tag awaiting its header

            def watch(data: bytes) -> Relayed:
                for _, channel, frame in frames.feed(data):
                    if isinstance(frame, pamqp.commands.Basic.Deliver | pamqp.commands.Basic.GetOk):
                        pending[channel] = frame.delivery_tag or 0
                    elif isinstance(frame, pamqp.header.ContentHeader) and channel in pending:
                        key = (connection, channel, pending.pop(channel))
                        with self._lock:
                            self._delivered[key] = frame.properties.message_id or ""
                return data, None
            return watch

        def hold(data: bytes) -> Relayed:
            passing = b""
            for raw, channel, frame in frames.feed(data):
                sprung = isinstance(frame, pamqp.commands.Basic.Ack) and self._spring(
                    (connection, channel, frame.delivery_tag or 0))
                if sprung == "hold":
                    return passing, 0.0
                passing += raw
                if sprung:
                    return passing, ACK_GRACE
            return passing, None
        return hold

    def _spring(self, key: tuple[int, int, int]) -> str:
        """"hold" or "pass" when the process was killed at this ack, "" when not."""
        with self._lock:
            armed, queue_id = self._armed, self._delivered.get(key, "")
            if armed is None or not armed[1](queue_id):
                return ""
            self._armed = None
            pid, _, hold, shut = armed
            listener = self._listener
            if shut:
                self._listener = None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        if shut and listener is not None:
            _close_listener(listener)
        self.caught = queue_id
        self.sprung.set()
        return "hold" if hold else "pass"


# Test content for the scanners (tests/integration/scanners/, the filter's scanning tests).

# SpamAssassin's and rspamd's built-in spam test string: rspamd answers "reject" (score 15),
# SpamAssassin scores it 1000.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def tls_1_1_only() -> ssl.SSLContext:
    """A client as an old device is: TLS 1.1 at most (our minimum is 1.2)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # deprecated, and meant: the client is an old one
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 will not send TLS 1.1
    return context


def eicar_bytes() -> bytes:
    """The 68-byte EICAR anti-virus test file, assembled here at run time: no file in the
    repository holds it whole, so antivirus software on a developer's machine does not
    quarantine the checkout. deploy/scanners/clamav/signatures/ detects it."""
    head = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}"
    middle = b"-".join([b"$EICAR", b"STANDARD", b"ANTIVIRUS", b"TEST", b"FILE!"])
    return head + middle + b"$H+H*"


# The protocol suites' accounts: address -> password.
TEST_USERS = {"alice@example.test": "alice secret", "bob@example.test": "bob-pw"}


def cheap_password_hashes(users: dict[str, str] = TEST_USERS) -> dict[str, str]:
    """argon2id hashes with the smallest parameters. The parameters travel inside each hash,
    so the server's unchanged verification takes about a millisecond instead of a quarter
    second: the IMAP suites log in a few hundred times."""
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return {address: hasher.hash(password) for address, password in users.items()}


def account_db(path: Path, password_hashes: dict[str, str]) -> AccountDB:
    """An account database at `path` with example.test and these users."""
    db = AccountDB(path)
    db.add_domain("example.test")
    for address, password_hash in password_hashes.items():
        db.add_user(address, password_hash)
    return db


# Mailbox storage (services/store/backends/maildb.py)

# TIERMAIL_STORE_INLINE_MAX values the store tests run with: 0, every body a file; the
# default, under which the small test messages are stored inside the index.
INLINE_MODES = {"files": 0, "inline": Settings.store_inline_max}


@dataclass(frozen=True)
class StoredBodies:
    """The stored bytes of a user's messages by GUID: those inside the index, and files."""

    inline: dict[str, bytes]
    files: dict[str, bytes]

    def __getitem__(self, guid: str) -> bytes:
        return self.inline[guid] if guid in self.inline else self.files[guid]

    @property
    def guids(self) -> set[str]:
        return self.inline.keys() | self.files.keys()


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the path of each file or directory os.fsync is called on in this
    process, in order (the store's own syncs: the journal, message files, directories, an
    index's WAL; SQLite's own are not among them)."""
    paths: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return paths


def check_bodies(user_dir: Path) -> StoredBodies:
    """Every message's stored bytes, from the index and files under `user_dir` (any process
    may call this), after checking the layout's promises: the index passes integrity_check;
    each mailbox's kept message count is its number of rows;
    each message row has exactly one body, a `body` row or a file m/xx/<guid>; no body row or
    file outlives its message row; tmp/ is empty."""
    conn = sqlite3.connect(user_dir / "index.sqlite")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        miscounted = conn.execute(
            "SELECT name, messages, (SELECT count(*) FROM message WHERE mailbox_id = mailbox.id)"
            " AS counted FROM mailbox WHERE messages != counted").fetchall()
        assert not miscounted, f"mailbox.messages differs from the rows: {miscounted}"
        guids = {guid for (guid,) in conn.execute("SELECT guid FROM message")}
        inline: dict[str, bytes] = dict(conn.execute("SELECT guid, data FROM body"))
    finally:
        conn.close()
    files = {path.name: path for path in (user_dir / "m").rglob("*") if path.is_file()}
    assert not inline.keys() - guids, f"body rows without a message: {inline.keys() - guids}"
    orphans = sorted(files.keys() - guids)
    assert not orphans, f"orphan files: {orphans[:5]}"
    assert not inline.keys() & files.keys(), "a message both inline and in a file"
    missing = sorted(guids - inline.keys() - files.keys())
    assert not missing, f"messages without a body: {missing[:5]}"
    tmp = user_dir / "tmp"
    assert not tmp.is_dir() or not any(tmp.iterdir()), "tmp files left"
    return StoredBodies(inline, {guid: path.read_bytes() for guid, path in files.items()})


@contextlib.contextmanager
def low_open_file_limit(hard_needed: int, soft: int = 128) -> Iterator[None]:
    """This process's soft open-file limit at `soft` for a start inside (a tier started
    then inherits it), the hard one left as it is and asserted to be at least
    `hard_needed`; the old soft limit restored after."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= hard_needed, \
        f"the test needs a hard open-file limit of {hard_needed} or more, not {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


@contextlib.contextmanager
def tmpfs(mount: Path, size: str = "16m") -> Iterator[Path]:
    """A small file system of its own at `mount` (a tmpfs), to be filled to the last block:
    disk-full tests on a real file system. The suite runs as root (make install needs it)."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # Not an install step: mounting needs root. CI (and `make test` on a new machine,
        # which installs packages) run as root; a developer's own account may not.
        message = f"a full-disk test mounts a tmpfs, which needs root: {done.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a ballast file on `disk` until its file system has no block left; delete the
    returned file to give the space back."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as file:
        for chunk in (b"\0" * (256 * 1024), b"\0" * 512):
            with contextlib.suppress(OSError):
                while True:
                    file.write(chunk)
    return ballast


class QuotaDisk:
    """A btrfs subvolume (`path`) whose qgroup limits how many octets may be written under it:
    a real disk quota (writes fail with EDQUOT, for root too) that statvfs does not show.
    The machine's kernel has neither tmpfs quotas (CONFIG_TMPFS_QUOTA) nor the quota format
    ext4's quota feature needs (CONFIG_QFMT_V2); its btrfs has qgroups."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def used(self) -> int:
        """The octets the subvolume's qgroup counts, once what was written is committed."""
        _btrfs("filesystem", "sync", str(self.path))
        table = _btrfs("qgroup", "show", "--raw", "-f", str(self.path))
        [row] = [line.split() for line in table.splitlines() if line.startswith("0/")]
        return int(row[1])

    def limit(self, octets: int | None) -> None:
        """Allow `octets` in all (None: no limit)."""
        _btrfs("qgroup", "limit", "none" if octets is None else str(octets), str(self.path))


def _btrfs(*args: str) -> str:
    return subprocess.run(["btrfs", *args], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def quota_disk(mount: Path) -> Iterator[QuotaDisk]:
    """A QuotaDisk with no limit yet: a btrfs (mkfs.btrfs from the Debian package btrfs-progs,
    which `make install` installs) on a loop device backed by a sparse file in a tmpfs, so
    nothing reaches the machine's disk."""
    mkfs = require_client("/usr/sbin/mkfs.btrfs", "btrfs-progs")
    with tmpfs(mount.with_name(mount.name + "-backing"), "160m") as backing:
        image = backing / "btrfs.img"
        with open(image, "wb") as file:  # sparse: the tmpfs holds only what btrfs writes
            file.truncate(128 * 1024 * 1024)
        mount.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([mkfs, "-q", "--mixed", str(image)], capture_output=True,
                           check=True)
            subprocess.run(["mount", "-o", "loop", str(image), str(mount)],
                           capture_output=True, check=True)
        except subprocess.CalledProcessError as exc:
            message = f"cannot make a btrfs on a loop device here: {exc.stderr.decode()}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        try:
            _btrfs("quota", "enable", str(mount))
            _btrfs("subvolume", "create", str(mount / "quota"))
            yield QuotaDisk(mount / "quota")
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def strace_attached(pid: int, output: Path, options: list[str]) -> Iterator[None]:
    """`strace -f -p pid OPTIONS -o output` (Debian package strace, which `make install`
    installs) while the block runs, from the moment every thread of `pid` is traced; strace
    detaches at the end. Attaching needs ptrace rights (root or CAP_SYS_PTRACE; some
    containers forbid it): without them a skip with strace's reason, a failure under
    CI=true."""
    path = require_client("/usr/bin/strace", "strace")
    tracer = subprocess.Popen([path, "-p", str(pid), *options, "-o", str(output)],
                              stderr=subprocess.PIPE, text=True)

    def attached() -> bool:
        if tracer.poll() is not None:
            message = f"strace cannot attach to a process here: {tracer.stderr.read()}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        statuses = []
        for task in Path(f"/proc/{pid}/task").glob("*/status"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                statuses.append(task.read_text())
        return all(f"TracerPid:\t{tracer.pid}\n" in status for status in statuses)

    try:
        wait_until(attached, what=f"strace attached to every thread of {pid}")
        yield
    finally:
        tracer.send_signal(signal.SIGINT)  # detach, leaving the process running
        tracer.wait(timeout=60)
        tracer.stderr.close()  # type: ignore[union-attr]


def require_client(path: str, package: str) -> str:
    """A real mail client from a Debian package that `make install` installs: its path, or a
    skip naming the install step (a failure under CI=true, where a missing install step must
    fail the run)."""
    if Path(path).exists():
        return path
    message = f"{Path(path).name} is not installed (Debian package {package}); " \
              f"`make install` installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # a private CA's certificate
    cert: Path  # a server certificate it signed, for 127.0.0.1 and localhost
    key: Path


def private_ca(folder: Path) -> TlsFiles:
    """A CA of the test's own and a server certificate it signed: what an operator with a
    private CA has, and what no system trust store knows."""
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca_key, request = folder / "ca.key", folder / "server.csr"
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n"
                          "basicConstraints = CA:FALSE\n")
    for command in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=tiermail test CA", "-keyout", ca_key, "-out", files.ca],
            ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", files.key, "-out", request],
            ["x509", "-req", "-in", request, "-CA", files.ca, "-CAkey", ca_key,
             "-CAcreateserial", "-days", "2", "-extfile", extensions, "-out", files.cert]):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return files


class PrivateBroker:
    """A RabbitMQ node of the test's own (its own node name, ports and data directory), for
    tests that kill the broker itself: the machine's broker, which every other test uses, is
    never touched. Debian's rabbitmq-server runs the node as the rabbitmq user, who cannot
    enter pytest's root-only temporary directories: the node's directory is a temporary
    directory of its own, handed to that user and removed by `stop`."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self.root = root = Path(tempfile.mkdtemp(prefix="tiermail-rabbitmq-"))
        shutil.chown(root, "rabbitmq", "rabbitmq")
        self.port, dist_port = free_port(), free_port()
        self.tls_port = free_port() if tls else None
        if tls:
            self._listen_with_tls(tls)
        self.node = f"tiermail-test-{self.port}@localhost"
        self._env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/"

    def _listen_with_tls(self, tls: TlsFiles) -> None:
        """An AMQPS listener beside the plain one, with the server certificate in `tls`
        (clients are not asked for one of theirs)."""
        files = {}
        for name, source in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
            files[name] = self.root / f"{name}.pem"
            shutil.copyfile(source, files[name])
            shutil.chown(files[name], "rabbitmq", "rabbitmq")
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {files['ca']}\n"
            f"ssl_options.certfile = {files['cert']}\n"
            f"ssl_options.keyfile = {files['key']}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n")

    def start(self, timeout: float = 90.0) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env, check=True,
                       capture_output=True, timeout=timeout)
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout=timeout,
                   interval=0.2, what=f"RabbitMQ node {self.node} (logs in {self.root / 'log'})")
        subprocess.run(["rabbitmqctl", "-q", "-n", self.node, "await_startup"], env=self._env,
                       check=True, capture_output=True, timeout=timeout)

    def set_disk_alarm(self, on: bool) -> None:
        """Raise or clear RabbitMQ's disk alarm (a free-disk limit above or below what the
        disk has), in which the node blocks every publishing connection."""
        self._ctl("set_disk_free_limit", "100000GB" if on else "1MB")
        wait_until(lambda: ("disk" in self._ctl("eval", "rabbit_alarm:get_alarms().")) == on,
                   what=f"the disk alarm {'raised' if on else 'cleared'}")

    def blocked_connections(self) -> int:
        """How many client connections the node holds blocked (a publish met an alarm)."""
        return self._ctl("list_connections", "state").split().count("blocked")

    def close_connections(self) -> None:
        """Close every client connection from the broker's side, as a restart would."""
        self._ctl("close_all_connections", "closed by the test")

    def _ctl(self, *args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], env=self._env,
                              check=True, capture_output=True, text=True, timeout=60).stdout

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, nothing flushed or closed."""
        pid = int((self.root / "pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not port_open("127.0.0.1", self.port), what="the killed broker")
        with contextlib.suppress(FileNotFoundError):
            (self.root / "pid").unlink()

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A redis-server of the test's own on a free port (no persistence, its own directory),
    for tests that need a Redis configured otherwise than the machine's (a password), which
    every other test uses and no test reconfigures."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.port = free_port()
        self._log = directory / f"redis-{self.port}.log"
        self._options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(directory), *options]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(["redis-server", *self._options], stdout=log,
                                          stderr=subprocess.STDOUT)
        wait_until(lambda: port_open("127.0.0.1", self.port),
                   what=f"redis-server on port {self.port} (log: {self._log})")

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            self._proc.wait(timeout=30)
