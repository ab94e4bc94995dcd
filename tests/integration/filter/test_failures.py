"""Failures of Redis, RabbitMQ and our own code become 4xx, never 250 and never 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from common.directory import Lookup
from common.envelope import Envelope
from common.settings import Settings, data_wire_octets
from services.filter import main as filter_main
from services.filter.main import FilterWorker
from services.filter.protocol import replies
from services.filter.rules import BareNewlineRule, Verdict
from services.filter.server import FilterSMTP
from tests.integration.filter.conftest import (
    ALICE,
    SENDER,
    RawClient,
    connect,
    drain_queue,
    in_thread,
    message,
    queue_depth,
    running_filter,
)
from tests.support import TcpProxy as SupportProxy
from tests.support import broker_at, eventually, free_port


def reply_of(code: int, text: bytes) -> str:
    return f"{code} {text.decode()}"


def one_transaction(port: int, subject: str) -> tuple[str, str]:
    """(RCPT reply, end-of-DATA reply) of one transaction to ALICE."""
    with connect(port) as client:
        client.mail(SENDER)
        rcpt = reply_of(*client.rcpt(ALICE))
        if not rcpt.startswith("250"):
            return rcpt, ""
        return rcpt, reply_of(*client.data(message(subject)))


async def test_redis_unreachable_451_at_rcpt(settings: Settings) -> None:
    broken = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with running_filter(broken) as worker:
        rcpt, _ = await in_thread(one_transaction, worker.ports[0], "no-redis")
    assert rcpt == replies.DIRECTORY_UNAVAILABLE
    assert await queue_depth(settings) == 0


def first_refusal(port: int, subject: str) -> tuple[str, str]:
    """(command, reply) of the first command of one transaction to ALICE that did not get a
    2xx/3xx, or ("", reply to the end of DATA) when none was refused."""
    with connect(port) as client:
        for command, send in (("MAIL", lambda: client.mail(SENDER)),
                              ("RCPT", lambda: client.rcpt(ALICE))):
            reply = reply_of(*send())
            if not reply.startswith("250"):
                return command, reply
        reply = reply_of(*client.data(message(subject)))
        return ("", reply) if reply.startswith("250") else ("DATA", reply)


async def test_broker_unreachable_451_at_mail_from(directory: Settings) -> None:
    """Known before the upload: the sender is not made to send a message only to hear 451."""
    broken = broker_at(directory, free_port())
    async with running_filter(broken) as worker:
        for attempt in ("no-broker", "still none"):  # the second within the retry interval
            refused = await in_thread(first_refusal, worker.ports[0], attempt)
            assert refused == ("MAIL", replies.QUEUE_NOT_TAKING)
        assert worker.stats.accepted == 0 and worker.stats.broker_unreachable == 2
    assert await queue_depth(directory) == 0


class TcpProxy:
    """A TCP forwarder to RabbitMQ that the test can take down and bring back."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


async def test_publisher_recovers_when_broker_returns(directory: Settings) -> None:
    proxy = TcpProxy(5672)
    await proxy.start()
    via_proxy = broker_at(directory, proxy.port)
    async with running_filter(via_proxy) as worker:
        port = worker.ports[0]
        refused_at, reply = await in_thread(first_refusal, port, "first")
        assert refused_at == "" and reply.startswith("250 2.0.0 Ok: queued as ")
        await proxy.stop()
        # Refused at MAIL FROM once the worker has seen the connection go, else at the end
        # of DATA (the publish fails); never 250.
        assert await in_thread(first_refusal, port, "second") in {
            ("MAIL", replies.QUEUE_NOT_TAKING), ("DATA", replies.QUEUE_UNAVAILABLE)}
        await proxy.start()

        async def taken_again() -> bool:
            return (await in_thread(first_refusal, port, "third"))[0] == ""

        await eventually(taken_again, what="mail taken again once the broker is back")
        await proxy.stop()
    subjects = [q.body.split(b"Subject: ")[1].split(b"\r\n")[0] for q in
                await drain_queue(directory)]
    assert subjects == [b"first", b"third"]


def losing_the_broker_after_rcpt(port: int, proxy: SupportProxy) -> str:
    with connect(port) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        proxy.cut()
        return reply_of(*client.data(message("lost")))


async def test_broker_lost_mid_transaction_451_at_end_of_data(directory: Settings) -> None:
    """Reachable at MAIL FROM, gone by the end of DATA: the publish fails, 451, nothing
    queued."""
    proxy = SupportProxy(5672)
    via_proxy = broker_at(directory, proxy.port)
    try:
        async with running_filter(via_proxy) as worker:
            reply = await in_thread(losing_the_broker_after_rcpt, worker.ports[0], proxy)
            assert reply == replies.QUEUE_UNAVAILABLE
            assert worker.stats.accepted == 0
    finally:
        proxy.cut()
    assert await queue_depth(directory) == 0


def mail_reply(port: int) -> str:
    with connect(port) as client:
        return reply_of(*client.mail(SENDER))


@contextlib.asynccontextmanager
async def filter_behind_a_proxy(directory: Settings, publish_timeout: float = 30.0
                                ) -> AsyncIterator[tuple[FilterWorker, SupportProxy]]:
    """A filter taking mail through a proxy to RabbitMQ that the test can hold or cut."""
    proxy = SupportProxy(5672)
    try:
        async with running_filter(broker_at(directory, proxy.port,
                                            publish_timeout=publish_timeout)
                                  ) as worker:
            await eventually(lambda: not worker.publisher.stalled, what="the worker taking mail")
            yield worker, proxy
    finally:
        proxy.cut()


async def test_a_broker_that_stops_confirming_gets_mail_refused_at_once(
        directory: Settings) -> None:
    """While a publish has waited more than STALLED_AFTER for its confirm (here: RabbitMQ
    behind a proxy that holds every byte, like a broker in a resource alarm), MAIL FROM gets
    451 at once instead of each sender uploading its message to wait for the same 451; when
    the broker answers again, mail is taken again."""
    async with filter_behind_a_proxy(directory) as (worker, proxy):
        port = worker.ports[0]
        assert (await in_thread(one_transaction, port, "before"))[1].startswith("250 ")
        proxy.hang()
        waiting = asyncio.create_task(in_thread(one_transaction, port, "held"))

        async def refused_at_mail() -> bool:
            return await in_thread(mail_reply, port) == replies.QUEUE_NOT_TAKING

        await eventually(refused_at_mail, what="MAIL FROM refused while the confirm is overdue")
        assert worker.stats.broker_stalled >= 1
        proxy.resume()
        _, held = await waiting  # its confirm arrives now
        assert held.startswith("250 ")
        assert (await in_thread(one_transaction, port, "after"))[1].startswith("250 ")
    subjects = sorted(q.body.split(b"Subject: ")[1].split(b"\r\n")[0]
                      for q in await drain_queue(directory))
    assert subjects == [b"after", b"before", b"held"]


async def test_after_a_publish_went_unconfirmed_mail_is_refused_as_a_stall(
        directory: Settings) -> None:
    """A publish left without its confirm past TIERMAIL_PUBLISH_TIMEOUT leaves the broker
    stalled until it confirms again (nothing of ours is waiting any more): MAIL FROM gets
    451 at once, and the operator's counters say the broker is not confirming, not that
    it is unreachable."""
    async with filter_behind_a_proxy(directory, publish_timeout=1.0) as (worker, proxy):
        port = worker.ports[0]
        proxy.hang()
        _, unconfirmed = await in_thread(one_transaction, port, "unconfirmed")
        assert unconfirmed == replies.QUEUE_UNAVAILABLE
        assert worker.publisher.stalled
        assert await in_thread(mail_reply, port) == replies.QUEUE_NOT_TAKING
        assert (worker.stats.broker_stalled, worker.stats.broker_unreachable) == (1, 0)


# A cron job's alert: the same bytes every time, no Message-ID, no Date.
NAMELESS = b"From: cron <cron@remote.test>\r\nSubject: nameless\r\n\r\ndisk full\r\n"


def send(port: int, content: bytes) -> str:
    with connect(port) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        return reply_of(*client.data(content))


def dated(subject: str) -> bytes:
    """A message that names itself: a Message-ID and a Date."""
    return b"Date: Fri, 04 Dec 2026 21:00:00 +0000\r\n" + message(subject)


async def test_a_retry_after_a_lost_confirm_is_published_under_the_same_queue_id(
        directory: Settings) -> None:
    """The broker persisted a message but its confirm never came back (a relay that passes
    the publish on and holds the replies): the sender got 451 and sends the same message
    again, here to another filter worker. The retry goes out under the first attempt's
    queue id, so the store, whose idempotence key is (queue id, mailbox), delivers one copy
    (tests/integration/store/test_consumer.py), and the entry is forgotten. Another message
    gets a queue id of its own, and so does each message without a Message-ID or a Date,
    identical bytes or not."""
    proxy = SupportProxy(5672)
    held = broker_at(directory, proxy.port, publish_timeout=1.0)
    try:
        async with running_filter(held) as first, \
                running_filter(directory, port=free_port()) as second:
            async def unconfirmed(content: bytes) -> None:
                await eventually(lambda: not first.publisher.stalled,
                                 what="the first worker taking mail")
                proxy.hold_replies()
                assert await in_thread(send, first.ports[0], content) == \
                    replies.QUEUE_UNAVAILABLE
                proxy.resume()

            await unconfirmed(dated("retried"))

            async def known_to_the_second_worker() -> bool:
                return len(second.server.unconfirmed) == 1

            await eventually(known_to_the_second_worker, what="the ledger entry announced")
            for content in (NAMELESS, message("undated")):
                await unconfirmed(content)
            assert len(first.server.unconfirmed) == len(second.server.unconfirmed) == 1
            for content in (dated("retried"), dated("other"), NAMELESS, message("undated")):
                assert (await in_thread(send, second.ports[0], content)).startswith("250 ")

            async def forgotten_everywhere() -> bool:
                return len(first.server.unconfirmed) == len(second.server.unconfirmed) == 0

            # Confirmed under the remembered queue id: identical bytes are new mail again.
            await eventually(forgotten_everywhere, what="the entry forgotten by both workers")
    finally:
        proxy.cut()
    queue_ids: dict[bytes, list[str]] = {}
    for queued in await drain_queue(directory):
        subject = queued.body.split(b"Subject: ")[1].split(b"\r\n")[0]
        queue_ids.setdefault(subject, []).append(queued.envelope.queue_id)
    assert len(queue_ids[b"retried"]) == 2  # the unconfirmed first attempt was persisted
    assert len(set(queue_ids[b"retried"])) == 1
    assert queue_ids[b"other"][0] not in queue_ids[b"retried"]
    for subject in (b"nameless", b"undated"):  # never matched: two queue ids
        assert len(queue_ids[subject]) == 2 and len(set(queue_ids[subject])) == 2


@pytest.mark.parametrize("leaves", ["closes", "resets"])
async def test_a_retry_from_a_client_that_left_before_its_250_is_not_a_second_copy(
        directory: Settings, leaves: str) -> None:
    """A client that gave up waiting for the reply to its DATA (the confirm was slow) and
    closed the connection sends the message again later. The 250 that went out after it
    left was never read, so that publish counts as uncertain: the retry goes out under its
    queue id and the store delivers one copy. Before, the retry got a new queue id: two.
    A client that resets the connection has the session's publish cancelled while its
    confirm is awaited: that publish is as uncertain."""
    content = dated("given up")
    async with filter_behind_a_proxy(directory) as (worker, proxy):
        proxy.hold_replies()
        client = RawClient(worker.ports[0])
        try:
            def send_without_reading_the_end() -> None:
                client.reply()
                client.command(b"EHLO client.remote.test\r\n")
                client.command(f"MAIL FROM:<{SENDER}>\r\n".encode())
                client.command(f"RCPT TO:<{ALICE}>\r\n".encode())
                client.command(b"DATA\r\n")
                client.sock.sendall(content + b".\r\n")

            await in_thread(send_without_reading_the_end)

            async def persisted() -> bool:
                return await queue_depth(directory) == 1

            await eventually(persisted, what="the publish persisted, its confirm held")
            if leaves == "resets":
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        finally:
            client.close()  # no reply read: the client gave up
        if leaves == "resets":
            await eventually(lambda: len(worker.server.unconfirmed) == 1,
                             what="the cancelled publish remembered")
        proxy.resume()
        if leaves == "closes":
            await eventually(lambda: worker.stats.accepted == 1, what="the late confirm")
        assert (await in_thread(send, worker.ports[0], content)).startswith("250 ")
    queue_ids = [queued.envelope.queue_id for queued in await drain_queue(directory)]
    assert len(queue_ids) == 2 and len(set(queue_ids)) == 1, queue_ids


async def test_a_publish_past_the_sessions_deadline_is_remembered_for_a_retry(
        directory: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session bounds the whole publish (connect plus confirm); a reconnect that took
    long can leave a confirm outstanding when it runs out. The publish went out: the 451
    must leave its queue id for the retry, or the retry is a second copy."""
    monkeypatch.setattr(filter_main, "publish_deadline", lambda settings: 1.0)
    content = dated("past the deadline")
    async with filter_behind_a_proxy(directory) as (worker, proxy):
        proxy.hold_replies()
        assert await in_thread(send, worker.ports[0], content) == replies.QUEUE_UNAVAILABLE
        assert len(worker.server.unconfirmed) == 1
        proxy.resume()
        assert (await in_thread(send, worker.ports[0], content)).startswith("250 ")
    queue_ids = [queued.envelope.queue_id for queued in await drain_queue(directory)]
    assert len(queue_ids) == 2 and len(set(queue_ids)) == 1, queue_ids


class ExplodingRule:
    name = "exploding"

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        raise RuntimeError("secret-internal-detail")


async def test_internal_error_is_451_without_details(
    directory: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="services.filter")

    def conversation() -> list[str]:
        with connect(worker.ports[0]) as client:
            client.mail(SENDER)
            client.rcpt(ALICE)
            first = reply_of(*client.data(message("boom")))
            # The failed transaction was reset: a new MAIL is not "nested".
            second = reply_of(*client.mail(SENDER))
            return [first, second]

    async with running_filter(directory, rules=[BareNewlineRule(), ExplodingRule()]) as worker:
        first, second = await in_thread(conversation)
        assert worker.stats.accepted == 0
    assert first == replies.INTERNAL_ERROR
    assert "secret" not in first and "RuntimeError" not in first
    assert second == replies.SENDER_OK
    assert await queue_depth(directory) == 0
    [record] = [r for r in caplog.records if r.exc_info]
    assert getattr(record, "queue_id", None)
    assert "secret-internal-detail" in caplog.text  # the traceback is logged


class ExplodingDirectory:
    async def resolve(self, address: str) -> Lookup:
        raise ValueError("directory bug with secret-internal-detail")


async def test_internal_error_at_rcpt_is_451(settings: Settings) -> None:
    async with running_filter(settings, directory=ExplodingDirectory()) as worker:
        rcpt, _ = await in_thread(one_transaction, worker.ports[0], "boom")
    assert rcpt == replies.INTERNAL_ERROR


async def two_open_then_third_refused(worker: FilterWorker, reply: str,
                                      between: Callable[[], Awaitable[None]] | None = None
                                      ) -> None:
    """Two sessions greeted, a third answered `reply` and closed; `between` runs while the
    two are open; then one closes and its place is taken again."""
    port = worker.ports[0]
    first, second = await in_thread(RawClient, port), await in_thread(RawClient, port)
    try:
        assert (await in_thread(first.reply)).startswith("220 ")
        assert (await in_thread(second.reply)).startswith("220 ")
        third = await in_thread(RawClient, port)
        assert await in_thread(third.reply) == reply
        assert await in_thread(third.closed)
        third.close()
        if between is not None:
            await between()
        first.close()
        await eventually(lambda: worker.stats.active == 1)
        fourth = await in_thread(RawClient, port)
        assert (await in_thread(fourth.reply)).startswith("220 ")
        fourth.close()
    finally:
        first.close()
        second.close()


async def test_max_connections_421(directory: Settings) -> None:
    async with running_filter(directory.replace(smtp_max_connections=2)) as worker:
        await two_open_then_third_refused(worker, replies.TOO_MANY_CONNECTIONS)
        assert worker.stats.refused_connections == 1


def client_in_data(port: int) -> RawClient:
    """A client that has sent DATA (after EHLO, MAIL and RCPT) and got its 354."""
    client = RawClient(port)
    try:
        client.reply()
        client.command(b"EHLO client.remote.test\r\n")
        client.command(b"MAIL FROM:<" + SENDER.encode() + b">\r\n")
        client.command(b"RCPT TO:<" + ALICE.encode() + b">\r\n")
        assert client.command(b"DATA\r\n").startswith("354 ")
    except BaseException:
        client.close()
        raise
    return client


async def test_stalled_upload_is_cut_by_data_timeout(directory: Settings) -> None:
    limits = directory.replace(smtp_command_timeout=30.0, smtp_data_timeout=0.5)
    async with running_filter(limits) as worker:
        def conversation() -> tuple[str, float]:
            client = client_in_data(worker.ports[0])
            try:
                started = time.monotonic()
                reply = client.command(b"Subject: stalled\r\n\r\npartial")
                assert client.closed()
                return reply, time.monotonic() - started
            finally:
                client.close()

        reply, elapsed = await in_thread(conversation)
    assert reply.startswith("421 4.4.2")
    assert elapsed < 10.0  # the data timeout applied, not the 30 s command timeout
    assert await queue_depth(directory) == 0


async def test_slow_but_alive_upload_is_not_cut(directory: Settings) -> None:
    # Every gap is shorter than the data timeout; the whole upload (3 s at least) outlasts the
    # command one. That one also bounds each command before DATA, the server's Redis lookups
    # for RCPT included: 0.6 s was not always enough for them on a loaded machine.
    limits = directory.replace(smtp_command_timeout=1.5, smtp_data_timeout=3.0)
    async with running_filter(limits) as worker:
        def conversation() -> str:
            client = client_in_data(worker.ports[0])
            try:
                client.sock.sendall(b"Subject: slow\r\n\r\n")
                for number in range(12):
                    time.sleep(0.25)  # pacing a slow client, not waiting for a result
                    client.sock.sendall(b"line %d\r\n" % number)
                return client.command(b".\r\n")
            finally:
                client.close()

        reply = await in_thread(conversation)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert await queue_depth(directory) == 1


async def test_idle_client_after_a_message_is_cut_by_the_command_timeout(
        directory: Settings) -> None:
    # The idle timer is kept armed while a deadline moves later (services/filter/server.py,
    # _reset_timeout): after an upload long enough for the timer to be armed for the data
    # timeout, the short command timeout must apply again.
    limits = directory.replace(smtp_command_timeout=0.5, smtp_data_timeout=30.0)
    async with running_filter(limits) as worker:
        def conversation() -> tuple[str, float]:
            client = client_in_data(worker.ports[0])
            try:
                client.sock.sendall(b"Subject: then idle\r\n\r\n")
                time.sleep(1.0)  # an upload longer than the command timeout
                queued = client.command(b"body\r\n.\r\n")
                started = time.monotonic()
                timeout_reply = client.reply()
                assert client.closed()
                return queued + "\n" + timeout_reply, time.monotonic() - started
            finally:
                client.close()

        replies_seen, idle = await in_thread(conversation)
    queued, timeout_reply = replies_seen.split("\n")
    assert queued.startswith("250 2.0.0 Ok: queued as ")
    assert timeout_reply.startswith("421 4.4.2")
    assert idle < 10.0  # the command timeout, not the 30 s data timeout
    assert await queue_depth(directory) == 1


async def test_a_client_cut_during_the_tls_handshake_gives_its_connection_slot_back(
        directory: Settings) -> None:
    """A client that sends its ClientHello a byte at a time is cut by the timeout in the
    middle of the handshake. asyncio's SSLProtocol then tells the session nothing, and the
    session kept its connection slot for good: ten such clients (under stress, 10 s each)
    shut a worker to everyone until it was restarted."""
    limits = directory.replace(smtp_command_timeout=1.0, smtp_max_connections=2)
    async with running_filter(limits) as worker:
        def dribbled_hello() -> bool:
            client = RawClient(worker.ports[0])
            try:
                client.reply()
                client.command(b"EHLO client.remote.test\r\n")
                assert client.command(b"STARTTLS\r\n").startswith("220 ")
                client.sock.sendall(b"\x16")  # a ClientHello's first octet, and no more
                return client.closed()
            finally:
                client.close()

        for _ in range(2):  # as many as the worker has slots
            assert await in_thread(dribbled_hello)
        await eventually(lambda: worker.stats.active == 0, within=10,
                         what="the connection slots given back")
        rcpt, queued = await in_thread(one_transaction, worker.ports[0], "after the cut ones")
    assert rcpt.startswith("250") and queued.startswith("250 2.0.0 Ok: queued as ")


async def test_under_stress_slow_clients_get_the_short_timeout_and_whole_lines_pass(
        directory: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """With 80 % of its connections open a worker is under stress (as Postfix's smtpd): a
    client gets smtp_stress_timeout for its next command or DATA line, timers already
    running are shortened, and a byte now and then no longer keeps an upload alive (before,
    every chunk re-armed the 3-minute data timer: a slowloris held a connection for as long
    as it liked). Uploads that bring whole lines in time go through."""
    caplog.set_level(logging.INFO, logger="services.filter.server")
    limits = directory.replace(smtp_max_connections=6, smtp_command_timeout=60.0,
                               smtp_data_timeout=60.0, smtp_stress_timeout=2.0)
    pace = 0.25  # seconds between a slow client's writes; pacing, not waiting for a result
    async with running_filter(limits) as worker:
        port = worker.ports[0]
        idle = await in_thread(RawClient, port)
        assert (await in_thread(idle.reply)).startswith("220 ")
        uploaders = [await in_thread(client_in_data, port) for _ in range(3)]
        assert not worker.server._registry.stressed  # 4 of 6 open
        dribbler = await in_thread(client_in_data, port)  # 5 of 6: stress
        assert worker.server._registry.stressed

        def upload(client: RawClient) -> str:
            client.sock.sendall(b"Subject: slow lines\r\n\r\n")
            for number in range(16):  # 4 s, twice the stress timeout
                time.sleep(pace)
                client.sock.sendall(b"line %d\r\n" % number)
            return client.command(b".\r\n")

        def dribble(client: RawClient) -> tuple[str, int]:
            client.sock.sendall(b"Subject: slowloris\r\n\r\n")
            for sent in range(240):  # a minute at most: the data timeout
                if select.select([client.sock], [], [], pace)[0]:
                    try:
                        return client.reply(), sent
                    except ConnectionResetError:  # cut while a byte was on its way
                        return "reset", sent
                client.sock.sendall(b"x")
            return "still open", 240

        def idle_reply() -> tuple[str, float]:
            started = time.monotonic()
            return idle.reply(), time.monotonic() - started

        try:
            results = await asyncio.gather(*(in_thread(upload, c) for c in uploaders),
                                           in_thread(dribble, dribbler), in_thread(idle_reply))
        finally:
            for client in (idle, dribbler, *uploaders):
                client.close()
    *uploaded, (dribbled, bytes_sent), (idle_cut, idle_waited) = results
    assert all(reply.startswith("250 2.0.0 Ok: queued as ") for reply in uploaded), uploaded
    assert dribbled.startswith("421 4.4.2") or dribbled == "reset", (dribbled, bytes_sent)
    assert bytes_sent < 40  # within 10 s (the stress timeout is 2 s), not the data timeout
    assert idle_cut.startswith("421 4.4.2")
    assert idle_waited < 30.0  # its 60 s timer was shortened when the stress began
    assert await queue_depth(directory) == 3
    assert worker.stats.stress_periods == 1
    assert "5 of 6 connections open: clients get 2 s" in caplog.text


class SlowRule:
    """A check slower than the stress timeout (a scanner taking its time)."""

    name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def check(self, envelope: Envelope, content: bytes) -> Verdict:
        await asyncio.sleep(self.seconds)  # the check's own pace, not a wait for a result
        return Verdict()


async def test_under_stress_our_own_processing_keeps_its_time(directory: Settings) -> None:
    """The stress timeout is for clients: once the whole message is in, the checks and the
    publish have the processing timeout, and a message whose checks take longer than the
    stress timeout still gets its 250 (cut with 421, it was sent again)."""
    limits = directory.replace(smtp_max_connections=2, smtp_stress_timeout=0.5)
    async with running_filter(limits, rules=[SlowRule(1.5)]) as worker:
        port = worker.ports[0]
        idle = await in_thread(RawClient, port)
        sender = await in_thread(client_in_data, port)
        try:
            assert worker.server._registry.stressed
            reply = await in_thread(sender.command, message("slow checks") + b".\r\n")
        finally:
            for client in (idle, sender):
                client.close()
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    assert await queue_depth(directory) == 1


async def test_when_stress_ends_a_client_gets_back_the_time_stress_took(
        directory: Settings) -> None:
    """A timer shortened when stress began is lengthened again when it ends: a client that
    was idle through the stress (a human at a terminal, an MTA between two messages) is cut
    by its command timeout, not by the stress timeout of a stress that is over."""
    limits = directory.replace(smtp_max_connections=5, smtp_command_timeout=60.0,
                               smtp_stress_timeout=3.0)
    async with running_filter(limits) as worker:
        port = worker.ports[0]
        registry = worker.server._registry
        idle = await in_thread(RawClient, port)
        others: list[RawClient] = []
        try:
            assert (await in_thread(idle.reply)).startswith("220 ")
            for _ in range(3):  # 4 of 5 open: stress, the idle client's timer shortened
                others.append(await in_thread(RawClient, port))
                assert (await in_thread(others[-1].reply)).startswith("220 ")
            assert registry.stressed
            for client in others[:2]:  # 2 of 5 open: the stress ends
                client.close()
            await eventually(lambda: not registry.stressed, within=2.5,
                             what="the stress over before the idle client's shortened timer")

            def noop_after_the_stress_timeout() -> str:
                time.sleep(4.0)  # pacing an idle client past the 3 s; not waiting for a result
                return idle.command(b"NOOP\r\n")

            reply = await in_thread(noop_after_the_stress_timeout)
        finally:
            for client in (idle, *others):
                client.close()
    assert reply.startswith("250"), reply


async def test_a_client_that_does_not_read_its_replies_is_not_answered_into_memory(
        directory: Settings) -> None:
    # Commands keep coming while their replies are not read: once the kernel's buffers are
    # full, the worker must stop reading commands (flow control) instead of queueing the
    # replies in its own memory; and none of them is lost.
    async with running_filter(directory) as worker:
        # Small client buffers, so that the kernel holds little of either direction.
        client = await in_thread(RawClient, worker.ports[0], buffers=16 * 1024)
        assert (await in_thread(client.reply)).startswith("220 ")
        command = b"NOOP\r\n"
        sent = 0
        blocked = False
        most_buffered = 0

        def flood() -> None:
            nonlocal sent, blocked
            client.sock.settimeout(1.0)
            chunk = command * 1000
            try:
                for _ in range(2000):  # at most 12 MB of commands, 28 MB of replies
                    client.sock.sendall(chunk)  # a timeout may leave part of it sent
                    sent += len(chunk)
            except TimeoutError:
                blocked = True  # the worker stopped reading

        flooding = asyncio.create_task(in_thread(flood))
        while not flooding.done():
            buffered = [connection.transport.get_write_buffer_size()
                        for connection in worker.server._registry  # its open sessions
                        if connection.transport is not None]
            most_buffered = max([most_buffered, *buffered])
            await asyncio.sleep(0.01)
        await flooding

        reply = b"250 2.0.0 OK\r\n"
        count = sent // len(command)

        def read_replies() -> bytes:
            client.sock.settimeout(30.0)
            return client.file.read(count * len(reply))

        answered = await in_thread(read_replies)
        client.close()
    assert blocked
    assert most_buffered <= 256 * 1024
    assert answered == reply * count


async def test_shutdown_closes_idle_sessions_with_421(directory: Settings) -> None:
    async with running_filter(directory) as worker:
        client = await in_thread(RawClient, worker.ports[0])
        assert (await in_thread(client.reply)).startswith("220 ")
        await eventually(lambda: worker.stats.active == 1)
    with contextlib.closing(client):
        assert await in_thread(client.reply) == replies.SHUTTING_DOWN


async def test_shutdown_lets_an_upload_under_way_finish(directory: Settings) -> None:
    """A session in the middle of its DATA upload when the worker is told to stop was cut
    with 421 at once (found in review): the upload was lost, and the client, still
    sending, read a reset. It now gets the message's reply, then 421."""
    started: list[FilterWorker] = []
    stop = asyncio.Event()

    async def serve() -> None:
        async with running_filter(directory) as worker:
            started.append(worker)
            await stop.wait()

    serving = asyncio.create_task(serve())
    await eventually(lambda: started or serving.done(), what="the worker")
    port = started[0].ports[0]
    client = await in_thread(RawClient, port)
    with contextlib.closing(client):
        assert (await in_thread(client.reply)).startswith("220 ")
        for command in (b"EHLO client.test\r\n", b"MAIL FROM:<sender@remote.test>\r\n",
                        f"RCPT TO:<{ALICE}>\r\n".encode()):
            assert (await in_thread(client.command, command)).startswith("250")
        assert (await in_thread(client.command, b"DATA\r\n")).startswith("354")
        await in_thread(client.sock.sendall, b"Subject: halfway\r\n\r\nfirst half\r\n")
        stop.set()
        await eventually(lambda: _refuses_connections(port), what="the worker to stop listening")
        await in_thread(client.sock.sendall, b"second half\r\n.\r\n")
        assert (await in_thread(client.reply)).startswith("250 ")
        assert await in_thread(client.reply) == replies.SHUTTING_DOWN
    await serving
    [queued] = await drain_queue(directory)
    assert queued.body.endswith(b"first half\r\nsecond half\r\n")


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_connection_closed_at_once_frees_its_slot(directory: Settings) -> None:
    async with running_filter(directory.replace(smtp_max_connections=1)) as worker:
        probe = await in_thread(RawClient, worker.ports[0])
        probe.sock.shutdown(2)  # like a port probe: connect, then EOF at once
        probe.close()
        await eventually(lambda: worker.stats.connections == 1 and worker.stats.active == 0)
        client = await in_thread(RawClient, worker.ports[0])
        with contextlib.closing(client):
            assert (await in_thread(client.reply)).startswith("220 ")


async def test_max_connections_per_client_address_421(directory: Settings) -> None:
    """Two sessions from one address at most (and none exempt here); a third from it gets 421
    and is closed, while another address is still served, and a freed place is taken."""
    limits = directory.replace(smtp_max_connections_per_ip=2, rate_limit_exempt="")
    async with running_filter(limits) as worker:
        async def another_address_is_served() -> None:
            other = await in_thread(RawClient, worker.ports[0], source="127.0.0.2")
            assert (await in_thread(other.reply)).startswith("220 ")
            other.close()

        await two_open_then_third_refused(worker, replies.TOO_MANY_FROM_CLIENT,
                                          another_address_is_served)
        assert worker.stats.refused_client_connections == 1
        assert worker.stats.refused_connections == 0


async def test_exempt_networks_have_no_per_client_limit(directory: Settings) -> None:
    limits = directory.replace(smtp_max_connections_per_ip=1)  # loopback is exempt by default
    async with running_filter(limits) as worker:
        clients = [await in_thread(RawClient, worker.ports[0]) for _ in range(3)]
        try:
            for client in clients:
                assert (await in_thread(client.reply)).startswith("220 ")
        finally:
            for client in clients:
                client.close()


async def test_uploads_beyond_the_workers_data_memory_get_452_and_go_through_later(
        directory: Settings) -> None:
    """A worker holds at most TIERMAIL_SMTP_DATA_MEMORY octets of message data at once: one
    more message while it is full gets 452 4.3.1 (the sender retries), the upload in progress
    is not harmed, and once it is through there is room again. Nothing is lost."""
    body = (b"x" * 78 + b"\r\n") * 500  # 40,000 octets
    # Room for one such message, not two (the least the settings allow for 48 KiB).
    limits = directory.replace(smtp_data_memory=data_wire_octets(48 * 1024),
                               max_message_size=48 * 1024)
    async with running_filter(limits) as worker:
        def open_transaction() -> RawClient:
            client = RawClient(worker.ports[0])
            client.reply()
            client.command(b"EHLO client.remote.test\r\n")
            assert client.command(b"MAIL FROM:<" + SENDER.encode() + b">\r\n").startswith("250")
            assert client.command(b"RCPT TO:<" + ALICE.encode() + b">\r\n").startswith("250")
            assert client.command(b"DATA\r\n").startswith("354")
            return client

        uploading = await in_thread(open_transaction)
        await in_thread(uploading.sock.sendall, message("first", body))  # not ended: held
        await eventually(lambda: worker.server.data_held >= len(body), what="the first held")

        def conversation() -> tuple[str, str, str]:
            refused = open_transaction()
            full = refused.command(message("second", body) + b".\r\n")
            done = uploading.command(b".\r\n")
            assert refused.command(b"MAIL FROM:<" + SENDER.encode() + b">\r\n").startswith("250")
            assert refused.command(b"RCPT TO:<" + ALICE.encode() + b">\r\n").startswith("250")
            assert refused.command(b"DATA\r\n").startswith("354")
            retried = refused.command(message("second", body) + b".\r\n")
            uploading.close()
            refused.close()
            return full, done, retried

        full, done, retried = await in_thread(conversation)
        assert full == replies.NO_MEMORY_FOR_DATA
        assert done.startswith("250 ") and retried.startswith("250 ")
        assert worker.stats.data_memory_full == 1
        await eventually(lambda: worker.server.data_held == 0, what="all memory given back")
    subjects = sorted(q.body.split(b"Subject: ")[1].split(b"\r\n")[0]
                      for q in await drain_queue(directory))
    assert subjects == [b"first", b"second"]


async def test_a_closed_connection_is_freed_without_a_garbage_collection(
        worker: FilterWorker) -> None:
    """Each connection is freed when it ends (`_release_references`), not left for, and
    lengthening, a collection: a lambda holding the connection in its own line-limit table
    made every one a cycle again (found in review)."""
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            await in_thread(_ehlo_and_quit, worker.ports[0])
        # Freed once each session's task has ended and its done-callback has run.
        await eventually(lambda: not _sessions_in_memory(), within=15,
                         what="every closed connection freed, with no collection")
    finally:
        gc.enable()


def _sessions_in_memory() -> list[FilterSMTP]:
    return [o for o in gc.get_objects() if isinstance(o, FilterSMTP)]


def _ehlo_and_quit(port: int) -> None:
    client = RawClient(port)
    try:
        client.reply()
        client.command(b"EHLO client.remote.test\r\n")
        client.command(b"QUIT\r\n")
    finally:
        client.close()


async def test_connections_reset_before_the_greeting_leave_no_task_error(
        directory: Settings) -> None:
    """A client that resets the connection while its connection rate is checked in Redis
    (a TCP health check, a port scan): the session ends quietly. The Redis client let the
    cancellation from connection_lost go now and then, the greeting was then written to the
    reset connection, and the error left the task unretrieved: an asyncio error with a
    traceback per connection, logged when the task was collected. The reset itself is kept in
    the stream protocol's closed-future, which only the protocol's __del__ retrieved: when the
    collector finalized that future first (it keeps no order within a cycle), asyncio logged
    'Future exception was never retrieved'. The test finalizes the futures first."""
    loop = asyncio.get_running_loop()
    unhandled: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context["message"]))
    try:
        async with running_filter(directory.replace(rate_limit_exempt="")) as worker:
            for number in range(30):
                probe = await in_thread(RawClient, worker.ports[0],
                                        source=f"127.0.3.{number + 2}")
                probe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
                probe.close()
                await eventually(lambda n=number: worker.stats.connections == n + 1
                                 and worker.stats.active == 0)
            await eventually(lambda: not [
                task for task in asyncio.all_tasks()
                if task.get_coro().__qualname__ == "FilterSMTP._handle_client"])
            for session in [o for o in gc.get_objects() if isinstance(o, FilterSMTP)]:
                session._closed.__del__()  # type: ignore[attr-defined]
            gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert unhandled == []
