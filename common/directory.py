"""The shared directory in Redis: which domains are local, which mailboxes and aliases exist.

The store's account database is the authority; it publishes a copy here (never password
hashes) on start and on every change, and the filter tier reads it to validate recipients,
so inbound mail keeps flowing while the store is down.

Keys (all under the configured prefix):
    dir:domains   SET   local domains, lower case
    dir:users     SET   mailbox addresses, lower case
    dir:aliases   HASH  source address (or "@domain" catch-all) -> comma-separated targets
    dir:version   STRING  set on every change: the directory exists (its absence means Redis
                  lost it, and lookups answer "temporarily unavailable"); `whole:<time>`
                  when the three keys above each hold PRESENT (a directory a store or CLI
                  of before 2026-12-07 wrote has a bare time and may lack an empty key)
    dir:generation STRING the account database's change counter the directory reflects; the
                  store republishes whenever it differs from the database's
    dir:overquota SET   mailboxes whose usage has reached their quota: the filter answers
                  452 4.2.2 at RCPT for them (RFC 3463 3.3: mailbox full, temporary);
                  PRESENT too, after a reconcile
    dir:usage     HASH  mailbox -> octets stored, as the store last computed them (for the
                  CLI, which sets quotas without opening mailboxes, and for the filter's
                  check of a declared SIZE against the room left); PRESENT too, after a
                  reconcile
    dir:limit     HASH  mailbox -> its quota in octets, for mailboxes that have one: the
                  filter refuses a declared SIZE that does not fit (552 5.2.2 over the whole
                  quota, 452 4.2.2 over the room left); PRESENT too, after a reconcile
    dir:quota-generation STRING the account generation the quota state was last fully
                  reconciled at (services/store/quota.py); its absence, or PRESENT missing
                  from dir:overquota, dir:limit or dir:usage, means Redis lost quota state
                  (or no store reconciled yet)
    dir:changed   pub/sub CHANNEL: every change above (in the same MULTI) publishes a notice
                  here; filter workers forget their cached lookups on each one
                  (common/directory_cache.py)

The quota keys are maintained by the store's QuotaPublisher, not by `publish`: a directory
republish leaves them alone.

A full publish writes fresh keys under a temporary name and swaps them in with RENAME inside
one MULTI, so a reader never sees a half-written directory. It puts PRESENT into dir:domains,
dir:users and dir:aliases, so that none is ever empty: a key lost on its own (evicted by a
shared Redis's maxmemory policy, deleted by hand) is then told from an empty one, and lookups
answer "temporarily unavailable" (451) rather than "no such user" (550) until the store
republishes (found in review). Writers never undo each other:
- a change is made only to a published directory (WATCH on dir:version): one made to a Redis
  that restarted empty would otherwise leave a directory of that change alone that looks
  published, and every other recipient would get a permanent 5xx;
- the CLI's change for account generation N is made, with dir:generation set to N, only if
  the directory is at N-1 (else the CLI publishes it whole);
- a publish from a snapshot older than what Redis already reflects is not swapped in (a
  store's publish read before a CLI change, swapped in after it, undid the change).
"""

from __future__ import annotations

import enum
import functools
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import idna
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

MAX_ALIAS_DEPTH = 8
# In every key of a published directory: never a domain or an address (no "@", "(" in none).
PRESENT = "(published)"
WHOLE = "whole:"  # how the version of a directory that holds PRESENT starts
_PARTS = ("domains", "users", "aliases")
_BATCH = 5000
# A publish's keys not yet swapped in expire on their own: a publisher that died or timed
# out midway left a whole copy of the directory behind, for ever.
_TEMP_TTL = 3600
# Tries of a WATCHed change that other writers keep overtaking, before giving up with an error.
_WATCH_TRIES = 50


class DirectoryUnavailable(RedisError):
    """The directory has not been published to this Redis (e.g. Redis restarted empty).

    It derives from RedisError on purpose: callers treat it exactly like Redis being down and
    answer 451, because an empty directory would otherwise turn every recipient into a
    permanent 550/554. The store republishes the directory when it notices it is missing.
    """


class Resolution(enum.Enum):
    LOCAL = "local"  # every target is a local mailbox
    UNKNOWN_USER = "unknown-user"  # a local domain, but no such mailbox or alias
    NOT_LOCAL = "not-local"  # not one of our domains: relaying


@dataclass(frozen=True)
class Lookup:
    resolution: Resolution
    mailboxes: tuple[str, ...] = ()
    over_quota: tuple[str, ...] = ()  # those of `mailboxes` that are full
    limits: tuple[tuple[str, int], ...] = ()  # (mailbox, quota) of those that have one


@dataclass(frozen=True)
class QuotaState:
    """One mailbox's usage, whether it has reached its quota, and the quota (None: none)."""

    usage: int
    over: bool
    limit: int | None = None


@dataclass
class DirectorySnapshot:
    domains: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    generation: int = 0  # the account database's change counter this snapshot was read at


def normalize_address(address: str) -> str:
    """The form addresses are stored and looked up in: lower case, and an internationalized
    domain in its ASCII (xn--) form, so `x@bücher.example` in an SMTPUTF8 RCPT TO finds the
    account of `x@xn--bcher-kva.example`. The domain is as `normalize_domain` stores it, a
    final dot dropped: written `@example.org.`, a catch-all never matched, and a login as
    `x@example.org.` failed (found in review)."""
    address = address.strip().strip("<>")
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return local.lower() + "@" + normalize_domain(domain)


def normalize_domain(domain: str) -> str:
    """A domain as stored: lower case, no final dot, ASCII (xn--) form."""
    return _domain_case(domain.strip().removesuffix(".").strip())


def _domain_case(domain: str) -> str:
    # An internationalized name is not lower-cased first: UTS 46 maps case as DNS names are
    # looked up (a final capital sigma to σ, where str.lower() makes it ς: another name).
    return domain.lower() if domain.isascii() else ascii_domain(domain)


def ascii_domain(domain: str) -> str:
    """An internationalized domain name's A-label form (IDNA 2008 with the UTS 46 mapping,
    as browsers and mail clients use), or the name in lower case when it is not valid IDNA
    (then it matches no local domain)."""
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain.lower()


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


class Directory:
    CHANGED = "changed"  # the change-notice channel, under the prefix like every key

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        # While `change_at` collects a change's commands: they go into its transaction.
        self._collected: list[Callable[[Pipeline], object]] | None = None

    def key(self, name: str) -> str:
        return f"{self._prefix}dir:{name}"

    # Reading (filter tier)

    async def resolve(self, address: str) -> Lookup:
        """Resolve a RCPT TO address to local mailboxes, following aliases.

        One Redis round trip for a plain user; one more per alias met (for all its
        targets). Whether each mailbox is over quota comes in the same round trips. Raises
        redis.RedisError when Redis is unreachable; the caller answers 451.
        """
        address = normalize_address(address)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key("version"))
            pipe.exists(*self._part_keys())
            pipe.sismember(self.key("domains"), domain_of(address))
            self._queue_entry(pipe, address)
            version, parts, local_domain, *entry = await pipe.execute()
        if version is None:
            raise DirectoryUnavailable("the directory is not published in Redis")
        if _part_lost(version, parts):
            raise DirectoryUnavailable("part of the directory is missing in Redis")
        if not local_domain:
            return Lookup(Resolution.NOT_LOCAL)
        mailboxes: dict[str, tuple[bool, int | None]] = {}
        await self._expand(address, entry, mailboxes)
        if not mailboxes:
            return Lookup(Resolution.UNKNOWN_USER)
        return Lookup(Resolution.LOCAL, tuple(mailboxes),
                      tuple(mailbox for mailbox, (full, _) in mailboxes.items() if full),
                      tuple((mailbox, limit) for mailbox, (_, limit) in mailboxes.items()
                            if limit is not None))

    def _queue_entry(self, pipe: Pipeline, address: str) -> None:
        """Queue the five reads that say what an address is: user, alias, catch-all, whether
        it is a full mailbox, and its quota."""
        pipe.sismember(self.key("users"), address)
        pipe.hget(self.key("aliases"), address)
        pipe.hget(self.key("aliases"), "@" + domain_of(address))
        pipe.sismember(self.key("overquota"), address)
        pipe.hget(self.key("limit"), address)

    async def _entries(self, addresses: list[str]) -> list[list[object]]:
        """What `_queue_entry` reads, for many addresses in five commands (SMISMEMBER needs
        Redis 6.2): an alias of thousands resolves in one round trip."""
        if not addresses:
            return []
        catch_alls = ["@" + domain_of(address) for address in addresses]
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.smismember(self.key("users"), addresses)
            pipe.hmget(self.key("aliases"), addresses)
            pipe.hmget(self.key("aliases"), catch_alls)
            pipe.smismember(self.key("overquota"), addresses)
            pipe.hmget(self.key("limit"), addresses)
            replies = await pipe.execute()
        return [list(entry) for entry in zip(*replies, strict=True)]

    async def _expand(self, address: str, entry: list[object],
                      out: dict[str, tuple[bool, int | None]]) -> None:
        """Add the mailboxes `address` delivers to into `out` (mailbox -> (over quota,
        quota)), one alias level per round trip (expand_level)."""
        seen: set[str] = set()
        level, depth = [(address, _met(entry))], 0
        while names := expand_level(level, depth, seen, out):
            level = [(name, _met(found))
                     for name, found in zip(names, await self._entries(names), strict=True)]
            depth += 1

    async def is_published(self) -> bool:
        """Whether lookups find a directory: one whose version marks it whole must have
        each of its keys (status said `published`, and healthy, while a lost key made every
        RCPT 451: found in review)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key("version"))
            pipe.exists(*self._part_keys())
            version, parts = await pipe.execute()
        return version is not None and not _part_lost(version, parts)

    async def counts(self) -> dict[str, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            self._queue_counts(pipe)
            return _counted(await pipe.execute())

    def _queue_counts(self, pipe: Pipeline) -> None:
        """Six replies for _counted: the sizes, then whether each holds PRESENT."""
        pipe.scard(self.key("domains"))
        pipe.scard(self.key("users"))
        pipe.hlen(self.key("aliases"))
        for _ in self._present(pipe):
            pass  # each call queues its command

    def _present(self, redis: Redis | Pipeline) -> Iterator[Any]:
        """Whether each of the directory's keys holds PRESENT: queued on a pipeline, or
        awaitables on one that runs its commands as they come (a WATCHed one). Made one at
        a time as iterated: a coroutine made before a cancellation and never awaited would
        be reported as such."""
        yield redis.sismember(self.key("domains"), PRESENT)
        yield redis.sismember(self.key("users"), PRESENT)
        yield redis.hexists(self.key("aliases"), PRESENT)

    def _part_keys(self) -> list[str]:
        return [self.key(name) for name in _PARTS]

    # Writing (store tier and the tiermail CLI)

    async def publish(self, snapshot: DirectorySnapshot,
                      generation_now: Callable[[], Awaitable[int]] | None = None) -> bool:
        """Replace the whole directory atomically. With `generation_now` (the account
        database's generation as it is now), not if Redis already reflects a later change
        of that database than `snapshot` (held above the snapshot's generation, not above
        the database's: one above it is another database's, a restored backup's, and is
        replaced). Whether it was swapped in."""
        tag = secrets.token_hex(6)
        temp = {name: self.key(f"tmp:{tag}:{name}") for name in _PARTS}
        try:
            await self._fill_set(temp["domains"], [PRESENT, *snapshot.domains])
            await self._fill_set(temp["users"], [PRESENT, *snapshot.users])
            await self._fill_hash(temp["aliases"], {
                PRESENT: "", **{k: ",".join(v) for k, v in snapshot.aliases.items()}})

            async def refuse(published: bool, held: int | None) -> bool:
                await self._still_filled(temp, snapshot)
                return (generation_now is not None and held is not None
                        and snapshot.generation < held <= await generation_now())

            return await self._watched(
                refuse, lambda pipe, _version: self._queue_swap(pipe, temp, snapshot),
                watch=tuple(temp.values()))
        finally:
            await self._redis.delete(*temp.values())  # no-op for those swapped in

    async def _still_filled(self, temp: Mapping[str, str], snapshot: DirectorySnapshot) -> None:
        """Raise if the temporary keys no longer hold the snapshot (a FLUSHDB, a Redis that
        restarted, an eviction since they were filled): swapped in, their RENAME failed in
        the transaction while the DEL of the live keys and the new version went through, a
        directory published without its domains (found in review: 554 for every valid
        recipient). They are WATCHed from before this look to the swap."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.scard(temp["domains"])
            pipe.scard(temp["users"])
            pipe.hlen(temp["aliases"])
            held = await pipe.execute()
        wanted = [1 + len(snapshot.domains), 1 + len(snapshot.users), 1 + len(snapshot.aliases)]
        if held != wanted:
            raise RedisError("the directory's temporary copy was lost before it was swapped "
                             "in (Redis flushed or restarted?); nothing was changed")

    def _queue_swap(self, pipe: Pipeline, temp: Mapping[str, str],
                    snapshot: DirectorySnapshot) -> None:
        for name, temp_key in temp.items():  # never empty: each holds PRESENT
            pipe.delete(self.key(name))
            pipe.rename(temp_key, self.key(name))
            pipe.persist(self.key(name))  # RENAME keeps the temporary key's TTL
        pipe.set(self.key("version"), WHOLE + repr(time.time()))
        pipe.set(self.key("generation"), snapshot.generation)
        self._changed(pipe)

    async def _watched(self, refuse: Callable[[bool, int | None], Awaitable[bool]],
                       queue: Callable[[Pipeline, str], None], *,
                       watch: Sequence[str] = ()) -> bool:
        """Queue a transaction with `queue(pipe, version)` and run it, unless `refuse(
        published, held generation)` says no, with no writer between the look and the
        transaction (WATCH on the version, the generation and `watch`: one that came
        between makes it look again). `version` is what a change writes as the version: the
        time, marked WHOLE as the directory it changes is. Whether it ran."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_TRIES):
                try:
                    await pipe.watch(self.key("version"), self.key("generation"),
                                     *self._part_keys(), *watch)
                    current = await pipe.get(self.key("version"))
                    held = _optional_int(await pipe.get(self.key("generation")))
                    marked = current is not None and _whole(current)
                    # A change to a key lost on its own would make it again without PRESENT,
                    # and its loss would then go unseen (found in review): such a directory,
                    # and one an older version wrote (no PRESENT, so no telling), counts as
                    # not published, so the CLI publishes it whole.
                    whole = marked and all([await done for done in self._present(pipe)])
                    if await refuse(whole, held):
                        await pipe.reset()
                        return False
                    pipe.multi()
                    queue(pipe, (WHOLE if marked else "") + repr(time.time()))
                    await pipe.execute()
                    return True
                except WatchError:
                    continue
        raise RedisError(f"the directory kept changing under {_WATCH_TRIES} tries of a change")

    async def published_generation(self) -> int | None:
        """The account generation the directory reflects, or None when nothing is published."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.key("version"))
            pipe.get(self.key("generation"))
            published, generation = await pipe.execute()
        return int(generation) if published and generation is not None else None

    async def reflects(self, generation: int, counts: Mapping[str, int]) -> bool:
        """Whether Redis holds the directory of the account database at `generation`, with
        as many domains, users and aliases as `counts` says (AccountDB.directory_counts),
        each key there (with PRESENT): a key lost on its own (an eviction by a shared Redis's
        maxmemory policy, a DEL by hand) leaves the generation as it was. One that a store
        of before 2026-12-07 published (no PRESENT) is published again, with it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key("version"))
            pipe.get(self.key("generation"))
            self._queue_counts(pipe)
            version, held, *numbers = await pipe.execute()
        return (version is not None and _whole(version) and held is not None
                and int(held) == generation and all(numbers[len(_PARTS):])
                and _counted(numbers) == dict(counts))

    async def change_at(self, generation: int,
                        change: Callable[[Directory], Awaitable[object]]) -> bool:
        """Make the directory changes `change` makes (through this object's add_/remove_/
        set_ methods) as the account database's change at `generation`: in one transaction
        that also sets the directory's generation to it, and only if the directory is
        published at `generation - 1` (every change before it mirrored). False, nothing
        of the directory written, otherwise: the caller then publishes it whole. (What
        `change` writes beside the directory, quota state, is written as it goes, either
        way.)"""
        collected: list[Callable[[Pipeline], object]] = []
        self._collected = collected
        try:
            await change(self)
        finally:
            self._collected = None

        async def not_next(published: bool, held: int | None) -> bool:
            return not published or held != generation - 1

        def queue(pipe: Pipeline, version: str) -> None:
            for command in collected:
                command(pipe)
            pipe.set(self.key("version"), version)
            pipe.set(self.key("generation"), generation)
            self._changed(pipe)

        return await self._watched(not_next, queue)

    async def add_domain(self, domain: str) -> None:
        await self._change(lambda p: p.sadd(self.key("domains"), normalize_domain(domain)))

    async def remove_domain(self, domain: str) -> None:
        await self._change(lambda p: p.srem(self.key("domains"), normalize_domain(domain)))

    async def add_user(self, address: str) -> None:
        await self._change(lambda p: p.sadd(self.key("users"), normalize_address(address)))

    async def remove_user(self, address: str) -> None:
        address = normalize_address(address)

        def remove(pipe: Pipeline) -> None:
            pipe.srem(self.key("users"), address)
            pipe.srem(self.key("overquota"), address)
            pipe.hdel(self.key("usage"), address)
            pipe.hdel(self.key("limit"), address)

        await self._change(remove)

    async def set_alias(self, source: str, targets: Iterable[str]) -> None:
        joined = ",".join(targets)
        await self._change(lambda p: p.hset(self.key("aliases"), normalize_address(source), joined))

    async def remove_alias(self, source: str) -> None:
        await self._change(lambda p: p.hdel(self.key("aliases"), normalize_address(source)))

    # Quota state (services/store/quota.py writes it, the filter reads it in `resolve`)

    async def set_quota_states(self, states: Mapping[str, QuotaState],
                               generation: int | None = None) -> None:
        """Record usage, the over-quota flag and the quota of some mailboxes; with
        `generation`, also that the quota state is now at that account generation."""
        if not states:
            if generation is not None:
                await self._redis.set(self.key("quota-generation"), generation)
            return
        mailboxes = list(states)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self.key("limit"), mailboxes)
            self._queue_quota_states(pipe, states)
            if generation is not None:  # last, in the same transaction: all or nothing
                pipe.set(self.key("quota-generation"), generation)
            limits_before, *flag_changes = await pipe.execute()
        # The filters cache the flag and the quota, not usage: a notice (which empties their
        # caches) only when one of those changed, not for every usage update.
        limits_changed = [_optional_int(before) for before in limits_before] != \
            [states[mailbox].limit for mailbox in mailboxes]
        if any(flag_changes[:self._flag_commands(states)]) or limits_changed:
            await self._redis.publish(self.key(self.CHANGED), "1")

    async def replace_quota_states(self, states: Mapping[str, QuotaState],
                                   generation: int) -> None:
        """The full quota state at an account generation: the over-quota set becomes exactly
        the mailboxes flagged in `states` (and PRESENT); usage entries are updated (others are
        kept: they are only a hint for the CLI)."""
        over = [mailbox for mailbox, state in states.items() if state.over]
        limits = {mailbox: str(state.limit) for mailbox, state in states.items()
                  if state.limit is not None}
        temp = self.key(f"tmp:{secrets.token_hex(6)}:overquota")
        temp_limits = self.key(f"tmp:{secrets.token_hex(6)}:limit")
        # PRESENT in these and in dir:usage, as in the directory's keys: one of them lost on
        # its own (evicted, deleted by hand) is then told from an empty one, and reconciled
        # (quota_generation).
        await self._fill_set(temp, [PRESENT, *over])
        await self._fill_hash(temp_limits, {PRESENT: PRESENT, **limits})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key("overquota"), self.key("limit"))
            for part, filled in (("overquota", temp), ("limit", temp_limits)):
                pipe.rename(filled, self.key(part))
                pipe.persist(self.key(part))
            pipe.hset(self.key("usage"), PRESENT, PRESENT)
            for start in range(0, len(states), _BATCH):
                chunk = dict(list(states.items())[start:start + _BATCH])
                pipe.hset(self.key("usage"),
                          mapping={mailbox: state.usage for mailbox, state in chunk.items()})
            pipe.set(self.key("quota-generation"), generation)
            self._changed(pipe)
            await pipe.execute()

    def _queue_quota_states(self, pipe: Pipeline, states: Mapping[str, QuotaState]) -> None:
        """Queue the flag changes first (`_flag_commands` of them), then usage and quotas."""
        over = [mailbox for mailbox, state in states.items() if state.over]
        under = [mailbox for mailbox, state in states.items() if not state.over]
        if over:
            pipe.sadd(self.key("overquota"), *over)
        if under:
            pipe.srem(self.key("overquota"), *under)
        pipe.hset(self.key("usage"),
                  mapping={mailbox: state.usage for mailbox, state in states.items()})
        unlimited = [m for m, state in states.items() if state.limit is None]
        if len(unlimited) < len(states):
            pipe.hset(self.key("limit"), mapping={m: state.limit for m, state in states.items()
                                                  if state.limit is not None})
        if unlimited:
            pipe.hdel(self.key("limit"), *unlimited)

    @staticmethod
    def _flag_commands(states: Mapping[str, QuotaState]) -> int:
        return (any(s.over for s in states.values())
                + any(not s.over for s in states.values()))

    async def quota_generation(self) -> int | None:
        """The account generation of the last full quota reconcile; None if there was none
        or Redis lost part of its result (quota_state says which)."""
        generation, lost = await self.quota_state()
        return None if lost else generation

    async def quota_state(self) -> tuple[int | None, list[str]]:
        """The account generation of the last full quota reconcile, and the quota keys that
        Redis lost since (or that no reconcile wrote yet): dir:quota-generation missing, or
        dir:overquota, dir:limit or dir:usage without PRESENT (each holds it after a
        reconcile; a change written into a lost one makes it again without)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key("quota-generation"))
            pipe.sismember(self.key("overquota"), PRESENT)
            pipe.hexists(self.key("limit"), PRESENT)
            pipe.hexists(self.key("usage"), PRESENT)
            value, *marked = await pipe.execute()
        kept = {"quota-generation": value is not None, "overquota": marked[0],
                "limit": marked[1], "usage": marked[2]}
        return (None if value is None else int(value)), [
            self.key(part) for part, there in kept.items() if not there]

    async def quota_limits(self) -> dict[str, int]:
        """Every mailbox's quota as published (mailboxes without one are absent)."""
        published = {_decoded(mailbox): limit for mailbox, limit
                     in (await self._redis.hgetall(self.key("limit"))).items()}
        published.pop(PRESENT, None)
        return {mailbox: int(limit) for mailbox, limit in published.items()}

    async def usages(self, mailboxes: Sequence[str]) -> list[int]:
        """Each mailbox's usage as the store last published it (0 if never)."""
        values = await self._redis.hmget(self.key("usage"), list(mailboxes))
        return [int(value or 0) for value in values]

    async def usage(self, address: str) -> int | None:
        """The mailbox's octets as the store last computed them; None if not known."""
        value = await self._redis.hget(self.key("usage"), normalize_address(address))
        return None if value is None else int(value)

    async def over_quota(self) -> set[str]:
        return {_decoded(m) for m in await self._redis.smembers(self.key("overquota"))} - {PRESENT}

    async def _change(self, command: Callable[[Pipeline], object]) -> None:
        """One change, made only to a published directory: raises DirectoryUnavailable,
        nothing written, if Redis lost it (its next publish will hold the change)."""
        if self._collected is not None:
            self._collected.append(command)
            return

        async def unpublished(published: bool, held: int | None) -> bool:
            return not published

        def queue(pipe: Pipeline, version: str) -> None:
            command(pipe)
            pipe.set(self.key("version"), version)
            self._changed(pipe)

        if not await self._watched(unpublished, queue):
            raise DirectoryUnavailable("the directory is not published in Redis")

    def _changed(self, pipe: Pipeline) -> None:
        """The change notice, queued last in a change's MULTI: subscribers hear of it only
        once the change is visible."""
        pipe.publish(self.key(self.CHANGED), "1")

    async def _fill_set(self, key: str, members: Iterable[str]) -> None:
        """Fill a temporary set, which expires unless it is swapped in (then PERSISTed)."""
        batches: list[list[str]] = [[]]
        for member in members:
            if len(batches[-1]) >= _BATCH:
                batches.append([])
            batches[-1].append(member)
        for batch in batches:
            if batch:
                await self._add_expiring(key, functools.partial(_sadd, key, batch))

    async def _fill_hash(self, key: str, mapping: Mapping[str, str]) -> None:
        """`_fill_set` for a hash."""
        items = list(mapping.items())
        for start in range(0, len(items), _BATCH):
            chunk = dict(items[start:start + _BATCH])
            await self._add_expiring(key, functools.partial(_hset, key, chunk))

    async def _add_expiring(self, key: str, add: Callable[[Pipeline], object]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            add(pipe)
            pipe.expire(key, _TEMP_TTL)
            await pipe.execute()


def _sadd(key: str, members: list[str], pipe: Pipeline) -> object:
    return pipe.sadd(key, *members)


def _hset(key: str, mapping: dict[str, str], pipe: Pipeline) -> object:
    return pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]


def _decoded(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def aliases_reaching_no_mailbox(users: Collection[str],
                                aliases: Mapping[str, Sequence[str]]) -> list[str]:
    """The alias sources that resolve to no mailbox: loops, chains deeper than
    MAX_ALIAS_DEPTH, targets that exist nowhere. The filter refuses mail to them (550);
    `tiermail` warns when a change leaves one."""
    return [source for source in aliases if not reaches_mailbox(users, aliases, source)]


def reaches_mailbox(users: Collection[str], aliases: Mapping[str, Sequence[str]],
                    address: str) -> bool:
    """Whether the filter would find a mailbox for `address` (a user, an alias, or an
    address of a domain with a catch-all "@domain"). The rules are Directory._expand's
    (expand_level), over the account database's users and aliases instead of Redis."""
    def met(name: str) -> Met:
        return Met(name in users, aliases.get(name), aliases.get("@" + domain_of(name)))

    found: dict[str, tuple[bool, int | None]] = {}
    seen: set[str] = set()
    names, depth = [address], 0
    while names and not found:
        names = expand_level([(name, met(name)) for name in names], depth, seen, found)
        depth += 1
    return bool(found)


@dataclass(frozen=True)
class Met:
    """What an address met while following aliases is."""

    is_user: bool
    targets: Sequence[str] | None  # its alias targets
    catch_all: Sequence[str] | None  # its domain's catch-all's targets
    quota: tuple[bool, int | None] = (False, None)  # over quota, quota


def expand_level(level: Sequence[tuple[str, Met]], depth: int, seen: set[str],
                 out: dict[str, tuple[bool, int | None]]) -> list[str]:
    """One step of following aliases, breadth first: the mailboxes among `level` (the
    addresses `depth` aliases away from the recipient) go into `out`; returns the addresses
    of the next level. Breadth first, each address is expanded where it is nearest to the
    recipient: an alias that one branch reaches deep and another directly gets all its
    targets (depth first, the deep visit came first, lost the targets past MAX_ALIAS_DEPTH,
    and marked the alias seen for the direct one)."""
    following: list[str] = []
    for address, met in level:
        if address in seen:
            # An alias naming itself, or a loop back to it: as in Postfix, a user met again
            # gets the mail instead of being expanded again (alice -> alice, bob keeps a copy).
            if met.is_user:
                out.setdefault(address, met.quota)
            continue
        if depth > MAX_ALIAS_DEPTH:
            continue
        seen.add(address)
        targets = met.targets
        if targets is None and not met.is_user:
            targets = met.catch_all
        if targets is None:
            if met.is_user:
                out.setdefault(address, met.quota)
            continue
        following.extend(targets)
    return following


def _met(entry: list[object]) -> Met:
    """A Redis entry (Directory._queue_entry's five reads) as a Met."""
    is_user, targets, catch_all, over_quota, limit = entry
    return Met(bool(is_user), None if targets is None else _split_targets(targets),  # type: ignore[arg-type]
               None if catch_all is None else _split_targets(catch_all),  # type: ignore[arg-type]
               (bool(over_quota), _optional_int(limit)))


def _counted(numbers: Sequence[int]) -> dict[str, int]:
    """Directory._queue_counts' replies by name: the sizes, PRESENT not counted."""
    sizes, present = numbers[:len(_PARTS)], numbers[len(_PARTS):]
    return {name: int(size) - int(bool(held))
            for name, size, held in zip(_PARTS, sizes, present, strict=True)}


def _whole(version: bytes | str) -> bool:
    """Whether a directory's version says it holds PRESENT in each of its keys."""
    return _decoded(version).startswith(WHOLE)


def _part_lost(version: bytes | str, parts: int) -> bool:
    """Whether a directory marked whole lacks one of its keys (`parts`: how many exist)."""
    return _whole(version) and parts < len(_PARTS)


def _split_targets(raw: bytes | str) -> list[str]:
    text = _decoded(raw)
    return [normalize_address(t) for t in text.split(",") if t.strip()]


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
