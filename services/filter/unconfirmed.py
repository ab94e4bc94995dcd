"""Messages the broker may hold although their senders were told 451, remembered so that a
retry of one goes out under the same queue id, which the store delivers only once.

A publish that went out but was not confirmed (no confirm in time, the connection lost after
the publish was sent) may or may not be in a queue: the sender gets 451 and, like any MTA,
sends again later. Under a new queue id that retry would be a second copy wherever the first
was persisted after all. The store's idempotence key is (queue id, mailbox), so the filter
publishes the retry under the first attempt's queue id: one copy either way.

What makes a retry: the same transaction, by its digest (MAIL FROM, the RCPT TO addresses in
order, the message bytes as the client sent them), of a message that names itself: its
header section has a Message-ID (RFC 5322 3.6.4: unique to one message) and a Date. Identical
bytes, both included, to the same recipients from the same sender are the same message. A
message without them is never matched: a script that sends the same alert every hour with a
fixed Message-ID or none, and no Date, sends identical bytes each time, and each is a message
of its own. Once a retry under a remembered queue id is confirmed, the entry is forgotten
everywhere: from then on identical bytes are a new message again.

Where entries live: each worker keeps them in memory, so a message is matched without a
Redis round trip on the SMTP path. An uncertain outcome is written to Redis as
`<prefix>unconfirmed:<digest>` (expiring after RETRY_WINDOW, the 4-5 days of RFC 5321
4.5.4.1 that MTAs keep retrying) and announced on the channel `<prefix>unconfirmed` in the
same MULTI; every worker follows the channel and loads the keys each time its subscription
starts, so a retry that reaches another worker is matched too. With Redis away a worker
still knows its own entries; a retry reaching another worker then gets a new queue id, the
at-least-once outcome the failure contract allows. MAX_ENTRIES bounds the memory: past it,
the earliest added go first (an O(1) eviction, and a load stops at the bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.directory_notices import Message, follow_channel
from services.filter.inflight import InFlightTable

log = logging.getLogger(__name__)

RETRY_WINDOW = 5 * 86400.0  # seconds an unconfirmed transaction is remembered
MAX_ENTRIES = 100_000  # per worker; an entry is about 200 octets
WRITE_TIMEOUT = 1.0  # seconds for the Redis write before the 451 goes out
LOAD_BATCH = 1000


_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:(.*)", re.DOTALL)
_MSG_ID = re.compile(rb"<[^<>@\s]+@[^<>\s]+>")
MAX_HEADER_LINES = 1000  # a header section longer than this is not looked through


def names_itself(content: bytes) -> bool:
    """Whether the message's header section (the lines before the first empty one, each a
    field or a field's continuation) has a Message-ID field with an id and a non-empty Date
    field. Anything else before the empty line, or no empty line: it does not."""
    fields: dict[bytes, bytes] = {}  # the first Message-ID and Date, unfolded
    name = b""
    # Lines ended by LF only: what follows the last LF is not a line yet.
    for number, line in enumerate(content.split(b"\n", MAX_HEADER_LINES + 1)[:-1]):
        line = line.removesuffix(b"\r")
        if not line:
            return (_MSG_ID.search(fields.get(b"message-id", b"")) is not None
                    and bool(fields.get(b"date", b"").strip()))
        if number >= MAX_HEADER_LINES:
            return False
        if line[:1] in (b" ", b"\t"):
            if name in fields and number:
                fields[name] += line  # a continuation of the field before
            continue
        field = _FIELD.fullmatch(line)
        if field is None:
            return False  # not a header section
        name = field.group(1).lower()
        if name in (b"message-id", b"date") and name not in fields:
            fields[name] = field.group(2)
        else:
            name = b""
    return False


def transaction_digest(mail_from: str, recipients: Sequence[str], content: bytes) -> str:
    """Each address length-prefixed, so no two envelopes join into the same octets."""
    digest = hashlib.sha256()
    for address in (mail_from, *recipients):
        octets = address.encode("utf-8", "surrogateescape")
        digest.update(b"%d:" % len(octets) + octets)
    digest.update(b"|")
    digest.update(content)
    return digest.hexdigest()


class UnconfirmedLedger:
    """digest -> queue id of transactions whose publish may have been persisted unconfirmed.
    `redis` None: this worker's own entries only (tests, a worker without Redis)."""

    def __init__(self, redis: Redis | None, prefix: str, *, window: float = RETRY_WINDOW,
                 max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._key_prefix = prefix + "unconfirmed:"
        self._channel = prefix + "unconfirmed"
        self._window = window
        self._max_entries = max_entries
        self._clock = clock  # the wall clock: expiry times travel between workers
        self._entries: dict[str, tuple[str, float]] = {}  # digest -> (queue id, expires at)
        self._tasks: set[asyncio.Task[None]] = set()  # loads and background writes
        self.in_flight_table: InFlightTable | None = None  # services/filter/inflight.py

    def __len__(self) -> int:
        return len(self._entries)

    def in_flight(self, digest: Callable[[], str | None],
                  queue_id: str) -> contextlib.AbstractContextManager[None]:
        """Around a publish: what a worker killed meanwhile leaves for `adopt_left_behind`.
        `digest` (the transaction's, None for a message that does not name itself) is
        computed only when there is a table to write it to."""
        key = digest() if self.in_flight_table is not None else None
        if key is None or self.in_flight_table is None:
            return contextlib.nullcontext()
        return self.in_flight_table.holding(key, queue_id)

    async def adopt_left_behind(self, entries: list[tuple[str, str]]) -> None:
        """Publishes a killed worker left in flight: uncertain outcomes, remembered."""
        for digest, queue_id in entries:
            await self.remember(digest, queue_id)
        if entries:
            log.warning("%d publish(es) a killed filter worker left unanswered remembered: a "
                        "client's retry of one reuses its queue id", len(entries),
                        extra={"event": "inflight-adopted"})

    def queue_id_for(self, digest: str) -> str | None:
        """The queue id an earlier, unconfirmed attempt of this transaction was published
        under, if one is remembered."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        queue_id, expires_at = entry
        if expires_at <= self._clock():
            del self._entries[digest]
            return None
        return queue_id

    async def remember(self, digest: str, queue_id: str) -> None:
        """Note an uncertain publish, here at once and, within WRITE_TIMEOUT, for every
        worker through Redis."""
        expires_at = self._clock() + self._window
        self._add(digest, queue_id, expires_at)
        value = f"{queue_id} {expires_at:.0f}"
        await self._tell_others(queue_id, lambda pipe: (
            pipe.set(self._key_prefix + digest, value, exat=int(expires_at) + 1),
            pipe.publish(self._channel, f"{digest} {value}")))

    def remember_soon(self, digest: str, queue_id: str) -> None:
        """`remember` from a task being cancelled (the client went away while the publish
        was under way): here at once, the others as soon as Redis answers."""
        self._in_background(self.remember(digest, queue_id))

    def forget(self, digest: str, queue_id: str) -> None:
        """A retry under the remembered queue id was confirmed: identical bytes from now on
        are a new message, on every worker."""
        if self._entries.pop(digest, None) is None:
            return
        self._in_background(self._tell_others(queue_id, lambda pipe: (
            pipe.delete(self._key_prefix + digest),
            pipe.publish(self._channel, f"- {digest}"))))

    async def _tell_others(self, queue_id: str, commands: Callable[[Any], object]) -> None:
        if self._redis is None:
            return
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                async with self._redis.pipeline(transaction=True) as pipe:
                    commands(pipe)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("unconfirmed-publish ledger not shared with other workers (Redis: "
                        "%s: %s)", type(exc).__name__, exc, extra={"queue_id": queue_id})

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Follow the other workers' entries until cancelled."""
        if self._redis is None:
            return
        try:
            await follow_channel(self._redis, self._channel, self._on_message, lambda: None,
                                 name="unconfirmed ledger")
        finally:
            for task in self._tasks:
                task.cancel()

    def _on_message(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # Subscribed first, then loaded: nothing written meanwhile goes unheard.
            self._in_background(self._load())
        elif kind == "message":
            text = _text(message.get("data"))
            if text.startswith("- "):
                self._entries.pop(text[2:], None)
            else:
                self._add_entry(text)

    async def _load(self) -> None:
        assert self._redis is not None
        try:
            keys: list[bytes] = []
            async for key in self._redis.scan_iter(match=self._key_prefix + "*",
                                                   count=LOAD_BATCH):
                if len(self._entries) + len(keys) >= self._max_entries:
                    break  # the bound holds for what is loaded too
                keys.append(key)
                if len(keys) >= LOAD_BATCH:
                    await self._load_keys(keys)
                    keys = []
            if keys:
                await self._load_keys(keys)
        except (RedisError, OSError) as exc:
            log.info("unconfirmed ledger not loaded: %s: %s", type(exc).__name__, exc)

    async def _load_keys(self, keys: list[bytes]) -> None:
        assert self._redis is not None
        values = await self._redis.mget(keys)
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                digest = _text(key)[len(self._key_prefix):]
                self._add_entry(f"{digest} {_text(value)}")

    def _add_entry(self, text: str) -> None:
        """An entry as the channel and the keys carry it: "<digest> <queue id> <expires>"."""
        try:
            digest, queue_id, expires = text.split(" ")
            expires_at = float(expires)
        except ValueError:
            log.warning("unconfirmed ledger: ignoring a malformed entry %r", text[:200])
            return
        if expires_at > self._clock():
            self._add(digest, queue_id, expires_at)

    def _add(self, digest: str, queue_id: str, expires_at: float) -> None:
        if digest not in self._entries:
            while len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # the earliest added
        self._entries[digest] = (queue_id, expires_at)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
