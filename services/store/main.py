"""The store tier's entry point: `tiermail store` calls `serve(settings)`.

One process owns every mailbox. Resources are opened in an AsyncExitStack and closed in reverse:
account database, mail store (after its crash sweep), the full-text indexer, Redis (directory
and quota publishers, heartbeat, login throttle), the spam-learning hook, the POP3 and IMAP
listeners with the watch that ends the sessions of deleted accounts, and the delivery
consumer. SIGTERM/SIGINT stop consuming, let the batch in flight be stored and acked, close
the listeners (IMAP sessions get `* BYE`) and exit.

Redis being down never stops the store: the directory and quota state are (re)published in the
background until it succeeds, failed logins go uncounted, deleted accounts are noticed by the
clock instead of by notice (services/store/logins.py), and POP3, IMAP and delivery keep
working without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from common.auththrottle import AuthThrottle
from common.budget import MemoryBudget
from common.directory import Directory
from common.fdlimit import raise_open_file_limit
from common.gcpause import freeze_startup_objects
from common.health import Heartbeat
from common.listen import lock_directory
from common.redisconn import check_redis_url, open_redis
from common.settings import Settings
from common.tasks import pause, stop_task
from common.tls import server_context
from common.words import counted
from services.store.backends import spacereserve
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import MAIL_DIR, MailDB
from services.store.backends.textindex import TextIndex, TextIndexer
from services.store.consumer import Consumer, ConsumerStats
from services.store.imap.cache import FetchCache
from services.store.imap.server import ImapDeps, start_imap_servers
from services.store.learning import LearningHook
from services.store.logins import Logins, end_sessions_of_deleted_accounts
from services.store.pop3.server import start_pop3_servers
from services.store.quota import QuotaPublisher

log = logging.getLogger(__name__)

DIRECTORY_CHECK_INTERVAL = 5.0  # republish if Redis lost or missed directory changes
# At most this long after Redis is back before the directory is published again (status
# and the docs say "within about 5 s": 10 s made that false after a long outage).
DIRECTORY_RETRY_MAX = DIRECTORY_CHECK_INTERVAL
# The listeners open once the first publish is done or has failed; a Redis that neither
# answers nor refuses holds the start no longer than this.
FIRST_PUBLISH_WAIT = 5.0
DELIVERY_QUIET = 0.5  # seconds without a delivery before the text indexer works
GIL_SWITCH_INTERVAL = 0.0005  # seconds (Python's default: 0.005)
# At a stop, how long the batch in flight may take to be stored and acked: within the store's
# stop grace (services/stack.py, compose: 30 s), so that a batch held by hung storage or a
# silent broker ends in an orderly exit, not a kill. Either loses nothing: what was not acked
# is delivered again, once (the `delivered` table).
CONSUMER_STOP_WAIT = 20.0
# Descriptors besides client connections: mailbox indexes kept open (up to 256 by the writer,
# 8 per reader thread; three descriptors each with WAL), text index files, broker, Redis.
# SQLite also defers closing an index's descriptor while another connection of the process
# holds a lock on that file, so each of the writer's 256 can keep one more per reader thread
# that read it (a soak measured 1,650 descriptors for 256 users and 4 readers).
STORE_FILES = 4096


def serve(settings: Settings) -> None:
    """Run the store tier until SIGTERM or SIGINT."""
    # The reader and writer threads hold the interpreter lock for long stretches (merging a
    # 100,000-message list); the event loop waits up to this long to get it back. The
    # default 5 ms became the p99 of every short IMAP command under load; 0.5 ms took the
    # mixed-load FETCH/NOOP p99 from 20-30 ms to 5-10 ms (docs/benchmarks.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at runtime
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    raise_open_file_limit(settings.imap_max_connections + settings.pop3_max_connections,
                          "TIERMAIL_IMAP_MAX_CONNECTIONS + TIERMAIL_POP3_MAX_CONNECTIONS",
                          reserve=STORE_FILES)
    server_context(settings)  # a configured but unusable certificate stops the start here

    async with AsyncExitStack() as stack:
        # Before anything touches the mailboxes: a second store on the same data (a second
        # `tiermail up`) would sweep away files the first one is writing.
        stack.enter_context(lock_directory(settings.store_dir, "store"))
        spacereserve.at_start(settings.store_dir, settings.store_dir / MAIL_DIR,
                              settings.store_space_reserve)
        accounts = AccountDB.for_store(settings.store_dir)
        stack.callback(accounts.close)

        maildb = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
        stack.push_async_callback(maildb.close)
        await check_redis_url(settings)  # a database number Redis does not have: exit 2
        swept = await maildb.sweep()
        log.info("mail store ready at %s (sweep checked %d users, removed %d files)",
                 maildb.root, swept.users, swept.files_removed, extra={"event": "sweep"})

        stats = ConsumerStats()
        # IMAP SEARCH TEXT/BODY: indexed off the delivery path, caught up after downtime,
        # and only while delivery pauses (it yields the CPU to the consumer).
        text_index = TextIndex(maildb.root)
        indexer = TextIndexer(maildb, text_index, quiet_in=lambda: _quiet_in(stats))
        maildb.add_listener(indexer.notify)
        indexer.request_all()
        indexing = asyncio.create_task(indexer.run(), name="text-indexer")
        reserve = spacereserve.ReserveState()
        if settings.store_space_reserve:
            stack.push_async_callback(stop_task, asyncio.create_task(
                spacereserve.keep(settings.store_dir, settings.store_space_reserve, reserve),
                name="space-reserve"))
        stack.push_async_callback(stop_task, indexing)

        redis = open_redis(settings)
        stack.push_async_callback(redis.aclose)
        directory = Directory(redis, settings.redis_prefix)
        first_publish = asyncio.Event()
        publisher = asyncio.create_task(
            _keep_directory_published(directory, accounts, first_publish),
            name="directory-publisher")
        stack.push_async_callback(stop_task, publisher)

        quota = QuotaPublisher(maildb, accounts, redis, settings.redis_prefix,
                               settings.default_quota)
        maildb.add_listener(quota.on_change)
        quota_task = asyncio.create_task(quota.run(), name="quota-publisher")
        stack.push_async_callback(stop_task, quota_task)

        if settings.learns_spam:
            learning = LearningHook.from_settings(settings, maildb)
            maildb.add_listener(learning.on_change)
            stack.push_async_callback(learning.close)

        throttle = AuthThrottle.from_settings(redis, settings)
        # A connection of its own: see Logins.
        logins_accounts = AccountDB.for_store(settings.store_dir)
        stack.callback(logins_accounts.close)
        logins = Logins(logins_accounts)
        # Before the ports answer: `tiermail up` says it is up when they do, and an account
        # command checks the directory in Redis against this account database.
        await _first_attempt(first_publish)
        pop3_servers = await start_pop3_servers(settings, maildb, accounts, throttle=throttle,
                                                logins=logins)
        stack.push_async_callback(_close_servers, pop3_servers)
        literals = MemoryBudget(settings.imap_literal_memory)
        fetch_memory = MemoryBudget(settings.imap_fetch_memory)
        imap = ImapDeps(store=maildb, accounts=accounts, throttle=throttle,
                        text_index=text_index, indexer=indexer, fetch_cache=FetchCache(),
                        literals=literals, fetch_memory=fetch_memory, logins=logins)
        imap_servers = await start_imap_servers(settings, imap)
        stack.push_async_callback(_close_servers, imap_servers)
        watching = asyncio.create_task(
            end_sessions_of_deleted_accounts(logins, redis, directory),
            name="deleted-accounts")
        stack.push_async_callback(stop_task, watching)

        def health() -> dict[str, Any]:
            return {**stats.as_dict(),
                    "imap_sessions": sum(server.sessions for server in imap_servers),
                    "imap_sessions_limit": settings.imap_max_connections,
                    "pop3_sessions": sum(server.sessions for server in pop3_servers),
                    "pop3_sessions_limit": settings.pop3_max_connections,
                    "imap_literals_held": literals.held,
                    "imap_fetch_held": fetch_memory.held,
                    "space_reserve_missing_since": reserve.missing_since}

        heartbeat = await stack.enter_async_context(
            Heartbeat(redis, settings.redis_prefix, "store", health))

        consumer = Consumer(settings, maildb, accounts, stats,
                            on_connection_change=heartbeat.beat_now)
        consuming = asyncio.create_task(consumer.run(), name="consumer")
        freeze_startup_objects()
        log.info("store running", extra={"event": "started"})

        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, consuming}, return_when=asyncio.FIRST_COMPLETED)
        log.info("store stopping", extra={"event": "stopping"})
        consumer.stop()
        try:
            async with asyncio.timeout(CONSUMER_STOP_WAIT):
                await consuming
        except TimeoutError:
            log.error("the batch in flight was not stored within %g s: stopping without "
                      "its ack (the broker delivers it again)", CONSUMER_STOP_WAIT,
                      extra={"event": "stopping"})
        # A consumer that failed raised out of the await above: a TopologyMismatch is a
        # SettingsError (exit 2, services/cli.py), anything else a traceback and exit 1.
        stopped.cancel()
    log.info("store stopped", extra={"event": "stopped"})


def _quiet_in(stats: ConsumerStats) -> float:
    """Seconds until the consumer will have delivered nothing for DELIVERY_QUIET."""
    return stats.last_delivery_at + DELIVERY_QUIET - time.time()


async def _first_attempt(attempted: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(FIRST_PUBLISH_WAIT):
            await attempted.wait()


async def _keep_directory_published(directory: Directory, accounts: AccountDB,
                                    attempted: asyncio.Event) -> None:
    """Publish the directory now and whenever Redis does not reflect the account database:
    Redis lost it (restart, flush) or part of it (a key evicted or deleted: the counts
    differ), or a change was not mirrored (the CLI mirrors each change
    itself; this catches the ones whose mirroring failed). Retries while Redis is down.
    `attempted` is set once the first publish is done or has failed."""
    delay = 0.5
    published = False
    while True:
        try:
            current, counts = await asyncio.to_thread(accounts.directory_counts)
            if not published or not await directory.reflects(current, counts):
                snapshot = await asyncio.to_thread(accounts.snapshot)
                if await directory.publish(snapshot, generation_now=lambda: asyncio.to_thread(
                        accounts.generation)):
                    log.info("directory published: %s, %s, %s",
                             counted(len(snapshot.domains), "domain"),
                             counted(len(snapshot.users), "user"),
                             counted(len(snapshot.aliases), "alias"),
                             extra={"event": "directory"})
                else:  # read before an account change that is mirrored already
                    log.info("directory not published: Redis holds a later account change",
                             extra={"event": "directory"})
                published = True
            attempted.set()
            delay = 0.5
            await pause(DIRECTORY_CHECK_INTERVAL)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("directory not published (%s: %s); retrying in %.1fs",
                        type(exc).__name__, exc, delay, extra={"event": "directory"})
            published = False
            attempted.set()
            await pause(delay)
            delay = min(delay * 2, DIRECTORY_RETRY_MAX)


async def _close_servers(servers: list[Any]) -> None:
    for server in servers:
        server.close()
    for server in servers:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await server.wait_closed()


