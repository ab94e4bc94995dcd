"""Failed logins counted in Redis per client IP and per account, shared by every store process
and every protocol (POP3 and IMAP count into the same keys).

One account's logins take turns (`one_check_at_a_time`), so guesses sent at the same time
cannot all get past the check before any is counted; one IP's checks under way count against
its limit beside its failures (`check`), so guesses at many accounts at once cannot either.

A fixed window per subject: the first failure creates `<prefix>authfail:ip:<ip>` (or
`...:user:<address>`) with a lifetime of `window` seconds, each further failure increments it
(INCR, then EXPIRE NX in the same round trip), and a login is refused without checking the
password while a counter has reached its limit. The window starts at the first failure and is
not extended by refused attempts, so a locked-out client may try again `window` seconds after
its first failure. A GCRA (common/ratelimit.py) would smooth the edge, but it only counts
events as it admits them; here the check (before the password) and the count (after a wrong
one) are separate steps, which plain counters express directly.

Policy:
- Per account: always counted, wherever the client connects from; a successful login resets
  the account's counter (its owner is using it), never the IP's (a client that owns one
  account must not reset its count of guesses at others).
- Known addresses: a successful login also marks its address as known to the account for
  KNOWN_FOR (`<prefix>authfail:known:<ip>|<address>`, renewed by every login). The account's
  limit does not refuse logins from a known address, so anyone who knows an address cannot
  lock its owner out by guessing from elsewhere; the known address stays held to its own
  per-IP limit. Only counted addresses become known, and only while both limits are on: an
  exempt address is shared by many people (webmail), and one with no per-IP limit would
  give an attacker on it unlimited guesses.
- Per IP: IPv6 clients are counted per /64, like the filter's rate limits; addresses in
  `exempt` are not counted per IP. The store passes `rate_limit_exempt` (loopback by default):
  a webmail worker or a local tool logs in on behalf of many people from one address, and
  one user's typos there must not lock out everyone else. Tests that want the per-IP limit
  from loopback set rate_limit_exempt to "".
- A limit of 0 turns it off.
- Redis down or slow: logins are allowed (ARCHITECTURE.md failure contract: IMAP and POP3 keep
  working without Redis), logged once per outage. After a failed round trip Redis is left
  alone for RECHECK_AFTER seconds: a Redis that hangs would otherwise cost every login
  CHECK_TIMEOUT per round trip (two of them: the check, then the count or the reset) for
  as long as it hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio
from redis.exceptions import RedisError

from common.directory import normalize_address
from common.ratelimit import Network, ip_subject, parse_networks
from common.settings import Settings

log = logging.getLogger(__name__)

WINDOW = 600.0  # seconds: the settings speak of "failures per 10 minutes"
CHECK_TIMEOUT = 1.0  # seconds per Redis round trip; past it the login is allowed
RECHECK_AFTER = 5.0  # seconds without asking Redis after a round trip failed
MAX_KEY_USER = 254  # RFC 5321 4.5.3.1.3 path length; longer names are hashed into the key
KNOWN_FOR = 30 * 86400.0  # seconds an address an account logged in from stays known to it

T = TypeVar("T")


class AuthThrottle:
    def __init__(self, redis: redis.asyncio.Redis, prefix: str, per_ip: int, per_user: int,
                 window: float = WINDOW, *, exempt: Sequence[Network] = (),
                 timeout: float = CHECK_TIMEOUT, known_for: float = KNOWN_FOR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._prefix = prefix + "authfail:"
        self._per_ip = per_ip
        self._per_user = per_user
        self._window_ms = max(1, round(window * 1000))
        self._exempt = tuple(exempt)
        self._timeout = timeout
        self._known_for_ms = max(1, round(known_for * 1000))
        self._clock = clock
        self._redis_down = False
        self._recheck_at = 0.0
        self._turns: dict[str, _Turn] = {}
        self._ip_checks: dict[str, _IpChecks] = {}

    @classmethod
    def from_settings(cls, redis: redis.asyncio.Redis, settings: Settings) -> AuthThrottle:
        return cls(redis, settings.redis_prefix, settings.auth_failures_per_ip,
                   settings.auth_failures_per_user,
                   exempt=parse_networks(settings.rate_limit_exempt))

    def ip_key(self, ip: str) -> str | None:
        subject = ip_subject(ip, self._exempt) if self._per_ip else None
        return None if subject is None else f"{self._prefix}ip:{subject}"

    def user_key(self, user: str | None) -> str | None:
        if not self._per_user or not user:
            return None
        return f"{self._prefix}user:{_key_name(user)}"

    def known_key(self, ip: str, user: str | None) -> str | None:
        """The key that marks `ip` as an address `user` logged in from lately; None where
        no address becomes known (see the module's policy)."""
        if not self._per_user or not self._per_ip or not user:
            return None
        subject = ip_subject(ip, self._exempt)
        return None if subject is None else f"{self._prefix}known:{subject}|{_key_name(user)}"

    async def allowed(self, ip: str, user: str | None) -> bool:
        """False while the IP or the account has used up its failures (check the password
        only when True). `user` may be None before the client named one."""
        failures = await self._failures(ip, user)
        return failures is None or all(count < limit for count, limit in failures.values())

    async def _failures(self, ip: str, user: str | None) -> dict[str, tuple[int, int]] | None:
        """(failures, limit) per counted key; None when Redis cannot tell."""
        limited = self._limited(ip, user)
        if not limited:
            return {}
        known, user_key = self.known_key(ip, user), self.user_key(user)
        keys = [key for key, _ in limited] + ([known] if known else [])
        counts = await self._call(lambda: self._redis.mget(keys))
        if counts is None:
            return None
        failures = {key: (int(count or 0), limit)
                    for count, (key, limit) in zip(counts, limited, strict=False)}
        if known and user_key and counts[-1] is not None:
            failures.pop(user_key, None)  # the owner's own address
        return failures

    async def check(self, ip: str, user: str,
                    verify: Callable[[], Awaitable[bool]]) -> str:
        """One login, counted: "right", "wrong" (counted as a failure) or "throttled" (the
        password not checked). `verify` checks the password. The account's checks take
        turns (`one_check_at_a_time`); an IP's run side by side, but no more at once than
        it has failures left (`_ip_admits`)."""
        async with self.one_check_at_a_time(user):
            ip_checks = self._ip_checks_of(self.ip_key(ip))
            started = False
            try:
                started = await self._ip_admits(ip, user, ip_checks)
                if not started:
                    return "throttled"
                right = await verify()
                await (self.succeeded if right else self.failed)(ip, user)
            finally:
                ip_checks.leave(started)
                if not ip_checks.holders:
                    self._ip_checks.pop(ip_checks.key, None)
        return "right" if right else "wrong"

    async def _ip_admits(self, ip: str, user: str, ip_checks: _IpChecks) -> bool:
        """Whether the password may be checked, once this IP's checks under way (each a
        failure still to be counted, for all we know) and its counted failures together
        stay under its limit: wrong passwords for many accounts sent at once on many
        connections would otherwise all be checked before any was counted. A client with
        many right passwords at once waits for a turn, it is not refused."""
        while True:
            finished_before = ip_checks.finished
            failures = await self._failures(ip, user)
            if failures is not None and any(n >= limit for n, limit in failures.values()):
                return False
            counted = 0 if failures is None else failures.get(ip_checks.key, (0, 0))[0]
            # A check that finished while the counts were read left `under_way`, and its
            # failure may be missing from the counts (read before it was counted): it is
            # taken as a failure, and when that decides, the counts are read again.
            racing = ip_checks.finished - finished_before
            if not ip_checks.key or counted + ip_checks.under_way + racing < self._per_ip:
                ip_checks.start()
                return True
            if not racing:
                await ip_checks.one_finished()

    def _ip_checks_of(self, key: str | None) -> _IpChecks:
        if key is None:
            return _IpChecks("")
        checks = self._ip_checks.get(key)
        if checks is None:
            checks = self._ip_checks[key] = _IpChecks(key)
        checks.holders += 1
        return checks

    @contextlib.asynccontextmanager
    async def one_check_at_a_time(self, user: str | None) -> AsyncIterator[None]:
        """Around `allowed`, the password check and `failed`/`succeeded`: one account's
        logins take turns in this process, so guesses sent at the same time on many
        connections each see the failures counted before them (checked and counted
        separately, 30 guesses at once were all checked against a limit of 3). Counting
        before the check instead would refuse an owner whose clients open many connections
        at once (Thunderbird opens five). Other accounts' logins do not wait."""
        key = normalize_address(user) if user else ""
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

    def _limited(self, ip: str, user: str | None) -> list[tuple[str, int]]:
        return [(key, limit) for key, limit in ((self.ip_key(ip), self._per_ip),
                                                (self.user_key(user), self._per_user))
                if key is not None]

    async def failed(self, ip: str, user: str | None) -> None:
        """Count one failed login against the IP and the account."""
        keys = [key for key in (self.ip_key(ip), self.user_key(user)) if key is not None]
        if not keys:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.incr(key)
            pipe.pexpire(key, self._window_ms, nx=True)
        await self._call(pipe.execute)

    async def succeeded(self, ip: str, user: str | None) -> None:
        """A login succeeded: the address is known to the account from now on. Neither the
        account's failures nor the address's are forgotten: they expire with their window.
        Forgetting the account's at each success gave guessers from many addresses the whole
        limit again every time the owner's client logged in (a poll a minute: ten times the
        guesses), and the owner needs no reset: a known address skips the account's limit."""
        known = self.known_key(ip, user)
        if known is not None:
            await self._call(lambda: self._redis.set(known, 1, px=self._known_for_ms))

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T | None:
        if self._redis_down and self._clock() < self._recheck_at:
            return None  # Redis is left alone for now
        try:
            async with asyncio.timeout(self._timeout):
                result = await operation()
        except (RedisError, OSError, TimeoutError) as exc:
            self._recheck_at = self._clock() + RECHECK_AFTER
            if not self._redis_down:
                self._redis_down = True
                log.warning("login failures not counted (Redis unavailable, logins allowed): "
                            "%s: %s", type(exc).__name__, exc,
                            extra={"event": "auththrottle-unavailable"})
            return None
        if self._redis_down:
            self._redis_down = False
            log.info("login failures counted again (Redis back)",
                     extra={"event": "auththrottle-available"})
        return result


def _key_name(user: str) -> str:
    """An account's name in a key: normalised, hashed when longer than any address."""
    name = normalize_address(user)
    if len(name) > MAX_KEY_USER:
        name = "sha256:" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()
    return name


class _Turn:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # logins holding or waiting for the lock


class _IpChecks:
    """One client IP's password checks in this process: how many are under way, and a way
    to wait until one of them is done. `key` is "" for an IP not counted (exempt, or no
    per-IP limit), which never waits."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.under_way = 0
        self.finished = 0  # checks that were under way and are done, since the record began
        self.holders = 0  # logins that have this record and have not left it
        self._done = asyncio.Event()

    def start(self) -> None:
        self.under_way += 1

    def leave(self, started: bool) -> None:
        self.holders -= 1
        if started:
            self.under_way -= 1
            self.finished += 1
            self._done.set()  # wakes the waiters; later ones wait for the next
            self._done = asyncio.Event()

    async def one_finished(self) -> None:
        await self._done.wait()
