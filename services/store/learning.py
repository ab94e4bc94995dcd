"""Spam learning: moving mail into Junk teaches rspamd spam, out of Junk teaches ham.

Two halves joined by a RabbitMQ queue (`<queue_prefix>.learn`, dramatiq):

- LearningHook, in the store: a MailDB listener. For a copy or move into Junk (the mailbox
  with the \\Junk special-use attribute, or a child of it) it enqueues "spam" for every new
  copy, and so for an APPEND into Junk (a move from another account or a local folder);
  out of Junk into anything but Trash (\\Trash or a child) "ham"; Junk -> Trash and
  moves within Junk nothing. A rename of a folder into or out of Junk teaches nothing: it
  is housekeeping (old spam filed under Archive/ would otherwise teach a thousand hams).
  It sees every change whoever made it (IMAP, webmail, a filter rule). The listener only
  schedules work: reading the message and the blocking pika publish run in a thread of the
  hook's own, so an IMAP MOVE never waits for the broker. A broker out of reach is waited
  for (the jobs are published once it is back), and so is one that takes the connection and
  then says nothing (each attempt is given up within broker_attempt_limit(), 30 s), and one
  that blocks its publishers (a disk or memory alarm: the publish is confirmed once the
  alarm clears; giving the blocked connection up and publishing again would queue the job
  again each time, on a broker out of disk). The thread is a daemon, so a store stopping
  during an alarm is not held up by it. Other failures are logged and the move stands;
  learning is best-effort.
- The learn actor, in `tiermail learner` (a dramatiq Worker in-process, possibly on another
  machine): POSTs the message to rspamd's controller /learnspam or /learnham with the
  controller password. "Already learned" (HTTP 208) and "nothing to learn" (204: too few
  tokens) are done; rspamd unreachable, 5xx or a refused password are retried with
  exponential backoff (MAX_RETRIES, then dramatiq's dead-letter queue `<queue>.XQ`, where a
  job whose retry the broker did not take goes too: _KeptRetries); other 4xx answers are
  logged and dropped.

The job carries the message bytes (base64, at most MAX_LEARN_SIZE; larger ones are skipped
with a log line, as rspamd's Bayes gains nothing from them): the worker needs no access to the
store's disk, and the job still means the same message if the user deletes it meanwhile.

The user's last decision wins. Jobs for one message can run out of order (two worker threads
or learners, a job retried with backoff while a later one succeeds), and rspamd relearns a
message as whatever class it is told last: moved into Junk and straight back out could end
learned as spam. So each job carries when the store decided (`decided_us`, microseconds of
the store's clock, strictly increasing within one store process), and the learner keeps, in
Redis, per user and message, the newest decision applied (LearnLedger). The message is
identified by the SHA-256 of the bytes the job carries, not by its GUID: rspamd knows a
message by its content, and a COPY or APPEND gives the same bytes a new GUID, so "spam" for
one copy and "ham" for another are two decisions about one message. Before posting, a Lua
script takes the message's turn: a job older than the decision applied or than the one in
flight is superseded (logged, counted `learn_superseded`, done: not retried, not
dead-lettered); a job while an older one is in flight waits (retried with the usual
backoff), so two requests for one message never race at rspamd; otherwise it goes. After
rspamd answered, a second script records the decision as applied (only ever raising it)
and ends the turn. A newer job retried after an older one applied still applies. The applied
record expires after APPLIED_TTL_S (2 h: a job's retries end 43 to 87 minutes after its
first try), the in-flight mark after RUNNING_TTL_MS (a job's time limit and a margin; the
same job redelivered after its learner died takes its mark over at once). Jobs queued by
a store from before this carry no decision time: they count as older than any that does.
Redis unreachable in the learner: the job is learned anyway (as before there was any
ordering; counted `learn_order_unchecked`): learning is best-effort, and an order that is
occasionally wrong beats no learning at all. `tiermail learner --retry-dead` long after
the applied record expired can still apply a superseded decision.

dramatiq normally binds actors to a global broker at import time (`dramatiq.set_broker`,
`@dramatiq.actor`). STYLE.md 11 asks for dependencies passed in, so `Learning` builds the
broker from settings and declares the actor on that broker explicitly (`broker=`): two stacks
in one process (the tests) each get their own, and importing this module connects nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import enum
import hashlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dramatiq
import httpx
import pika
import pika.exceptions
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import xq_name
from dramatiq.middleware import Retries, default_middleware
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)

from common.health import Heartbeat
from common.redisconn import REDIS_TIMEOUT, check_redis_url, open_redis
from common.settings import Settings
from services.store.daemonthread import DaemonThread
from services.store.mailbox import (
    HIERARCHY_DELIMITER,
    JUNK,
    TRASH,
    ChangeEvent,
    MailboxInfo,
    MailStore,
    NoSuchMessage,
    NoSuchUser,
    StorageError,
)

log = logging.getLogger(__name__)

SPAM, HAM = "spam", "ham"
ACTOR_NAME = "tiermail_learn"
MAX_LEARN_SIZE = 10 * 1024 * 1024  # octets; larger messages are not learned
MAX_RETRIES = 16  # backoff from 1 s doubling up to 10 min, jittered: 43 to 87 min in all
MIN_BACKOFF_MS = 1_000
MAX_BACKOFF_MS = 600_000
TIME_LIMIT_MS = 120_000  # one learn request, retries apart
CONTROLLER_TIMEOUT = 60.0  # seconds; rspamd tokenises the whole message before answering
# Messages of moves waiting for their jobs to be published, in the store; more are dropped
# (logged). Only their GUIDs wait: each message is read when its job is published.
MAX_PENDING = 100_000
WORKER_THREADS = 2
# Retried jobs a learner holds in memory until they are due (dramatiq takes 1000 a thread
# from the delay queue: up to MAX_LEARN_SIZE each, as base64, gigabytes while rspamd is down).
# The rest wait in the broker.
DELAY_PREFETCH = 20
APPLIED_TTL_S = 2 * 3600  # retries end 43 to 87 min after a job's first try; then margin
RUNNING_TTL_MS = TIME_LIMIT_MS + 30_000  # dramatiq stops an attempt after TIME_LIMIT_MS
LEARNED_CHANGES = frozenset({"copy", "move", "append"})  # ChangeEvent kinds that may teach


def learn_queue(settings: Settings) -> str:
    return settings.topology.learn_queue


# Which moves teach what (pure; tests/unit/store/test_learning.py).

def within(name: str, roots: Sequence[str]) -> bool:
    """`name` is one of `roots` or a mailbox below one of them."""
    return any(name == root or name.startswith(root + HIERARCHY_DELIMITER) for root in roots)


def special_roots(mailboxes: Sequence[MailboxInfo], attribute: str, fallback: str) -> list[str]:
    """The mailboxes carrying a special-use attribute; the standard name if none does."""
    return [m.name for m in mailboxes if m.special_use == attribute] or [fallback]


def learn_kind(source: str | None, dest: str, junk: Sequence[str],
               trash: Sequence[str]) -> str | None:
    """"spam", "ham" or None for a copy or move from `source` to `dest`; `source` None for
    an APPEND (from outside the account: never from Junk)."""
    from_junk = source is not None and within(source, junk)
    into_junk = within(dest, junk)
    if into_junk and not from_junk:
        return SPAM
    if from_junk and not into_junk and not within(dest, trash):
        return HAM
    return None


# The worker side: rspamd's controller.

class LearnOutcome(enum.Enum):
    LEARNED = "learned"
    ALREADY = "already learned"
    NOTHING = "nothing to learn"  # rspamd found too few tokens (HTTP 204)
    REFUSED = "refused"  # a 4xx that retrying will not change


class BrokerUnreachable(Exception):
    """A learn job could not be published because RabbitMQ could not be reached (down,
    restarting, a network between): worth publishing again later, unlike a publish the broker
    itself refused."""


class PublishRefused(dramatiq.errors.BrokerError):
    """The broker refused the learn job (a channel error, a nack: a queue full and rejecting
    publishes): publishing it again would not help."""


class LearnError(dramatiq.Retry):
    """A temporary failure: the job is retried (with the actor's backoff).

    A dramatiq.Retry, because dramatiq logs any other exception from an actor at ERROR with
    a traceback and the message's arguments: the whole mail in base64, once per attempt. The
    actor logs one line of its own instead."""


class RspamdController:
    """POST /learnspam and /learnham (rspamd's controller worker), synchronously: dramatiq
    runs actors in worker threads."""

    def __init__(self, url: str, password: str, timeout: float = CONTROLLER_TIMEOUT) -> None:
        self._url = url.rstrip("/")
        self._password = password
        self._timeout = timeout

    def learn(self, kind: str, message: bytes) -> tuple[LearnOutcome, str]:
        headers = {"Password": self._password} if self._password else {}
        try:
            response = httpx.post(f"{self._url}/learn{kind}", content=message, headers=headers,
                                  timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise LearnError(f"rspamd controller unreachable: {type(exc).__name__}: {exc}") \
                from exc
        return outcome(response.status_code, response.text)


def outcome(status: int, text: str) -> tuple[LearnOutcome, str]:
    """rspamd's answer to a learn request: its outcome, or LearnError to retry."""
    detail = text.strip()[:200]
    if status == 200:
        return LearnOutcome.LEARNED, detail
    if status == 208:  # the learn cache: this message was learned as this class before
        return LearnOutcome.ALREADY, detail
    if status == 204:
        return LearnOutcome.NOTHING, detail
    if status in (401, 403):
        # A wrong controller password is an operator's mistake that gets fixed: retry.
        raise LearnError(f"rspamd controller refused the password (HTTP {status})")
    if 400 <= status < 500:
        return LearnOutcome.REFUSED, f"HTTP {status}: {detail}"
    raise LearnError(f"rspamd controller answered HTTP {status}: {detail}")


# The last decision wins: the newest applied, per user and message, in Redis.

class Turn(enum.Enum):
    GO = "go"
    SUPERSEDED = "superseded"  # a newer decision for the message was applied or is in flight
    WAIT = "wait"  # another job, of an older or equal decision time, is in flight
    UNCHECKED = "unchecked"  # Redis failed: learn anyway


# KEYS: applied, running. ARGV: decided_us, token, RUNNING_TTL_MS. Stamps are microseconds
# (about 2^51 today), exact in Lua's doubles, which nanoseconds would not be. The token names
# the job, not the attempt: the same job again (redelivered because its learner died
# mid-post) takes over its own in-flight mark instead of waiting for it to expire.
_TAKE_TURN = """
local decided = tonumber(ARGV[1])
local applied = redis.call('GET', KEYS[1])
if applied and tonumber(applied) > decided then return 'superseded' end
local running = redis.call('GET', KEYS[2])
if running and running ~= ARGV[1] .. ' ' .. ARGV[2] then
  if tonumber(string.match(running, '^%S+')) > decided then return 'superseded' end
  return 'wait'
end
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[3])
return 'go'
"""

# KEYS: applied, running. ARGV: decided_us, token, APPLIED_TTL_S, "1" if rspamd answered.
_END_TURN = """
if ARGV[4] == '1' then
  local applied = redis.call('GET', KEYS[1])
  if not applied or tonumber(applied) <= tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] .. ' ' .. ARGV[2] then redis.call('DEL', KEYS[2]) end
return 0
"""


class LearnLedger:
    """Which decision for a message is the newest, shared by every learner (Redis).

    `take_turn` before posting to rspamd, `end_turn` (with the same token) after, whatever
    happened; both are one Lua script each, so two threads or learners cannot both win.
    The token is the same for every attempt of one job (job_token)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._take = client.register_script(_TAKE_TURN)
        self._end = client.register_script(_END_TURN)

    @classmethod
    def from_settings(cls, settings: Settings) -> LearnLedger:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=REDIS_TIMEOUT,
                                      socket_timeout=REDIS_TIMEOUT)
        return cls(client, settings.redis_prefix)

    def keys(self, user: str, message: bytes) -> list[str]:
        digest = hashlib.sha256(message).hexdigest()
        return [f"{self._prefix}learn:applied:{user}:{digest}",
                f"{self._prefix}learn:running:{user}:{digest}"]

    def take_turn(self, keys: list[str], decided_us: int, token: str,
                  context: dict[str, str] | None = None) -> Turn:
        try:
            answer = self._take(keys=keys, args=[decided_us, token, RUNNING_TTL_MS])
        except redis.RedisError as exc:
            log.warning("learn order unchecked, learned anyway: Redis failed: %s: %s",
                        type(exc).__name__, exc, extra=context)
            return Turn.UNCHECKED
        return Turn(answer.decode() if isinstance(answer, bytes) else answer)

    def end_turn(self, keys: list[str], decided_us: int, token: str, applied: bool,
                 context: dict[str, str] | None = None) -> None:
        try:
            self._end(keys=keys, args=[decided_us, token, APPLIED_TTL_S, "1" if applied else "0"])
        except redis.RedisError as exc:  # the in-flight mark expires by itself
            log.warning("learn order not recorded, Redis failed: %s: %s",
                        type(exc).__name__, exc, extra=context)

    def close(self) -> None:
        self._client.close()


def job_token(kind: str, guid: str) -> str:
    """Names a learn job in the ledger, with its decision time: two jobs for one message
    with the same kind, GUID and time are the same decision (published twice at most)."""
    return f"{kind}:{guid}"


class DecisionClock:
    """When the store decided, in microseconds: the wall clock, but strictly increasing, so
    two moves of one message in the same microsecond (or across a clock step back) keep
    their order within a store process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        with self._lock:
            self._last = max(time.time_ns() // 1000, self._last + 1)
            return self._last


class Learning:
    """The learn job: a RabbitMQ broker built from settings and the actor declared on it.

    The store uses `send`; `tiermail learner` runs `worker()`. The controller and the ledger
    are only used by a worker (the store builds ones it never calls; neither connects until
    used)."""

    def __init__(self, settings: Settings, controller: RspamdController | None = None,
                 max_retries: int = MAX_RETRIES, ledger: LearnLedger | None = None) -> None:
        self.queue_name = learn_queue(settings)
        self.broker = _LearnBroker(settings.amqp_url)
        self._controller = controller or RspamdController(
            settings.rspamd_controller_url, settings.rspamd_controller_password)
        self._settings = settings
        self._own_ledger = ledger  # built on first use: only a learner uses it
        # Before (_Kept)Retries in the list, so after it once a job is done: it sees the job
        # failed.
        self.broker.add_middleware(_GivenUp(xq_name(self.queue_name), self._count),
                                   before=Retries)
        declare = dramatiq.actor(
            broker=self.broker, actor_name=ACTOR_NAME, queue_name=self.queue_name,
            max_retries=max_retries, min_backoff=MIN_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS,
            time_limit=TIME_LIMIT_MS)
        self.actor = declare(self._learn)
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        """Outcomes of the learn jobs this process ran, for its heartbeat."""
        with self._counts_lock:
            return dict(self._counts)

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self._counts[outcome] += 1

    def send(self, kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        """Enqueue one learn job (blocking: a publish with a broker confirm)."""
        try:
            self.publish(kind, user, guid, message, decided_us)
        finally:
            self.release_connection()

    def publish(self, kind: str, user: str, guid: str, message: bytes,
                decided_us: int) -> None:
        """`send` keeping this thread's broker connection for the next: a batch of jobs
        calls release_connection once at its end. `decided_us`: when the store decided
        (DecisionClock), which orders the decisions for one message. BrokerUnreachable when
        no connection could be had; pika's own ERROR lines and tracebacks for each of
        dramatiq's connection attempts are kept out of the log."""
        try:
            with _pika_quiet():
                self.actor.send(kind, user, guid, base64.b64encode(message).decode("ascii"),
                                decided_us)
        except dramatiq.errors.ConnectionClosed as exc:
            # dramatiq wraps a refused publish (a channel error) the same way: that one is
            # not retried, or one message the broker will never take would stop the rest,
            # and it is named for what it is in the log.
            if isinstance(exc.message, pika.exceptions.AMQPConnectionError):
                raise BrokerUnreachable(str(exc)) from exc
            raise PublishRefused(f"the broker refused the job ({type(exc.message).__name__}: "
                                 f"{exc.message})") from exc

    def declare(self) -> None:
        """Declare the learn queues from this thread before the worker starts, so its
        consumer threads need no second connection of their own to do it."""
        try:
            with _pika_quiet():
                self.broker.declare_queue(self.queue_name, ensure=True)
        finally:
            self.release_connection()

    def release_connection(self) -> None:
        """Close this thread's broker connection. pika's BlockingConnection answers
        RabbitMQ's heartbeats only while its thread calls into it, so one left idle in a
        thread that enqueues now and then is closed by the broker after a minute ("missed
        heartbeats from client") and pika logs errors about it later. Learn jobs are rare;
        a connection each costs less than that."""
        with contextlib.suppress(Exception):
            del self.broker.connection

    def requeue_dead(self) -> int:
        """Move the dead jobs (`<queue>.XQ`: out of retries, or their retry not scheduled)
        back to the learn queue with their retry count reset, for when rspamd's controller
        works again. Returns how many; each is taken off the dead-letter queue only once the
        broker confirmed its copy."""
        self.declare()
        dead = xq_name(self.queue_name)
        try:
            channel = self.broker.channel
            waiting = channel.queue_declare(dead, passive=True).method.message_count
            moved = 0
            for _ in range(waiting):  # not what failed again meanwhile, if a learner runs
                method, _, body = channel.basic_get(dead)
                if method is None:
                    break
                self.broker.enqueue(fresh_job(dramatiq.Message.decode(body), self.queue_name))
                channel.basic_ack(method.delivery_tag)
                moved += 1
            return moved
        finally:
            self.release_connection()

    def worker(self, threads: int = WORKER_THREADS) -> dramatiq.Worker:
        worker = dramatiq.Worker(self.broker, worker_threads=threads)
        worker.delay_prefetch = DELAY_PREFETCH
        return worker

    @property
    def _ledger(self) -> LearnLedger:
        if self._own_ledger is None:
            self._own_ledger = LearnLedger.from_settings(self._settings)
        return self._own_ledger

    def close(self) -> None:
        self.broker.close()
        if self._own_ledger is not None:
            self._own_ledger.close()

    def _learn(self, kind: str, user: str, guid: str, message_b64: str,
               decided_us: int = 0) -> None:
        """The actor. Raising LearnError makes dramatiq retry the job later. A job from a
        store that sent no `decided_us` counts as older than every one that did."""
        context = {"user": user, "event": f"learn-{kind}", "queue_id": guid}
        if kind not in (SPAM, HAM):
            log.error("learn job with unknown kind %r dropped", kind, extra=context)
            return
        try:
            message = base64.b64decode(message_b64, validate=True)
        except (binascii.Error, ValueError):
            log.error("learn job with undecodable message dropped", extra=context)
            return
        keys, token = self._ledger.keys(user, message), job_token(kind, guid)
        turn = self._ledger.take_turn(keys, decided_us, token, context)
        if turn is Turn.SUPERSEDED:
            self._count("learn_superseded")
            log.info("%s not learned as %s: a newer decision for it came first", guid, kind,
                     extra=context)
            return
        if turn is Turn.WAIT:
            self._count("learn_waits")
            log.info("%s waits for an earlier learn job for the same message", guid,
                     extra=context)
            raise LearnError("an earlier learn job for the same message is under way")
        if turn is Turn.UNCHECKED:
            self._count("learn_order_unchecked")
        answered = False
        try:
            self._post(kind, guid, message, context)
            answered = True
        finally:
            if turn is Turn.GO:
                self._ledger.end_turn(keys, decided_us, token, answered, context)

    def _post(self, kind: str, guid: str, message: bytes, context: dict[str, str]) -> None:
        try:
            result, detail = self._controller.learn(kind, message)
        except LearnError as exc:
            self._count("learn_retries")
            log.warning("%s not learned as %s yet, retried later: %s", guid, kind, exc,
                        extra=context)
            raise
        self._count(f"{kind}_{result.name.lower()}")
        level = logging.WARNING if result is LearnOutcome.REFUSED else logging.INFO
        log.log(level, "rspamd %s %s as %s (%d octets) %s", result.value, guid, kind,
                len(message), detail, extra=context)


class QuietJob(dramatiq.Message[Any]):
    """A learn job that names its message but does not print it. dramatiq puts the job, its
    arguments and so the user's whole mail in base64, into some of its own log lines: a
    broker connection lost as the job ends, an exception other than LearnError."""

    def __str__(self) -> str:
        named = ", ".join(repr(arg) for arg in self.args[:3])  # kind, user, guid
        return f"{self.actor_name}({named}, ...) {self.message_id}"

    def __repr__(self) -> str:
        return str(self)


class _QuietConsumer(dramatiq.broker.Consumer):
    """A consumer handing out its jobs as QuietJob; otherwise the one it wraps."""

    def __init__(self, consumer: dramatiq.broker.Consumer) -> None:
        self._consumer = consumer

    def __next__(self) -> dramatiq.MessageProxy | None:
        job = next(self._consumer)
        if job is not None:
            # What the worker, its middleware and its log lines see of the job.
            job._message = QuietJob(**job._message.asdict())
        return job

    def ack(self, message: dramatiq.MessageProxy) -> None:
        self._consumer.ack(message)

    def nack(self, message: dramatiq.MessageProxy) -> None:
        self._consumer.nack(message)

    def requeue(self, messages: Any) -> None:
        self._consumer.requeue(messages)

    def close(self) -> None:
        self._consumer.close()


class _LearnBroker(RabbitmqBroker):
    """dramatiq's RabbitMQ broker with every wait on a broker that stopped answering bounded
    (BROKER_CONNECT_TIMEOUT, BROKER_HEARTBEAT), its consumers handing out QuietJobs.

    pika gives up a handshake that does not finish in time with an exception that is not
    one of its connection errors, which dramatiq does not expect: it reached the store's
    hook as a refused publish (the rest of the move was not learned) and the learner's
    start as a crash. Here it is a connection error like any other."""

    def __init__(self, url: str) -> None:
        middleware = [_KeptRetries() if kind is Retries else kind()
                      for kind in default_middleware]
        super().__init__(url=url, confirm_delivery=True, middleware=middleware)
        every = self.parameters if isinstance(self.parameters, list) else [self.parameters]
        for parameters in every:
            parameters.socket_timeout = BROKER_CONNECT_TIMEOUT
            parameters.stack_timeout = BROKER_CONNECT_TIMEOUT
            parameters.heartbeat = _bounded_heartbeat(parameters.heartbeat)

    def enqueue(self, message: dramatiq.Message[Any], *,
                delay: int | None = None) -> dramatiq.Message[Any]:
        """The store's learn jobs, and in a learner the retries and the delayed jobs that
        fell due."""
        with self._one_attempt():
            return super().enqueue(message, delay=delay)

    def declare_queue(self, queue_name: str, *, ensure: bool = False) -> None:
        with self._one_attempt():
            super().declare_queue(queue_name, ensure=ensure)

    @contextlib.contextmanager
    def _one_attempt(self) -> Iterator[None]:
        """dramatiq connects again after any failure, up to six times in one enqueue: a
        broker that takes connections and then says nothing cost each of them the whole
        wait. Within this block a new connection is only made in its first
        BROKER_CONNECT_TIMEOUT (one lost at once: a broker restarting), so the block ends
        within broker_attempt_limit() and its caller tries again later, saying so."""
        if getattr(self.state, "reconnect_until", None) is not None:  # enqueue declares
            yield
            return
        self.state.reconnect_until = time.monotonic() + BROKER_CONNECT_TIMEOUT
        try:
            yield
        finally:
            self.state.reconnect_until = None

    def _connection(self) -> pika.BlockingConnection:
        until = getattr(self.state, "reconnect_until", None)
        if getattr(self.state, "connection", None) is None and until is not None and \
                time.monotonic() > until:
            raise pika.exceptions.AMQPConnectionError("the broker does not answer")
        try:
            return RabbitmqBroker.connection.fget(self)  # type: ignore[attr-defined]
        except AMQPConnectorException as exc:
            raise _connection_error(exc) from exc

    def _channel(self) -> Any:
        """dramatiq's getter, but the channel is known to the broker before Confirm.Select:
        dramatiq's own registered it after, so when the broker did not answer that, dropping
        the channel raised KeyError, which the store took for a refused publish."""
        channel = getattr(self.state, "channel", None)
        if channel is None:
            channel = self.state.channel = self.connection.channel()
            self.channels.add(channel)
            channel.confirm_delivery()
        return channel

    connection = property(_connection, fdel=RabbitmqBroker.connection.fdel)  # type: ignore[attr-defined]
    channel = property(_channel, fdel=RabbitmqBroker.channel.fdel)  # type: ignore[attr-defined]

    def consume(self, queue_name: str, prefetch: int = 1,
                timeout: int = 5000) -> dramatiq.broker.Consumer:
        try:
            consumer = super().consume(queue_name, prefetch, timeout)
        except AMQPConnectorException as exc:  # its own connection, not self.connection
            raise dramatiq.errors.ConnectionClosed(_connection_error(exc)) from exc
        return _QuietConsumer(consumer)


def _connection_error(exc: AMQPConnectorException) -> pika.exceptions.AMQPConnectionError:
    if isinstance(exc, AMQPConnectorStackTimeout):
        return pika.exceptions.AMQPConnectionError(
            f"no AMQP handshake within {BROKER_CONNECT_TIMEOUT:.0f}s")
    return pika.exceptions.AMQPConnectionError(f"{type(exc).__name__}: {exc}")


class _KeptRetries(Retries):
    """dramatiq's Retries, but a job whose retry cannot be put on the delay queue (the
    broker stopped answering, or refused the publish) is marked failed, so the consumer
    nacks it into the dead-letter queue. dramatiq's Broker.emit_after logs such a failure
    as CRITICAL with a traceback and carries on, and the consumer then acknowledged the
    job, which nothing had marked failed: it was gone. `retry_unscheduled` on the job says
    why, for _GivenUp's line; pika's ERROR lines and tracebacks about the connection are
    kept out of the log, as for the store's publishes."""

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *,
                              result: Any = None, exception: BaseException | None = None) -> None:
        try:
            with _pika_quiet():
                super().after_process_message(broker, message, result=result,
                                              exception=exception)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the job must not be acked
            message.retry_unscheduled = f"{type(exc).__name__}: {exc}"
            message.fail()


class _GivenUp(dramatiq.Middleware):
    """Says when a learn job goes to the dead-letter queue, naming its message and user
    (dramatiq's own line names its job id only, and the job's last line said "retried
    later"): out of retries, counted `learn_dead`, or its retry could not be scheduled
    (_KeptRetries), counted `learn_unscheduled`."""

    def __init__(self, dead_queue: str, count: Callable[[str], None]) -> None:
        self._dead_queue = dead_queue
        self._count = count

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *,
                              result: Any = None, exception: BaseException | None = None) -> None:
        if exception is None or not message.failed or message.actor_name != ACTOR_NAME:
            return
        kind, user, guid = (*map(str, message.args[:3]), "?", "?", "?")[:3]
        extra = {"user": user, "event": f"learn-{kind}", "queue_id": guid}
        unscheduled = getattr(message, "retry_unscheduled", None)
        if unscheduled is not None:
            self._count("learn_unscheduled")
            log.warning("%s not learned as %s yet: its retry could not be scheduled (%s); the "
                        "job goes to %s (tiermail learner --retry-dead), or is handed out again "
                        "if the broker drops this learner's connection first", guid, kind,
                        unscheduled, self._dead_queue, extra=extra)
            return
        self._count("learn_dead")
        log.warning("%s not learned as %s: out of retries after %d tries; the job waits in "
                    "%s for a week (tiermail learner --retry-dead once rspamd's controller "
                    "works)", guid, kind, message.options.get("retries", 0), self._dead_queue,
                    extra=extra)


# What dramatiq's retries and delays leave in a job's options.
_RETRY_STATE = frozenset({"retries", "traceback", "requeue_timestamp", "eta"})


def fresh_job(message: dramatiq.Message[Any], queue_name: str) -> dramatiq.Message[Any]:
    """A dead-lettered job as it was first sent: for the learn queue, no retries counted."""
    options = {k: v for k, v in message.options.items() if k not in _RETRY_STATE}
    return dataclasses.replace(message, queue_name=queue_name, options=options)


class LearningHook:
    """A MailDB listener that turns moves into and out of Junk into learn jobs.

    `send` is Learning.publish (or a stand-in in tests), `release` what lets go of its broker
    connection after each batch of jobs, `close` what ends it; all run in the hook's one
    thread, so the pika connection `send` opens stays in that thread."""

    def __init__(self, mailstore: MailStore,
                 send: Callable[[str, str, str, bytes, int], None],
                 close: Callable[[], None] | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self._mailstore = mailstore
        self._send = send
        self._close = close
        self._release = release
        self._executor = DaemonThread("learn-enqueue")
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0  # messages reserved, their batch not yet done (MAX_PENDING)
        self._queued = 0  # messages of the batches waiting for the hook's thread
        self._lock = threading.Lock()
        self._closed = False
        self._abandon = threading.Event()  # the grace of close() is over: publish no more
        self._clock = DecisionClock()

    @classmethod
    def from_settings(cls, settings: Settings, mailstore: MailStore) -> LearningHook:
        learning = Learning(settings)
        return cls(mailstore, learning.publish, learning.close, learning.release_connection)

    def on_change(self, event: ChangeEvent) -> None:
        """MailDB listener (in the event loop): returns at once, the work runs in a task.
        The decision is timed here, where changes arrive in the order they were committed."""
        if self._closed or event.kind not in LEARNED_CHANGES or not event.guids:
            return
        task = asyncio.get_running_loop().create_task(
            self._classify_and_enqueue(event, self._clock.now()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float = 10.0) -> None:
        """Let scheduled jobs reach the broker for up to `grace` seconds, then stop; the
        messages of moves that never got their turn are counted in one log line, and so
        are those of a batch whose publish the broker still has not confirmed (a resource
        alarm: the hook's thread cannot be interrupted, and is left behind)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        # Batches behind the one under way are not started (they are counted below):
        # cancelled here, and passed over by the hook's thread (_enqueue_all) if the
        # cancellation has not reached its queue when the batch under way gives up.
        for task in self._tasks:
            task.cancel()
        self._abandon.set()
        closed = False
        with contextlib.suppress(Exception):
            # In the hook's thread (it owns the pika connection), after the batch under way,
            # which ends at once unless a publish is under way.
            async with asyncio.timeout_at(max(deadline, loop.time() + STOP_WAIT)):
                await loop.run_in_executor(self._executor, self._close or _nothing)
                closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            # Batches that never started; the one under way says its own if it ended. One
            # that did not is a publish the broker does not confirm (a resource alarm).
            left = self._queued if closed else self._pending
        if left:
            log.warning("not learned: %d more messages of moves waiting for the broker (the "
                        "store is stopping%s)", left,
                        "" if closed else "; a publish it has not confirmed may yet go out",
                        extra={"event": "learn"})

    async def _classify_and_enqueue(self, event: ChangeEvent, decided_us: int) -> None:
        extra = {"user": event.user, "event": "learn"}
        try:
            mailboxes = await self._mailstore.list_mailboxes(event.user)
        except StorageError as exc:
            log.warning("not learned: mailboxes unreadable: %r", exc, extra=extra)
            return
        kind = learn_kind(event.source, event.mailbox,
                          special_roots(mailboxes, "\\Junk", JUNK),
                          special_roots(mailboxes, "\\Trash", TRASH))
        if kind is None:
            return
        guids = self._reserve(event.guids, extra)
        if guids:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._enqueue_all, kind, event.user, guids, decided_us)

    def _reserve(self, guids: Sequence[str], extra: dict[str, str]) -> list[str]:
        """As many of `guids` as MAX_PENDING leaves room for, counted as pending."""
        with self._lock:
            taken = list(guids[:max(MAX_PENDING - self._pending, 0)])
            self._pending += len(taken)
            self._queued += len(taken)
        if len(taken) < len(guids):
            log.warning("not learned: %d of %d messages, %d already waiting for the broker",
                        len(guids) - len(taken), len(guids), MAX_PENDING, extra=extra)
        return taken

    def _enqueue_all(self, kind: str, user: str, guids: list[str], decided_us: int) -> None:
        """In the hook's thread: a job for each message, on one broker connection. A broker
        out of reach is waited for (later batches queue behind this one); when it refuses a
        job, or the store stops meanwhile, the rest of the batch is given up with one log
        line, not one each."""
        if self._abandon.is_set():
            # Never started: close() counts it with the other batches left waiting. Its task
            # was cancelled first, but that reaches this thread's queue only on a later pass
            # of the event loop, and the thread may take the batch before then.
            return
        with self._lock:
            self._queued -= len(guids)
        settled = 0  # messages of the batch no longer pending (published, or not learned)
        try:
            for done, guid in enumerate(guids):
                if self._abandon.is_set():
                    left, why = len(guids) - done, "the store is stopping"
                elif not self._enqueue(kind, user, guid, decided_us):
                    left, why = len(guids) - done - 1, "the broker failed"
                    if self._abandon.is_set():
                        left, why = len(guids) - done, "the store is stopping"
                else:
                    settled = self._settle(settled, done + 1)
                    continue
                settled = self._settle(settled, len(guids))
                if left:
                    log.warning("not learned: %d more messages of the same move (%s)", left,
                                why, extra={"user": user, "event": f"learn-{kind}"})
                return
        finally:
            self._settle(settled, len(guids))
            if self._release is not None:
                with contextlib.suppress(Exception):
                    self._release()

    def _settle(self, settled: int, now: int) -> int:
        """No longer count the messages of a batch up to `now` as pending (MAX_PENDING, and
        what close() reports when the batch does not end in time)."""
        with self._lock:
            self._pending -= now - settled
        return now

    def _enqueue(self, kind: str, user: str, guid: str, decided_us: int) -> bool:
        """Read the message and publish its job; False when the broker failed."""
        extra = {"user": user, "event": f"learn-{kind}", "queue_id": guid}
        try:
            message = self._read(user, guid)
        except (NoSuchMessage, NoSuchUser):
            # Expunged or moved on before the hook read it (a client cleaning up, a user
            # emptying Junk): the user's latest decision stands, nothing went wrong.
            log.info("not learned: the message is gone", extra=extra)
            return True
        except Exception as exc:  # noqa: BLE001 - unreadable
            log.warning("not learned: %s: %s", type(exc).__name__, exc, extra=extra)
            return True
        if message is None:
            log.info("not learned: larger than %d octets", MAX_LEARN_SIZE, extra=extra)
            return True
        if not self._send_once_reachable(kind, user, guid, message, decided_us, extra):
            return False
        log.info("learn job queued (%d octets)", len(message), extra=extra)
        return True

    def _send_once_reachable(self, kind: str, user: str, guid: str, message: bytes,
                             decided_us: int, extra: dict[str, str]) -> bool:
        """Publish the job, trying again while the broker is out of reach (1 s doubling to
        30 s, one WARNING line each time) until it is back or close() gives up. False when
        the job was not published."""
        delay = 1.0
        while True:
            try:
                self._send_saying_a_stall(kind, user, guid, message, decided_us, extra)
                return True
            except BrokerUnreachable as exc:
                log.warning("learn jobs wait for the broker, unreachable (%s); trying again "
                            "in %.0fs", exc, delay, extra=extra)
            except PublishRefused as exc:
                log.warning("not learned: %s", exc, extra=extra)
                return False
            except Exception as exc:  # noqa: BLE001 - learning is best-effort; the move stands
                log.warning("not learned: %s: %s", type(exc).__name__, exc, extra=extra)
                return False
            if self._abandon.wait(delay):
                return False
            delay = min(delay * 2, BROKER_RETRY_MAX)

    def _send_saying_a_stall(self, kind: str, user: str, guid: str, message: bytes,
                             decided_us: int, extra: dict[str, str]) -> None:
        """`send`, with a WARNING line once it has waited STALL_NOTICE seconds for the broker
        to confirm (a resource alarm blocks the connection; the publish goes out once it
        clears) and one when it has gone out after all. Nothing said the jobs waited."""
        since = time.monotonic()
        notice = threading.Timer(STALL_NOTICE, log.warning, args=(
            "learn jobs wait for the broker, which has not confirmed a publish for %.0fs (a "
            "disk or memory alarm? rabbitmqctl status); it goes out once the broker takes it",
            STALL_NOTICE), kwargs={"extra": extra})
        notice.daemon = True
        notice.start()
        try:
            self._send(kind, user, guid, message, decided_us)
        finally:
            notice.cancel()
            waited = time.monotonic() - since
        if waited >= STALL_NOTICE:
            log.warning("learn jobs go out again: the broker confirmed after %.0fs", waited,
                        extra=extra)

    def _read(self, user: str, guid: str) -> bytes | None:
        with self._mailstore.open_message(user, guid) as file:
            data = file.read(MAX_LEARN_SIZE + 1)
        return None if len(data) > MAX_LEARN_SIZE else data


# A broker that takes connections and then says nothing (a node that hangs, a path to it
# that drops packets) costs each attempt to reach it a bounded wait, broker_attempt_limit():
# a learn job's publish in the store, the learner's declares and each (re)start of its
# consumers. Seconds for TCP's connect and the AMQP handshake (pika's socket_timeout and
# stack_timeout; the other tiers: 5 s for a filter, 10 s for the store's consumer).
BROKER_CONNECT_TIMEOUT = 5.0
# Seconds, the AMQP heartbeat the broker is asked for: it sends something at least every
# half of it, and pika gives up an open connection on which nothing arrived during one of
# its checks, which come every BROKER_HEARTBEAT + 5 s. A connection blocked by an alarm
# still gets the broker's heartbeats: it is waited out (see STALL_NOTICE). Not pika's
# blocked_connection_timeout: see docs/operations.md, "Spam learning".
BROKER_HEARTBEAT = 5


def _bounded_heartbeat(asked: int | None) -> int:
    """The AMQP heartbeat for a learn connection: the one TIERMAIL_AMQP_URL's `heartbeat=`
    asks for when it is as short as BROKER_HEARTBEAT or shorter, else BROKER_HEARTBEAT, with a
    WARNING saying so (a longer one, or none, would leave a silent broker unnoticed for
    longer than broker_attempt_limit())."""
    if asked is None:
        return BROKER_HEARTBEAT
    if 0 < asked <= BROKER_HEARTBEAT:
        return asked
    log.warning("spam learning uses an AMQP heartbeat of %ds, not TIERMAIL_AMQP_URL's "
                "heartbeat=%d: a broker that stops answering is given up within %.0fs",
                BROKER_HEARTBEAT, asked, broker_silence_limit(),
                extra={"event": "learn"})
    return BROKER_HEARTBEAT


def broker_silence_limit() -> float:
    """Seconds at most from a broker's last word to pika giving its connection up."""
    return 2 * (BROKER_HEARTBEAT + 5.0)


def broker_attempt_limit() -> float:
    """Seconds at most that one attempt (_LearnBroker._one_attempt) waits for a broker that
    stopped answering: reconnecting in its first BROKER_CONNECT_TIMEOUT, a handshake, and the
    silence after it (30 s)."""
    return 2 * BROKER_CONNECT_TIMEOUT + broker_silence_limit()


# Seconds a learn job's publish waits for the broker's confirm before the store says so:
# longer than an attempt on a broker that stopped answering lasts, so the publish that waits
# is held by a broker that is there (its heartbeats arrive): an alarm.
STALL_NOTICE = broker_attempt_limit() + 5.0
# Seconds close() waits, once its grace is over, for the hook's thread to give up its batch.
STOP_WAIT = 1.0
BROKER_RETRY_MAX = 30.0  # seconds between attempts to reach the broker (learner start, learn jobs)


def _nothing() -> None:
    pass


def _declare_once_reachable(learning: Learning, stop: threading.Event) -> bool:
    """Declare the learn queues, waiting for the broker as the other tiers do: a learner
    started while RabbitMQ is down (or before it, in compose) tries again, 1 s doubling to
    30 s, one WARNING line each time, instead of exiting with pika's tracebacks. False when
    stopped before the broker was reached."""
    delay = 1.0
    while not stop.is_set():
        try:
            learning.declare()
            return True
        except dramatiq.errors.BrokerError as exc:
            log.warning("the broker is unreachable (%s); trying again in %.0fs", exc, delay,
                        extra={"event": "broker-unreachable"})
        stop.wait(delay)
        delay = min(delay * 2, BROKER_RETRY_MAX)
    return False


class _PikaQuiet:
    """pika logs a failed connect at ERROR, with a traceback, several lines deep; the callers
    of `Learning.declare` and `Learning.publish` say it in one line. Counted, so threads
    quieting it at once leave pika's level as it was once the last is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._level = logging.NOTSET

    @contextlib.contextmanager
    def __call__(self) -> Any:
        pika_log = logging.getLogger("pika")
        with self._lock:
            if not self._holders:
                self._level = pika_log.level
                pika_log.setLevel(logging.CRITICAL)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if not self._holders:
                    pika_log.setLevel(self._level)


_pika_quiet = _PikaQuiet()


async def _report_until(stop: threading.Event, settings: Settings,
                        stats: Callable[[], dict[str, int]]) -> None:
    """A heartbeat in Redis (what `tiermail status` lists) until `stop` is set."""
    redis = open_redis(settings)
    try:
        async with Heartbeat(redis, settings.redis_prefix, "learner", stats):
            await asyncio.to_thread(stop.wait)
    finally:
        await redis.aclose()


def run_worker(settings: Settings, stop: threading.Event | None = None) -> int:
    """`tiermail learner`: consume learn jobs until SIGTERM/SIGINT (or `stop` is set)."""
    stop = stop or threading.Event()
    asyncio.run(check_redis_url(settings))  # the learn ledger's database
    learning = Learning(settings)

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    if not _declare_once_reachable(learning, stop):
        learning.close()
        return 0
    worker = learning.worker()
    worker.start()
    log.info("learner running: queue %s, rspamd controller %s", learning.queue_name,
             settings.rspamd_controller_url, extra={"event": "started"})
    try:
        asyncio.run(_report_until(stop, settings, learning.stats))
    finally:
        log.info("learner stopping", extra={"event": "stopping"})
        worker.stop(timeout=30_000)
        learning.close()
    log.info("learner stopped", extra={"event": "stopped"})
    return 0
