"""Tier heartbeats in Redis, read by `tiermail status`.

Each tier process writes `<prefix>health:<tier>:<host>:<pid>` every few seconds with a short
TTL; a process that died simply disappears after the TTL. So that status can still say it
went, each also notes when it was last seen in the hash `<prefix>health-seen` (field
`<tier>:<host>:<pid>`), and takes its field out when it stops cleanly: a field whose
process no longer reports is one that was killed or cannot reach Redis (`silent_processes`).
The payload is a small JSON object of the process's own counters (`stats()`), so status
can show rates without scraping logs, and under `recent` how much each counter grew in about
the last minute: a rate averaged since start would hide that mail stopped flowing an hour
ago in a process up for a week.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from common.tasks import pause

log = logging.getLogger(__name__)

INTERVAL = 5.0
TTL = 15
RECENT_SECONDS = 60.0  # the window of `recent`
SILENT_SHOWN = 3600.0  # how long status names a process that went without stopping


class RecentCounts:
    """How much each counter grew over about the last RECENT_SECONDS, from the snapshots
    the heartbeat takes anyway. A process younger than that counts from its start, when
    every counter was 0."""

    def __init__(self, started: float, window: float = RECENT_SECONDS) -> None:
        self._window = window
        self._snapshots: deque[tuple[float, dict[str, int]]] = deque([(started, {})])

    def record(self, at: float, stats: dict[str, Any]) -> dict[str, Any]:
        """Take a snapshot; returns {"seconds": span, "counts": {counter: growth}}."""
        counters = {k: v for k, v in stats.items()
                    if isinstance(v, int) and not isinstance(v, bool)}
        # Keep the newest snapshot that is at least a window old as the base.
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= at - self._window:
            self._snapshots.popleft()
        since, base = self._snapshots[0]
        self._snapshots.append((at, counters))
        return {"seconds": at - since,
                "counts": {k: v - base.get(k, 0) for k, v in counters.items()}}


def heartbeat_key(prefix: str, tier: str) -> str:
    return f"{prefix}health:{tier}:{socket.gethostname()}:{os.getpid()}"


def seen_key(prefix: str) -> str:
    return f"{prefix}health-seen"


class Heartbeat:
    def __init__(self, redis: Redis, prefix: str, tier: str,
                 stats: Callable[[], dict[str, Any]]) -> None:
        self._redis = redis
        self._key = heartbeat_key(prefix, tier)
        self._seen = seen_key(prefix)
        self._field = f"{tier}:{socket.gethostname()}:{os.getpid()}"
        self._tier = tier
        self._stats = stats
        self._started = time.time()
        self._recent = RecentCounts(self._started)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # the next beat now: stopping, or something changed

    def beat_now(self) -> None:
        """Report now rather than at the next interval (a state status shows changed)."""
        self._wake.set()

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self._tier}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        # An event, not Task.cancel(): redis-py can swallow a cancellation that lands while it
        # opens a connection, and the loop would then never end.
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(TTL):
                    await self._task
            except Exception as error:
                log.warning("heartbeat did not stop cleanly: %r", error)
        with contextlib.suppress(Exception):
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(self._key)
            pipe.hdel(self._seen, self._field)
            async with asyncio.timeout(2.0):
                await pipe.execute()

    async def _run(self) -> None:
        predecessors_forgotten = False
        while not self._stop.is_set():
            if not predecessors_forgotten:
                predecessors_forgotten = await self._forget_replaced()
            now, stats = time.time(), self._stats()
            payload = {"tier": self._tier, "pid": os.getpid(), "host": socket.gethostname(),
                       "started": self._started, "at": now, **stats,
                       "recent": self._recent.record(now, stats)}
            try:
                pipe = self._redis.pipeline(transaction=False)  # one round trip for both
                pipe.set(self._key, json.dumps(payload), ex=TTL)
                pipe.hset(self._seen, self._field, json.dumps(
                    {"tier": self._tier, "host": payload["host"], "pid": payload["pid"],
                     "started": self._started, "at": now}))
                async with asyncio.timeout(TTL):
                    await pipe.execute()
            except Exception as exc:  # Redis down must not take a tier down.
                log.warning("heartbeat not written: %s", exc, extra={"event": "heartbeat"})
            await pause(INTERVAL, self._wake)
            self._wake.clear()


    async def _forget_replaced(self) -> bool:
        """Take out of `<prefix>health-seen` the processes of this tier on this host that are
        gone: this one replaces them (`tiermail up` or a service manager restarting a killed
        one). status judged that by the replacement still reporting, so once the stack was
        stopped cleanly it named the killed processes again, for an hour. True once done."""
        try:
            async with asyncio.timeout(TTL):
                entries = await self._redis.hgetall(self._seen)
                gone = [field for field, raw in entries.items()
                        if _gone_from_here(raw, self._tier)]
                if gone:
                    await self._redis.hdel(self._seen, *gone)
        except Exception as exc:  # tried again; the heartbeat's write says Redis is down
            log.debug("replaced processes not forgotten: %s", exc, extra={"event": "heartbeat"})
            return False
        return True


def _gone_from_here(raw: bytes | str, tier: str) -> bool:
    """Whether a `health-seen` entry is a process of `tier` on this host that has ended."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("tier") == tier and ended_here(entry)


def ended_here(entry: dict[str, Any]) -> bool:
    """Whether a heartbeat or `health-seen` entry is of a process on this host that no
    longer runs (killed: its heartbeat lives on until its TTL)."""
    try:
        pid = int(entry["pid"])
    except (ValueError, TypeError, KeyError):
        return False
    if entry.get("host") != socket.gethostname() or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


async def read_heartbeats(redis: Redis, prefix: str) -> list[dict[str, Any]]:
    """The processes reporting: not one of this host that has ended, whose heartbeat has
    not expired yet."""
    beats = []
    async for key in redis.scan_iter(match=f"{prefix}health:*", count=500):
        raw = await redis.get(key)
        if raw:
            beat = json.loads(raw)
            if not ended_here(beat):
                beats.append(beat)
    return sorted(beats, key=lambda b: (b.get("tier", ""), b.get("host", ""), b.get("pid", 0)))


async def silent_processes(redis: Redis, prefix: str, beats: list[dict[str, Any]],
                           now: float) -> list[dict[str, Any]]:
    """Processes that reported and then went without stopping cleanly (killed, or cut off
    from Redis) in the last SILENT_SHOWN seconds, as {tier, host, pid, at}: not those that
    one started on the same host since replaced (`tiermail up`, a service manager). Older
    entries are dropped."""
    reporting = {(b.get("tier"), b.get("host"), b.get("pid")) for b in beats}
    silent = []
    for field, raw in (await redis.hgetall(seen_key(prefix))).items():
        try:
            entry = json.loads(raw)
            last = float(entry["at"])
        except (ValueError, TypeError, KeyError):
            await redis.hdel(seen_key(prefix), field)
            continue
        if now - last > SILENT_SHOWN:
            await redis.hdel(seen_key(prefix), field)
            continue
        if (entry.get("tier"), entry.get("host"), entry.get("pid")) in reporting:
            continue
        if now - last <= TTL and not ended_here(entry):
            continue  # its heartbeat may just be late
        replaced = any(b.get("tier") == entry.get("tier") and b.get("host") == entry.get("host")
                       and float(b.get("started", 0)) >= last for b in beats)
        if not replaced:
            silent.append(entry)
    return sorted(silent, key=lambda e: (e.get("tier", ""), e.get("pid", 0)))

