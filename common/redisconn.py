"""How every tier opens Redis: with a bound on each wait.

A Redis that stops answering (a frozen process, a network that drops packets without a reset)
must cost each call a bounded wait, never hang a tier: the filter then answers 451 at RCPT,
the store's logins and background publishers carry on without it (ARCHITECTURE.md, failure
contract). redis-py happens to default to 5 s in the version we use; it is set here so that a
new default cannot quietly take the bound away.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import redis.asyncio

from common.settings import Settings, SettingsError

REDIS_TIMEOUT = 5.0  # seconds for connecting and for each reply
START_CHECK_TIMEOUT = 3.0  # what a hung Redis may add to a tier's start


def open_redis(settings: Settings, timeout: float = REDIS_TIMEOUT) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(settings.redis_url, socket_connect_timeout=timeout,
                                        socket_timeout=timeout)


async def check_redis_url(settings: Settings) -> None:
    """At a tier's start: a Redis that answers but refuses what TIERMAIL_REDIS_URL asks of it
    (a database number it does not have: 16 by default, 0 to 15; a wrong password, or none
    where it requires one) would refuse it on every retry, so it is a bad setting
    (SettingsError, exit 2). A Redis that does not answer, or is busy (loading, running a
    script), is no setting's fault: the tier starts and works without it until it is back,
    as when it goes away later (failure contract)."""
    client = open_redis(settings, START_CHECK_TIMEOUT)
    try:
        await ping_or_refuse(client, settings)
    except (redis.exceptions.RedisError, OSError):
        pass  # down or hung: each part of the tier says so and retries
    finally:
        await client.aclose()


async def ping_or_refuse(client: redis.asyncio.Redis, settings: Settings) -> None:
    """PING through `client` (connecting sends AUTH, then SELECT with the URL's database).
    A TIERMAIL_REDIS_URL that Redis refuses raises SettingsError; any other failure (down,
    hung, busy) is raised as it came."""
    try:
        await client.ping()
    except Exception as exc:
        refused = refused_setting(settings, exc)
        if refused is not None:
            raise refused from None
        raise


def refused_setting(settings: Settings, exc: BaseException) -> SettingsError | None:
    """The bad setting that `exc`, raised by a Redis call, says TIERMAIL_REDIS_URL is (a
    database number the server does not have, a password it refuses or requires), or None
    when it is no setting's fault (down, hung, busy). The `tiermail` commands ask it of their
    own first Redis call, as the tiers do through check_redis_url."""
    if isinstance(exc, redis.exceptions.AuthenticationError):
        # WRONGPASS or NOAUTH. redis-py makes it a ConnectionError, like a Redis that is
        # down, but no retry will change the answer.
        return SettingsError(f"TIERMAIL_REDIS_URL={_without_password(settings.redis_url)}: "
                             f"Redis refuses it: {_authentication_refused(exc)}")
    # A plain "ERR" refuses the command's arguments; the other codes (BUSY, MASTERDOWN,
    # NOPERM, ...) come as subclasses or other codes and may pass.
    if type(exc) is redis.exceptions.ResponseError and getattr(exc, "status_code",
                                                                None) == "ERR":
        return SettingsError(f"TIERMAIL_REDIS_URL={_without_password(settings.redis_url)}: "
                             f"Redis refuses it: {exc}{_hint(str(exc))}")
    return None


def _authentication_refused(exc: redis.exceptions.AuthenticationError) -> str:
    if getattr(exc, "status_code", None) == "NOAUTH":
        return ("it requires a password and the URL has none "
                "(redis://:PASSWORD@HOST:PORT/DB, or redis://USER:PASSWORD@... for an ACL user)")
    return (f"{exc} (the password, or user and password, in the URL: "
            "redis://:PASSWORD@HOST:PORT/DB or redis://USER:PASSWORD@...)")


def _hint(error: str) -> str:
    if "DB index" in error:
        return (" (the database number in the URL must be below the server's `databases`, "
                "16 unless redis.conf sets another)")
    return ""


def _without_password(url: str) -> str:
    """The URL fit for an error message: a password in it, before the host or as redis-py's
    `?password=` query parameter, shown as ***."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    return parts._replace(query=_QUERY_PASSWORD.sub(r"\1***", parts.query)).geturl()


_QUERY_PASSWORD = re.compile(r"((?:^|&)password=)[^&]*")
