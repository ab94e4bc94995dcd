"""Spam learning end to end: a move in MailDB -> LearningHook -> RabbitMQ (dramatiq) ->
`tiermail learner` -> the real rspamd controller, with Bayes statistics in the real Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import imaplib
import logging
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import dramatiq
import httpx
import pika.exceptions
import pytest
import redis.asyncio as aioredis
from dramatiq.common import dq_name

from common.health import read_heartbeats
from common.ids import new_queue_id
from common.passwords import hash_password
from common.settings import Settings
from services.devscanners.runner import Scanner
from services.status import collect_status, format_status
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MailDB
from services.store.learning import (
    DELAY_PREFETCH,
    SPAM,
    Learning,
    LearningHook,
    RspamdController,
    learn_queue,
)
from services.store.mailbox import INBOX, JUNK, TRASH, ChangeEvent, Delivery
from tests.support import (
    TcpProxy,
    TierProcess,
    broker_at,
    eventually,
    free_port,
    queue_depth,
    rabbitmqctl,
    run_cli,
    wait_until,
)

ALICE = "alice@example.test"


@dataclass
class Store:
    maildb: MailDB
    hook: LearningHook

    async def deliver(self, mailbox: str = INBOX) -> tuple[int, bytes]:
        """A message no rspamd has seen: enough random words for Bayes (11 tokens)."""
        words = " ".join(secrets.token_hex(5) for _ in range(40))
        body = (f"From: someone@remote.test\r\nTo: {ALICE}\r\n"
                f"Message-ID: <{secrets.token_hex(10)}@remote.test>\r\n"
                f"Subject: offer {secrets.token_hex(4)}\r\n\r\n{words}\r\n").encode()
        await self.maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time(), mailbox)])
        return (await self.maildb.uids(ALICE, mailbox))[-1], body


@pytest.fixture
async def store(learn_settings: Settings) -> AsyncIterator[Store]:
    maildb = MailDB.for_store(learn_settings.store_dir,
                              inline_max=learn_settings.store_inline_max)
    learning = Learning(learn_settings)
    hook = LearningHook(maildb, learning.publish, learning.close, learning.release_connection)
    maildb.add_listener(hook.on_change)
    yield Store(maildb, hook)
    await hook.close()
    await maildb.close()


def controller_learn(scanner: Scanner, kind: str, body: bytes,
                     password: str | None = None) -> httpx.Response:
    password = scanner.controller_password if password is None else password
    return httpx.post(f"{scanner.controller_url}/learn{kind}", content=body,
                      headers={"Password": password} if password else {}, timeout=30)


def learned(scanner: Scanner) -> int:
    """How many messages this rspamd has learned since it started (its /stat counter; the
    Bayes statistics themselves live on in Redis across runs)."""
    stat = httpx.get(f"{scanner.controller_url}/stat",
                     headers={"Password": scanner.controller_password}, timeout=30).json()
    return int(stat["learned"])


def learned_as(process: TierProcess, kind: str) -> Callable[[], bool]:
    """The learner logged rspamd's answer to a job of this kind ("rspamd learned <guid> as
    spam (N octets) ..."), not the warning of a try to be retried ("<guid> not learned as
    spam yet"), which a controller slow to answer brings first."""
    pattern = re.compile(rf"rspamd \w+ \S+ as {kind} \(")
    return lambda: pattern.search(process.output()) is not None


async def test_junk_moves_teach_spam_and_ham(learn_settings: Settings, store: Store,
                                             rspamd_scanner: Scanner,
                                             run_tier: Callable[..., TierProcess]) -> None:
    learner = run_tier(learn_settings, "learner")
    before = await asyncio.to_thread(learned, rspamd_scanner)
    uid, _ = await store.deliver()
    await store.maildb.move(ALICE, INBOX, [uid], JUNK)
    await eventually(learned_as(learner, "spam"), within=60, what="the learner to learn spam")
    assert "rspamd learned" in learner.output(), learner.output()
    assert await asyncio.to_thread(learned, rspamd_scanner) == before + 1

    uid, _ = await store.deliver(JUNK)
    await store.maildb.move(ALICE, JUNK, [uid], INBOX)
    await eventually(learned_as(learner, "ham"), within=60, what="the learner to learn ham")
    assert await asyncio.to_thread(learned, rspamd_scanner) == before + 2

    # `tiermail status` sees the learner and what it did (its heartbeat in Redis).
    async def learner_reports_both() -> bool:
        client = aioredis.from_url(learn_settings.redis_url)
        try:
            beats = await read_heartbeats(client, learn_settings.redis_prefix)
        finally:
            await client.aclose()
        return any(beat["tier"] == "learner" and beat.get("spam_learned") == 1
                   and beat.get("ham_learned") == 1 for beat in beats)

    await eventually(learner_reports_both, within=30, what="the learner's heartbeat")


@contextlib.contextmanager
def recording_controller() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """An HTTP server standing in for rspamd's controller: its URL, and each request it was
    sent ("POST /learnspam", body), answered 200."""
    requests: list[tuple[str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            requests.append((f"{self.command} {self.path}", body))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_rspamd_is_sent_the_class_of_the_move_and_the_stored_bytes(
        learn_settings: Settings, store: Store) -> None:
    """What rspamd's controller receives: /learnspam for a move into Junk, /learnham for
    one out of it, with the message exactly as stored, CRLF line ends and all (the bytes
    rspamd scanned at delivery). The learner's counters and log lines name the class the
    job asked for, not the URL posted to: a swapped class would show only here."""
    moved: list[str] = []

    def remember(event: ChangeEvent) -> None:
        if event.kind == "move":
            moved.extend(event.guids)

    store.maildb.add_listener(remember)
    with recording_controller() as (url, requests):
        learning = Learning(learn_settings, RspamdController(url, "pw"))
        learning.declare()
        worker = learning.worker(threads=1)
        worker.start()
        try:
            uid, body = await store.deliver()
            assert b"\r\n" in body
            await store.maildb.move(ALICE, INBOX, [uid], JUNK)
            await eventually(lambda: len(requests) == 1, within=60, what="the spam request")
            [uid] = await store.maildb.uids(ALICE, JUNK)
            await store.maildb.move(ALICE, JUNK, [uid], INBOX)
            await eventually(lambda: len(requests) == 2, within=60, what="the ham request")
        finally:
            await asyncio.to_thread(worker.stop, 10_000)
            learning.close()
    with store.maildb.open_message(ALICE, moved[-1]) as file:
        stored = file.read()
    assert stored == body
    assert requests == [("POST /learnspam", stored), ("POST /learnham", stored)]


@contextlib.contextmanager
def refusing_publishes(vhost: str, queue: str, policy: str) -> Iterator[None]:
    """`queue` takes nothing: the broker nacks every publish to it (a policy, as an
    operator's max-length would)."""
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", policy,
                f"^{re.escape(queue)}$", '{"max-length": 0, "overflow": "reject-publish"}')
    try:
        wait_until(lambda: policy in rabbitmqctl("list_queues", "-p", vhost, "name", "policy"),
                   timeout=30, what="the policy")
        yield
    finally:
        rabbitmqctl("clear_policy", "-p", vhost, policy)


@contextlib.contextmanager
def learn_queue_refusing(settings: Settings, vhost: str) -> Iterator[None]:
    """The learn queue, declared, refusing every publish."""
    learning = Learning(settings)
    try:
        learning.declare()
    finally:
        learning.close()
    with refusing_publishes(vhost, learn_queue(settings), f"{settings.queue_prefix}-refuse-learn"):
        yield


async def test_a_publish_the_broker_refuses_is_not_waited_for_nor_said_queued(
        learn_settings: Settings, store: Store, amqp_vhost: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The broker refuses the learn job (the queue is full and rejects publishes): the
    move is not learned, and the log says so. Taking that for a broker out of reach would
    retry it for ever and hold up every later learn in the store; and a publish not
    confirmed would have said "learn job queued" for a job the broker dropped."""
    caplog.set_level(logging.INFO, logger="services.store.learning")
    with learn_queue_refusing(learn_settings, amqp_vhost):
        first, _ = await store.deliver()
        second, _ = await store.deliver()
        await store.maildb.move(ALICE, INBOX, [first, second], JUNK)
        await store.hook.close(grace=30)
    lines = [r.getMessage() for r in caplog.records]
    # Not dramatiq's name for it (ConnectionClosed), which reads as a broker out of reach.
    assert [line for line in lines if line.startswith("not learned: the broker refused the "
                                                      "job (NackError: ")], lines
    assert not [line for line in lines if "ConnectionClosed" in line], lines
    assert "not learned: 1 more messages of the same move (the broker failed)" in lines, lines
    assert not [line for line in lines if "learn jobs wait for the broker" in line], lines
    assert not [line for line in lines if "learn job queued" in line], lines


async def test_a_job_for_a_learn_queue_deleted_meanwhile_still_arrives(
        learn_settings: Settings, store: Store, amqp_vhost: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """An operator deletes the learn queue while the store runs (a cleanup, a broker reset):
    the next job is returned to the store as unroutable, which declares the queue again and
    publishes the job into it. Otherwise the broker drops it, and the store still says
    "learn job queued"."""
    caplog.set_level(logging.INFO, logger="services.store.learning")
    queue = learn_queue(learn_settings)
    uid, _ = await store.deliver()
    await store.maildb.move(ALICE, INBOX, [uid], JUNK)
    await eventually(lambda: "learn job queued" in caplog.text, within=60,
                     what="the first job published")
    rabbitmqctl("delete_queue", "-p", amqp_vhost, queue)
    uid, _ = await store.deliver()
    await store.maildb.move(ALICE, INBOX, [uid], JUNK)
    await store.hook.close(grace=30)
    assert caplog.text.count("learn job queued") == 2, caplog.text
    assert await _depth_is(learn_settings, queue, 1)


async def test_a_dead_job_the_learn_queue_refuses_stays_dead_lettered(
        settings: Settings, amqp_vhost: str) -> None:
    """`--retry-dead` while the broker refuses the learn queue's publishes: it fails, and
    the job is still in the dead-letter queue, not taken off it and lost."""
    await dead_letter(settings, "9" * 32, b"Subject: x\r\n\r\nbody\r\n")
    learning = Learning(settings)
    try:
        with learn_queue_refusing(settings, amqp_vhost), \
                pytest.raises(dramatiq.errors.ConnectionClosed) as refused:
            await asyncio.to_thread(learning.requeue_dead)
    finally:
        learning.close()
    assert isinstance(refused.value.message, pika.exceptions.NackError), refused.value
    await eventually(lambda: _depth_is(settings, settings.topology.learn_dead_queue, 1),
                     within=30, what="the job back in the dead-letter queue")
    assert await _depth_is(settings, learn_queue(settings), 0)


async def test_junk_to_trash_teaches_nothing(learn_settings: Settings, store: Store) -> None:
    junk_uid, _ = await store.deliver(JUNK)
    await store.maildb.move(ALICE, JUNK, [junk_uid], TRASH)
    inbox_uid, _ = await store.deliver()
    await store.maildb.copy(ALICE, INBOX, [inbox_uid], JUNK)  # the control: one job
    await store.hook.close()  # every scheduled job has been published (or dropped)
    depth = await asyncio.to_thread(queue_depth, learn_settings, learn_queue(learn_settings))
    assert depth == 1


async def test_an_append_into_junk_teaches_spam(learn_settings: Settings, store: Store) -> None:
    """A client moving mail into Junk from another account (Thunderbird across accounts, a
    sync tool uploading a local Junk folder) APPENDs it: spam, as a COPY would be. An APPEND
    elsewhere says nothing about spam (and nothing can be ham: it came from no Junk)."""
    await store.maildb.create_mailbox(ALICE, f"{JUNK}/Old")
    body = b"Subject: from elsewhere\r\n\r\nwords\r\n"
    for mailbox in (JUNK, f"{JUNK}/Old", INBOX, TRASH):
        await store.maildb.append(ALICE, mailbox, body, frozenset())
    await store.hook.close()
    depth = await asyncio.to_thread(queue_depth, learn_settings, learn_queue(learn_settings))
    assert depth == 2


async def test_a_move_of_thousands_into_junk_queues_a_job_for_each(
        learn_settings: Settings, store: Store) -> None:
    """One MOVE of 1500 messages (a user cleaning up a folder): the hook took 1000 GUIDs at
    once and dropped the rest with a warning each, while publishing them one broker
    connection each (7 ms a message)."""
    count = 1500
    body = b"Subject: bulk\r\n\r\nwords\r\n"
    await store.maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time(), INBOX)
                                for _ in range(count)])
    await store.maildb.move(ALICE, INBOX, await store.maildb.uids(ALICE, INBOX), JUNK)
    await store.hook.close(grace=300)
    depth = await asyncio.to_thread(queue_depth, learn_settings, learn_queue(learn_settings))
    assert depth == count


async def test_a_move_while_the_broker_is_down_is_queued_once_it_is_back(
        learn_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ restarting (or out of reach) while a user moves mail into Junk: the MOVE
    goes through at once and its learn job waits in the store until the broker is back.
    The store gave the job up at the first failed publish, so a broker restart of a few
    seconds lost the training of every move made meanwhile."""
    proxy = TcpProxy(5672)
    proxy.cut()
    maildb = MailDB.for_store(learn_settings.store_dir,
                              inline_max=learn_settings.store_inline_max)
    learning = Learning(broker_at(learn_settings, proxy.port))
    hook = LearningHook(maildb, learning.publish, learning.close, learning.release_connection)
    maildb.add_listener(hook.on_change)
    try:
        store = Store(maildb, hook)
        uid, _ = await store.deliver()
        caplog.set_level(logging.WARNING, logger="services.store.learning")
        await maildb.move(ALICE, INBOX, [uid], JUNK)  # returns without the broker
        await eventually(lambda: caplog.records, within=60, what="a publish to fail")
        proxy.start()
        await hook.close(grace=120)
    finally:
        await hook.close()
        await maildb.close()
        proxy.cut()
    depth = await asyncio.to_thread(queue_depth, learn_settings, learn_queue(learn_settings))
    assert depth == 1, caplog.text


def test_the_controller_wants_the_password(rspamd_scanner: Scanner) -> None:
    body = b"Subject: x\r\n\r\n" + " ".join(secrets.token_hex(5) for _ in range(40)).encode()
    assert controller_learn(rspamd_scanner, "spam", body, password="").status_code == 401
    assert controller_learn(rspamd_scanner, "spam", body, password="q1").status_code == 401


def test_no_broker_connection_is_left_idle(learn_settings: Settings) -> None:
    """pika's blocking connections answer heartbeats only while their thread uses them: one
    left open in a thread that enqueues now and then is closed by RabbitMQ a minute later
    ("missed heartbeats from client") and pika logs errors about it. Declaring and sending
    close theirs; the job still arrives."""
    learning = Learning(learn_settings)
    try:
        learning.declare()
        assert not learning.broker.connections
        learning.send("spam", ALICE, "0" * 32, b"Subject: x\r\n\r\nbody\r\n", 1)
        assert not learning.broker.connections
        assert queue_depth(learn_settings, learning.queue_name) == 1
    finally:
        learning.close()


def test_a_retried_learn_logs_no_message_and_no_traceback(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """rspamd unreachable: the job is retried, and the log says so in one line naming the
    message. dramatiq logged each attempt at ERROR with a traceback and the job's arguments,
    the whole message in base64 (a user's mail in the log, megabytes a line, ten times)."""
    secret = secrets.token_hex(16)
    body = f"Subject: private\r\n\r\n{secret}\r\n".encode()
    encoded = base64.b64encode(body).decode("ascii")
    learning = Learning(settings, RspamdController(f"http://127.0.0.1:{free_port()}", "pw"))
    learning.declare()
    learning.send("spam", ALICE, "f" * 32, body, 1)
    caplog.set_level(logging.INFO)
    worker = learning.worker(threads=1)
    worker.start()
    try:
        wait_until(lambda: any(r.getMessage().startswith("Retrying message")
                               for r in caplog.records), timeout=60,
                   what="dramatiq to schedule the retry")
    finally:
        worker.stop(timeout=10_000)
        learning.close()
    assert learning.stats() == {"learn_retries": 1}
    text = caplog.text
    assert encoded[:40] not in text and secret not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    [line] = [r for r in caplog.records if r.name == "services.store.learning"]
    assert line.levelno == logging.WARNING and "f" * 32 in line.getMessage()



async def test_a_broker_lost_as_a_job_ends_logs_no_message(
        learn_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ restarting while rspamd learns a job: dramatiq cannot acknowledge it and
    says so in a WARNING line that printed the job with its arguments: the user's whole mail
    in base64, megabytes on one line. The line now names the job and its message only."""
    secret = secrets.token_hex(16)
    body = f"Subject: private\r\n\r\n{secret}\r\n".encode()
    guid = "d" * 32
    proxy = TcpProxy(5672)
    controller = socket.create_server(("127.0.0.1", 0))  # an rspamd that answers when told
    controller.settimeout(60)
    learning = Learning(broker_at(learn_settings, proxy.port), RspamdController(
        f"http://127.0.0.1:{controller.getsockname()[1]}", "pw"))
    learning.declare()
    learning.send(SPAM, ALICE, guid, body, 1)
    caplog.set_level(logging.INFO)
    worker = learning.worker(threads=1)
    worker.start()
    try:
        connection, _ = await asyncio.to_thread(controller.accept)  # the job is under way
        proxy.cut()
        # The consumer of the job's queue, not only the delay queue's: until it has seen the
        # broker go, an ack is queued on the dead connection without a word (CI saw that).
        job_consumer = f"dramatiq.worker.ConsumerThread({learning.queue_name})"
        await eventually(lambda: any(
            record.name == job_consumer and "connection error" in record.getMessage()
            for record in caplog.records), within=60, what="the learner to lose the broker")
        await asyncio.to_thread(connection.recv, 65536)
        connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}')
        connection.close()
        await eventually(lambda: "post_process_message" in caplog.text, within=60,
                         what="dramatiq to fail to acknowledge the job")
    finally:
        controller.close()
        await asyncio.to_thread(worker.stop, 10_000)
        learning.close()
    [line] = [r.getMessage() for r in caplog.records if "post_process_message" in r.getMessage()]
    assert guid in line, line
    text = caplog.text
    assert base64.b64encode(body).decode("ascii")[:40] not in text and secret not in text


async def test_a_learner_holds_few_retried_jobs_in_memory(settings: Settings) -> None:
    """rspamd down: every job waits for its retry in the learn queue's delay queue, and a
    learner keeps those it took in memory until they are due. dramatiq takes up to 1000 a
    worker thread: a user moving a folder of large mails into Junk meanwhile (each job up to
    13 MB of base64) put gigabytes into the learner, which the kernel ends, over and over.
    `tiermail status` shows the rest waiting (it showed an empty learn queue)."""
    jobs = DELAY_PREFETCH + 10
    learning = Learning(settings, RspamdController(f"http://127.0.0.1:{free_port()}", "pw"))
    learning.declare()
    for number in range(jobs):  # first retry in ten minutes: none is due during the test
        learning.actor.send_with_options(
            args=(SPAM, ALICE, f"{number:032x}", base64.b64encode(b"%d" % number).decode(), 1),
            min_backoff=600_000, max_backoff=600_000)
    learning.release_connection()
    worker = learning.worker()
    worker.start()
    try:
        waiting = dq_name(learning.queue_name)
        await eventually(lambda: _depth_is(settings, waiting, jobs - DELAY_PREFETCH), within=60,
                         what="the jobs beyond the learner's share left waiting")
        assert learning.stats()["learn_retries"] == jobs
        shown = format_status(await collect_status(settings))
        assert f"{waiting}: {jobs - DELAY_PREFETCH} messages, 1 consumer" in shown, shown
    finally:
        await asyncio.to_thread(worker.stop, 10_000)
        learning.close()


def test_a_job_whose_retry_the_broker_refuses_is_dead_lettered(
        settings: Settings, amqp_vhost: str, caplog: pytest.LogCaptureFixture) -> None:
    """The broker refuses the retry's publish (here a policy: the delay queue takes nothing):
    dramatiq logged "Unexpected failure in after_process_message" (CRITICAL, a traceback)
    and acknowledged the job, gone at once. Now it waits in the dead-letter queue, and one
    WARNING line says so."""
    guid = "7" * 32
    learning = Learning(settings, RspamdController(f"http://127.0.0.1:{free_port()}", "pw"))
    learning.declare()
    caplog.set_level(logging.INFO)
    worker = learning.worker(threads=1)
    with refusing_publishes(amqp_vhost, settings.topology.learn_retry_queue,
                            f"{settings.queue_prefix}-refuse-retries"):
        try:
            learning.send(SPAM, ALICE, guid, b"Subject: x\r\n\r\nbody\r\n", 1)
            worker.start()
            wait_until(lambda: queue_depth(settings, settings.topology.learn_dead_queue) == 1,
                       timeout=30, what="the job in the learn dead-letter queue")
        finally:
            worker.stop(timeout=10_000)
            learning.close()
    [line] = [r for r in caplog.records if "its retry could not be scheduled" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert (line.user, line.queue_id) == (ALICE, guid)  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert learning.stats() == {"learn_retries": 1, "learn_unscheduled": 1}


async def dead_letter(settings: Settings, guid: str, body: bytes,
                      max_retries: int = 0) -> dict[str, int]:
    """A learn job that ran out of retries: sent with `max_retries` allowed (none unless
    told), to a controller that is not there. The learner's counts."""
    learning = Learning(settings, RspamdController(f"http://127.0.0.1:{free_port()}", "pw"),
                        max_retries=max_retries)
    learning.declare()
    learning.send("spam", ALICE, guid, body, 1)
    worker = learning.worker(threads=1)
    worker.start()
    try:
        await eventually(lambda: _depth_is(settings, settings.topology.learn_dead_queue, 1),
                         within=60, what="the job in the learn dead-letter queue")
    finally:
        worker.stop(timeout=10_000)
        learning.close()
    return learning.stats()


async def test_learn_jobs_that_ran_out_of_retries_are_a_problem_in_status(
        settings: Settings) -> None:
    """rspamd's controller out of reach for longer than the retries last: the job lands in
    dramatiq's dead-letter queue (`<learn queue>.XQ`, where it expires after a week). Nothing
    said so: `tiermail status` counted the learn queue only and stayed healthy."""
    await dead_letter(settings, "e" * 32, b"Subject: x\r\n\r\nbody\r\n")
    dead_queue = settings.topology.learn_dead_queue
    report = await collect_status(settings)
    assert not report["healthy"]
    assert [p for p in report["problems"] if dead_queue in p and p.startswith("1 ")]
    assert f"{dead_queue}: 1 message," in format_status(report)


async def test_a_job_out_of_retries_says_so_naming_its_message(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """The last try's line said "retried later", and dramatiq's own ("Retries exceeded for
    message <its id>") named neither the message nor the user: an operator looking for why
    a user's move taught nothing found no trace of it giving up."""
    caplog.set_level(logging.INFO)
    guid = "b" * 32
    stats = await dead_letter(settings, guid, b"Subject: x\r\n\r\nbody\r\n")
    assert stats == {"learn_retries": 1, "learn_dead": 1}  # `tiermail status` counts it
    [line] = [r for r in caplog.records if "out of retries" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert (line.user, line.queue_id) == (ALICE, guid)  # type: ignore[attr-defined]
    assert guid in line.getMessage() and "--retry-dead" in line.getMessage()
    assert settings.topology.learn_dead_queue in line.getMessage()


async def test_dead_learn_jobs_are_retried_once_rspamd_is_back(
        learn_settings: Settings, store: Store, rspamd_scanner: Scanner,
        run_tier: Callable[..., TierProcess]) -> None:
    """`tiermail learner --retry-dead` puts them back with no retries counted (dramatiq
    would otherwise give up on them at the first failure) and a learner learns them; there
    was no way back but a week's wait for them to expire."""
    _, body = await store.deliver()
    await dead_letter(learn_settings, "c" * 32, body)
    moved = await asyncio.to_thread(run_cli, learn_settings, "learner", "--retry-dead")
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == f"1 learn job moved back to {learn_queue(learn_settings)}\n"
    assert await _depth_is(learn_settings, learn_settings.topology.learn_dead_queue, 0)
    before = await asyncio.to_thread(learned, rspamd_scanner)
    learner = run_tier(learn_settings, "learner")
    await eventually(learned_as(learner, "spam"), within=60, what="the retried job learned")
    assert f"rspamd learned {'c' * 32} as spam" in learner.output(), learner.output()
    assert await asyncio.to_thread(learned, rspamd_scanner) == before + 1


def take_learn_job(learning: Learning) -> dramatiq.Message[object]:
    """The next job waiting in the learn queue, taken off it."""
    try:
        method, _, body = learning.broker.channel.basic_get(learning.queue_name, auto_ack=True)
    finally:
        learning.release_connection()
    assert method is not None, "no job in the learn queue"
    return dramatiq.Message.decode(body)


async def test_a_dead_job_put_back_starts_its_retries_afresh(settings: Settings) -> None:
    """`--retry-dead` puts a job back with no retries counted: one that had used up its 16
    would otherwise go straight back to the dead-letter queue at its first failure."""
    guid = "a" * 32
    await dead_letter(settings, guid, b"Subject: x\r\n\r\nbody\r\n", max_retries=1)
    learning = Learning(settings)
    try:
        assert await asyncio.to_thread(learning.requeue_dead) == 1
        job = await asyncio.to_thread(take_learn_job, learning)
    finally:
        learning.close()
    assert job.args[2] == guid
    assert "retries" not in job.options, job.options


async def _depth_is(settings: Settings, queue: str, depth: int) -> bool:
    return await asyncio.to_thread(queue_depth, settings, queue) == depth


def unseen_message() -> bytes:
    words = " ".join(secrets.token_hex(5) for _ in range(40))
    return (f"From: someone@remote.test\r\nTo: {ALICE}\r\n"
            f"Message-ID: <{secrets.token_hex(10)}@remote.test>\r\n"
            f"Subject: offer {secrets.token_hex(4)}\r\n\r\n{words}\r\n").encode()


def imap_session(settings: Settings) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", settings.imap_port, timeout=30)
    client.login(ALICE, "secret pw")
    return client


def moves_of_every_kind(client: imaplib.IMAP4) -> None:
    """What clients do, on the wire: MOVE, UID MOVE, COPY + STORE \\Deleted + EXPUNGE,
    APPEND into Junk; and Junk -> Trash, which teaches nothing. 4 spam (two APPENDs into
    Junk, a MOVE, a COPY), 1 ham."""
    def appended(mailbox: str) -> bytes:
        typ, data = client.append(mailbox, "", None, unseen_message())
        assert typ == "OK", data
        return re.findall(rb"APPENDUID \d+ (\d+)", data[0])[0]

    assert client.create(f"{JUNK}/Old")[0] == "OK"
    client.select(JUNK)
    assert client.uid("MOVE", appended(JUNK).decode(), TRASH)[0] == "OK"  # spam, nothing
    client.select(INBOX)
    first, second = appended(INBOX).decode(), appended(INBOX).decode()
    assert client.uid("MOVE", first, JUNK)[0] == "OK"  # spam
    assert client.uid("COPY", second, f"{JUNK}/Old")[0] == "OK"  # spam
    assert client.uid("STORE", second, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    assert client.expunge()[0] == "OK"
    appended(JUNK)  # spam
    client.select(f"{JUNK}/Old")
    assert client.uid("MOVE", "1:*", INBOX)[0] == "OK"  # ham


def run_store_for_alice(settings: Settings, run_tier: Callable[..., TierProcess]
                        ) -> TierProcess:
    """A real store process serving IMAP, with ALICE's account (password "secret pw")."""
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.add_domain("example.test")
    accounts.add_user(ALICE, hash_password("secret pw"))
    accounts.close()
    store = run_tier(settings, "store")
    store.wait_for_port(settings.imap_port)
    return store


async def test_every_client_move_through_the_real_store_teaches_rspamd(
        learn_settings: Settings, rspamd_scanner: Scanner,
        run_tier: Callable[..., TierProcess]) -> None:
    settings = learn_settings.replace(spam="rspamd", rspamd_url=rspamd_scanner.address)
    store = run_store_for_alice(settings, run_tier)
    learner = run_tier(settings, "learner")
    before = await asyncio.to_thread(learned, rspamd_scanner)
    client = await asyncio.to_thread(imap_session, settings)
    try:
        await asyncio.to_thread(moves_of_every_kind, client)
    finally:
        await asyncio.to_thread(client.logout)
    await eventually(lambda: learner.output().count("rspamd learned") == 5, within=120,
                     what="five learn jobs done")
    assert store.output().count("learn job queued") == 5, store.output()
    assert learner.output().count(" as spam (") == 4, learner.output()
    assert learner.output().count(" as ham (") == 1, learner.output()
    assert await asyncio.to_thread(learned, rspamd_scanner) == before + 5


async def test_a_learner_killed_mid_job_leaves_the_job_to_the_next(
        learn_settings: Settings, store: Store, rspamd_scanner: Scanner,
        run_tier: Callable[..., TierProcess]) -> None:
    """dramatiq acknowledges a job after the actor returns: a learner SIGKILLed while rspamd
    is still answering loses nothing, the broker hands the job to the next learner."""
    listener = socket.create_server(("127.0.0.1", 0))
    stalled = learn_settings.replace(
        rspamd_controller_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        first = run_tier(stalled, "learner")
        uid, _ = await store.deliver()
        await store.maildb.move(ALICE, INBOX, [uid], JUNK)
        listener.settimeout(60)
        connection, _ = await asyncio.to_thread(listener.accept)  # the job is under way
        first.kill(signal.SIGKILL)
        connection.close()
    finally:
        listener.close()
    before = await asyncio.to_thread(learned, rspamd_scanner)
    second = run_tier(learn_settings, "learner")
    await eventually(learned_as(second, "spam"), within=60, what="the next learner's try")
    assert "rspamd learned" in second.output(), second.output()
    assert await asyncio.to_thread(learned, rspamd_scanner) == before + 1


def test_a_learner_started_before_the_broker_waits_for_it(
        learn_settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Like the other tiers, a learner that cannot reach RabbitMQ at start waits for it (a
    compose stack starting, a broker restarting). It exited with pika's tracebacks instead,
    and `tiermail up` restarted it every 2 s."""
    proxy = TcpProxy(5672)
    proxy.cut()
    learner = run_tier(broker_at(learn_settings, proxy.port), "learner")
    wait_until(lambda: "the broker is unreachable" in learner.output() or not learner.alive,
               timeout=60, what="the learner to try the broker")
    assert learner.alive, learner.output()
    proxy.start()
    wait_until(lambda: "learner running" in learner.output(), timeout=60,
               what="the learner to reach the broker")
    assert "Traceback" not in learner.output()


def test_retry_dead_without_a_broker_says_so_in_one_line(learn_settings: Settings) -> None:
    done = run_cli(broker_at(learn_settings, free_port(), log_level="INFO"), "learner",
                   "--retry-dead")
    assert done.returncode == 1
    assert done.stderr.startswith("tiermail: RabbitMQ could not be used: "), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
