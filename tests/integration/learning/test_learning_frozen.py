"""Spam learning against a RabbitMQ that takes connections and then says nothing (a node
that hangs, a path to it that drops packets): the real broker behind a relay the test
freezes. Every wait on it ends within a bound, the waiting side says so in a WARNING line and
tries again, and no learn job the store holds is lost. The pika constants are made short
here (1 s heartbeat, 2 s handshake); docs/operations.md gives the production ones."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pamqp.commands
import pytest
from aiormq.exceptions import ChannelNotFoundEntity

from common.ids import new_queue_id
from common.logs import BrokerLinkNotes
from common.settings import Settings
from services.store import learning
from services.store.backends.maildb import MailDB
from services.store.learning import SPAM, Learning, LearningHook, learn_queue, run_worker
from services.store.mailbox import INBOX, JUNK, Delivery
from tests.integration.learning.test_learning import ALICE, run_store_for_alice, unseen_message
from tests.support import (
    AmqpFrames,
    QuietProxy,
    Relayed,
    TcpProxy,
    TierProcess,
    broker_at,
    eventually,
    free_port,
    queue_consumers,
    queue_depth,
    wait_until,
)

UNREACHABLE = "learn jobs wait for the broker, unreachable"
UNSCHEDULED = "its retry could not be scheduled"
DRAMATIQ_GAVE_UP = "Unexpected failure in after_process_message"
MARGIN = 5.0  # seconds for a loaded test machine to log what the bound says it must


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> float:
    """Seconds one attempt may wait for the frozen broker, plus MARGIN."""
    monkeypatch.setattr(learning, "BROKER_HEARTBEAT", 1)
    monkeypatch.setattr(learning, "BROKER_CONNECT_TIMEOUT", 2.0)
    return learning.broker_attempt_limit() + MARGIN


@dataclass
class Hook:
    maildb: MailDB
    hook: LearningHook
    settings: Settings

    async def move_into_junk(self, count: int = 1) -> None:
        await self.maildb.deliver([Delivery(new_queue_id(), ALICE, unseen_message(),
                                            time.time(), INBOX) for _ in range(count)])
        await self.maildb.move(ALICE, INBOX, await self.maildb.uids(ALICE, INBOX), JUNK)


async def queued(settings: Settings, count: int) -> None:
    async def depth_is() -> bool:
        try:
            return await asyncio.to_thread(queue_depth, settings, learn_queue(settings)) == count
        except ChannelNotFoundEntity:  # not declared yet: nothing was published
            return False

    await eventually(depth_is, within=60, what=f"{count} learn jobs in the queue")


@pytest.fixture
async def hook_at(settings: Settings) -> AsyncIterator[Callable[..., Hook]]:
    """The store's learning hook, its broker reached through a relay."""
    made: list[Hook] = []

    def make(port: int, after_first: Callable[[], None] | None = None) -> Hook:
        """`after_first`: called once the first job is published."""
        maildb = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
        learn = Learning(broker_at(settings, port))
        published = threading.Event()

        def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
            learn.publish(kind, user, guid, message, decided_us)
            if after_first is not None and not published.is_set():
                after_first()
            published.set()

        hook = LearningHook(maildb, send, learn.close, learn.release_connection)
        maildb.add_listener(hook.on_change)
        made.append(Hook(maildb, hook, settings))
        return made[-1]

    yield make
    for each in made:
        await each.hook.close(grace=0)
        await each.maildb.close()


def said(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], bool]:
    return lambda: text in caplog.text


async def test_an_imap_move_while_the_broker_is_frozen_is_learned_once_it_answers(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """The MOVE answers at once; the store's publish gives the frozen broker up after its
    handshake timeout, says so, and publishes the job once the broker answers again. pika's
    handshake timeout was an exception dramatiq does not expect: the store took it for a
    refused publish and dropped the job (`not learned: AMQPConnectorStackTimeout`)."""
    relay = TcpProxy(5672)
    try:
        stack = broker_at(settings, relay.port, learn="rspamd")
        store = run_store_for_alice(stack, run_tier)
        client = imaplib.IMAP4("127.0.0.1", stack.imap_port, timeout=5)  # a slow MOVE fails
        client.login(ALICE, "secret pw")
        assert client.append(INBOX, "", None, unseen_message())[0] == "OK"
        client.select(INBOX)
        relay.hang()
        assert client.uid("MOVE", "1", JUNK)[0] == "OK"
        assert client.noop()[0] == "OK"
        client.shutdown()
        await asyncio.to_thread(wait_until, lambda: UNREACHABLE in store.output(),
                                timeout=learning.broker_attempt_limit() + MARGIN,
                                what="the store to give the frozen broker up")
        relay.resume()
        await queued(settings, 1)
    finally:
        relay.cut()
    assert "not learned" not in store.output(), store.output()


@pytest.mark.parametrize("quiet_after", [pamqp.commands.Connection.OpenOk,
                                         pamqp.commands.Channel.OpenOk],
                         ids=["channel-open", "confirm-select"])
async def test_a_broker_quiet_while_the_publisher_sets_up_is_given_up_and_tried_again(
        hook_at: Callable[..., Hook], bound: float, quiet_after: type,
        caplog: pytest.LogCaptureFixture) -> None:
    """The broker opens the connection, then answers nothing: the publisher waited for the
    channel until pika's heartbeat check gave up, twice (dramatiq declares twice), 260 s
    with RabbitMQ's 60 s heartbeat, with every learn job behind it; waiting for the
    Confirm.SelectOk it gave up after 130 s and dropped the job (dramatiq's KeyError)."""
    relay = QuietProxy(5672, after=quiet_after)
    caplog.set_level(logging.INFO, logger="services.store.learning")
    try:
        store = hook_at(relay.port)
        await store.move_into_junk()
        await eventually(said(caplog, UNREACHABLE), within=bound,
                         what="the publisher to give the quiet broker up")
        relay.speak()
        await queued(store.settings, 1)
    finally:
        relay.cut()
    assert "not learned" not in caplog.text, caplog.text


async def test_a_broker_frozen_between_two_publishes_is_given_up_and_tried_again(
        hook_at: Callable[..., Hook], bound: float, caplog: pytest.LogCaptureFixture) -> None:
    """A move of three: the broker freezes once the first job is confirmed, and the second
    waits for its confirm on the open connection. It waited until pika's heartbeat check
    gave up (up to 130 s), then dramatiq's new connection met the handshake timeout and the
    rest of the move was dropped."""
    relay = TcpProxy(5672)
    caplog.set_level(logging.INFO, logger="services.store.learning")
    try:
        store = hook_at(relay.port, after_first=relay.hang)
        await store.move_into_junk(3)
        await eventually(said(caplog, UNREACHABLE), within=bound,
                         what="the publisher to give the frozen broker up")
        assert caplog.text.count("learn job queued") == 1
        relay.resume()
        await queued(store.settings, 3)
    finally:
        relay.cut()
    assert "not learned" not in caplog.text, caplog.text
    # One line per attempt: a broker that stopped answering is not taken for an alarm.
    assert "has not confirmed a publish" not in caplog.text, caplog.text


@dataclass
class Learner:
    thread: threading.Thread
    stopping: threading.Event

    def stopped_within(self, seconds: float) -> bool:
        self.stopping.set()
        self.thread.join(seconds)
        return not self.thread.is_alive()


@pytest.fixture
def learner_at(settings: Settings) -> Iterator[Callable[..., Learner]]:
    """`tiermail learner` (run_worker) in a thread, its broker reached through a relay and
    its rspamd controller at `controller_url`, by default not there (every job it takes is
    retried)."""
    running: list[Learner] = []

    def start(port: int, controller_url: str | None = None) -> Learner:
        learner_settings = broker_at(
            settings, port, learn="rspamd",
            rspamd_controller_url=controller_url or f"http://127.0.0.1:{free_port()}")
        stopping = threading.Event()
        learner = Learner(threading.Thread(target=run_worker, name="learner", daemon=True,
                                           args=(learner_settings, stopping)), stopping)
        learner.thread.start()
        running.append(learner)
        return learner

    yield start
    for learner in running:
        learner.stopping.set()
    for learner in running:
        learner.thread.join(60)


@pytest.mark.parametrize("frozen", ["at-accept", "after-open"])
def test_a_learner_started_against_a_frozen_broker_waits_for_it(
        learner_at: Callable[[int], Learner], bound: float, frozen: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """pika's handshake timeout ended the learner with a traceback (dramatiq lets it
    through, the learner expected dramatiq's errors only); a broker quiet after opening
    the connection held the learner's declare for 260 s an attempt."""
    relay: TcpProxy
    if frozen == "at-accept":
        relay = TcpProxy(5672)
        relay.hang()
    else:
        relay = QuietProxy(5672, after=pamqp.commands.Connection.OpenOk)
    caplog.set_level(logging.INFO)
    try:
        learner = learner_at(relay.port)
        wait_until(said(caplog, "the broker is unreachable"), timeout=bound,
                   what="the learner to give the frozen broker up")
        assert learner.thread.is_alive()
        relay.resume()
        if isinstance(relay, QuietProxy):
            relay.speak()
        wait_until(said(caplog, "learner running"), timeout=60, what="the learner running")
    finally:
        relay.cut()


def consuming(settings: Settings) -> Callable[[], bool]:
    """Both of the learner's consumers (the learn queue and its delay queue) are set up
    (the queues exist: the learner declared them before saying it runs)."""
    queues = [learn_queue(settings), settings.topology.learn_retry_queue]
    return lambda: all(queue_consumers(settings, queue) == 1 for queue in queues)


def test_a_learner_whose_broker_freezes_reconnects_once_it_answers(
        settings: Settings, learner_at: Callable[[int], Learner], bound: float,
        caplog: pytest.LogCaptureFixture) -> None:
    """The consumers noticed a frozen broker when the heartbeat check of RabbitMQ's 60 s
    gave up (127 s), then each reconnect met pika's handshake timeout, which dramatiq
    logged as an unexpected error with a traceback. Now they notice within the bound, each
    reconnect fails within it, and they take jobs again once the broker answers."""
    relay = TcpProxy(5672)
    caplog.set_level(logging.INFO)
    try:
        learner_at(relay.port)
        wait_until(said(caplog, "learner running"), timeout=60, what="the learner running")
        wait_until(consuming(settings), timeout=60, what="the learner consuming")
        relay.hang()
        wait_until(said(caplog, "Consumer encountered a connection error"), timeout=bound,
                   what="the consumers to give the frozen broker up")
        wait_until(lambda: caplog.text.count("Restarting consumer") >= 4, timeout=bound,
                   what="a reconnect to the frozen broker to fail")
        assert "unexpected error" not in caplog.text, caplog.text
        relay.resume()
        sender = Learning(settings)
        try:
            sender.send("spam", ALICE, "a" * 32, unseen_message(), 1)
        finally:
            sender.close()
        wait_until(said(caplog, f"{'a' * 32} not learned as spam yet"), timeout=60,
                   what="the learner to take the job")  # rspamd is not there: retried
    finally:
        relay.cut()


def test_a_learner_stopped_while_its_broker_is_frozen_stops_in_time(
        settings: Settings, learner_at: Callable[[int], Learner], bound: float,
        caplog: pytest.LogCaptureFixture) -> None:
    """Stopping closes each consumer's connection politely, which waits for the broker's
    Close-Ok: 187 s with RabbitMQ's 60 s heartbeat. Now each wait ends when pika's
    heartbeat check gives the connection up."""
    relay = TcpProxy(5672)
    caplog.set_level(logging.INFO)
    try:
        learner = learner_at(relay.port)
        wait_until(said(caplog, "learner running"), timeout=60, what="the learner running")
        wait_until(consuming(settings), timeout=60, what="the learner consuming")
        relay.hang()
        assert learner.stopped_within(2 * learning.broker_silence_limit() + MARGIN)
    finally:
        relay.cut()


@pytest.fixture
def controller() -> Iterator[socket.socket]:
    """Where a learner's rspamd controller is: a listener the test answers by hand."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    yield listener
    listener.close()


def fail_a_learn_call_on_a_frozen_broker(settings: Settings, learner_at: Callable[..., Learner],
                                         relay: TcpProxy, controller: socket.socket,
                                         guid: str, caplog: pytest.LogCaptureFixture) -> None:
    """A learner behind `relay` takes a job for `guid`; while its learn call waits for the
    controller the broker freezes, then the call fails: the retry is to be scheduled on the
    frozen broker. In this order, whatever the timing."""
    caplog.set_level(logging.INFO)
    learner_at(relay.port, f"http://127.0.0.1:{controller.getsockname()[1]}")
    wait_until(said(caplog, "learner running"), timeout=60, what="the learner running")
    sender = Learning(settings)
    try:
        sender.send(SPAM, ALICE, guid, unseen_message(), 1)
    finally:
        sender.close()
    connection, _ = controller.accept()  # the learn call waits for rspamd
    relay.hang()
    connection.close()  # and fails


def test_a_job_whose_retry_meets_a_frozen_broker_is_kept(
        settings: Settings, learner_at: Callable[..., Learner], controller: socket.socket,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The learn call fails while the broker is frozen: putting the retry on the delay queue
    fails within the handshake timeout. dramatiq logged that as CRITICAL with a traceback
    and acknowledged the job, and the acknowledgement reached the broker once it answered
    again: the job was gone, neither retried nor dead-lettered. Now it is nacked into the
    dead-letter queue, with one WARNING line. The heartbeat is made long so that neither
    side gives the consumer's connection up (which would requeue the job anyway) before
    the broker answers again."""
    monkeypatch.setattr(learning, "BROKER_HEARTBEAT", 30)
    monkeypatch.setattr(learning, "BROKER_CONNECT_TIMEOUT", 1.0)
    guid = "9" * 32
    relay = TcpProxy(5672)
    try:
        fail_a_learn_call_on_a_frozen_broker(settings, learner_at, relay, controller, guid,
                                             caplog)
        wait_until(lambda: UNSCHEDULED in caplog.text or DRAMATIQ_GAVE_UP in caplog.text,
                   timeout=learning.broker_attempt_limit() + MARGIN,
                   what="scheduling the retry to fail")
        relay.resume()
        wait_until(lambda: queue_depth(settings, settings.topology.learn_dead_queue) == 1,
                   timeout=30, what="the job in the learn dead-letter queue")
        records = list(caplog.records)  # not those of the relay cut below
    finally:
        relay.cut()
    [line] = [r for r in records if UNSCHEDULED in r.getMessage()]
    assert line.levelno == logging.WARNING and guid in line.getMessage()
    assert (line.user, line.queue_id) == (ALICE, guid)  # type: ignore[attr-defined]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_a_job_whose_retry_and_nack_meet_a_frozen_broker_is_handed_out_again(
        settings: Settings, learner_at: Callable[..., Learner], controller: socket.socket,
        bound: float, caplog: pytest.LogCaptureFixture) -> None:
    """Frozen for longer: the nack into the dead-letter queue cannot reach the broker
    either. The broker gives the consumer's connection up (1 s heartbeat here), which puts
    the unacknowledged job back, and hands it out again once it answers: learned then."""
    guid = "8" * 32
    relay = TcpProxy(5672)
    consumer = f"ConsumerThread({learn_queue(settings)})"
    try:
        fail_a_learn_call_on_a_frozen_broker(settings, learner_at, relay, controller, guid,
                                             caplog)
        wait_until(said(caplog, UNSCHEDULED), timeout=bound, what="scheduling the retry to fail")
        wait_until(lambda: any(r.name.endswith(consumer) and "connection error" in r.getMessage()
                               for r in caplog.records),
                   timeout=bound, what="the learner to give its consumer's connection up")
        relay.resume()
        again, _ = controller.accept()  # the same job, handed out again
        again.recv(65536)
        again.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        again.close()
        wait_until(said(caplog, f"rspamd learned {guid} as spam"), timeout=30,
                   what="the job learned")
    finally:
        relay.cut()
    assert queue_depth(settings, settings.topology.learn_dead_queue) == 0


class CountingController:
    """A learner's rspamd controller on the `controller` listener: fails the first `fail`
    learn calls (closes the connection unanswered), answers the rest 200, and counts them."""

    def __init__(self, listener: socket.socket, fail: int) -> None:
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.failed = 0
        self.learned = 0
        self._listener = listener
        self._fail = fail
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # the fixture closed it, or nothing came for a minute
                return
            with connection:
                if self.failed < self._fail:
                    self.failed += 1
                    continue
                read_request(connection)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                self.learned += 1


def read_request(connection: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += connection.recv(65536)


def logged(caplog: pytest.LogCaptureFixture, start: str, by: str = "") -> list[logging.LogRecord]:
    """The records whose message template starts with `start`, from a logger ending in `by`."""
    return [r for r in caplog.records if str(r.msg).startswith(start) and r.name.endswith(by)]


def as_the_learner_logs(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """`records` as `tiermail learner` writes them (common.logs.setup_logging): pika's below
    CRITICAL dropped, dramatiq's consumer connection errors a WARNING."""
    notes = BrokerLinkNotes()
    return [r for r in records if not (r.name.startswith("pika") and r.levelno < logging.CRITICAL)
            and notes.filter(r)]


class AckCounter(TcpProxy):
    """A TcpProxy that counts the basic.ack frames its clients send: one counted is past the
    relay's gate, so a `hang()` after it no longer holds it back."""

    def __init__(self, target_port: int) -> None:
        self.acks = 0
        super().__init__(target_port)

    def _relay(self, client: socket.socket, to_target: bool) -> Callable[[bytes], Relayed]:
        if not to_target:
            return super()._relay(client, to_target)
        frames = AmqpFrames()

        def count(data: bytes) -> Relayed:
            acks = sum(isinstance(frame, pamqp.commands.Basic.Ack)
                       for _, _, frame in frames.feed(data))
            with self._lock:
                self.acks += acks
            return data, None
        return count


def test_a_delayed_job_due_while_the_broker_is_frozen_is_learned_once_it_answers(
        settings: Settings, learner_at: Callable[..., Learner], controller: socket.socket,
        bound: float, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A learn job fails once and waits for its retry in the learner's memory (taken off the
    delay queue, unacknowledged); the broker freezes before it is due. Putting it back on
    the learn queue when it falls due (dramatiq's handle_delayed_messages) fails within one
    attempt, and dramatiq drops what its delay-queue consumer held and reconnects (one
    WARNING line as the learner logs it). The job is not lost: the broker, which heard
    nothing more from that consumer's connection, gives it up and puts the job back on the
    delay queue, where it waits out the freeze. Once the broker answers the job is due at
    once: learned, once (the publish never reached the frozen broker)."""
    monkeypatch.setattr(learning, "MIN_BACKOFF_MS", 3_000)  # the first retry in 3 to 6 s
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="dramatiq")  # where its jobs go; after: it lowers
    # the capture's own level too
    rspamd = CountingController(controller, fail=1)
    main, delay_queue = learn_queue(settings), settings.topology.learn_retry_queue
    guid = "7" * 32
    relay = AckCounter(5672)
    try:
        learner = learner_at(relay.port, rspamd.url)
        wait_until(said(caplog, "learner running"), timeout=60, what="the learner running")
        wait_until(consuming(settings), timeout=60, what="the learner consuming")
        sender = Learning(settings)
        try:
            sender.send(SPAM, ALICE, guid, unseen_message(), 1)
        finally:
            sender.close()
        wait_until(lambda: bool(logged(caplog, "Pushing message",
                                       f"ConsumerThread({delay_queue})")),
                   timeout=60, what="the retry held by the learner until it is due")
        # The learn queue's consumer acknowledges the failed job in its own time (its next
        # turn, up to a second later): frozen before that, the broker would hand the job out
        # again from the learn queue as well once it gives that connection up.
        wait_until(lambda: relay.acks >= 1, timeout=60,
                   what="the failed job's ack on its way to the broker")
        relay.hang()
        frozen = time.time()
        [retrying] = logged(caplog, "Retrying message")
        job_id, delay_ms = retrying.args or ()
        due = retrying.created + float(str(delay_ms)) / 1000
        assert frozen < due, "the retry fell due before the broker froze"
        wait_until(lambda: any(r.args == (job_id, main) and r.created > due
                               for r in logged(caplog, "Enqueueing message")),
                   timeout=bound, what="the due job put back on the frozen broker")
        wait_until(lambda: bool(logged(caplog, "Consumer encountered a connection error",
                                       f"ConsumerThread({delay_queue})")),
                   timeout=bound, what="the delay-queue consumer to give the broker up")
        # The test sees the broker itself, not through the relay.
        wait_until(lambda: queue_depth(settings, delay_queue) == 1, timeout=bound,
                   what="the broker to put the job back on the delay queue")
        assert queue_depth(settings, main) == 0 and rspamd.learned == 0
        # Frozen for longer than any one wait on it may last: nothing held through the
        # freeze depends on its length.
        time.sleep(max(0.0, frozen + bound - time.time()))
        relay.resume()
        wait_until(said(caplog, f"rspamd learned {guid} as spam"), timeout=60,
                   what="the job learned")
        wait_until(consuming(settings), timeout=60, what="the learner consuming again")
        records = list(caplog.records)  # not those of the relay cut below
        assert learner.stopped_within(60)  # what it held unacknowledged goes back
    finally:
        relay.cut()
    assert (rspamd.failed, rspamd.learned) == (1, 1)
    for queue in (main, delay_queue, settings.topology.learn_dead_queue):
        assert queue_depth(settings, queue) == 0, queue
    shown = as_the_learner_logs(records)
    assert not [r for r in shown if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert {r.levelno for r in shown if delay_queue in r.name
            and str(r.msg).startswith("Consumer encountered")} == {logging.WARNING}
    assert DRAMATIQ_GAVE_UP not in caplog.text and "unexpected error" not in caplog.text
