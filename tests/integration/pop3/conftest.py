"""POP3 conversation fixtures: the real server on spare ports, a real AccountDB, and either
the in-memory fake store or the real MailDB (every conversation test runs against both)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.ids import new_queue_id
from common.passwords import hash_password
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MailDB
from services.store.mailbox import Delivery, MailStore
from services.store.pop3.locks import MailboxLocks
from services.store.pop3.server import start_pop3_servers
from tests.support import INLINE_MODES, TEST_USERS, account_db, free_port
from tests.unit.pop3.fakes import FakeMailStore

USERS = TEST_USERS
ALICE, BOB = "alice@example.test", "bob@example.test"
TEST_AUTH_DELAY = 0.05


@pytest.fixture
def settings(tmp_path: Path, tls_files: tuple[Path, Path]) -> Settings:
    """POP3 needs neither RabbitMQ nor Redis, so this replaces tests/conftest.py's fixture."""
    cert, key = tls_files
    return Settings(
        hostname="mx.test.invalid",
        bind="127.0.0.1",
        pop3_port=free_port(),
        pop3s_port=free_port(),
        data_dir=tmp_path / "var",
        tls_cert=str(cert),
        tls_key=str(key),
        log_level="DEBUG",
    )


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {address: hash_password(password) for address, password in USERS.items()}


@pytest.fixture
def accounts(tmp_path: Path, password_hashes: dict[str, str]) -> Iterator[AccountDB]:
    db = account_db(tmp_path / "accounts.sqlite", password_hashes)
    yield db
    db.close()


@pytest.fixture(params=["fake", *INLINE_MODES])
async def mailstore(request: pytest.FixtureRequest, tmp_path: Path
                    ) -> AsyncIterator[MailStore]:
    """The fake, and MailDB with files only and with inline bodies (RETR reads either)."""
    store: MailStore = (FakeMailStore() if request.param == "fake" else
                        MailDB(tmp_path / "mail", inline_max=INLINE_MODES[request.param]))
    yield store
    await store.close()


class ObservedLocks(MailboxLocks):
    """The server's lock registry, observable by tests: waiting is on an event, not a sleep."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def release(self, user: str) -> None:
        super().release(user)
        self._changed.set()

    async def wait_released(self, user: str) -> None:
        while self.held(user):
            self._changed.clear()
            await self._changed.wait()


@dataclass
class Pop3Stack:
    settings: Settings
    store: MailStore
    locks: ObservedLocks
    servers: list[asyncio.AbstractServer]

    @property
    def port(self) -> int:
        return self.settings.pop3_port

    @property
    def tls_port(self) -> int:
        return self.settings.pop3s_port

    async def deliver(self, user: str, body: bytes) -> None:
        assert await self.store.deliver([Delivery(new_queue_id(), user, body, time.time())])

    async def wait_unlocked(self, user: str) -> None:
        """Wait for the server to notice a session ended (an event; no fixed sleep)."""
        async with asyncio.timeout(10):
            await self.locks.wait_released(user)


StartPop3 = Callable[..., Awaitable[Pop3Stack]]


@pytest.fixture
async def start_pop3(settings: Settings, accounts: AccountDB
                     ) -> AsyncIterator[StartPop3]:
    """Start POP3 + POP3S in this test's event loop; `settings`/`store` may be overridden."""
    servers: list[asyncio.AbstractServer] = []

    async def start(store: MailStore, settings: Settings = settings,
                    auth_failure_delay: float = TEST_AUTH_DELAY) -> Pop3Stack:
        locks = ObservedLocks()
        started = await start_pop3_servers(settings, store, accounts,
                                           auth_failure_delay=auth_failure_delay, locks=locks)
        servers.extend(started)
        return Pop3Stack(settings, store, locks, started)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def pop3(start_pop3: StartPop3, mailstore: MailStore) -> Pop3Stack:
    return await start_pop3(mailstore)
