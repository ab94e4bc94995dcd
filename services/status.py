"""`tiermail status`: what an operator checks first. Broker queues, dead letters, tier health."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiormq
from aiormq.abc import AbstractConnection

from common.broker import close_connection, connect, connect_failure, setting_up
from common.directory import Directory
from common.health import INTERVAL as HEARTBEAT_INTERVAL
from common.health import read_heartbeats, silent_processes
from common.redisconn import open_redis, ping_or_refuse
from common.settings import Settings, SettingsError
from common.topology import Topology
from common.words import counted
from services.heldmail import delete_queue_command, lock_state

TIMEOUT = 5.0
LOCK_RECHECK = 0.5  # seconds before a held-mail lock that looks like a plain queue is re-read
# Heartbeat values that say how much there is now, not how many so far: no rate for them.
GAUGES = frozenset({"active", "data_held", "imap_sessions", "pop3_sessions",
                    "imap_literals_held", "imap_fetch_held"})
LIMIT_SUFFIX = "_limit"  # a heartbeat's `<gauge>_limit`: what the gauge may reach
BEAT_IDENTITY = frozenset({"pid", "started", "at"})  # numbers in a heartbeat that measure nothing


async def collect_status(settings: Settings) -> dict[str, Any]:
    # Both finish before a bad setting found by one is raised: no connection left half open.
    results: list[Any] = await asyncio.gather(
        _broker_status(settings), _redis_status(settings), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    broker, redis = results
    tiers = {beat["tier"] for beat in redis.get("processes", [])}
    problems = []
    if not broker["reachable"]:
        problems.append(f"RabbitMQ cannot be used ({broker['error']}): "
                        + _while_broker_unusable(redis.get("processes", [])))
    problems += _eviction(redis)
    problems += _directory_problems(redis, tiers | _consuming_tiers(broker))
    problems += _held_mail(broker, settings)
    problems += _learn_problems(broker, settings)
    for tier in ("filter", "store"):
        if redis["reachable"] and tier not in tiers:
            problems.append(_not_reporting(tier, broker))
    problems += _unconsumed(broker)
    problems += _cut_off_filters(redis.get("processes", []))
    problems += _scanners_down(redis.get("processes", []), settings)
    problems += _storage_problems(redis.get("processes", []))
    problems += _silent(redis.get("silent", []))
    problems += _failing_deliveries(redis.get("processes", []))
    problems += _silent_brokers(redis.get("processes", []))
    problems += _stressed_filters(redis.get("processes", []))
    report = {"healthy": not problems, "problems": problems, "broker": broker, "redis": redis}
    backlog = store_backlog(broker, redis.get("processes", []))
    if backlog is not None:
        report["backlog"] = backlog
    return report


def store_backlog(broker: dict[str, Any], beats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The messages waiting in the store's queues and, once the store has reported for a
    heartbeat interval, how fast it took messages off them and how fast the filters took new
    ones in, over their heartbeats' recent windows: how long a backlog (after an outage, say)
    still has to go at that pace."""
    queues = [q for q in (broker.get(key) for key in STORE_QUEUE_KEYS) if q and q["declared"]]
    if not broker.get("reachable") or not queues:
        return None
    backlog: dict[str, Any] = {"messages": sum(q["messages"] for q in queues)}
    taken = _recent_rate(beats, "store", "taken")
    if taken is None:
        return backlog
    per_second, seconds = taken
    arriving = _recent_rate(beats, "filter", "accepted")
    arriving_per_second = 0.0 if arriving is None else arriving[0]
    # Three significant digits, so that a slow rate is not shown as 0 beside an estimate.
    per_second, arriving_per_second = _significant(per_second), _significant(arriving_per_second)
    backlog.update(taken_per_second=per_second, arriving_per_second=arriving_per_second,
                   over_seconds=round(seconds))
    shrinking = per_second - arriving_per_second
    if shrinking > 0:
        backlog["catch_up_seconds"] = round(backlog["messages"] / shrinking, 1)
    return backlog


def _significant(value: float) -> float:
    return float(f"{value:.3g}")


def _recent_rate(beats: list[dict[str, Any]], tier: str, counter: str
                 ) -> tuple[float, float] | None:
    """(per second, over how many seconds) `counter` grew in the recent windows of `tier`'s
    processes together; None while none of them has a window of a heartbeat interval (one
    that just started has a window of nothing) or counts it (an older version)."""
    per_second, longest = 0.0, None
    for beat in beats:
        window = _recent_window(beat, tier)
        if window is None:
            continue
        seconds, growth = window
        grown = growth.get(counter)
        if isinstance(grown, int):
            per_second += grown / seconds
            longest = max(longest or 0.0, seconds)
    return None if longest is None else (per_second, longest)


def _recent_window(beat: dict[str, Any], tier: str) -> tuple[float, dict[str, Any]] | None:
    """A `tier` process's recent window, if it spans at least a heartbeat interval."""
    recent = beat.get("recent")
    if beat.get("tier") != tier or not isinstance(recent, dict):
        return None
    window = _window(recent)
    return window if window is not None and window[0] >= HEARTBEAT_INTERVAL else None


def _consuming_tiers(broker: dict[str, Any]) -> set[str]:
    """The tiers the broker shows running: a consumer of the delivery queue is a store."""
    return {"store"} if (broker.get("deliver") or {}).get("consumers") else set()


def _not_reporting(tier: str, broker: dict[str, Any]) -> str:
    """A tier with no heartbeat in Redis; a store the broker shows consuming has lost its
    heartbeat, not stopped (found in review: Redis evicting keys said "no store process
    is reporting" and "start the store" while it ran)."""
    if tier in _consuming_tiers(broker):
        queue = broker["deliver"]
        return (f"no store process is reporting, though {queue['queue']} has "
                f"{counted(queue['consumers'], 'consumer')}: a store runs but its heartbeat "
                "is not in Redis (keys evicted, or the store cannot reach Redis)")
    return f"no {tier} process is reporting"


def _eviction(redis: dict[str, Any]) -> list[str]:
    """A Redis that evicts keys takes the directory, the heartbeats and the rate counters
    with whatever else it drops (docs/operations.md, Redis: noeviction)."""
    memory = redis.get("memory") or {}
    if not memory.get("evicted_keys") or memory.get("policy") == "noeviction":
        return []
    return [f"Redis has evicted {memory['evicted_keys']} keys since it started "
            f"(maxmemory-policy {memory['policy']}): tiermail's go with them (the directory: "
            "451 at RCPT until the store republishes it; the heartbeats this status reads); "
            "give it maxmemory-policy noeviction or more memory (then `redis-cli CONFIG "
            "RESETSTAT` clears this count)"]


def _directory_problems(redis: dict[str, Any], tiers: set[str]) -> list[str]:
    if not redis["reachable"]:
        return ["Redis unreachable: filters answer 451 at RCPT"]
    if redis["directory"]["published"]:
        return []
    # A running store publishes it again within its DIRECTORY_CHECK_INTERVAL (found in
    # review: "start the store" was said with the store running).
    return ["directory not published in Redis: filters answer 451 at RCPT; " + (
        "the running store publishes it again within about 5 s (if this stays, see its log)"
        if "store" in tiers else "start the store")]


async def _lock_state(connection: AbstractConnection, queue: str) -> str:
    """heldmail.lock_state; "a queue" is looked at again a moment later, as a command's lock
    being deleted with its connection can look like one."""
    state = await lock_state(connection, queue)
    if state == "a queue":
        await asyncio.sleep(LOCK_RECHECK)
        state = await lock_state(connection, queue)
    return state


def _held_mail(broker: dict[str, Any], settings: Settings) -> list[str]:
    """Dead letters and quarantined mail. A queue a deadletters or quarantine command holds
    counts only what it has not taken: one whose every message was taken said healthy, exit
    0, while 300 dead letters waited (found in review)."""
    problems = []
    for key, what, command in (
            ("dead", f"in the dead-letter queue {settings.topology.dead_queue}",
             "tiermail deadletters list"),
            ("quarantine", f"in quarantine {settings.topology.quarantine_queue}, infected or "
                           "not scanned", "tiermail quarantine list")):
        queue = broker.get(key) or {}
        if lock := queue.get("lock_name_taken"):
            problems.append(f"a queue named {lock}, which the deadletters and quarantine "
                            "commands use as their lock, is on the broker and is not theirs: "
                            f"they refuse to work on {queue['queue']} until it is deleted "
                            f"({delete_queue_command(settings, lock)})")
        if queue.get("held_by_a_command"):
            problems.append(f"{queue.get('messages', 0)} message(s) or more {what}: a "
                            "deadletters or quarantine command holds the rest while it works, "
                            f"or one whose connection was lost ({command} once it is done)")
        elif queue.get("messages"):
            problems.append(f"{queue['messages']} message(s) {what} ({command})")
    return problems


def _unconsumed(broker: dict[str, Any]) -> list[str]:
    """Delivery queues nobody consumes: the store is stopped, or running but cut off from
    the broker (then it is reporting, and this is the only sign). And mail waiting to be
    scanned that no filter takes (a dead letter of the scan queue sent back while no
    filter scans, or scanners down: the filters' own lines say which)."""
    problems = [f"nothing consumes {queue['queue']} ({queue['messages']} message(s) "
                "waiting): the store is stopped or cannot reach the broker"
                for queue in (broker.get("deliver"), broker.get("large"))
                if queue is not None and queue["declared"] and not queue["consumers"]]
    scan = broker.get("scan")
    if scan is not None and scan["declared"] and scan["messages"] and not scan["consumers"]:
        problems.append(f"{scan['messages']} message(s) wait in {scan['queue']} to be scanned "
                        "and no filter is scanning them: its scanners are down, or no "
                        "filter runs with scanning on")
    return problems


def _learn_problems(broker: dict[str, Any], settings: Settings) -> list[str]:
    """Learn jobs that gave up (the controller out of reach or refusing the password for
    longer than their retries last, or a retry the broker did not take), and learn jobs
    nobody takes while learning is on."""
    problems = []
    dead, waiting = broker.get("learn_dead"), broker.get("learn")
    if dead is not None and dead["declared"] and dead["messages"]:
        problems.append(f"{dead['messages']} spam-learning job(s) ran out of retries, or "
                        "their retry could not be scheduled, and wait "
                        f"in {dead['queue']} (expiring after a week): is rspamd's controller "
                        "reachable with TIERMAIL_RSPAMD_CONTROLLER_PASSWORD, the broker "
                        "healthy? (learner log; then tiermail learner --retry-dead)")
    if (settings.learns_spam and waiting is not None and waiting["declared"]
            and waiting["messages"] and not waiting["consumers"]):
        problems.append(f"nothing consumes {waiting['queue']} ({waiting['messages']} "
                        "spam-learning job(s) waiting): start `tiermail learner`")
    return problems


def _while_broker_unusable(beats: list[dict[str, Any]]) -> str:
    """What the filters do while status cannot use the broker: a filter connected before (a
    connection limit refuses only new connections) still takes mail."""
    connected = sum(1 for beat in beats
                    if beat.get("tier") == "filter" and beat.get("broker_connected") is True
                    and not beat.get("broker_not_confirming"))
    if connected:
        return (f"{connected} filter(s) connected before still take mail; a filter that "
                "cannot connect answers 451")
    return "filters answer 451, mail waits at the senders"


def _cut_off_filters(beats: list[dict[str, Any]]) -> list[str]:
    """Filters that cannot reach the broker although status can (another host, a network
    in between), or that it does not confirm (blocked by a resource alarm): they refuse mail
    at MAIL FROM until it is back."""
    return [f"filter {beat.get('host')}:{beat.get('pid')} cannot reach the broker: it "
            "answers 451 at MAIL FROM" for beat in beats
            if beat.get("tier") == "filter" and beat.get("broker_connected") is False] + [
        f"filter {beat.get('host')}:{beat.get('pid')}: the broker does not confirm its "
        "publishes (a resource alarm? rabbitmqctl eval 'rabbit_alarm:get_alarms().'): it "
        "answers 451 at MAIL FROM" for beat in beats
        if beat.get("tier") == "filter" and beat.get("broker_not_confirming")]


# What a filter does with mail while a scanner does not answer (TIERMAIL_SCAN_FAILURE).
_WHILE_SCANNER_DOWN = {
    "tempfail": "messages get 451 4.7.0 until it scans again",
    "accept": "messages are accepted without its scan",
    "defer": "messages wait unscanned in {scan_queue} until it scans again",
}


def _scanners_down(beats: list[dict[str, Any]], settings: Settings) -> list[str]:
    """Scanners whose last call from a filter failed (down, refusing, timing out, answering
    garbage): with the default policy every message is refused meanwhile."""
    now = time.time()
    problems = []
    for beat in beats:
        down = beat.get("scanners_down")
        if beat.get("tier") != "filter" or not isinstance(down, dict):
            continue
        policy = str(beat.get("scan_failure", ""))
        effect = _WHILE_SCANNER_DOWN.get(policy, "").format(
            scan_queue=settings.topology.scan_queue)
        failing = beat.get("scanners_failing")
        failing = failing if isinstance(failing, dict) else {}
        where = f"filter {beat.get('host')}:{beat.get('pid')}"
        what = f"{effect} (TIERMAIL_SCAN_FAILURE={policy}; the filter log says why)"
        problems += [f"{where}: {scanner} has not answered for {max(now - since, 0):.0f} s: "
                     f"{what}" for scanner, since in sorted(down.items())]
        problems += [f"{where}: {scanner} answers pings, but its scans have failed for "
                     f"{max(now - since, 0):.0f} s (none passed since): {what}"
                     for scanner, since in sorted(failing.items())]
    return problems


def _silent(entries: list[dict[str, Any]]) -> list[str]:
    """Processes that went without stopping, none started on their host since to replace
    them (common/health.py silent_processes)."""
    now = time.time()
    why = {"filter": "killed, or it cannot reach Redis: it then answers 451 at RCPT",
           "store": "killed, or it cannot reach Redis"}
    return [f"{e.get('tier')} {e.get('host')}:{e.get('pid')} stopped reporting "
            f"{now - float(e['at']):.0f} s ago without stopping "
            f"({why.get(str(e.get('tier')), 'killed, or it cannot reach Redis')})"
            for e in entries]


def _failing_deliveries(beats: list[dict[str, Any]]) -> list[str]:
    """Stores that put messages back on the queue in the last minute because storing them
    failed while their storage works (a damaged index, say): the messages wait, unacked,
    and go to the dead-letter queue after TIERMAIL_DELIVERY_ATTEMPTS; the queue depth does
    not count them. And stores that renewed messages (services/store/redelivery.py): their
    broker link keeps breaking."""
    problems = []
    for beat in beats:
        if beat.get("tier") == "store" and beat.get("renewals_off_since"):
            problems.append(
                f"store {beat.get('host')}:{beat.get('pid')}: its attempt log (attempts.sqlite"
                " in the store directory) failed, so it renews no message until it is "
                "restarted: a broker link that breaks with mail in flight can send that mail "
                "to the dead-letter queue (see its log)")
        recent = beat.get("recent")
        window = _window(recent) if isinstance(recent, dict) else None
        if window is None or beat.get("tier") != "store":
            continue
        requeued = window[1].get("requeued")
        if isinstance(requeued, int) and requeued > 0:
            problems.append(
                f"store {beat.get('host')}:{beat.get('pid')} could not store {requeued} "
                f"message(s) in the last {window[0]:.0f} s and put them back on the queue "
                "(see its log); they go to the dead-letter queue after "
                "TIERMAIL_DELIVERY_ATTEMPTS attempts")
        renewed = window[1].get("renewed")
        if isinstance(renewed, int) and renewed > 0:
            problems.append(
                f"store {beat.get('host')}:{beat.get('pid')}: its broker connection broke "
                f"while {renewed} message(s) were in flight, often enough to use up most of "
                f"their delivery attempts, in the last {window[0]:.0f} s; it renewed them (a "
                "fresh copy each, so they are not dead-lettered). See its log for the "
                "connection errors")
    return problems


def _silent_brokers(beats: list[dict[str, Any]]) -> list[str]:
    """Stores whose broker connection is open but does not answer (services/store/
    consumer.py `_watch_broker`): what the broker sent them waits unacknowledged, which the
    queue depth does not count."""
    now = time.time()
    return [f"store {beat.get('host')}:{beat.get('pid')}: the broker has not answered its "
            f"connection for {now - beat['broker_silent_since']:.0f} s (a broker that hangs, "
            "or a path that drops packets): messages sent to the store wait unacknowledged, "
            "uncounted in the queue depth, until the AMQP heartbeat gives the connection up "
            "(three heartbeat intervals; ?heartbeat= in TIERMAIL_AMQP_URL)"
            for beat in beats
            if beat.get("tier") == "store" and beat.get("broker_silent_since")]


def _stressed_filters(beats: list[dict[str, Any]]) -> list[str]:
    """Filters with most of their connections open (services/filter/server.py, stress): many
    slow clients, an attack, or more mail than the workers are sized for."""
    now = time.time()
    return [f"filter {beat.get('host')}:{beat.get('pid')} has had most of its connections "
            f"open for {now - beat['stressed_since']:.0f} s ({beat.get('active')} of "
            f"{beat.get('active_limit', '?')}): clients get TIERMAIL_SMTP_STRESS_TIMEOUT per "
            "command and line; slow clients (its log's timeouts), or too few workers "
            "(TIERMAIL_SMTP_MAX_CONNECTIONS, more filters)?"
            for beat in beats if beat.get("tier") == "filter" and beat.get("stressed_since")]


def _storage_problems(beats: list[dict[str, Any]]) -> list[str]:
    """Stores that cannot write (their consumer holds the mail until they can), and stores
    without their space reserve (services/store/backends/spacereserve.py)."""
    now = time.time()
    stores = [beat for beat in beats if beat.get("tier") == "store"]
    return [f"store {beat.get('host')}:{beat.get('pid')} cannot write to its storage for "
            f"{now - beat['storage_down_since']:.0f} s (disk full? read-only?): deliveries "
            "wait, unacknowledged, and resume by themselves once it can"
            for beat in stores if beat.get("storage_down_since")] + [
            f"store {beat.get('host')}:{beat.get('pid')} has had no space reserve for "
            f"{now - beat['space_reserve_missing_since']:.0f} s (given up to start on a full "
            "disk, or less than four times TIERMAIL_STORE_SPACE_RESERVE free): stopped now, "
            "it may not start again until space is freed"
            for beat in stores if beat.get("space_reserve_missing_since")]


async def _broker_status(settings: Settings) -> dict[str, Any]:
    topology = settings.topology
    status: dict[str, Any] = {"reachable": False}
    try:
        connection = await connect(settings.amqp_url, TIMEOUT)
    except TimeoutError:
        status["error"] = (f"no answer within {TIMEOUT:g} s to the connection or its "
                           "handshake (a node that hangs, or packets dropped on the way? "
                           "rabbitmqctl status)")
        return status
    except Exception as exc:
        status["error"] = connect_failure(exc)
        return status
    try:
        async with setting_up(connection, TIMEOUT):
            queues = await _queue_counts(connection, topology)
    except TimeoutError:
        status["error"] = (f"it took the connection, then did not answer within {TIMEOUT:g} s "
                           "(a node that hangs? rabbitmqctl status)")
        return status
    await close_connection(connection)
    status.update(queues, reachable=True)
    status["dead_letters"] = status.get("dead", {}).get("messages", 0)
    status["quarantined"] = status.get("quarantine", {}).get("messages", 0)
    return status


async def _queue_counts(connection: AbstractConnection, topology: Topology
                        ) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, Any]] = {}
    for key in QUEUE_KEYS:
        queue = getattr(topology, f"{key}_queue")
        channel = await connection.channel()
        try:
            ok = await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            counts[key] = {"queue": queue, "declared": False}
            continue
        counts[key] = {"queue": queue, "declared": True, "messages": ok.message_count,
                       "consumers": ok.consumer_count}
        await channel.close()
        if key in HELD_KEYS:
            lock = await _lock_state(connection, queue)
            counts[key]["held_by_a_command"] = lock == "held"
            if lock == "a queue":
                counts[key]["lock_name_taken"] = Topology.held_lock_queue(queue)
    return counts


async def _redis_status(settings: Settings) -> dict[str, Any]:
    redis = open_redis(settings, TIMEOUT)
    try:
        # A database number Redis does not have, a password it refuses: no outage but a bad
        # setting, as for the tiers (exit 2), not "Redis unreachable".
        await ping_or_refuse(redis, settings)
        directory = Directory(redis, settings.redis_prefix)
        counts = await directory.counts()
        published = await directory.is_published()
        processes = await read_heartbeats(redis, settings.redis_prefix)
        silent = await silent_processes(redis, settings.redis_prefix, processes, time.time())
        memory = await _memory(redis)
    except SettingsError:
        raise
    except Exception as exc:
        return {"reachable": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await redis.aclose()
    return {"reachable": True, "directory": {"published": published, **counts},
            "processes": processes, "silent": silent, "memory": memory}


async def _memory(redis: Any) -> dict[str, Any]:
    """Redis's eviction policy and how many keys it has evicted; {} where INFO is refused
    (a managed Redis may rename or forbid it)."""
    try:
        memory = await redis.info("memory")
        stats = await redis.info("stats")
    except Exception:  # noqa: BLE001 - not ours to judge then
        return {}
    return {"policy": str(memory.get("maxmemory_policy", "")),
            "evicted_keys": int(stats.get("evicted_keys", 0))}


# The queues of held mail, which a deadletters or quarantine command may be working on: the
# messages it holds are then not in the queue's count (services/heldmail.py).
HELD_KEYS = ("dead", "quarantine")
# The queues status looks at, by their Topology property `<key>_queue`, in display order.
STORE_QUEUE_KEYS = ("deliver", "large")  # what the store consumes
QUEUE_KEYS = ("deliver", "large", "scan", "quarantine", "dead", "learn", "learn_retry",
              "learn_dead")


def format_status(report: dict[str, Any]) -> str:
    lines = [f"tiermail: {'healthy' if report['healthy'] else 'ATTENTION'}"]
    lines += [f"  ! {problem}" for problem in report["problems"]]
    broker = report["broker"]
    lines.append(f"broker: {'up' if broker['reachable'] else 'DOWN ' + broker.get('error', '')}")
    for key in QUEUE_KEYS:
        queue = broker.get(key)
        if queue is None:
            continue
        if not queue["declared"]:
            lines.append(f"  {queue['queue']}: not declared yet (nothing that uses it has started)")
        else:
            lines.append(f"  {queue['queue']}: {counted(queue['messages'], 'message')}, "
                         f"{counted(queue['consumers'], 'consumer')}"
                         + (" (held by a deadletters or quarantine command, or by one whose "
                            "connection was lost: the messages it took are not counted, and "
                            "may count as consumers)" if queue.get("held_by_a_command")
                            else ""))
    backlog = report.get("backlog")
    if backlog and backlog["messages"]:
        lines.append(_backlog_line(backlog))
    redis = report["redis"]
    if not redis["reachable"]:
        lines.append(f"redis: DOWN {redis.get('error', '')}")
        return "\n".join(lines)
    d = redis["directory"]
    lines.append(f"redis: up; directory {'published' if d['published'] else 'NOT published'}: "
                 f"{counted(d['domains'], 'domain')}, {counted(d['users'], 'user')}, "
                 f"{counted(d['aliases'], 'alias')}")
    lines.append("processes (rates over the last minute):")
    now = time.time()
    for beat in redis["processes"]:
        uptime = max(now - beat.get("started", now), 1e-9)
        # Counters that are still 0 are left out (a filter reports some thirty); gauges and
        # flags are always shown. `--json` has everything.
        counters = {k: v for k, v in beat.items()
                    if isinstance(v, int | float) and k not in BEAT_IDENTITY
                    and not k.endswith(LIMIT_SUFFIX)
                    and (v or k in GAUGES or isinstance(v, bool))}
        recent = beat.get("recent")
        window = _window(recent) if isinstance(recent, dict) else None
        rates = ", ".join(_shown(k, v, uptime, now, window, beat.get(k + LIMIT_SUFFIX))
                          for k, v in counters.items())
        lines.append(f"  {beat['tier']:<7} {beat.get('host')}:{beat.get('pid')} "
                     f"up {uptime:.0f}s {rates}".rstrip())
    if not redis["processes"]:
        lines.append("  (none reporting)")
    return "\n".join(lines)


def _backlog_line(backlog: dict[str, Any]) -> str:
    waiting = f"  backlog: {counted(backlog['messages'], 'message')} for the store"
    if "taken_per_second" not in backlog:
        return waiting
    taken, arriving = backlog["taken_per_second"], backlog["arriving_per_second"]
    pace = (f"which took {_rate_in_words(taken) if taken else 'none'} over the last "
            f"{backlog['over_seconds']} s"
            + (f" while {_rate_in_words(arriving)} arrived" if arriving else ""))
    if not taken:
        return f"{waiting}, {pace}"
    if "catch_up_seconds" not in backlog:
        return f"{waiting}, {pace}: it is not catching up"
    return (f"{waiting}, {pace}: {_duration_in_words(backlog['catch_up_seconds'])} to catch "
            f"up at that pace")


def _rate_in_words(per_second: float) -> str:
    """As store_backlog rounds it: three significant digits, no trailing `.0`."""
    return f"{per_second:g}/s"


def _duration_in_words(seconds: float) -> str:
    if seconds < 1:
        return "less than a second"
    if seconds < 120:
        return f"about {seconds:.0f} s"
    if seconds < 7200:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def is_counter(key: str, value: object) -> bool:
    """Whether a heartbeat value counts up from the process's start (a rate means something)
    rather than telling how much there is now, a limit, a flag or a time."""
    return (isinstance(value, int) and not isinstance(value, bool) and key not in GAUGES
            and not key.endswith(LIMIT_SUFFIX))


def _window(recent: dict[str, Any]) -> tuple[float, dict[str, Any]] | None:
    """(seconds, counter -> growth) from a heartbeat's `recent`, None when unusable."""
    seconds, counts = recent.get("seconds"), recent.get("counts")
    if isinstance(seconds, int | float) and seconds > 0 and isinstance(counts, dict):
        return float(seconds), counts
    return None


def _shown(key: str, value: float, uptime: float, now: float,
           window: tuple[float, dict[str, Any]] | None = None, limit: Any = None) -> str:
    """One heartbeat value: a counter with its rate over the heartbeat's recent window (a
    heartbeat without one, from an older process: since start), a gauge or flag as it is
    (out of its limit, `<key>_limit`, when the heartbeat has one), a time (`..._at`,
    seconds since the epoch) as how long ago."""
    if key in GAUGES and isinstance(limit, int):
        return f"{key}={value}/{limit}"
    if key.endswith("_at") and isinstance(value, float):
        return f"{key.removesuffix('_at')} {max(now - value, 0):.0f}s ago"
    if key.endswith("_seconds") and isinstance(value, float):
        return f"{key.removesuffix('_seconds')}={value:.1f}s"
    if key.endswith("_since") and isinstance(value, float):
        return f"{key.removesuffix('_since')} for {max(now - value, 0):.0f}s"
    if is_counter(key, value):
        growth, seconds = value, uptime
        if window is not None and isinstance(window[1].get(key), int):
            seconds, growth = window[0], window[1][key]
        return f"{key}={value} ({growth / seconds * 60:.1f}/min)"
    return f"{key}={value}"
