"""The records the worker reads, detached from librdkafka's messages, and their keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

# One topic-partition, the key of every per-partition structure in the worker.
PartitionKey = tuple[str, int]
Headers = tuple[tuple[str, bytes | None], ...]
# Headers of a record to produce, in the form confluent-kafka accepts (read-only here, so
# the contract's list of (name, bytes) headers is one).
OutHeaders = Sequence[tuple[str, str | bytes | None]]


class InputRecord(NamedTuple):
    """One consumed record, detached from the librdkafka message.

    A named tuple rather than a frozen dataclass: one is built per consumed record, and a
    tuple is built several times faster while being just as immutable.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None
    # Which assignment of its partition this record was fetched under (counted by the
    # consumer from 1): one fetched before a revoke and a new assignment of the same
    # partition must not be applied to the new one.
    generation: int = 0

    @property
    def partition_key(self) -> PartitionKey:
        return (self.topic, self.partition)

    @classmethod
    def from_message(cls, message: Message, generation: int = 0) -> InputRecord:
        """Copy out of a consumed (error-free) message."""
        timestamp_type, timestamp = message.timestamp()
        partition, offset = message.partition(), message.offset()
        if partition is None or offset is None:
            raise ValueError("a consumed message without partition or offset")
        raw_headers = message.headers()
        return cls(
            message.topic() or "",
            partition,
            offset,
            message.key(),
            message.value(),
            _headers(raw_headers) if raw_headers else (),
            None if timestamp_type == TIMESTAMP_NOT_AVAILABLE else timestamp,
            generation,
        )


def _as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode("utf-8") if isinstance(value, str) else value


def _headers(raw: Any) -> Headers:
    pairs = raw.items() if isinstance(raw, dict) else raw
    return tuple((name, _as_bytes(value)) for name, value in pairs)


def describe_partitions(keys: Sequence[PartitionKey]) -> list[str]:
    """``["news[0]", "news[3]"]`` for logs."""
    return [f"{topic}[{partition}]" for topic, partition in sorted(keys)]
