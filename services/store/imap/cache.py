"""A bounded LRU cache of FETCH items derived by parsing a message (ENVELOPE, BODYSTRUCTURE,
BODY), shared by every IMAP session of the store process. Pure: no asyncio, no I/O.

Keyed by message GUID and item name: a GUID names one stored message for its whole life and
is never reused, and the stored bytes never change, so an entry never goes stale; an expunged
message's entries simply age out. Dovecot keeps the same data in its per-mailbox cache file.
"""

from __future__ import annotations

from collections import OrderedDict

# 64 MiB holds the ENVELOPE and BODYSTRUCTURE of roughly 60,000 typical messages.
DEFAULT_MAX_OCTETS = 64 * 1024 * 1024
# Approximate per-entry cost beyond the value (key tuple, GUID string, dict node), so that the
# bound tracks real memory even for small values.
ENTRY_OVERHEAD = 200


class FetchCache:
    """Item name and GUID -> the item's response bytes, least recently used evicted first
    once the total size exceeds `max_octets`."""

    def __init__(self, max_octets: int = DEFAULT_MAX_OCTETS) -> None:
        self.max_octets = max_octets
        self.octets = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, guid: str, name: str) -> bytes | None:
        key = (guid, name)
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def get_many(self, guid: str, names: tuple[str, ...]) -> dict[str, bytes]:
        """The cached values among `names` for one message (those missing are left out)."""
        found = {}
        for name in names:
            value = self.get(guid, name)
            if value is not None:
                found[name] = value
        return found

    def put(self, guid: str, name: str, value: bytes) -> None:
        cost = _cost(guid, value)
        if cost > self.max_octets:
            return  # would evict everything and still not fit
        key = (guid, name)
        old = self._entries.pop(key, None)
        if old is not None:
            self.octets -= _cost(guid, old)
        self._entries[key] = value
        self.octets += cost
        while self.octets > self.max_octets:
            (old_guid, _), evicted = self._entries.popitem(last=False)
            self.octets -= _cost(old_guid, evicted)


def _cost(guid: str, value: bytes) -> int:
    return len(value) + len(guid) + ENTRY_OVERHEAD
