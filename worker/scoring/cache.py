"""A small bounded least-recently-used map, for what scorers keep across batches.

The NLI scorer keeps hypotheses' token ids in one, the embedding scorer hypotheses'
embeddings; each picks its capacity for what one entry costs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# A real hypothesis ("This example is sports.") is a few dozen characters. Longer ones are
# computed every time rather than kept: the caches are sized by entries, so only short
# keys keep their memory bounded however hostile the templates and labels an input sends.
MAX_CACHED_HYPOTHESIS_CHARS = 256


def cacheable_hypothesis(hypothesis: str) -> bool:
    """Whether a hypothesis is short enough to be kept across batches."""
    return len(hypothesis) <= MAX_CACHED_HYPOTHESIS_CHARS


class LruCache(Generic[K, V]):
    """At most ``capacity`` entries; adding one more evicts the least recently used.

    Both :meth:`get` (a hit) and :meth:`put` make the entry the most recently used.
    """

    __slots__ = ("_capacity", "_items")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None when absent."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
