"""The shared FETCH item cache (imap/cache.py)."""

from __future__ import annotations

from services.store.imap.cache import ENTRY_OVERHEAD, FetchCache

GUID_A, GUID_B, GUID_C = "a" * 32, "b" * 32, "c" * 32
VALUE = b"x" * 100
COST = len(VALUE) + 32 + ENTRY_OVERHEAD  # one entry of VALUE under a 32-character GUID


def test_get_returns_what_was_put_and_counts_hits_and_misses() -> None:
    cache = FetchCache()
    assert cache.get(GUID_A, "ENVELOPE") is None
    cache.put(GUID_A, "ENVELOPE", VALUE)
    assert cache.get(GUID_A, "ENVELOPE") == VALUE
    assert cache.get(GUID_A, "BODYSTRUCTURE") is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_octets_track_entries_and_replacing_does_not_double_count() -> None:
    cache = FetchCache()
    cache.put(GUID_A, "ENVELOPE", VALUE)
    cache.put(GUID_A, "ENVELOPE", VALUE)
    assert (len(cache), cache.octets) == (1, COST)


def test_evicts_least_recently_used_when_over_size() -> None:
    cache = FetchCache(max_octets=2 * COST)
    cache.put(GUID_A, "ENVELOPE", VALUE)
    cache.put(GUID_B, "ENVELOPE", VALUE)
    assert cache.get(GUID_A, "ENVELOPE") == VALUE  # now B is the least recently used
    cache.put(GUID_C, "ENVELOPE", VALUE)
    assert cache.get(GUID_B, "ENVELOPE") is None
    assert cache.get(GUID_A, "ENVELOPE") == VALUE
    assert cache.get(GUID_C, "ENVELOPE") == VALUE
    assert cache.octets == 2 * COST <= cache.max_octets


def test_a_value_larger_than_the_cache_is_not_kept() -> None:
    cache = FetchCache(max_octets=COST)
    cache.put(GUID_A, "ENVELOPE", VALUE)
    cache.put(GUID_B, "BODYSTRUCTURE", VALUE * 2)
    assert cache.get(GUID_A, "ENVELOPE") == VALUE
    assert (len(cache), cache.octets) == (1, COST)


def test_get_many_leaves_out_missing_names() -> None:
    cache = FetchCache()
    cache.put(GUID_A, "ENVELOPE", VALUE)
    assert cache.get_many(GUID_A, ("ENVELOPE", "BODY")) == {"ENVELOPE": VALUE}
