"""The scorers' bounded least-recently-used cache."""

from __future__ import annotations

import pytest

from worker.scoring.cache import LruCache


def test_evicts_the_least_recently_put_entry_past_capacity() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)
    assert len(cache) == 2
    assert cache.get("a") is None
    assert (cache.get("b"), cache.get("c")) == (2, 3)


def test_a_hit_makes_the_entry_most_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert "b" not in cache
    assert "a" in cache and "c" in cache


def test_putting_an_existing_key_replaces_it_and_refreshes_it() -> None:
    cache: LruCache[str, tuple[int, ...]] = LruCache(2)
    cache.put("a", (1,))
    cache.put("b", (2,))
    cache.put("a", (1, 1))
    assert len(cache) == 2
    cache.put("c", (3,))
    assert cache.get("a") == (1, 1)
    assert cache.get("b") is None


def test_a_miss_adds_nothing() -> None:
    cache: LruCache[str, int] = LruCache(1)
    assert cache.get("absent") is None
    assert len(cache) == 0
    assert "absent" not in cache
    assert cache.capacity == 1


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        LruCache[str, int](capacity)
