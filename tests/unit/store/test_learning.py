"""Which moves teach rspamd what, how its answers are read, and that the hook enqueues off the
event loop (services/store/learning.py). rspamd and RabbitMQ themselves:
tests/integration/learning/."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from typing import BinaryIO

import dramatiq
import pytest

from common.settings import Settings
from services.store import learning
from services.store.learning import (
    HAM,
    SPAM,
    BrokerUnreachable,
    LearnError,
    LearningHook,
    LearnOutcome,
    learn_kind,
    outcome,
    special_roots,
)
from services.store.mailbox import ChangeEvent, MailboxInfo, NoSuchMessage
from tests.support import eventually, wait_until

JUNK, TRASH = ["Junk"], ["Trash"]


class GuidsSent(list[str]):
    """A hook's `send` that records the GUID of each message it is given."""

    def __call__(self, kind: str, user: str, guid: str, message: bytes,
                 decided_us: int) -> None:
        self.append(guid)


@pytest.mark.parametrize(("source", "dest", "kind"), [
    ("INBOX", "Junk", SPAM),
    ("INBOX", "Junk/Phishing", SPAM),
    ("Archive/2024", "Junk", SPAM),
    ("Trash", "Junk", SPAM),
    ("Junk", "INBOX", HAM),
    ("Junk/Phishing", "Work", HAM),
    ("Junk", "Archive", HAM),
    ("Junk", "Trash", None),
    ("Junk", "Trash/Old", None),
    ("Junk", "Junk/Sorted", None),
    ("Junk/Sorted", "Junk", None),
    ("INBOX", "Trash", None),
    ("INBOX", "Archive", None),
    ("INBOX", "Junkyard", None),  # a sibling that only starts with the same letters
    ("Junkyard", "INBOX", None),
])
def test_learn_kind(source: str, dest: str, kind: str | None) -> None:
    assert learn_kind(source, dest, JUNK, TRASH) == kind


def test_an_append_teaches_spam_into_junk_and_never_ham() -> None:
    assert learn_kind(None, "Junk", JUNK, TRASH) == SPAM
    assert learn_kind(None, "Junk/Old", JUNK, TRASH) == SPAM
    assert learn_kind(None, "INBOX", JUNK, TRASH) is None
    assert learn_kind(None, "Trash", JUNK, TRASH) is None


def test_special_use_decides_which_mailbox_is_junk() -> None:
    renamed = [MailboxInfo("INBOX", None), MailboxInfo("Spam", "\\Junk"),
               MailboxInfo("Junk", None), MailboxInfo("Bin", "\\Trash")]
    junk = special_roots(renamed, "\\Junk", "Junk")
    trash = special_roots(renamed, "\\Trash", "Trash")
    assert (junk, trash) == (["Spam"], ["Bin"])
    assert learn_kind("INBOX", "Spam", junk, trash) == SPAM
    assert learn_kind("INBOX", "Junk", junk, trash) is None
    assert learn_kind("Spam", "Bin", junk, trash) is None
    assert special_roots([MailboxInfo("INBOX", None)], "\\Junk", "Junk") == ["Junk"]


@pytest.mark.parametrize(("status", "result"), [
    (200, LearnOutcome.LEARNED), (208, LearnOutcome.ALREADY), (204, LearnOutcome.NOTHING),
    (400, LearnOutcome.REFUSED), (404, LearnOutcome.REFUSED),
])
def test_outcome(status: int, result: LearnOutcome) -> None:
    assert outcome(status, '{"error": "x"}')[0] is result


@pytest.mark.parametrize("status", [401, 403, 500, 502, 503])
def test_outcomes_that_are_retried(status: int) -> None:
    with pytest.raises(LearnError):
        outcome(status, "")


class Store:
    """list_mailboxes and open_message, which is all the hook uses."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self.bodies = bodies

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        return [MailboxInfo("INBOX", None), MailboxInfo("Junk", "\\Junk"),
                MailboxInfo("Trash", "\\Trash")]

    def open_message(self, user: str, guid: str) -> BinaryIO:
        if guid not in self.bodies:
            raise NoSuchMessage(guid)
        return io.BytesIO(self.bodies[guid])


async def test_the_hook_enqueues_in_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(learning, "MAX_LEARN_SIZE", 10)
    sent: list[tuple[str, str, str, bytes]] = []
    threads: set[str] = set()
    published = threading.Event()

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        threads.add(threading.current_thread().name)
        published.wait(5)  # a slow broker: the event loop must not wait for it
        sent.append((kind, user, guid, message))

    store = Store({"g1": b"small", "g2": b"far too large"})
    hook = LearningHook(store, send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1", "g2")))
    hook.on_change(ChangeEvent("a@x.test", "flags", "Junk"))
    hook.on_change(ChangeEvent("a@x.test", "move", "Trash", "Junk", ("g1",)))
    await asyncio.sleep(0.05)  # the loop runs on while send blocks in the hook's thread
    assert sent == []
    published.set()
    await hook.close()
    assert sent == [("spam", "a@x.test", "g1", b"small")]  # g2 skipped: over the size cap
    assert len(threads) == 1 and threading.current_thread().name not in threads


async def test_a_failing_broker_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        raise ConnectionError("broker down")

    hook = LearningHook(Store({"g1": b"body"}), send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "copy", "INBOX", "Junk", ("g1",)))
    await hook.close()
    assert "not learned: ConnectionError: broker down" in caplog.text


async def test_a_message_gone_before_it_was_read_is_no_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """A client that moves mail into Junk and expunges it at once: an expected race."""
    caplog.set_level(logging.INFO, logger=learning.__name__)
    sent = GuidsSent()
    hook = LearningHook(Store({"g1": b"body"}), sent)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("gone", "g1")))
    await hook.close()
    assert sent == ["g1"]
    notes = [(r.levelname, r.getMessage()) for r in caplog.records
             if r.getMessage().startswith("not learned")]
    assert notes == [("INFO", "not learned: the message is gone")]


async def test_a_broker_out_of_reach_is_waited_for_until_the_store_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    """The job waits for the broker (tests/integration/learning: published once it is back);
    a store stopping meanwhile gives it up in one line instead of hanging on it."""
    attempts = threading.Semaphore(0)

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        attempts.release()
        raise BrokerUnreachable("connection refused")

    hook = LearningHook(Store({"g1": b"body", "g2": b"body"}), send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1", "g2")))
    for _ in range(2):  # tried again, not given up
        assert await asyncio.to_thread(attempts.acquire, timeout=30)
    await hook.close(grace=0.05)
    await asyncio.to_thread(wait_until, lambda: "store is stopping" in caplog.text,
                            timeout=30, what="the batch to give up")
    assert "learn jobs wait for the broker, unreachable (connection refused)" in caplog.text
    assert "not learned: 2 more messages of the same move (the store is stopping)" \
        in caplog.text


async def test_moves_queued_behind_a_broker_wait_are_not_lost_silently_at_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    """Moves waiting behind one that waits for the broker: the store stopping gives them up
    with a line that counts them (they vanished without one)."""
    attempts = threading.Semaphore(0)

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        attempts.release()
        raise BrokerUnreachable("connection refused")

    hook = LearningHook(Store({g: b"body" for g in ("g1", "g2", "g3", "g4", "g5")}),
                        send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1", "g2")))
    assert await asyncio.to_thread(attempts.acquire, timeout=30)  # the first move waits
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g3", "g4")))
    hook.on_change(ChangeEvent("a@x.test", "copy", "Junk", "INBOX", ("g5",)))
    await hook.close(grace=1.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not learned")]
    assert lines == [
        "not learned: 2 more messages of the same move (the store is stopping)",
        "not learned: 3 more messages of moves waiting for the broker (the store is stopping)"]


async def test_a_batch_its_cancellation_has_not_reached_is_not_started_at_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    """close() cancels the tasks of the batches waiting for the hook's thread, but the
    cancellation reaches the thread's queue only on a later pass of the event loop: the
    thread, freed by the give-up, could start one first, and it said "N more messages of
    the same move" in place of being counted with the batches left waiting (seen in CI).
    Here the batch is queued the way such a task had queued it, where no cancel reaches."""
    attempts = threading.Semaphore(0)

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        attempts.release()
        raise BrokerUnreachable("connection refused")

    hook = LearningHook(Store({g: b"body" for g in ("g1", "g2", "g3")}),
                        send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1", "g2")))
    assert await asyncio.to_thread(attempts.acquire, timeout=30)  # the first move waits
    queued = hook._reserve(["g3"], {})  # noqa: SLF001 - what the task did before its await
    hook._executor.submit(hook._enqueue_all, "spam", "a@x.test", queued, 0)  # noqa: SLF001
    await hook.close(grace=1.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not learned")]
    assert lines == [
        "not learned: 2 more messages of the same move (the store is stopping)",
        "not learned: 1 more messages of moves waiting for the broker (the store is stopping)"]


def test_the_retries_outlast_a_40_minute_controller_outage_whatever_the_jitter() -> None:
    """dramatiq waits MIN_BACKOFF * 2**k times 1 to 2 before retry k+1, and 0.5 to 1 times
    MAX_BACKOFF once that is over MAX_BACKOFF. The least it can wait in all must cover an
    rspamd (or its Redis) restarted or upgraded; with 10 retries it was 13.5 minutes, while
    the module said "about an hour"."""
    least = sum(min(learning.MIN_BACKOFF_MS * 2 ** k, learning.MAX_BACKOFF_MS // 2)
                for k in range(learning.MAX_RETRIES))
    assert least >= 40 * 60 * 1000


async def test_a_batch_uses_one_connection_and_a_broker_failure_ends_it_in_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """A move of many messages: the connection is let go once, after the batch; a broker
    that fails gives one line for the message that failed and one for the rest (it logged
    a line for each of thousands)."""
    bodies = {f"g{i}": b"body" for i in range(50)}
    sent: list[str] = []
    released: list[int] = []
    broken = threading.Event()

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        if broken.is_set():
            raise ConnectionError("broker down")
        sent.append(guid)

    store = Store(bodies)
    hook = LearningHook(store, send,  # type: ignore[arg-type]
                        release=lambda: released.append(len(sent)))
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", tuple(bodies)))
    await hook.close()
    assert len(sent) == 50 and released == [50]

    caplog.set_level("WARNING")
    broken.set()
    hook = LearningHook(Store(bodies), send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "copy", "Junk", "INBOX", tuple(bodies)))
    await hook.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["not learned: ConnectionError: broker down",
                     "not learned: 49 more messages of the same move (the broker failed)"]


async def test_a_batch_stops_between_two_messages_once_close_gives_up(
        caplog: pytest.LogCaptureFixture) -> None:
    """The store stopping: what close()'s grace did not cover is given up, in one line."""
    bodies = {f"g{i}": b"body" for i in range(10)}
    entered, gate = threading.Event(), threading.Event()
    sent: list[str] = []

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        entered.set()
        gate.wait(30)  # a broker that does not confirm until the store has given up
        sent.append(guid)

    hook = LearningHook(Store(bodies), send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", tuple(bodies)))
    assert await asyncio.to_thread(entered.wait, 30)
    await hook.close(grace=0.05)
    # close() counts the batch it could not wait for (it said nothing of it).
    assert "not learned: 10 more messages of moves waiting for the broker (the store is " \
        "stopping; a publish it has not confirmed may yet go out)" in caplog.text
    gate.set()
    await asyncio.to_thread(wait_until, lambda: "same move (the store is stopping)"
                            in caplog.text, timeout=30, what="the batch to give up")
    assert sent == ["g0"]
    assert "not learned: 9 more messages of the same move (the store is stopping)" \
        in caplog.text


def test_a_dead_job_goes_back_as_it_was_first_sent() -> None:
    dead = dramatiq.Message(queue_name="t.learn.DQ", actor_name="tiermail_learn",
                            args=("spam", "a@x.test", "g1", "Ym9keQ=="), kwargs={},
                            options={"retries": 17, "traceback": "...", "eta": 1,
                                     "requeue_timestamp": 2, "max_retries": 16})
    fresh = learning.fresh_job(dead, "t.learn")
    assert (fresh.queue_name, fresh.args, fresh.message_id) == \
        ("t.learn", dead.args, dead.message_id)
    assert fresh.options == {"max_retries": 16}


def test_decisions_are_timed_strictly_increasing() -> None:
    """Two moves of one message within the same microsecond (or across a step back of the
    clock) keep their order: the learner applies only the newest."""
    clock = learning.DecisionClock()
    stamps = [clock.now() for _ in range(1000)]
    assert stamps == sorted(set(stamps))


@pytest.mark.parametrize(("query", "heartbeat", "warned"), [
    ("", learning.BROKER_HEARTBEAT, False),
    ("?heartbeat=2", 2, False),
    ("?heartbeat=60", learning.BROKER_HEARTBEAT, True),
    ("?heartbeat=0", learning.BROKER_HEARTBEAT, True),  # none at all
])
def test_a_url_heartbeat_is_kept_only_when_it_is_short_enough(
        query: str, heartbeat: int, warned: bool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=learning.__name__):
        broker = learning._LearnBroker(f"amqp://guest:guest@127.0.0.1:5672/{query}")
    assert broker.parameters.heartbeat == heartbeat
    assert any("not TIERMAIL_AMQP_URL's heartbeat=" in r.getMessage()
               for r in caplog.records) == warned


class StoreWithAnUnreadableMessage(Store):
    """g1's file cannot be read (a disk error, a permission gone wrong)."""

    def open_message(self, user: str, guid: str) -> BinaryIO:
        if guid == "g1":
            raise OSError(5, "Input/output error")
        return super().open_message(user, guid)


async def test_one_unreadable_message_does_not_end_the_rest_of_the_move(
        caplog: pytest.LogCaptureFixture) -> None:
    """A message the store cannot read is skipped with a line of its own; the other messages
    of the same move are still learned, and nothing blames the broker."""
    sent = GuidsSent()
    hook = LearningHook(StoreWithAnUnreadableMessage({"g1": b"body", "g2": b"body"}),
                        sent)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1", "g2")))
    await hook.close()
    assert sent == ["g2"]
    assert "not learned: OSError: [Errno 5] Input/output error" in caplog.text
    assert "the broker failed" not in caplog.text


class Answer:
    status_code = 200
    text = "{}"


def test_rspamd_is_given_the_controller_timeout_for_large_messages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """rspamd reads a whole message before it answers: with httpx's default of 5 s a large
    one would time out at every try and never be learned."""
    calls: list[tuple[str, dict[str, object]]] = []

    def post(url: str, **kwargs: object) -> Answer:
        calls.append((url, kwargs))
        return Answer()

    monkeypatch.setattr(learning.httpx, "post", post)
    controller = learning.RspamdController("http://rspamd.test:11334/", "pw")
    assert controller.learn(SPAM, b"message")[0] is LearnOutcome.LEARNED
    [(url, kwargs)] = calls
    assert url == "http://rspamd.test:11334/learnspam"
    assert kwargs["timeout"] == learning.CONTROLLER_TIMEOUT
    assert learning.RspamdController("http://x.test", "", timeout=7.0).learn(
        HAM, b"message")[0] is LearnOutcome.LEARNED
    assert calls[1][0] == "http://x.test/learnham" and calls[1][1]["timeout"] == 7.0


async def test_a_move_after_the_hook_closed_schedules_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """A change that arrives while the store stops (after the hook closed): nothing is
    started on a hook whose thread is gone, and no error is logged."""
    sent = GuidsSent()
    hook = LearningHook(Store({"g1": b"body"}), sent)  # type: ignore[arg-type]
    await hook.close()
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1",)))
    assert not hook._tasks  # noqa: SLF001 - no task was started
    assert sent == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class Sent(list[tuple[str, bytes]]):
    """A hook's `send` that records each message's GUID and the bytes it was given."""

    def __call__(self, kind: str, user: str, guid: str, message: bytes,
                 decided_us: int) -> None:
        self.append((guid, message))


async def test_a_message_of_exactly_the_size_cap_is_learned_and_one_octet_more_is_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages of at most MAX_LEARN_SIZE octets are learned whole; a larger one is skipped
    (not learned cut short)."""
    monkeypatch.setattr(learning, "MAX_LEARN_SIZE", 10)
    sent = Sent()
    hook = LearningHook(Store({"at": b"x" * 10, "over": b"x" * 11}), sent)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("at", "over")))
    await hook.close()
    assert sent == [("at", b"x" * 10)]


async def test_messages_beyond_the_pending_limit_are_not_learned_and_a_line_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """While the broker holds up the hook, at most MAX_PENDING messages wait in the store's
    memory; those of a move beyond that are dropped with one WARNING line, and the ones that
    fitted are still learned."""
    monkeypatch.setattr(learning, "MAX_PENDING", 3)
    gate = threading.Event()
    sent = GuidsSent()

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        gate.wait(30)  # a broker slow to confirm: the first move stays pending
        sent(kind, user, guid, message, decided_us)

    hook = LearningHook(Store({g: b"body" for g in ("g1", "g2", "g3", "g4")}),
                        send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1", "g2")))
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g3", "g4")))
    await eventually(lambda: "not learned: 1 of 2 messages, 3 already waiting for the broker"
                     in caplog.text, within=30, what="the move over the limit to be cut")
    gate.set()
    await hook.close()
    assert sent == ["g1", "g2", "g3"]


class CountedWaits(threading.Event):
    """A stop event whose waits return at once, recording how long each would have waited;
    it is set (the store or learner stopping) at the `stop_at`th wait."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.waits: list[float] = []
        self._stop_at = stop_at

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        if len(self.waits) >= self._stop_at:
            self.set()
        return self.is_set()


# docs/operations.md: 1 s doubling to 30 s.
BROKER_WAITS = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


async def test_learn_jobs_try_an_unreachable_broker_again_at_least_every_30s() -> None:
    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        raise BrokerUnreachable("connection refused")

    hook = LearningHook(Store({"g1": b"body"}), send)  # type: ignore[arg-type]
    waits = hook._abandon = CountedWaits(stop_at=len(BROKER_WAITS))  # noqa: SLF001
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1",)))
    await asyncio.to_thread(wait_until, waits.is_set, timeout=30, what="the waits to end")
    await hook.close()
    assert waits.waits == BROKER_WAITS


def test_a_learner_starting_without_a_broker_tries_again_at_least_every_30s() -> None:
    class Unreachable:
        def declare(self) -> None:
            raise dramatiq.errors.ConnectionClosed(ConnectionRefusedError("refused"))

    stop = CountedWaits(stop_at=len(BROKER_WAITS))
    assert not learning._declare_once_reachable(Unreachable(), stop)  # type: ignore[arg-type]  # noqa: SLF001
    assert stop.waits == BROKER_WAITS


def test_the_learn_job_retries_16_times_from_1s_to_10min_and_each_try_has_2min() -> None:
    """The actor's retry and time limit are what docs/operations.md promises (and what
    RUNNING_TTL_MS and APPLIED_TTL_S are computed from), not dramatiq's defaults: 15 s to
    7 days of backoff, 20 retries, 10 minutes a try."""
    learn = learning.Learning(Settings())
    try:
        options = learn.actor.options
    finally:
        learn.close()
    assert (options["max_retries"], options["min_backoff"], options["max_backoff"],
            options["time_limit"]) == (16, 1_000, 600_000, 120_000)


def test_a_learn_connection_gives_tcp_and_the_amqp_handshake_5s() -> None:
    """docs/operations.md: 5 s for TCP and the handshake (pika's defaults, 10 s and 15 s,
    would let one attempt on a silent broker outlast broker_attempt_limit())."""
    broker = learning._LearnBroker("amqp://guest:guest@127.0.0.1:5672/")  # noqa: SLF001
    assert (broker.parameters.socket_timeout, broker.parameters.stack_timeout) == (5.0, 5.0)


class StoreWithoutSpecialUse(Store):
    """An account whose mailboxes carry no special-use attributes."""

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        return [MailboxInfo("INBOX", None), MailboxInfo("Junk", None),
                MailboxInfo("Trash", None)]


async def test_without_special_use_the_mailboxes_named_junk_and_trash_decide() -> None:
    """No mailbox says \\Junk or \\Trash: the standard names stand in, so a move into
    "Junk" teaches spam, out of it ham, and Junk -> "Trash" nothing."""
    sent: list[tuple[str, str]] = []

    def send(kind: str, user: str, guid: str, message: bytes, decided_us: int) -> None:
        sent.append((kind, guid))

    hook = LearningHook(StoreWithoutSpecialUse({g: b"body" for g in ("g1", "g2", "g3")}),
                        send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1",)))
    await hook.close()
    hook = LearningHook(StoreWithoutSpecialUse({g: b"body" for g in ("g1", "g2", "g3")}),
                        send)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "INBOX", "Junk", ("g2",)))
    hook.on_change(ChangeEvent("a@x.test", "move", "Trash", "Junk", ("g3",)))
    await hook.close()
    assert sent == [("spam", "g1"), ("ham", "g2")]


class StoreStillListing(Store):
    """A store whose mailbox list is read only once `listed` is set."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        super().__init__(bodies)
        self.listed = asyncio.Event()

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        await self.listed.wait()
        return await super().list_mailboxes(user)


async def test_a_move_still_being_classified_when_the_store_stops_is_given_up(
        caplog: pytest.LogCaptureFixture) -> None:
    """close() cancels the work of a move whose mailbox list had not been read by the end
    of its grace: it does not go on, once the list arrives, to hand a batch to the hook's
    thread that is gone (an error nobody collects)."""
    store, sent = StoreStillListing({"g1": b"body"}), GuidsSent()
    hook = LearningHook(store, sent)  # type: ignore[arg-type]
    hook.on_change(ChangeEvent("a@x.test", "move", "Junk", "INBOX", ("g1",)))
    work = set(hook._tasks)  # noqa: SLF001 - the move's classification
    await hook.close(grace=0.05)
    store.listed.set()
    await asyncio.wait(work, timeout=30)
    assert [task.cancelled() for task in work] == [True]
    assert sent == []
