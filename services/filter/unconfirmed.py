"""Messages the broker may hold although their senders were told 451, remembered so that a
retry of one goes out under the same queue id, which the store delivers only once.

A publish that went out but was not confirmed (no confirm in time, the connection lost after
the publish was sent) may or may not be in a queue: the sender gets 451 and, like any MTA,
sends again later. Under a new queue id that retry would be a second copy wherever the first
was persisted after all. The store's idempotence key is (queue id, mailbox), so the filter
publishes the retry under the first attempt's queue id: one copy either way.

What makes a retry: the same transaction, by its digest (MAIL FROM, the RCPT TO addresses in
order, the message bytes as the client sent them), of a message that names itself with a
Message-ID field (RFC 5322 3.6.4: unique to one message). Identical bytes, Message-ID
included, to the same recipients from the same sender are the same message. A message
without one is never matched: a script that sends the same alert every hour with no
Message-ID (and no Date) sends identical bytes each time, and each is a message of its own.

Where entries live: each worker keeps them in memory, so a message is matched without a
Redis round trip on the SMTP path. An uncertain outcome is written to Redis as
`<prefix>unconfirmed:<digest>` (expiring after RETRY_WINDOW, the 4-5 days of RFC 5321
4.5.4.1 that MTAs keep retrying) and announced on the channel `<prefix>unconfirmed` in the
same MULTI; every worker follows the channel and loads the keys each time its subscription
starts, so a retry that reaches another worker is matched too. With Redis away a worker
still knows its own entries; a retry reaching another worker then gets a new queue id, the
at-least-once outcome the failure contract allows. Entries are only ever added (they expire),
so a stale copy is never wrong. MAX_ENTRIES bounds the memory: past it, the oldest go first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.directory_notices import Message, follow_channel

log = logging.getLogger(__name__)

RETRY_WINDOW = 5 * 86400.0  # seconds an unconfirmed transaction is remembered
MAX_ENTRIES = 100_000  # per worker; an entry is about 200 octets
WRITE_TIMEOUT = 1.0  # seconds for the Redis write before the 451 goes out
LOAD_BATCH = 1000


def names_itself(content: bytes) -> bool:
    """Whether the message's header section has a Message-ID field."""
    end = content.find(b"\r\n\r\n")
    head = b"\r\n" + (content if end < 0 else content[:end]).lower()
    return b"\r\nmessage-id:" in head or b"\r\nmessage-id :" in head


def transaction_digest(mail_from: str, recipients: Sequence[str], content: bytes) -> str:
    digest = hashlib.sha256()
    for address in (mail_from, *recipients):
        digest.update(address.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(b"\0")
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
        self._loads: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._entries)

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
        if self._redis is None:
            return
        value = f"{queue_id} {expires_at:.0f}"
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.set(self._key_prefix + digest, value, exat=int(expires_at) + 1)
                    pipe.publish(self._channel, f"{digest} {value}")
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("unconfirmed publish known to this worker only (Redis: %s: %s)",
                        type(exc).__name__, exc, extra={"queue_id": queue_id})

    async def run(self) -> None:
        """Follow the other workers' entries until cancelled."""
        if self._redis is None:
            return
        try:
            await follow_channel(self._redis, self._channel, self._on_message, lambda: None,
                                 name="unconfirmed ledger")
        finally:
            for task in self._loads:
                task.cancel()

    def _on_message(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # Subscribed first, then loaded: nothing written meanwhile goes unheard.
            task = asyncio.get_running_loop().create_task(self._load())
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        elif kind == "message":
            self._add_entry(_text(message.get("data")))

    async def _load(self) -> None:
        assert self._redis is not None
        try:
            keys: list[bytes] = []
            async for key in self._redis.scan_iter(match=self._key_prefix + "*",
                                                   count=LOAD_BATCH):
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
        if digest not in self._entries and len(self._entries) >= self._max_entries:
            now = self._clock()
            for old in [d for d, (_, at) in self._entries.items() if at <= now]:
                del self._entries[old]
            while len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[digest] = (queue_id, expires_at)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
