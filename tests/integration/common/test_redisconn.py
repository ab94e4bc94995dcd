"""check_redis_url against a redis-server of the test's own that requires a password: what
it refuses on every retry is a bad setting; what passes (busy, down) is waited for."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from common.redisconn import check_redis_url, open_redis
from common.settings import Settings, SettingsError
from tests.support import PrivateRedis, wait_until

PASSWORD = "right-password"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path, "--requirepass", PASSWORD, "--busy-reply-threshold", "10")
    server.start()
    yield server
    server.stop()


async def test_the_right_password_passes_and_a_wrong_one_is_a_bad_setting(
        private_redis: PrivateRedis) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/1"
    await check_redis_url(Settings(hostname="test", redis_url=url))
    for wrong in (url.replace(PASSWORD, "wrong"), url.replace(f":{PASSWORD}@", "")):
        with pytest.raises(SettingsError, match=r"Redis refuses it") as refused:
            await check_redis_url(Settings(hostname="test", redis_url=wrong))
        assert "wrong" not in str(refused.value).partition("refuses")[0]


async def test_a_wrong_password_in_the_query_is_not_shown(private_redis: PrivateRedis) -> None:
    """redis-py also takes the password as a query parameter; the error hides it there too."""
    url = f"redis://127.0.0.1:{private_redis.port}/1?socket_keepalive=1&password=wrong-one"
    with pytest.raises(SettingsError, match=r"Redis refuses it") as refused:
        await check_redis_url(Settings(hostname="test", redis_url=url))
    assert str(refused.value).startswith(
        f"TIERMAIL_REDIS_URL=redis://127.0.0.1:{private_redis.port}/1"
        "?socket_keepalive=1&password=***: Redis refuses it")


async def test_a_frozen_redis_costs_each_call_the_timeout(private_redis: PrivateRedis) -> None:
    """Connected, then the server stops answering (SIGSTOP): the call fails after the
    timeout open_redis was given instead of waiting for ever."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/1"
    client = open_redis(Settings(hostname="test", redis_url=url), timeout=0.5)
    # What the bound is, not only that there is one: redis-py's own default is 5 s now.
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    try:
        assert await client.ping()
        private_redis.pause()
        try:
            async with asyncio.timeout(10):  # the test's own bound, far above the client's
                with pytest.raises(redis.exceptions.TimeoutError):
                    await client.ping()
        finally:
            private_redis.resume()
    finally:
        await client.aclose()


async def test_a_busy_redis_is_no_bad_setting(private_redis: PrivateRedis) -> None:
    """A script that runs on (past busy-reply-threshold) makes Redis answer BUSY to every
    other client: it ends when the script does, so the tier starts and waits."""
    admin = redis.Redis(port=private_redis.port, password=PASSWORD)
    looping = threading.Thread(target=_run_quietly,
                               args=(admin.eval, "while true do end", 0))
    looping.start()
    try:
        probe = redis.Redis(port=private_redis.port, password=PASSWORD)
        wait_until(lambda: _busy(probe), what="Redis to answer BUSY")
        url = f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/1"
        await check_redis_url(Settings(hostname="test", redis_url=url))
    finally:
        redis.Redis(port=private_redis.port, password=PASSWORD).script_kill()
        looping.join(timeout=30)


def _run_quietly(call: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(redis.RedisError):  # the script is killed at the end
        call(*args)


def _busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.exceptions.ResponseError as exc:
        return str(exc).startswith("BUSY") or getattr(exc, "status_code", None) == "BUSY"
    return False
