"""Rate limits in the real Redis: shared by workers, separate per stack, open when Redis fails.

Every client here is 127.0.0.1, which `rate_limit_exempt` spares by default; these tests turn
the exemption off. GCRA allows a burst of `count` and then one per period/count (12 s for 5
per minute), so the counts below do not depend on how fast the test runs.
"""

from __future__ import annotations

import random
import smtplib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from common.ratelimit import Limit, MemoryCounter, Rate, RateLimiter, RedisCounter
from common.settings import Settings
from services.filter.protocol import replies
from tests.integration.filter.conftest import (
    ALICE,
    SENDER,
    RawClient,
    in_thread,
    message,
    publish_directory,
    queue_depth,
    running_filter,
    send,
)
from tests.support import free_port


def limited(settings: Settings, **changes: int) -> Settings:
    base = {"rate_connections_per_ip": 0, "rate_messages_per_ip": 0}
    return settings.replace(rate_limit_exempt="", **{**base, **changes})


def mail_reply(port: int) -> str:
    """The reply to MAIL FROM in a fresh session (the session then ends with QUIT)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.test",
                      timeout=30) as client:
        client.ehlo()
        code, text = client.mail(SENDER)
        return f"{code} {text.decode()}"


def mail_and_rcpt(port: int) -> tuple[str, str]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.test",
                      timeout=30) as client:
        client.ehlo()
        mail = client.mail(SENDER)
        rcpt = client.rcpt(ALICE)
        return f"{mail[0]} {mail[1].decode()}", f"{rcpt[0]} {rcpt[1].decode()}"


def greeting(port: int) -> str:
    client = RawClient(port)
    try:
        reply = client.reply()
        if reply.startswith("421"):
            assert client.closed()
        return reply
    finally:
        client.close()


@pytest.fixture
async def aredis(settings: Settings) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


async def test_lua_script_agrees_with_gcra(settings: Settings,
                                           aredis: redis.asyncio.Redis) -> None:
    """The script in Redis and the Python arithmetic the unit tests check decide alike."""
    now = [1_700_000_000.0]
    redis_counter = RedisCounter(aredis, clock=lambda: now[0])
    memory = MemoryCounter(lambda: now[0])
    rates = [Rate(3, 60.0), Rate(7, 60.0), Rate(2, 3600.0)]
    keys = [f"{settings.redis_prefix}rate:test:{i}" for i in range(3)]
    chooser = random.Random(1234)
    outcomes = []
    for _ in range(300):
        now[0] += chooser.choice([0, 0, 0.001, 0.5, 3, 11, 25, 70])
        picked = chooser.sample(range(3), chooser.randint(1, 3))
        args = ([keys[i] for i in picked], [rates[i] for i in picked])
        expected = await memory.take(*args)
        assert await redis_counter.take(*args) == expected
        outcomes.append(expected)
    assert 0 in outcomes and any(outcomes)  # both allowed and refused happened
    # Keys expire once their bucket is full again, so idle clients cost nothing.
    ttl = await aredis.pttl(keys[0])
    assert ttl == -2 or 0 < ttl <= rates[0].burst_ms, ttl  # -2: gone; -1 would be never


async def test_redis_clock_is_used_by_default(settings: Settings,
                                              aredis: redis.asyncio.Redis) -> None:
    limits = RateLimiter(RedisCounter(aredis), prefix=settings.redis_prefix,
                         connections_per_ip=2, messages_per_ip=0, messages_per_user=0)
    got = [await limits.connection("192.0.2.1", {}) for _ in range(3)]
    assert got == [None, None, Limit.CONNECTIONS_PER_IP]
    ttl = await aredis.pttl(f"{settings.redis_prefix}rate:conn-ip:192.0.2.1")
    assert 0 < ttl <= 60_000, ttl  # a key of an address that comes no more goes


async def test_message_limit_holds_across_two_workers(directory: Settings) -> None:
    shared = limited(directory, rate_messages_per_ip=5)
    other = shared.replace(smtp_port=shared.submission_port)
    async with running_filter(shared) as first, running_filter(other) as second:
        a, b = first.ports[0], second.ports[0]
        assert a != b
        for port in (a, a, a, b, b):
            assert await in_thread(send, port, message(f"via {port}"), [ALICE]) == {}
        # The sixth MAIL FROM, whichever worker takes it, is over the shared budget.
        assert await in_thread(mail_reply, b) == replies.RATE_MESSAGES_IP
        assert await in_thread(mail_reply, a) == replies.RATE_MESSAGES_IP
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await in_thread(send, a, message("over"), [ALICE])
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.decode().startswith("4.7.1 ")
        assert first.stats.accepted + second.stats.accepted == 5
        assert first.stats.rate_limited_messages == 2
        assert second.stats.rate_limited_messages == 1
    assert await queue_depth(directory) == 5


async def test_a_mail_refused_for_its_parameters_or_address_spends_no_budget(
        directory: Settings) -> None:
    """MAIL with a repeated parameter or a non-ASCII sender without SMTPUTF8 is refused
    before the session's hook: it counts nothing, so the one message allowed still goes."""
    def refused_mails(port: int) -> list[str]:
        client = RawClient(port)
        try:
            client.reply()
            client.command(b"EHLO client.remote.test\r\n")
            return [client.command(line + b"\r\n") for line in (
                f"MAIL FROM:<{SENDER}> SIZE=10 SIZE=10".encode(),
                "MAIL FROM:<jörg@remote.test>".encode())]
        finally:
            client.close()

    async with running_filter(limited(directory, rate_messages_per_ip=1)) as worker:
        port = worker.ports[0]
        assert await in_thread(refused_mails, port) == [
            replies.REPEATED_PARAMETER.format(keyword="SIZE"), replies.NON_ASCII_SENDER]
        assert await in_thread(send, port, message("the one"), [ALICE]) == {}
        assert await in_thread(mail_reply, port) == replies.RATE_MESSAGES_IP
    assert await queue_depth(directory) == 1


async def test_connection_limit_holds_across_two_workers(directory: Settings) -> None:
    shared = limited(directory, rate_connections_per_ip=4)
    other = shared.replace(smtp_port=shared.submission_port)
    async with running_filter(shared) as first, running_filter(other) as second:
        a, b = first.ports[0], second.ports[0]
        for port in (a, b, a, b):
            assert (await in_thread(greeting, port)).startswith("220 ")
        assert await in_thread(greeting, a) == replies.RATE_CONNECTIONS
        assert await in_thread(greeting, b) == replies.RATE_CONNECTIONS
        assert first.stats.rate_limited_connections == 1
        assert second.stats.rate_limited_connections == 1
        # A refused connection left no session behind.
        assert first.stats.active == second.stats.active == 0


async def test_two_stacks_sharing_redis_are_isolated(directory: Settings) -> None:
    one = limited(directory, rate_messages_per_ip=1, rate_connections_per_ip=2)
    tag = directory.redis_prefix  # under the fixture's prefix, so its cleanup removes it
    two = one.replace(redis_prefix=f"{tag}other:", queue_prefix=f"{one.queue_prefix}-other",
                      smtp_port=one.submission_port)
    await publish_directory(two)
    async with running_filter(one) as first, running_filter(two) as second:
        assert await in_thread(send, first.ports[0], message("one"), [ALICE]) == {}
        assert await in_thread(mail_reply, first.ports[0]) == replies.RATE_MESSAGES_IP
        assert await in_thread(greeting, first.ports[0]) == replies.RATE_CONNECTIONS
        # The other stack's budget for the same client is untouched.
        assert await in_thread(send, second.ports[0], message("two"), [ALICE]) == {}
        assert await in_thread(mail_reply, second.ports[0]) == replies.RATE_MESSAGES_IP
    assert await queue_depth(directory) == 1
    assert await queue_depth(two) == 1


async def test_redis_down_fails_open_until_rcpt(settings: Settings) -> None:
    broken = limited(settings, rate_messages_per_ip=1, rate_connections_per_ip=1).replace(
        redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with running_filter(broken) as worker:
        port = worker.ports[0]
        for _ in range(2):  # both limits are 1: these would be refused if counted
            assert (await in_thread(greeting, port)).startswith("220 ")
        assert await in_thread(mail_and_rcpt, port) == (
            replies.SENDER_OK, replies.DIRECTORY_UNAVAILABLE)
        assert worker.stats.rate_limit_errors >= 3
        assert worker.stats.rate_limited_connections == worker.stats.rate_limited_messages == 0
    assert await queue_depth(settings) == 0


async def test_loopback_is_exempt_by_default(directory: Settings) -> None:
    strict = directory.replace(rate_messages_per_ip=1, rate_connections_per_ip=1)
    async with running_filter(strict) as worker:
        for i in range(3):
            assert await in_thread(send, worker.ports[0], message(f"m{i}"), [ALICE]) == {}
        assert worker.stats.rate_limit_errors == 0
    assert await queue_depth(directory) == 3
