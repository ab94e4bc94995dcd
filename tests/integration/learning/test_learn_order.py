"""The user's last decision for a message wins, whatever order its learn jobs run in: the
real store hook, RabbitMQ, the learner's Redis ledger and rspamd (services/store/learning.py).

rspamd relearns a message as whatever class it is told last, so a spam job that ran after
the ham job for the same message (retried with backoff, or taken by another worker thread)
left the message learned as spam although the user had taken it out of Junk."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis as syncredis

from common.ids import new_queue_id
from common.settings import Settings
from services.devscanners.runner import Scanner
from services.store.backends.maildb import MailDB
from services.store.learning import (
    APPLIED_TTL_S,
    HAM,
    RUNNING_TTL_MS,
    SPAM,
    LearnError,
    Learning,
    LearningHook,
    LearnLedger,
    LearnOutcome,
    RspamdController,
    Turn,
)
from services.store.mailbox import INBOX, JUNK, Delivery
from tests.integration.learning.test_learning import (
    ALICE,
    learned,
    unseen_message,
)
from tests.support import eventually, free_port


class HeldController(RspamdController):
    """The real rspamd controller, except that a `held` job fails (as an unreachable rspamd
    makes it: retried with backoff) at its first try and until a job of the other kind has
    been learned. That makes the held job a retry run after the other, every time.
    `posted`: the kinds rspamd was asked to learn, in order (its learn cache is no witness:
    it answers "already learned" to a repeat within a second, not after)."""

    def __init__(self, scanner: Scanner, held: str) -> None:
        super().__init__(scanner.controller_url, scanner.controller_password)
        self._held = held
        self.other_learned = threading.Event()
        self._tried = False
        self.posted: list[str] = []

    def learn(self, kind: str, message: bytes) -> tuple[LearnOutcome, str]:
        if kind == self._held and not (self._tried and self.other_learned.is_set()):
            self._tried = True
            raise LearnError(f"{kind} held until the other job is learned")
        self.posted.append(kind)
        answer = super().learn(kind, message)
        if kind != self._held:
            self.other_learned.set()
        return answer


@pytest.fixture
async def maildb(settings: Settings) -> AsyncIterator[MailDB]:
    db = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
    yield db
    await db.close()


async def into_junk_and_back(settings: Settings, maildb: MailDB, body: bytes) -> None:
    """A user moves a new message into Junk and back out: the store's hook queues a spam
    job, then a ham job. One hook per move, each closed (its job published) before the next
    move, so the spam job is first in the queue: one hook publishes two moves' jobs in the
    order its reads of the mailbox list finish, which the readers' pool may swap (the jobs'
    decision times keep the outcome right, but the retry under test would not happen)."""
    await maildb.deliver([Delivery(new_queue_id(), ALICE, body, time.time(), INBOX)])
    [uid] = await maildb.uids(ALICE, INBOX)
    async with learning_hook(settings, maildb):
        await maildb.move(ALICE, INBOX, [uid], JUNK)
    [uid] = await maildb.uids(ALICE, JUNK)
    async with learning_hook(settings, maildb):
        await maildb.move(ALICE, JUNK, [uid], INBOX)


@contextlib.asynccontextmanager
async def learning_hook(settings: Settings, maildb: MailDB) -> AsyncIterator[None]:
    """The store's learning hook on `maildb`; the jobs of its moves published on leaving."""
    learning = Learning(settings)
    hook = LearningHook(maildb, learning.publish, learning.close, learning.release_connection)
    maildb.add_listener(hook.on_change)
    try:
        yield
    finally:
        await hook.close()
        maildb.remove_listener(hook.on_change)


async def run_learner(settings: Settings, controller: RspamdController) -> dict[str, int]:
    """A learner with one thread until both jobs are done (ham learned, spam learned or
    superseded)."""
    learning = Learning(settings, controller)
    learning.declare()
    worker = learning.worker(threads=1)
    worker.start()
    try:
        await eventually(lambda: both_done(learning.stats()), within=90,
                         what="both learn jobs done")
        return learning.stats()
    finally:
        await asyncio.to_thread(worker.stop, 10_000)
        learning.close()


def both_done(stats: dict[str, int]) -> bool:
    return "ham_learned" in stats and ("spam_learned" in stats or "learn_superseded" in stats)


@pytest.mark.parametrize(("held", "posted", "superseded"), [
    # The spam job retried after the ham job: superseded. The old code had rspamd relearn
    # the message as spam after the ham, against the user's last move.
    (SPAM, [HAM], 1),
    # The ham job (the newer decision) retried after the spam job: it still applies.
    (HAM, [SPAM, HAM], 0),
])
async def test_the_last_move_wins_whichever_job_is_retried(
        learn_settings: Settings, maildb: MailDB, rspamd_scanner: Scanner, held: str,
        posted: list[str], superseded: int) -> None:
    before = await asyncio.to_thread(learned, rspamd_scanner)
    await into_junk_and_back(learn_settings, maildb, unseen_message())
    controller = HeldController(rspamd_scanner, held=held)
    stats = await run_learner(learn_settings, controller)
    assert controller.posted == posted, controller.posted
    assert stats.get("learn_superseded", 0) == superseded and stats["learn_retries"], stats
    assert await asyncio.to_thread(learned, rspamd_scanner) == before + len(posted)


async def test_a_job_from_an_older_store_without_a_decision_time_is_learned(
        learn_settings: Settings, rspamd_scanner: Scanner) -> None:
    body = unseen_message()
    learning = Learning(learn_settings)
    learning.declare()
    learning.actor.send(HAM, ALICE, "b" * 32, base64.b64encode(body).decode("ascii"))
    learning.release_connection()
    worker = learning.worker(threads=1)
    worker.start()
    try:
        await eventually(lambda: "ham_learned" in learning.stats(), within=60,
                         what="the old job learned")
    finally:
        await asyncio.to_thread(worker.stop, 10_000)
        learning.close()


@pytest.fixture
def ledger(settings: Settings) -> LearnLedger:
    return LearnLedger.from_settings(settings)


def test_the_ledger_lets_only_the_newest_decision_through(ledger: LearnLedger,
                                                          settings: Settings) -> None:
    keys = ledger.keys(ALICE, b"Subject: x\r\n\r\nbody\r\n")
    assert ledger.take_turn(keys, 20, "t20") is Turn.GO
    with syncredis.Redis.from_url(settings.redis_url) as client:
        # The in-flight mark expires by itself: a learner that dies, or Redis failing as
        # the turn ends, must not hold the message back for good.
        assert 0 < client.pttl(keys[1]) <= RUNNING_TTL_MS
    assert ledger.take_turn(keys, 10, "t10") is Turn.SUPERSEDED  # a newer one in flight
    assert ledger.take_turn(keys, 30, "t30") is Turn.WAIT  # an older one in flight
    assert ledger.take_turn(keys, 20, "other") is Turn.WAIT  # one at a time, even equal
    assert ledger.take_turn(keys, 20, "t20") is Turn.GO  # the same job, redelivered
    ledger.end_turn(keys, 20, "t20", applied=True)
    assert ledger.take_turn(keys, 10, "t10") is Turn.SUPERSEDED  # older than the applied
    assert ledger.take_turn(keys, 0, "old store") is Turn.SUPERSEDED
    assert ledger.take_turn(keys, 30, "t30") is Turn.GO
    ledger.end_turn(keys, 30, "t30", applied=False)  # rspamd failed: retried, not recorded
    assert ledger.take_turn(keys, 25, "t25") is Turn.GO  # 20 is still the newest applied
    ledger.end_turn(keys, 25, "t25", applied=True)
    assert ledger.take_turn(keys, 30, "t30 retried") is Turn.GO
    ledger.end_turn(keys, 30, "t30 retried", applied=True)
    ledger.end_turn(keys, 25, "t25", applied=True)  # a late repeat never lowers it
    assert ledger.take_turn(keys, 29, "t29") is Turn.SUPERSEDED
    client = syncredis.Redis.from_url(settings.redis_url)
    try:
        applied, running = keys
        assert client.get(applied) == b"30"
        assert 0 < client.ttl(applied) <= APPLIED_TTL_S
        assert not client.exists(running)
    finally:
        client.close()
        ledger.close()


def test_the_ledger_is_per_user_and_message(ledger: LearnLedger) -> None:
    """One user's decision, in flight or applied, neither holds up nor supersedes another
    user's about the same bytes, nor the same user's about other bytes."""
    body = b"Subject: x\r\n\r\nbody\r\n"
    alice = ledger.keys(ALICE, body)
    assert ledger.take_turn(alice, 20, "a") is Turn.GO
    assert ledger.take_turn(ledger.keys("bob@example.test", body), 10, "b") is Turn.GO
    assert ledger.take_turn(ledger.keys(ALICE, body + b"x"), 10, "c") is Turn.GO
    ledger.end_turn(alice, 20, "a", applied=True)
    assert ledger.take_turn(ledger.keys("carol@example.test", body), 10, "d") is Turn.GO
    assert ledger.take_turn(ledger.keys(ALICE, body + b"y"), 10, "e") is Turn.GO
    ledger.close()


def test_jobs_from_an_older_store_without_decision_times_are_each_learned(
        ledger: LearnLedger) -> None:
    """Jobs queued before there were decision times all count as time 0: among themselves
    none supersedes another, so each is learned in the order it runs, as before there was
    any ordering (a spam job applied does not swallow the ham job of the move back)."""
    keys = ledger.keys(ALICE, b"Subject: old\r\n\r\nbody\r\n")
    try:
        assert ledger.take_turn(keys, 0, "spam:g") is Turn.GO
        ledger.end_turn(keys, 0, "spam:g", applied=True)
        assert ledger.take_turn(keys, 0, "ham:g") is Turn.GO
    finally:
        ledger.close()


def test_without_redis_the_learner_learns_anyway(settings: Settings) -> None:
    down = LearnLedger(syncredis.Redis(port=free_port(), socket_connect_timeout=1), "x:")
    keys = down.keys(ALICE, b"body")
    assert down.take_turn(keys, 1, "t") is Turn.UNCHECKED
    down.end_turn(keys, 1, "t", applied=True)  # logged, not raised
    down.close()


def test_of_learners_racing_for_one_message_exactly_one_goes(settings: Settings) -> None:
    """Two learner threads or processes taking the same message at once: the compare-and-set
    is one Lua script, so one goes and the others wait or are superseded."""
    ledgers = [LearnLedger.from_settings(settings) for _ in range(8)]
    keys = ledgers[0].keys(ALICE, b"Subject: raced\r\n\r\nbody\r\n")
    start = threading.Barrier(len(ledgers))
    turns: list[Turn] = []

    def race(stamp: int, ledger: LearnLedger) -> None:
        start.wait()
        turns.append(ledger.take_turn(keys, stamp, f"t{stamp}"))

    threads = [threading.Thread(target=race, args=(stamp, ledger))
               for stamp, ledger in enumerate(ledgers, start=1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ledger in ledgers:
        ledger.close()
    assert turns.count(Turn.GO) == 1, turns


class RecordingController(RspamdController):
    """An rspamd that learns everything at once; `posted`: the kinds it was asked to learn."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:1", "pw")
        self.posted: list[str] = []

    def learn(self, kind: str, message: bytes) -> tuple[LearnOutcome, str]:
        self.posted.append(kind)
        return LearnOutcome.LEARNED, ""


def test_a_job_behind_an_earlier_one_for_its_message_is_retried_not_dropped(
        settings: Settings, ledger: LearnLedger) -> None:
    """Another learner is posting an older decision for the same message: the job waits
    (it fails, so dramatiq retries it) and is learned on its retry, not acknowledged and
    lost."""
    body = b"Subject: x\r\n\r\nbody\r\n"
    encoded = base64.b64encode(body).decode("ascii")
    controller = RecordingController()
    learning = Learning(settings, controller)
    keys = ledger.keys(ALICE, body)
    try:
        assert ledger.take_turn(keys, 10, "other") is Turn.GO
        with pytest.raises(LearnError):
            learning._learn(HAM, ALICE, "a" * 32, encoded, 20)  # noqa: SLF001 - the actor
        assert controller.posted == []
        assert learning.stats() == {"learn_waits": 1}
        ledger.end_turn(keys, 10, "other", applied=True)
        learning._learn(HAM, ALICE, "a" * 32, encoded, 20)  # noqa: SLF001 - its retry
        assert controller.posted == [HAM]
    finally:
        learning.close()
        ledger.close()


def test_with_redis_down_the_job_is_still_learned(settings: Settings) -> None:
    """The learner's Redis out of reach: the order of jobs cannot be checked, but the job
    is learned anyway (and counted), since learning is best-effort."""
    down = LearnLedger(syncredis.Redis(port=free_port(), socket_connect_timeout=1), "x:")
    controller = RecordingController()
    learning = Learning(settings, controller, ledger=down)
    body = base64.b64encode(b"Subject: x\r\n\r\nbody\r\n").decode("ascii")
    try:
        learning._learn(SPAM, ALICE, "a" * 32, body, 20)  # noqa: SLF001 - the actor
    finally:
        learning.close()
    assert controller.posted == [SPAM]
    assert learning.stats() == {"learn_order_unchecked": 1, "spam_learned": 1}


def test_a_job_rspamd_did_not_answer_is_not_taken_as_applied(
        settings: Settings, ledger: LearnLedger) -> None:
    """Only a decision rspamd answered counts as applied: a newer job that failed (to be
    retried) leaves no record, so it supersedes no older one meanwhile, and its turn ends."""
    body = b"Subject: x\r\n\r\nbody\r\n"
    learning = Learning(settings, RspamdController(f"http://127.0.0.1:{free_port()}", "pw"))
    keys = ledger.keys(ALICE, body)
    try:
        with pytest.raises(LearnError):
            learning._learn(HAM, ALICE, "a" * 32, base64.b64encode(body).decode("ascii"),  # noqa: SLF001
                            20)
        assert ledger.take_turn(keys, 10, "older") is Turn.GO
    finally:
        learning.close()
        ledger.close()


@pytest.mark.parametrize(("kind", "encoded"), [
    ("bogus", base64.b64encode(b"Subject: x\r\n\r\nbody\r\n").decode("ascii")),
    (SPAM, "U3ViamVjdDog eA=="),  # a space: not base64, whatever a lenient decoder makes of it
])
def test_a_malformed_learn_job_is_dropped_without_asking_rspamd(
        settings: Settings, kind: str, encoded: str) -> None:
    """A job of no known class, or whose message is not base64, is logged and dropped: rspamd
    is not asked, and the job takes no turn that could hold up or supersede real ones."""
    controller = RecordingController()
    learning = Learning(settings, controller)
    try:
        learning._learn(kind, ALICE, "a" * 32, encoded, 20)  # noqa: SLF001 - the actor
    finally:
        learning.close()
    assert controller.posted == []
    assert learning.stats() == {}


class AskingAgainMeanwhile(RecordingController):
    """An rspamd during whose answer to a spam job the ham job for the same message (the
    same GUID, moved back out of Junk) is tried: `ham_waited`, whether it waited."""

    def __init__(self, learning: Callable[[], Learning],
                 ham_job: tuple[str, str, str, int]) -> None:
        super().__init__()
        self._learning, self._ham_job = learning, ham_job
        self.ham_waited = False

    def learn(self, kind: str, message: bytes) -> tuple[LearnOutcome, str]:
        answer = super().learn(kind, message)
        if kind == SPAM:
            try:
                self._learning()._learn(HAM, *self._ham_job)  # noqa: SLF001 - the actor
            except LearnError:
                self.ham_waited = True
        return answer


def test_an_older_stores_spam_and_ham_jobs_for_one_message_never_run_at_once(
        settings: Settings) -> None:
    """The two jobs of a move into Junk and back (one GUID, no decision times, from a store
    from before them) are two jobs, not one redelivered: the ham job waits for the spam job
    instead of taking over its turn, so rspamd is never asked both at once."""
    body = base64.b64encode(b"Subject: old\r\n\r\nbody\r\n").decode("ascii")
    controller = AskingAgainMeanwhile(lambda: learning, (ALICE, "g" * 32, body, 0))
    learning = Learning(settings, controller)
    try:
        learning._learn(SPAM, ALICE, "g" * 32, body, 0)  # noqa: SLF001 - the actor
    finally:
        learning.close()
    assert controller.posted == [SPAM]
    assert controller.ham_waited
