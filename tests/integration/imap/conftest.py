"""IMAP conversation fixtures: the real IMAP server started in the test's event loop on spare
ports, with a real MailDB and AccountDB, and real Redis behind the login throttle.

Blocking clients (imaplib, imapclient) must run in a thread (`await asyncio.to_thread(dialog)`)
so the server in this event loop keeps running:

    async def test_x(imap_server: ImapStack, deliver: Deliver) -> None:
        await deliver(ALICE, b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        def dialog() -> None:
            with imaplib.IMAP4("127.0.0.1", imap_server.port) as client:
                client.login(ALICE, USERS[ALICE])
                ...
        await asyncio.to_thread(dialog)
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from common.auththrottle import AuthThrottle
from common.budget import MemoryBudget
from common.ids import new_queue_id
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MailDB
from services.store.imap.server import ImapDeps, start_imap_servers
from services.store.mailbox import INBOX, Delivery
from tests.conftest import TEST_REDIS_DB
from tests.support import TEST_USERS, account_db, cheap_password_hashes, free_port

ALICE, BOB = "alice@example.test", "bob@example.test"
USERS = TEST_USERS
TEST_AUTH_DELAY = 0.05  # seconds after a failed login (production: 1 s)


@pytest.fixture
def settings(tmp_path: Path, tls_files: tuple[Path, Path], redis_client: redis.Redis
             ) -> Iterator[Settings]:
    """IMAP needs Redis (login throttle) but not RabbitMQ: replaces tests/conftest.py's."""
    cert, key = tls_files
    tag = uuid.uuid4().hex[:10]
    value = Settings(
        hostname="mx.test.invalid",
        bind="127.0.0.1",
        imap_port=free_port(),
        imaps_port=free_port(),
        redis_url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        redis_prefix=f"t{tag}:",
        data_dir=tmp_path / "var",
        tls_cert=str(cert),
        tls_key=str(key),
        allow_plaintext_auth=True,
        log_level="DEBUG",
    )
    yield value
    keys = list(redis_client.scan_iter(match=f"t{tag}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return cheap_password_hashes()


@pytest.fixture
def imap_users(tmp_path: Path, password_hashes: dict[str, str]) -> Iterator[AccountDB]:
    """The account database with alice@example.test ("alice secret") and bob@example.test
    ("bob-pw")."""
    db = account_db(tmp_path / "accounts.sqlite", password_hashes)
    yield db
    db.close()


@pytest.fixture
def maildb_class() -> type[MailDB]:
    """The MailDB the store runs on; a module overrides it with a subclass that hooks in
    between reads (another session's change at the worst moment)."""
    return MailDB


@pytest.fixture
async def maildb(tmp_path: Path, settings: Settings,
                 maildb_class: type[MailDB]) -> AsyncIterator[MailDB]:
    store = maildb_class(tmp_path / "mail", inline_max=settings.store_inline_max)
    yield store
    await store.close()


Deliver = Callable[..., Awaitable[None]]


@pytest.fixture
def deliver(maildb: MailDB) -> Deliver:
    """`await deliver(user, body, mailbox="INBOX")`: store a message as the consumer does."""

    async def deliver_one(user: str, body: bytes, mailbox: str = INBOX) -> None:
        stored = await maildb.deliver([Delivery(new_queue_id(), user, body, time.time(),
                                                mailbox)])
        assert stored == [True]

    return deliver_one


@dataclass
class ImapStack:
    settings: Settings
    maildb: MailDB
    accounts: AccountDB
    servers: list[asyncio.AbstractServer]
    deps: ImapDeps

    @property
    def port(self) -> int:
        """The plain port (STARTTLS available)."""
        return self.settings.imap_port

    @property
    def tls_port(self) -> int:
        """The implicit-TLS port (IMAPS)."""
        return self.settings.imaps_port


StartImap = Callable[..., Awaitable[ImapStack]]


@pytest.fixture
async def start_imap(settings: Settings, maildb: MailDB, imap_users: AccountDB
                     ) -> AsyncIterator[StartImap]:
    """Start IMAP + IMAPS in this test's event loop; pass `settings=` to override (e.g.
    `settings.replace(allow_plaintext_auth=False)`). Every server is closed afterwards."""
    servers: list[asyncio.AbstractServer] = []
    clients: list[aioredis.Redis] = []

    async def start(settings: Settings = settings, *,
                    fetch_memory: MemoryBudget | None = None) -> ImapStack:
        client = aioredis.from_url(settings.redis_url)
        clients.append(client)
        throttle = AuthThrottle(client, settings.redis_prefix, settings.auth_failures_per_ip,
                                settings.auth_failures_per_user)
        deps = ImapDeps(store=maildb, accounts=imap_users, throttle=throttle,
                        auth_failure_delay=TEST_AUTH_DELAY, fetch_memory=fetch_memory)
        started = await start_imap_servers(settings, deps)
        servers.extend(started)
        return ImapStack(settings, maildb, imap_users, started, deps)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
    for client in clients:
        await client.aclose()


@pytest.fixture
async def imap_server(start_imap: StartImap) -> ImapStack:
    """The server with the default test settings (plaintext LOGIN allowed without TLS)."""
    return await start_imap()


def client_tls_context() -> ssl.SSLContext:
    """For imaplib.IMAP4_SSL / starttls against the self-signed test certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
