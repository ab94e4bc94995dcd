"""How the store learns that an account was deleted (services/store/logins.py), in this test's
event loop against the real Redis: by the directory's change notice, by its own clock when
Redis is away, and at login when the deletion came during the password check."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from redis.asyncio import Redis, from_url

from common.directory import Directory
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.logins import Logins, end_sessions_of_deleted_accounts
from tests.support import eventually, free_port

USERS = ("alice@example.org", "bob@example.org", "carol@example.org")
NEVER = 3600.0  # a clock that never strikes during a test: only notices wake the watch


@pytest.fixture
def accounts(settings: Settings) -> Iterator[AccountDB]:
    """The database the CLI would change: a connection of its own, as the CLI's is."""
    db = AccountDB.for_store(settings.store_dir)
    db.add_domain("example.org")
    for user in USERS:
        db.add_user(user, "not-a-real-hash")
    yield db
    db.close()


@pytest.fixture
def logins(settings: Settings, accounts: AccountDB) -> Iterator[Logins]:
    own = AccountDB.for_store(settings.store_dir)
    yield Logins(own)
    own.close()


class Sessions:
    """Stand-ins for logged-in sessions: the ones ended, by account. An ended one leaves
    `Logins` at once, as a real one does when its connection closes."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    async def log_in(self, logins: Logins, user: str) -> Callable[[], None] | None:
        leave: Callable[[], None] | None = None

        def end() -> None:
            self.ended.append(user)
            assert leave is not None
            leave()

        leave = await logins.admit(user, end)
        return leave


@contextlib.asynccontextmanager
async def watching(logins: Logins, redis_url: str, prefix: str,
                   interval: float) -> AsyncIterator[Directory]:
    redis: Redis = from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    directory = Directory(redis, prefix)
    task = asyncio.create_task(
        end_sessions_of_deleted_accounts(logins, redis, directory, interval=interval))
    try:
        yield directory
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()


async def delete(accounts: AccountDB, directory: Directory | None, user: str) -> None:
    """What `tiermail user del` does: the database, then the notice through Redis."""
    accounts.delete_user(user)
    if directory is not None:
        if not await directory.is_published():  # a change needs a published directory
            await directory.publish(accounts.snapshot())
        await directory.remove_user(user)


async def test_a_change_notice_ends_the_sessions_of_a_deleted_account(
        settings: Settings, accounts: AccountDB, logins: Logins) -> None:
    sessions = Sessions()
    for user in (*USERS, USERS[0]):  # alice twice
        assert await sessions.log_in(logins, user) is not None
    async with watching(logins, settings.redis_url, settings.redis_prefix, NEVER) as directory:
        # Carol's end may come from the look the watch takes once it is subscribed; it
        # shows the subscription is there, so Alice's can only come from her notice.
        await delete(accounts, directory, USERS[2])
        await eventually(lambda: sessions.ended == [USERS[2]], within=10, what="carol ended")
        await delete(accounts, directory, USERS[0])
        await eventually(lambda: len(sessions.ended) == 3, within=10, what="alice ended")
    assert sessions.ended == [USERS[2], USERS[0], USERS[0]]  # not bob


async def test_without_redis_the_clock_finds_the_deletion(
        settings: Settings, accounts: AccountDB, logins: Logins) -> None:
    sessions = Sessions()
    for user in USERS:
        await sessions.log_in(logins, user)
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    async with watching(logins, unreachable, settings.redis_prefix, interval=0.1):
        await delete(accounts, None, USERS[1])
        await eventually(lambda: sessions.ended == [USERS[1]], within=10, what="bob ended")


async def test_a_login_that_races_the_deletion_fails_and_a_left_session_is_forgotten(
        accounts: AccountDB, logins: Logins) -> None:
    sessions = Sessions()
    leave = await sessions.log_in(logins, USERS[1])
    assert leave is not None and len(logins) == 1
    leave()
    assert len(logins) == 0
    # The password was found right a moment before the account was deleted.
    accounts.delete_user(USERS[0])
    assert await sessions.log_in(logins, USERS[0]) is None
    assert len(logins) == 0
    assert await logins.end_deleted() == 0 and sessions.ended == []


async def test_a_session_of_an_account_deleted_and_added_again_unseen_is_ended(
        logins: Logins, accounts: AccountDB) -> None:
    """Deleted and added again between two looks (the notice lost, the clock not yet
    struck): the session belongs to the earlier account, another person's perhaps, and ends;
    a session of the new account goes on."""
    sessions = Sessions()
    assert await sessions.log_in(logins, USERS[0]) is not None
    assert await logins.end_deleted() == 0
    accounts.delete_user(USERS[0])
    accounts.add_user(USERS[0], "another-hash")
    assert await logins.end_deleted() == 1 and sessions.ended == [USERS[0]]

    assert await sessions.log_in(logins, USERS[0]) is not None
    before = accounts.generation()
    accounts.set_quota(USERS[1], 1_000_000)  # any change the directory follows
    assert accounts.generation() > before
    assert await logins.end_deleted() == 0 and sessions.ended == [USERS[0]]
    assert len(logins) == 1


async def test_a_login_looked_up_during_a_look_is_looked_at_again_without_another_change(
        logins: Logins, accounts: AccountDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The login's own lookup read the account just before `user del`, and returned only
    after the watcher's look, which could not yet tell whose the session was. The next look
    ends it, though the account database has not changed since."""
    looked, answer = threading.Event(), threading.Event()
    user_created = logins._accounts.user_created

    def held_lookup(user: str) -> float | None:
        created = user_created(user)
        looked.set()
        answer.wait(timeout=30)
        return created

    monkeypatch.setattr(logins._accounts, "user_created", held_lookup)
    sessions = Sessions()
    login = asyncio.create_task(sessions.log_in(logins, USERS[0]))
    await asyncio.to_thread(looked.wait, 30)
    accounts.delete_user(USERS[0])
    assert await logins.end_deleted() == 0  # the session's account not known yet
    answer.set()
    assert await login is not None, "the password check came before the deletion"
    generation = accounts.generation()
    assert await logins.end_deleted() == 1 and sessions.ended == [USERS[0]]
    assert accounts.generation() == generation
