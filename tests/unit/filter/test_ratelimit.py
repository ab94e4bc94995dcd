"""Rate limits: the GCRA arithmetic with a fake clock, and the limiter's policy around it.

The Lua script that runs the same arithmetic inside Redis is checked against `gcra` in
tests/integration/filter/test_ratelimit.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from aiosmtpd.smtp import Session as SMTPSession
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from common.ratelimit import (
    Limit,
    MemoryCounter,
    Rate,
    RateLimiter,
    gcra,
    ip_subject,
    parse_networks,
)
from common.settings import Settings, SettingsError
from services.filter.protocol import replies
from services.filter.session import FilterSession, SessionPolicy, authenticated_user
from services.filter.stats import WorkerStats

EXTRA: Mapping[str, Any] = {"session": "s1", "peer": "test"}


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock, *, conn: int = 0, ip: int = 0, user: int = 0,
            exempt: str = "", stats: WorkerStats | None = None) -> RateLimiter:
    return RateLimiter(MemoryCounter(clock), prefix="p:", connections_per_ip=conn,
                       messages_per_ip=ip, messages_per_user=user,
                       exempt=parse_networks(exempt), stats=stats)


# The arithmetic


def run(rate: Rate, times_ms: Sequence[int]) -> list[bool]:
    tat: int | None = None
    allowed = []
    for now in times_ms:
        new = gcra(tat, now, rate)
        allowed.append(new is not None)
        tat = new if new is not None else tat
    return allowed


def test_burst_then_one_per_interval() -> None:
    rate = Rate(5, 60.0)  # one per 12 s, bursts of 5
    assert (rate.interval_ms, rate.burst_ms) == (12_000, 60_000)
    assert run(rate, [0] * 6) == [True] * 5 + [False]
    # After the burst, a new event fits every 12 s and not before.
    assert run(rate, [0] * 5 + [11_999, 12_000, 12_001, 24_000]) == [True] * 5 + [
        False, True, False, True]
    # A full period of quiet gives the whole burst back.
    assert run(rate, [0] * 5 + [60_000] * 6) == [True] * 5 + [True] * 5 + [False]


@pytest.mark.parametrize(("count", "period"), [(1, 60.0), (7, 60.0), (120, 60.0),
                                               (240, 60.0), (1000, 3600.0), (3, 3600.0)])
def test_burst_is_exactly_the_count(count: int, period: float) -> None:
    assert run(Rate(count, period), [5] * (count + 1)) == [True] * count + [False]


@given(st.lists(st.integers(min_value=0, max_value=300_000), max_size=80),
       st.integers(min_value=1, max_value=10))
def test_never_more_than_burst_plus_rate(times: list[int], count: int) -> None:
    """In any span of L ms at most count + L / interval events get through."""
    rate = Rate(count, 60.0)
    times.sort()
    allowed = [t for t, ok in zip(times, run(rate, times), strict=True) if ok]
    for i, start in enumerate(allowed):
        for j in range(i, len(allowed)):
            span = allowed[j] - start
            assert j - i + 1 <= count + span // rate.interval_ms


def test_memory_counter_is_all_or_nothing() -> None:
    clock = FakeClock()
    counter = MemoryCounter(clock)
    one, two = Rate(1, 60.0), Rate(2, 60.0)
    assert asyncio.run(counter.take(["a", "b"], [two, one])) == 0
    assert asyncio.run(counter.take(["a", "b"], [two, one])) == 2  # b is full...
    assert asyncio.run(counter.take(["a"], [two])) == 0  # ...and a was not charged for it
    assert asyncio.run(counter.take(["a"], [two])) == 1


# The limiter


async def test_connection_limit_per_ip() -> None:
    clock, stats = FakeClock(), WorkerStats()
    limits = limiter(clock, conn=3, stats=stats)
    results = [await limits.connection("192.0.2.1", EXTRA) for _ in range(4)]
    assert results == [None, None, None, Limit.CONNECTIONS_PER_IP]
    assert await limits.connection("192.0.2.2", EXTRA) is None  # another client
    assert stats.rate_limited_connections == 1
    clock.now += 20  # one per 20 s comes back
    assert await limits.connection("192.0.2.1", EXTRA) is None
    assert await limits.connection("192.0.2.1", EXTRA) is Limit.CONNECTIONS_PER_IP


async def test_message_limits_per_ip_and_per_user() -> None:
    clock, stats = FakeClock(), WorkerStats()
    limits = limiter(clock, ip=3, user=2, exempt="127.0.0.0/8", stats=stats)
    assert await limits.message("192.0.2.1", "Alice@example.test", EXTRA) is None
    assert await limits.message("192.0.2.9", "alice@example.test", EXTRA) is None
    # The user's hourly budget is spent, from whichever address, even an exempt one.
    assert await limits.message("198.51.100.7", "alice@example.test", EXTRA) is (
        Limit.MESSAGES_PER_USER)
    assert await limits.message("127.0.0.1", "alice@example.test", EXTRA) is (
        Limit.MESSAGES_PER_USER)
    # Refused checks charged nothing: 192.0.2.1 has two of its three left.
    assert await limits.message("192.0.2.1", None, EXTRA) is None
    assert await limits.message("192.0.2.1", "bob@example.test", EXTRA) is None
    assert await limits.message("192.0.2.1", None, EXTRA) is Limit.MESSAGES_PER_IP
    assert stats.rate_limited_messages == 3
    clock.now += 61  # a minute on: still spent, the budget is the hour's
    assert await limits.message("127.0.0.1", "alice@example.test", EXTRA) is (
        Limit.MESSAGES_PER_USER)
    clock.now += 3600 / 2 - 61  # half an hour: one more for alice
    assert await limits.message("127.0.0.1", "alice@example.test", EXTRA) is None


async def test_zero_disables_and_exempt_networks_skip_ip_limits() -> None:
    clock = FakeClock()
    off = limiter(clock)
    assert all([await off.connection("192.0.2.1", EXTRA) is None for _ in range(50)])
    assert all([await off.message("192.0.2.1", "a@b.test", EXTRA) is None for _ in range(50)])
    limits = limiter(clock, conn=1, ip=1, exempt="127.0.0.0/8,::1,10.0.0.0/8")
    for ip in ("127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "::ffff:10.1.2.3", ""):
        assert [await limits.connection(ip, EXTRA) for _ in range(5)] == [None] * 5
        assert [await limits.message(ip, None, EXTRA) for _ in range(5)] == [None] * 5


def test_ip_subjects() -> None:
    assert ip_subject("192.0.2.1", ()) == "192.0.2.1"
    assert ip_subject("::ffff:192.0.2.1", ()) == "192.0.2.1"
    # One IPv6 host normally owns a /64: its addresses share one count.
    assert ip_subject("2001:db8:1:2:aaaa::1", ()) == ip_subject("2001:db8:1:2::ffff", ()) == (
        "2001:db8:1:2::/64")
    assert ip_subject("not an ip", ()) is None
    assert ip_subject("192.0.2.1", parse_networks("192.0.2.0/24")) is None


def test_ip_subjects_kept_for_one_list_of_exempt_networks_are_not_another_lists() -> None:
    # The answers are kept by address and by the identity of the exempt list.
    exempt = parse_networks("192.0.2.0/24")
    assert ip_subject("192.0.2.9", exempt) is None
    assert ip_subject("192.0.2.9", parse_networks("198.51.100.0/24")) == "192.0.2.9"
    assert ip_subject("192.0.2.9", ()) == "192.0.2.9"
    assert ip_subject("192.0.2.9", exempt) is None


def test_keys_are_under_the_stack_prefix() -> None:
    limits = RateLimiter.from_settings(
        Settings(redis_prefix="stack1:"), MemoryCounter(FakeClock()))
    assert limits.key(Limit.MESSAGES_PER_IP, "192.0.2.1") == "stack1:rate:msg-ip:192.0.2.1"


def test_exempt_setting_is_validated() -> None:
    assert parse_networks(Settings().rate_limit_exempt) == parse_networks("127.0.0.0/8, ::1")
    assert parse_networks("") == ()
    with pytest.raises(SettingsError, match="RATE_LIMIT_EXEMPT"):
        parse_networks("127.0.0.0/8,example.com")


class BrokenCounter:
    def __init__(self, error: BaseException | None = None, delay: float = 0.0) -> None:
        self.error, self.delay = error, delay

    async def take(self, keys: Sequence[str], rates: Sequence[Rate]) -> int:
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return 1


@pytest.mark.parametrize("counter", [BrokenCounter(RedisConnectionError("refused")),
                                     BrokenCounter(OSError(111, "refused")),
                                     BrokenCounter(delay=5.0)])
async def test_counter_failure_fails_open_and_is_logged(
        counter: BrokenCounter, caplog: pytest.LogCaptureFixture) -> None:
    stats = WorkerStats()
    limits = RateLimiter(counter, prefix="p:", connections_per_ip=1, messages_per_ip=1,
                         messages_per_user=1, stats=stats, timeout=0.05)
    assert await limits.connection("192.0.2.1", EXTRA) is None
    assert await limits.message("192.0.2.1", "a@b.test", EXTRA) is None
    assert stats.rate_limit_errors == 2
    assert stats.rate_limited_connections == stats.rate_limited_messages == 0
    warnings = [r for r in caplog.records if "fail open" in r.getMessage()]
    assert len(warnings) == 2 and all(getattr(r, "session", None) == "s1" for r in warnings)


# The session's MAIL FROM


class ReadyPublisher:
    """MAIL FROM asks only whether the broker can be reached."""

    connected = True
    stalled = False

    async def ready(self) -> bool:
        return True

    async def publish(self, *args: Any) -> None:
        raise AssertionError("MAIL FROM publishes nothing")


def session_with(limits: RateLimiter) -> FilterSession:
    unused: Any = None  # MAIL FROM needs no directory
    return FilterSession(session_id="s1", directory=unused, publisher=ReadyPublisher(),
                         rules=[], stats=WorkerStats(),
                         policy=SessionPolicy("mx.test", 100, 30.0), rate_limits=limits)


async def mail(handler: FilterSession, session: SMTPSession, address: str,
               envelope: SMTPEnvelope | None = None) -> str:
    server: Any = None  # handle_MAIL does not use it
    return await handler.handle_MAIL(server, session, envelope or SMTPEnvelope(), address, [])


def smtp_session(peer: tuple[str, int], login: bytes | None = None) -> SMTPSession:
    session = SMTPSession(asyncio.get_running_loop())
    session.peer = peer
    if login is not None:
        session.authenticated = True
        session.auth_data = type("LoginPassword", (), {"login": login})()
    return session


async def test_mail_from_is_refused_over_the_ip_rate() -> None:
    handler = session_with(limiter(FakeClock(), ip=2))
    session = smtp_session(("192.0.2.1", 40000))
    envelope = SMTPEnvelope()
    for _ in range(2):
        assert await mail(handler, session, "a@remote.test") == replies.SENDER_OK
    assert await mail(handler, session, "a@remote.test", envelope) == replies.RATE_MESSAGES_IP
    assert envelope.mail_from is None  # no transaction was started


async def test_mail_from_counts_the_authenticated_user() -> None:
    """Inert on the wire until submission brings AUTH; the path is ready for it."""
    handler = session_with(limiter(FakeClock(), ip=100, user=1, exempt="127.0.0.0/8"))
    session = smtp_session(("127.0.0.1", 40000), login=b"alice@example.test")
    assert authenticated_user(session) == "alice@example.test"
    assert await mail(handler, session, "alice@example.test") == replies.SENDER_OK
    assert await mail(handler, session, "alice@example.test") == replies.RATE_MESSAGES_USER
    anonymous = smtp_session(("127.0.0.1", 40001))
    assert authenticated_user(anonymous) is None
    assert await mail(handler, anonymous, "x@remote.test") == replies.SENDER_OK


def test_rate_replies_carry_enhanced_codes() -> None:
    assert replies.RATE_CONNECTIONS.startswith("421 4.7.0 ")
    assert replies.RATE_MESSAGES_IP.startswith("451 4.7.1 ")
    assert replies.RATE_MESSAGES_USER.startswith("451 4.7.1 ")
    for reply in (replies.RATE_CONNECTIONS, replies.RATE_MESSAGES_IP, replies.RATE_MESSAGES_USER):
        assert replies.enhance(reply) == reply
