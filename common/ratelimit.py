"""Per client IP and per authenticated user rate limits, counted in Redis across every worker.

Shared by the tiers (common/): the filter's SMTP limits (RateLimiter below) and the helpers
the store's login throttle reuses (common/auththrottle.py: parse_networks, ip_subject).

Algorithm: GCRA (the generic cell rate algorithm, as in redis-cell and Stripe's limiter). A
limit of `count` events per `period` becomes an emission interval T = period / count; each key
stores one number, the theoretical arrival time (TAT). An event at `now` is allowed when
`max(TAT, now) + T - count * T <= now`, and then TAT becomes `max(TAT, now) + T`. So a quiet
client may burst `count` events at once and after that gets one every T: over any window of
`period` it never gets more than about 2 * count, and never more than `count` in a burst. Unlike
a fixed window there is no reset edge at which a client can double its burst; unlike a log of
timestamps it costs one key of one integer (expiring when the bucket is full again).

One check is one round trip: a Lua script (EVALSHA) counts an event against all its keys at
once, all or nothing, atomically, with Redis's own clock (TIME), so workers on different hosts
agree on time. Keys: `<redis_prefix>rate:<limit>:<subject>`; the prefix keeps stacks apart.
IPv6 clients are counted per /64 (one host usually owns a whole /64).

Exempt networks (`rate_limit_exempt`, loopback by default) skip the IP limits without a round
trip; the per-user limit applies wherever the user connects from. When Redis fails or is slow
the check fails open and logs: the directory lookup at RCPT answers 451 without Redis anyway,
so nothing is accepted unchecked during an outage, and a Redis blip does not refuse greetings.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio
from redis.exceptions import RedisError

from common.settings import Settings, SettingsError

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 1.0  # seconds; past it the check fails open
IPV6_PREFIX = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Limit(enum.Enum):
    """Which limit a client exceeded; the value is the key component and the log text."""

    CONNECTIONS_PER_IP = "conn-ip"
    MESSAGES_PER_IP = "msg-ip"
    MESSAGES_PER_USER = "msg-user"


@dataclass(frozen=True)
class Rate:
    """`count` events per `period` seconds, as whole milliseconds for the script."""

    count: int
    period: float

    @property
    def interval_ms(self) -> int:
        return max(1, round(self.period * 1000 / self.count))

    @property
    def burst_ms(self) -> int:
        return self.interval_ms * self.count  # exactly `count` events fit in a burst


def gcra(tat: int | None, now: int, rate: Rate) -> int | None:
    """One event at `now` (ms) against a key whose stored TAT is `tat` (None: no key).

    Returns the new TAT when the event is allowed, None when it exceeds the rate. The Lua
    script below is this function; tests check that the two agree.
    """
    start = now if tat is None or tat < now else tat
    after = start + rate.interval_ms
    if after - rate.burst_ms > now:
        return None
    return after


# KEYS: one per limit. ARGV[1]: now in ms, or "" for Redis's clock; then interval_ms and
# burst_ms per key. Returns 0 when the event was counted against every key, else the (1-based)
# index of the first key over its rate, and then nothing was counted. Redis >= 5 replicates
# script effects, which allows TIME before writes.
_SCRIPT = """
local now = tonumber(ARGV[1])
if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local after = {}
for i, key in ipairs(KEYS) do
    local interval = tonumber(ARGV[2 * i])
    local burst = tonumber(ARGV[2 * i + 1])
    local tat = tonumber(redis.call('GET', key))
    if tat == nil or tat < now then tat = now end
    after[i] = tat + interval
    if after[i] - burst > now then return i end
end
for i, key in ipairs(KEYS) do
    redis.call('SET', key, string.format('%d', after[i]), 'PX', after[i] - now)
end
return 0
"""


class Counter(Protocol):
    async def take(self, keys: Sequence[str], rates: Sequence[Rate]) -> int:
        """Count one event against every key if all have room; 0, or 1 + the index of the
        first key over its rate (then nothing is counted)."""
        ...


class RedisCounter:
    """The shared counter: one EVALSHA per check. `clock` (seconds) is for tests only;
    without it Redis's clock is used, so every worker sees the same time."""

    def __init__(self, client: redis.asyncio.Redis,
                 clock: Callable[[], float] | None = None) -> None:
        self._script = client.register_script(_SCRIPT)
        self._clock = clock

    async def take(self, keys: Sequence[str], rates: Sequence[Rate]) -> int:
        args: list[str | int] = ["" if self._clock is None else int(self._clock() * 1000)]
        for rate in rates:
            args += [rate.interval_ms, rate.burst_ms]
        return int(await self._script(keys=list(keys), args=args))


class MemoryCounter:
    """The same counter in one process (unit tests; a single worker without Redis)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.tats: dict[str, int] = {}

    async def take(self, keys: Sequence[str], rates: Sequence[Rate]) -> int:
        now = int(self._clock() * 1000)
        after: list[int] = []
        for index, (key, rate) in enumerate(zip(keys, rates, strict=True), start=1):
            new = gcra(self.tats.get(key), now, rate)  # a TAT in the past = Redis's expiry
            if new is None:
                return index
            after.append(new)
        self.tats.update(zip(keys, after, strict=True))
        return 0


class RateStats(Protocol):
    """The counters a RateLimiter bumps (the filter's WorkerStats has them)."""

    rate_limited_connections: int
    rate_limited_messages: int
    rate_limit_errors: int


@dataclass
class _Tally:
    rate_limited_connections: int = 0
    rate_limited_messages: int = 0
    rate_limit_errors: int = 0


class RateLimits(Protocol):
    """What the SMTP session and server ask; `extra` is the caller's logging context."""

    async def connection(self, client_ip: str, extra: Mapping[str, Any]) -> Limit | None: ...

    async def message(self, client_ip: str, user: str | None,
                      extra: Mapping[str, Any]) -> Limit | None: ...


class Unlimited:
    """No limits (a worker built without them, e.g. in tests of other things)."""

    async def connection(self, client_ip: str, extra: Mapping[str, Any]) -> Limit | None:
        return None

    async def message(self, client_ip: str, user: str | None,
                      extra: Mapping[str, Any]) -> Limit | None:
        return None


UNLIMITED = Unlimited()


def parse_networks(text: str) -> tuple[Network, ...]:
    """`rate_limit_exempt`: comma-separated addresses or CIDR networks."""
    networks: list[Network] = []
    for item in text.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError as exc:
                raise SettingsError(f"TIERMAIL_RATE_LIMIT_EXEMPT: {exc}") from None
    return tuple(networks)


def ip_subject(client_ip: str, exempt: Sequence[Network]) -> str | None:
    """The key component an IP is counted under; None if exempt or not an IP address.

    Asked several times per message (connection, MAIL), so the answers are kept, by address
    and by the identity of `exempt` (hashing its networks for every lookup cost more than
    the lookup); the entry holds `exempt`, so that identity stays its own."""
    key = (client_ip, id(exempt))
    cached = _subjects.get(key)
    if cached is not None and cached[0] is exempt:
        return cached[1]
    subject = _ip_subject(client_ip, exempt)
    if len(_subjects) >= _SUBJECTS_KEPT:
        _subjects.clear()
    _subjects[key] = (exempt, subject)
    return subject


_SUBJECTS_KEPT = 4096
_subjects: dict[tuple[str, int], tuple[Sequence[Network], str | None]] = {}


def _ip_subject(client_ip: str, exempt: Sequence[Network]) -> str | None:
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return None  # no peer address (a unix socket, a test transport): nothing to count
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in exempt):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class RateLimiter:
    """The limits of the settings over a Counter. A count of 0 turns a limit off."""

    def __init__(
        self,
        counter: Counter,
        *,
        prefix: str,
        connections_per_ip: int,
        messages_per_ip: int,
        messages_per_user: int,
        exempt: Sequence[Network] = (),
        stats: RateStats | None = None,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self._counter = counter
        self._prefix = prefix + "rate:"
        self._rates: dict[Limit, Rate | None] = {
            Limit.CONNECTIONS_PER_IP: Rate(connections_per_ip, 60.0) if connections_per_ip
            else None,
            Limit.MESSAGES_PER_IP: Rate(messages_per_ip, 60.0) if messages_per_ip else None,
            Limit.MESSAGES_PER_USER: Rate(messages_per_user, 3600.0) if messages_per_user
            else None,
        }
        self._exempt = tuple(exempt)
        self._stats: RateStats = stats or _Tally()
        self._timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings, counter: Counter,
                      stats: RateStats | None = None) -> RateLimiter:
        return cls(
            counter,
            prefix=settings.redis_prefix,
            connections_per_ip=settings.rate_connections_per_ip,
            messages_per_ip=settings.rate_messages_per_ip,
            messages_per_user=settings.rate_messages_per_user,
            exempt=parse_networks(settings.rate_limit_exempt),
            stats=stats,
        )

    def key(self, limit: Limit, subject: str) -> str:
        return f"{self._prefix}{limit.value}:{subject}"

    async def connection(self, client_ip: str, extra: Mapping[str, Any]) -> Limit | None:
        """Count a new connection; the limit it exceeds, if any."""
        checks = self._checks([(Limit.CONNECTIONS_PER_IP, ip_subject(client_ip, self._exempt))])
        exceeded = await self._take(checks, extra)
        if exceeded is not None:
            self._stats.rate_limited_connections += 1
        return exceeded

    async def message(self, client_ip: str, user: str | None,
                      extra: Mapping[str, Any]) -> Limit | None:
        """Count one message (a MAIL FROM) against the client IP and the authenticated user."""
        checks = self._checks([(Limit.MESSAGES_PER_IP, ip_subject(client_ip, self._exempt)),
                               (Limit.MESSAGES_PER_USER, user.lower() if user else None)])
        exceeded = await self._take(checks, extra)
        if exceeded is not None:
            self._stats.rate_limited_messages += 1
        return exceeded

    def _checks(self, wanted: list[tuple[Limit, str | None]]) -> list[tuple[Limit, str, Rate]]:
        checks = []
        for limit, subject in wanted:
            rate = self._rates[limit]
            if rate is not None and subject is not None:
                checks.append((limit, self.key(limit, subject), rate))
        return checks

    async def _take(self, checks: list[tuple[Limit, str, Rate]],
                    extra: Mapping[str, Any]) -> Limit | None:
        if not checks:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                index = await self._counter.take([c[1] for c in checks], [c[2] for c in checks])
        except (RedisError, OSError, TimeoutError) as exc:
            # Fail open: RCPT needs Redis too and answers 451 while it is away.
            self._stats.rate_limit_errors += 1
            log.warning("rate limits not checked (fail open): %s: %s", type(exc).__name__, exc,
                        extra={**extra, "event": "ratelimit-unavailable"})
            return None
        if not 0 < index <= len(checks):
            return None
        return checks[index - 1][0]
