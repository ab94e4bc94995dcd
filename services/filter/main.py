"""Entry point of one filter worker: `tiermail filter` calls `serve(settings)`.

Resources are opened in one AsyncExitStack (`open_worker`) and closed in reverse order: the
broker publisher, the scanner clients, the heartbeat, the deferred scanner task, the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import redis.asyncio

from common.broker import Publisher, TopologyMismatch
from common.directory import Directory, Resolution
from common.directory_cache import DirectoryCache
from common.fdlimit import raise_open_file_limit
from common.gcpause import freeze_startup_objects
from common.health import Heartbeat
from common.listen import binding, join_port, leave_port
from common.ratelimit import RateLimiter, RateLimits, RedisCounter
from common.redisconn import check_redis_url, open_redis
from common.settings import Settings
from common.tasks import pause, stop_task
from common.tls import server_context
from services.filter.backends.scanners import Scanners
from services.filter.deferred import DeferredScanner
from services.filter.inflight import ADOPT_INTERVAL, InFlightTable
from services.filter.rules import Rule, default_rules
from services.filter.rules.defaults import spam_judge
from services.filter.server import FilterServer, ServerLimits
from services.filter.session import (
    MessagePublisher,
    RecipientDirectory,
    SessionPolicy,
    postmaster_problem,
)
from services.filter.stats import WorkerStats
from services.filter.unconfirmed import UnconfirmedLedger

log = logging.getLogger(__name__)

AMQP_CONNECT_TIMEOUT = 5.0
POSTMASTER_CHECK_TIMEOUT = 5.0  # seconds the start waits to check TIERMAIL_POSTMASTER
STAY_CONNECTED_INTERVAL = 2.0  # seconds between checks that the broker connection is up
SCANNER_RECHECK_INTERVAL = 5.0  # seconds between pings of a scanner whose last call failed


@dataclass
class FilterWorker:
    """A running filter worker: what a health reporter or a test may look at."""

    settings: Settings
    server: FilterServer
    stats: WorkerStats
    publisher: MessagePublisher
    directory: RecipientDirectory
    stack: contextlib.AsyncExitStack
    drainer: DeferredScanner | None = None

    @property
    def ports(self) -> list[int]:
        return self.server.ports


def publish_deadline(settings: Settings) -> float:
    """Upper bound on one publish: connect (when reconnecting) plus the confirm wait."""
    return AMQP_CONNECT_TIMEOUT + settings.publish_timeout


def shutdown_grace(settings: Settings) -> float:
    return publish_deadline(settings) + 5.0


@contextlib.asynccontextmanager
async def open_worker(
    settings: Settings,
    *,
    rules: Sequence[Rule] | None = None,
    directory: RecipientDirectory | None = None,
    publisher: MessagePublisher | None = None,
    port: int | None = None,
    scanners: Scanners | None = None,
    drain_scan_queue: bool | None = None,
    rate_limits: RateLimits | None = None,
) -> AsyncIterator[FilterWorker]:
    """Open everything one worker needs and listen; close it all on exit.

    `directory`, `publisher`, `rules` and `scanners` default to the real ones built from
    settings; tests pass their own to inject failures. With any scanner configured the worker
    also drains the scan-pending queue (services/filter/deferred.py) unless
    `drain_scan_queue` is False. Rate limits are counted in Redis unless `rate_limits` is given.
    """
    tls_context = _tls_context(settings)  # a configured but unusable certificate: stop here
    if not settings.postmaster:
        log.warning("TIERMAIL_POSTMASTER is not set: a bare RCPT TO:<postmaster> is refused, "
                    "and postmaster@ a domain only where that address exists (RFC 5321 4.5.1 "
                    "wants both accepted); see docs/operations.md, 'The postmaster'",
                    extra={"event": "no-postmaster"})
    if directory is None or rate_limits is None:
        await check_redis_url(settings)
    async with contextlib.AsyncExitStack() as stack:
        client: redis.asyncio.Redis | None = None
        if directory is None:
            client = _redis_client(settings, stack)
            cache = DirectoryCache(Directory(client, settings.redis_prefix), client)
            stack.push_async_callback(stop_task, asyncio.create_task(cache.run()))
            directory = cache
        if client is not None and settings.postmaster:
            await _check_postmaster(directory, settings.postmaster)
        if publisher is None:
            real = Publisher(
                settings.amqp_url,
                settings.topology,
                confirm_timeout=settings.publish_timeout,
                connect_timeout=AMQP_CONNECT_TIMEOUT,
            )
            stack.push_async_callback(real.close)
            await _connect_early(real)
            stack.push_async_callback(stop_task, asyncio.create_task(_stay_connected(real)))
            publisher = real
        stats = WorkerStats()
        # Rate limits: counted in Redis so they hold across all workers (common/ratelimit.py).
        if rate_limits is None:
            redis_client = client or _redis_client(settings, stack)
            rate_limits = RateLimiter.from_settings(settings, RedisCounter(redis_client), stats)
        if scanners is None:
            scanners = Scanners.from_settings(settings)
            stack.push_async_callback(scanners.aclose)
        if scanners.enabled:
            stack.push_async_callback(stop_task, asyncio.create_task(_recheck_down(scanners)))
        if rules is None:
            rules = default_rules(settings, scanners, stats)
        # Redis is at hand only with the real directory (tests that inject one get a ledger
        # of this worker's own entries).
        unconfirmed = UnconfirmedLedger(client, settings.redis_prefix)
        if client is not None:
            await _track_in_flight(unconfirmed, settings, stack)
        server = FilterServer(
            limits=ServerLimits.from_settings(settings, publish_deadline(settings)),
            policy=SessionPolicy(
                hostname=settings.hostname,
                max_recipients=settings.max_recipients,
                publish_deadline=publish_deadline(settings),
                postmaster=settings.postmaster,
                spam_scanning=settings.spam != "off",
            ),
            directory=directory,
            publisher=publisher,
            rules=rules,
            stats=stats,
            tls_context=tls_context,
            rate_limits=rate_limits,
            unconfirmed=unconfirmed,
        )
        if client is not None:
            stack.push_async_callback(stop_task, asyncio.create_task(unconfirmed.run()))
            await stack.enter_async_context(
                Heartbeat(client, settings.redis_prefix, "filter",
                          lambda: _health(server, stats, publisher, scanners, settings))
            )
        drainer: DeferredScanner | None = None
        if scanners.enabled and drain_scan_queue is not False:
            judge = spam_judge(settings, scanners) if scanners.spam is not None else None
            drainer = DeferredScanner(settings, scanners, judge, publisher, stats)
            stack.push_async_callback(stop_task, asyncio.create_task(drainer.run()))
        listen_port = settings.smtp_port if port is None else port
        if listen_port:  # 0: a port of its own, chosen by the kernel
            held = join_port(settings.bind, listen_port, settings.stack_identity, "smtp_port")
            if held is not None:
                stack.callback(leave_port, held)
        with binding("smtp_port", settings.bind, listen_port):
            await server.listen(settings.bind, listen_port)
        stack.push_async_callback(server.close, shutdown_grace(settings))
        yield FilterWorker(settings, server, stats, publisher, directory, stack, drainer)


async def _check_postmaster(directory: RecipientDirectory, postmaster: str) -> None:
    """Say at start that TIERMAIL_POSTMASTER is no local mailbox (postmaster mail is then
    refused; RFC 5321 4.5.1 wants it accepted). Redis away or no directory published yet:
    nothing to say now, RCPT says it when it happens."""
    try:
        async with asyncio.timeout(POSTMASTER_CHECK_TIMEOUT):
            lookup = await directory.resolve(postmaster)
    except Exception:  # noqa: BLE001 - a check for the operator, never a reason not to start
        return
    if lookup.resolution is not Resolution.LOCAL:
        log.warning("TIERMAIL_POSTMASTER=%s is %s: postmaster mail is refused; see "
                    "docs/operations.md, 'The postmaster'", postmaster,
                    postmaster_problem(lookup.resolution), extra={"event": "bad-postmaster"})


async def _track_in_flight(ledger: UnconfirmedLedger, settings: Settings,
                           stack: contextlib.AsyncExitStack) -> None:
    """Publishes in flight go into a file that a killed worker leaves behind
    (services/filter/inflight.py); what killed workers of this stack left is adopted now and
    every ADOPT_INTERVAL."""
    table = InFlightTable(settings.ledger_identity, settings.smtp_max_connections)
    try:
        left_behind = table.open()
    except OSError as exc:
        log.warning("publishes in flight not tracked (%s: %s): a retry of a message this "
                    "worker is killed in the middle of publishing may be a second copy",
                    table.path, exc.strerror or exc)
        return
    stack.callback(table.close)
    ledger.in_flight_table = table
    await ledger.adopt_left_behind(left_behind)
    stack.push_async_callback(stop_task, asyncio.create_task(_adopt_periodically(ledger, table)))


async def _adopt_periodically(ledger: UnconfirmedLedger, table: InFlightTable) -> None:
    while True:
        await pause(ADOPT_INTERVAL)
        await ledger.adopt_left_behind(table.adopt())


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    context = server_context(settings)
    if context is None:
        log.warning("no TLS certificate at %s: STARTTLS not offered", settings.tls_cert_path,
                    extra={"event": "no-tls"})
    return context


def _redis_client(settings: Settings, stack: contextlib.AsyncExitStack) -> redis.asyncio.Redis:
    client = open_redis(settings)
    stack.push_async_callback(client.aclose)
    return client


def _health(server: FilterServer, stats: WorkerStats, publisher: MessagePublisher,
            scanners: Scanners, settings: Settings) -> dict[str, object]:
    return {"ports": server.ports, "data_held": server.data_held,
            "broker_connected": publisher.connected,
            "broker_not_confirming": publisher.stalled,
            "scanners_down": scanners.down(), "scanners_failing": scanners.failing(),
            "scan_failure": settings.scan_failure,
            "active_limit": settings.smtp_max_connections,
            **stats.snapshot()}


async def _recheck_down(scanners: Scanners) -> None:
    """Ping a scanner whose last call failed until it answers, so that `scanners_down`
    (tiermail status) is cleared when it is back, not only at the next message."""
    while True:
        await pause(SCANNER_RECHECK_INTERVAL)
        await scanners.ping_down()


async def _stay_connected(publisher: Publisher) -> None:
    """Reconnect an idle worker after the broker went away, rather than at the next sender's
    MAIL FROM; say once per outage that mail is being refused."""
    unreachable = False
    while True:
        await pause(STAY_CONNECTED_INTERVAL)
        if publisher.connected:
            unreachable = False
            continue
        if not await publisher.ready() and not unreachable:
            unreachable = True
            log.warning("broker unreachable (%s): MAIL FROM gets 451 4.3.0 until it is back",
                        publisher.unreachable_because, extra={"event": "amqp-unreachable"})


async def _connect_early(publisher: Publisher) -> None:
    """Connect at start so the first message is not slower; a broker outage is not fatal."""
    try:
        await publisher.ensure_connected()
    except Exception as exc:
        if isinstance(exc.__cause__, TopologyMismatch):
            raise exc.__cause__ from None  # refused every time: a bad setting, exit 2
        log.warning("broker not reachable at start (will retry per message): %s", exc)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run one worker until `stop` is set or SIGTERM/SIGINT arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    raise_open_file_limit(settings.smtp_max_connections, "TIERMAIL_SMTP_MAX_CONNECTIONS")
    try:
        async with open_worker(settings) as worker:
            freeze_startup_objects()
            log.info("filter worker ready", extra={"event": "ready"})
            await stop.wait()
            log.info("shutting down", extra={"event": "stopping", **_stats_extra(worker)})
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _stats_extra(worker: FilterWorker) -> dict[str, int]:
    return {f"stats_{key}": value for key, value in worker.stats.snapshot().items()}


def serve(settings: Settings) -> None:
    """Blocking: run one filter worker (uvloop when installed) until SIGTERM/SIGINT."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run(settings))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
