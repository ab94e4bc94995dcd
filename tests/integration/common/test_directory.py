"""The Redis directory against the real Redis: resolution, aliases, atomic publish."""

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis, from_url
from redis.exceptions import RedisError

from common.directory import (
    PRESENT,
    Directory,
    DirectorySnapshot,
    DirectoryUnavailable,
    Resolution,
    aliases_reaching_no_mailbox,
)
from common.settings import Settings
from tests.support import free_port


@pytest.fixture
async def directory(settings: Settings) -> AsyncIterator[Directory]:
    redis: Redis = from_url(settings.redis_url)
    d = Directory(redis, settings.redis_prefix)
    await d.publish(DirectorySnapshot(
        domains={"example.org", "example.com"},
        users={"alice@example.org", "bob@example.org", "carol@example.com"},
        aliases={"postmaster@example.org": ("alice@example.org",),
                 "team@example.org": ("alice@example.org", "bob@example.org",
                                      "postmaster@example.org"),
                 "@example.com": ("carol@example.com",),
                 "loop1@example.org": ("loop2@example.org",),
                 "loop2@example.org": ("loop1@example.org",)}))
    yield d
    await redis.aclose()


async def test_users_aliases_and_catch_all(directory: Directory) -> None:
    assert (await directory.resolve("<Alice@Example.ORG>")).mailboxes == ("alice@example.org",)
    team = await directory.resolve("team@example.org")
    assert team.resolution is Resolution.LOCAL
    assert team.mailboxes == ("alice@example.org", "bob@example.org")
    assert (await directory.resolve("anything@example.com")).mailboxes == ("carol@example.com",)
    # A user of the catch-all's domain gets its own mail: the catch-all takes the rest.
    await directory.add_user("dave@example.com")
    assert (await directory.resolve("dave@example.com")).mailboxes == ("dave@example.com",)


async def test_unknown_and_foreign(directory: Directory) -> None:
    assert (await directory.resolve("nobody@example.org")).resolution is Resolution.UNKNOWN_USER
    assert (await directory.resolve("x@elsewhere.net")).resolution is Resolution.NOT_LOCAL
    assert (await directory.resolve("loop1@example.org")).resolution is Resolution.UNKNOWN_USER


async def test_republish_replaces_everything(directory: Directory) -> None:
    await directory.publish(DirectorySnapshot(domains={"example.org"}, users={"bob@example.org"}))
    assert (await directory.resolve("alice@example.org")).resolution is Resolution.UNKNOWN_USER
    assert (await directory.resolve("x@example.com")).resolution is Resolution.NOT_LOCAL
    assert await directory.counts() == {"domains": 1, "users": 1, "aliases": 0}


async def test_incremental_changes(directory: Directory) -> None:
    await directory.add_user("dave@example.org")
    await directory.set_alias("sales@example.org", ["dave@example.org"])
    assert (await directory.resolve("sales@example.org")).mailboxes == ("dave@example.org",)
    await directory.remove_user("dave@example.org")
    assert (await directory.resolve("sales@example.org")).resolution is Resolution.UNKNOWN_USER


async def test_missing_directory_is_a_temporary_failure(settings: Settings) -> None:
    """A Redis that restarted empty must not turn every recipient into a 5xx."""
    redis: Redis = from_url(settings.redis_url)
    try:
        with pytest.raises(DirectoryUnavailable):
            await Directory(redis, settings.redis_prefix).resolve("alice@example.org")
    finally:
        await redis.aclose()


@pytest.mark.parametrize("lost", ["domains", "users", "aliases"])
async def test_a_part_of_the_directory_lost_is_a_temporary_failure(
        directory: Directory, lost: str) -> None:
    """One key of the directory lost on its own (evicted by a shared Redis's maxmemory
    policy, deleted by hand) turned every user into 550 5.1.1 (or every domain into 554)
    until the store's next check (found in review): each key holds PRESENT, so a lost one
    is told from an empty one."""
    await directory._redis.delete(directory.key(lost))
    for address in ("alice@example.org", "nobody@example.org", "x@elsewhere.net"):
        with pytest.raises(DirectoryUnavailable):
            await directory.resolve(address)


@pytest.mark.parametrize("lost", ["domains", "users", "aliases"])
async def test_no_change_is_made_to_a_directory_missing_a_part(
        directory: Directory, lost: str) -> None:
    """A change to the lost key made it again without PRESENT, and every other user got 550
    again (found in review): the directory counts as not published to a change, and the CLI
    then publishes it whole."""
    await directory._redis.delete(directory.key(lost))
    with pytest.raises(DirectoryUnavailable):
        await directory.add_user("dave@example.org")
    generation = int(await directory._redis.get(directory.key("generation")) or 0)
    assert not await directory.change_at(generation + 1,
                                         lambda d: d.add_user("dave@example.org"))
    assert not await directory._redis.exists(directory.key(lost))
    with pytest.raises(DirectoryUnavailable):
        await directory.resolve("alice@example.org")
    assert not await directory.is_published()  # what status says


async def test_empty_parts_of_a_directory_are_no_failure(directory: Directory) -> None:
    await directory.publish(DirectorySnapshot())
    assert (await directory.resolve("x@example.org")).resolution is Resolution.NOT_LOCAL
    assert await directory.counts() == {"domains": 0, "users": 0, "aliases": 0}
    await directory.publish(DirectorySnapshot(domains={"example.org"}))
    assert (await directory.resolve("x@example.org")).resolution is Resolution.UNKNOWN_USER
    await directory.add_user("x@example.org")
    await directory.remove_user("x@example.org")  # the last one: the key stays
    assert (await directory.resolve("x@example.org")).resolution is Resolution.UNKNOWN_USER


async def test_a_directory_an_older_store_published_is_read_as_before(
        directory: Directory) -> None:
    """No PRESENT, a bare time as its version (a store or CLI of before 2026-12-07): an empty
    key is no loss there. No change is made to it, since a lost key cannot be told from an
    empty one (an older CLI's change then gave every user 550, and a change of ours kept
    that: found in review): the CLI publishes it whole, as the store's check does."""
    redis = directory._redis
    for name in ("domains", "users"):
        await redis.srem(directory.key(name), PRESENT)
    await redis.delete(directory.key("aliases"))
    await redis.set(directory.key("version"), "1765000000.0")
    assert await directory.is_published()
    assert (await directory.resolve("alice@example.org")).mailboxes == ("alice@example.org",)
    assert (await directory.resolve("team@example.org")).resolution is Resolution.UNKNOWN_USER
    with pytest.raises(DirectoryUnavailable):
        await directory.add_user("dave@example.org")
    assert not await directory.change_at(1, lambda d: d.add_user("dave@example.org"))
    assert not await directory.reflects(0, await directory.counts())  # published anew
    await directory.publish(DirectorySnapshot(domains={"example.org"}))
    await directory.add_domain("example.net")
    assert (await redis.get(directory.key("version"))).startswith(b"whole:")
    assert await directory.counts() == {"domains": 2, "users": 0, "aliases": 0}


async def test_unreachable_redis_raises_redis_error() -> None:
    redis: Redis = from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        with pytest.raises(RedisError):
            await Directory(redis, "x:").resolve("alice@example.org")
    finally:
        await redis.aclose()


async def test_a_large_nested_alias_resolves_every_mailbox(settings: Settings) -> None:
    redis: Redis = from_url(settings.redis_url)
    directory = Directory(redis, settings.redis_prefix)
    staff = [f"user{i:05d}@example.org" for i in range(5000)]
    await directory.publish(DirectorySnapshot(
        domains={"example.org"}, users=set(staff),
        aliases={"all@example.org": ("first@example.org", "second@example.org"),
                 "first@example.org": tuple(staff[:2500]),
                 "second@example.org": tuple(staff[2000:])}))
    try:
        everyone = await directory.resolve("all@example.org")
    finally:
        await redis.aclose()
    assert everyone.resolution is Resolution.LOCAL
    assert sorted(everyone.mailboxes) == staff


async def test_a_user_aliased_to_itself_and_others_keeps_a_copy(settings: Settings) -> None:
    redis: Redis = from_url(settings.redis_url)
    directory = Directory(redis, settings.redis_prefix)
    await directory.publish(DirectorySnapshot(
        domains={"example.org"}, users={"alice@example.org", "bob@example.org"},
        aliases={"alice@example.org": ("alice@example.org", "bob@example.org"),
                 "bob@example.org": ("helpdesk@example.org",),
                 "helpdesk@example.org": ("bob@example.org",)}))
    try:
        alice = await directory.resolve("alice@example.org")
        bob = await directory.resolve("bob@example.org")
    finally:
        await redis.aclose()
    assert alice.mailboxes == ("alice@example.org", "bob@example.org")
    assert bob.mailboxes == ("bob@example.org",)  # a loop back to a user ends there


async def test_an_alias_reached_deep_in_one_branch_and_near_in_another_gets_its_mail(
        settings: Settings) -> None:
    """`team` is reached by `all` directly and through a chain of 7: followed depth first,
    the chain came first, its visit of `team` was too deep for alice (past MAX_ALIAS_DEPTH),
    and the direct one was skipped as seen: `all` got 550, and `all-and-bob` a 250 with
    no copy for alice. Each address is now followed where it is nearest."""
    chain = {f"chain{i}@example.org": (f"chain{i + 1}@example.org",) for i in range(1, 7)}
    chain["chain7@example.org"] = ("team@example.org",)
    users = {"alice@example.org", "bob@example.org"}
    aliases = {**chain, "team@example.org": ("alice@example.org",),
               "all@example.org": ("chain1@example.org", "team@example.org"),
               "all-and-bob@example.org": ("chain1@example.org", "team@example.org",
                                           "bob@example.org")}
    redis: Redis = from_url(settings.redis_url)
    directory = Directory(redis, settings.redis_prefix)
    await directory.publish(DirectorySnapshot(
        domains={"example.org"}, users=users, aliases=aliases))
    try:
        everyone = await directory.resolve("all@example.org")
        with_bob = await directory.resolve("all-and-bob@example.org")
    finally:
        await redis.aclose()
    assert everyone.mailboxes == ("alice@example.org",)
    assert sorted(with_bob.mailboxes) == ["alice@example.org", "bob@example.org"]
    assert aliases_reaching_no_mailbox(users, aliases) == []


async def test_the_aliases_found_reaching_no_mailbox_are_those_the_filter_refuses(
        settings: Settings) -> None:
    """aliases_reaching_no_mailbox (the CLI's warning) follows the same rules as resolve."""
    chain = {f"chain{i}@example.org": (f"chain{i + 1}@example.org",) for i in range(9)}
    chain["chain9@example.org"] = ("alice@example.org",)
    users = {"alice@example.org", "bob@example.org", "carol@example.com"}
    aliases = {**chain,
               "loop1@example.org": ("loop2@example.org",),
               "loop2@example.org": ("loop1@example.org",),
               "self@example.org": ("self@example.org",),
               "alice@example.org": ("alice@example.org", "bob@example.org"),
               "dangling@example.org": ("nobody@example.org",),
               "half@example.org": ("nobody@example.org", "loop1@example.org",
                                     "bob@example.org"),
               "@example.com": ("carol@example.com",),
               "ghost@example.com": ("nobody@example.com",),
               "@example.net": ("lost@example.net",)}
    redis: Redis = from_url(settings.redis_url)
    directory = Directory(redis, settings.redis_prefix)
    await directory.publish(DirectorySnapshot(
        domains={"example.org", "example.com", "example.net"}, users=users, aliases=aliases))
    try:
        refused = {source for source in aliases if (await directory.resolve(
            "unlisted" + source if source.startswith("@") else source)).resolution
            is Resolution.UNKNOWN_USER}
    finally:
        await redis.aclose()
    assert refused == {"chain0@example.org", "chain1@example.org", "loop1@example.org",
                       "loop2@example.org", "self@example.org", "dangling@example.org",
                       "@example.net"}
    assert set(aliases_reaching_no_mailbox(users, aliases)) == refused


async def _keys(directory: Directory, pattern: str = "*") -> set[str]:
    return {key.decode() for key in
            await directory._redis.keys(directory.key("").removesuffix("dir:") + pattern)}


async def _lose_everything(directory: Directory) -> None:
    """What Redis restarting empty does to this directory (a FLUSHDB would hit other tests)."""
    if keys := await _keys(directory):
        await directory._redis.delete(*keys)


class MeddledWith(Directory):
    """A directory that `meddle` changes once, right after a writer looked at it and before
    its transaction runs: another writer, or Redis restarting empty, at the worst moment."""

    meddle: Callable[[], Awaitable[object]] | None = None

    async def _watched(self, refuse: Callable[[bool, int | None], Awaitable[bool]],
                       queue: Callable[[Any], None], *, watch: Sequence[str] = ()) -> bool:
        async def then_meddled(published: bool, held: int | None) -> bool:
            answer = await refuse(published, held)
            meddle, self.meddle = self.meddle, None
            if meddle is not None:
                await meddle()
            return answer

        return await super()._watched(then_meddled, queue, watch=watch)


async def test_a_change_is_never_made_to_a_directory_redis_lost(directory: Directory) -> None:
    """A change made after Redis restarted empty (or a FLUSHDB) left a directory of that
    change alone that looked published: every other recipient got 554 or 550 until the
    store published again (found in review, with the flush between the CLI's look at the
    directory and its change)."""
    await _lose_everything(directory)
    with pytest.raises(DirectoryUnavailable):
        await directory.add_domain("new.example")
    assert not await directory.change_at(1, lambda d: d.add_domain("new.example"))
    assert await _keys(directory) == set()

    meddled = MeddledWith(directory._redis, directory._prefix)
    await meddled.publish(DirectorySnapshot(domains={"example.org"}, users={"a@example.org"},
                                            generation=4))
    meddled.meddle = lambda: _lose_everything(directory)
    with pytest.raises(DirectoryUnavailable):
        await meddled.add_user("b@example.org")
    assert await _keys(directory) == set()
    with pytest.raises(DirectoryUnavailable):
        await directory.resolve("a@example.org")


async def test_a_cli_change_is_made_with_its_generation_only_after_the_one_before(
        directory: Directory) -> None:
    await directory.publish(DirectorySnapshot(domains={"example.org"}, users={"a@example.org"},
                                              generation=7))
    assert not await directory.change_at(9, lambda d: d.add_user("b@example.org"))
    assert await directory.change_at(8, lambda d: d.add_user("b@example.org"))
    assert await directory.published_generation() == 8
    assert (await directory.resolve("b@example.org")).resolution is Resolution.LOCAL
    # Made once: the change at 8 again is refused, not applied a second time.
    assert not await directory.change_at(8, lambda d: d.remove_user("a@example.org"))
    assert (await directory.resolve("a@example.org")).resolution is Resolution.LOCAL


async def test_a_publish_never_undoes_a_later_change(directory: Directory) -> None:
    """The store read the account database at generation 7, a CLI change at 8 was mirrored,
    then the store's publish landed: it took the change back (the new user got 550 5.1.1,
    a deleted one 250, until the store's next check; found in review)."""
    older = DirectorySnapshot(domains={"example.org"}, users={"a@example.org"}, generation=7)
    await directory.publish(older)
    assert await directory.change_at(8, lambda d: d.add_user("b@example.org"))

    async def database_at_8() -> int:
        return 8

    assert not await directory.publish(older, generation_now=database_at_8)
    assert (await directory.resolve("b@example.org")).resolution is Resolution.LOCAL
    assert await directory.published_generation() == 8
    assert await _keys(directory, "dir:tmp:*") == set()

    # The change lands between the publish's look and its swap.
    meddled = MeddledWith(directory._redis, directory._prefix)
    meddled.meddle = lambda: directory.change_at(9, lambda d: d.add_user("c@example.org"))

    async def database_at_9() -> int:
        return 9

    newer_than_8 = DirectorySnapshot(domains={"example.org"},
                                      users={"a@example.org", "b@example.org"}, generation=8)
    assert not await meddled.publish(newer_than_8, generation_now=database_at_9)
    assert (await directory.resolve("c@example.org")).resolution is Resolution.LOCAL

    # Held above the account database's own generation: another database's directory (a
    # restored backup's), which the store replaces.
    async def restored_at_3() -> int:
        return 3

    restored = DirectorySnapshot(domains={"example.org"}, users={"a@example.org"}, generation=3)
    assert await directory.publish(restored, generation_now=restored_at_3)
    assert (await directory.resolve("c@example.org")).resolution is Resolution.UNKNOWN_USER


async def test_a_publish_that_fails_midway_leaves_no_copy_behind(directory: Directory) -> None:
    """A publish that timed out before its swap left its temporary copy of the whole
    directory in Redis for ever, one more with each failed attempt (found in review)."""
    failing = MeddledWith(directory._redis, directory._prefix)

    async def redis_goes() -> None:
        raise RedisError("Redis went away")

    failing.meddle = redis_goes
    with pytest.raises(RedisError):
        await failing.publish(DirectorySnapshot(domains={"example.org"},
                                                users={"a@example.org"}))
    assert await _keys(directory, "dir:tmp:*") == set()
    # And one whose process dies midway: what it filled expires.
    await directory._fill_set(directory.key("tmp:dead:users"), ["a@example.org"])
    assert 0 < await directory._redis.ttl(directory.key("tmp:dead:users")) <= 3600
    await directory.publish(DirectorySnapshot(domains={"example.org"}, users={"a@example.org"}))
    assert await directory._redis.ttl(directory.key("users")) == -1  # swapped in: kept


async def test_a_publish_whose_copy_was_lost_changes_nothing(directory: Directory) -> None:
    """A FLUSHDB (or a Redis restarted empty) between the fill of a publish's temporary keys
    and their swap: the swap's RENAMEs failed inside the transaction while the DEL of the live
    keys and the new version went through, a directory published without its domains (554
    for every valid recipient, found in review). The swap now happens only over the copy
    the publish filled."""
    before = await directory.resolve("alice@example.org")
    meddled = MeddledWith(directory._redis, directory._prefix)

    async def copy_lost() -> None:
        if keys := await _keys(directory, "dir:tmp:*"):
            await directory._redis.delete(*keys)

    meddled.meddle = copy_lost
    newer = DirectorySnapshot(domains={"example.org", "new.example"},
                              users={"alice@example.org", "zed@new.example"}, generation=9)
    with pytest.raises(RedisError, match="temporary copy was lost"):
        await meddled.publish(newer)
    assert await directory.resolve("alice@example.org") == before
    assert await directory.counts() == {"domains": 2, "users": 3, "aliases": 5}
    await directory.publish(newer)  # the next publish goes through
    assert (await directory.resolve("zed@new.example")).resolution is Resolution.LOCAL
