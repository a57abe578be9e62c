"""Consumer lag, in messages (from librdkafka's statistics) and in seconds (from the last
record's timestamp), per assigned partition, computed at scrape time.

See :mod:`worker.observability.metrics` for what each gauge means exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import orjson
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.kafka.records import PartitionKey
from worker.observability.names import metric_name

# librdkafka's id of its internal "unassigned" partition, present in every statistics topic.
UNASSIGNED_PARTITION: Final = -1


def _partition_lag(stats: dict[str, Any]) -> int | None:
    """Messages not yet finished in one ``topics.*.partitions.*`` statistics object.

    librdkafka reports -1 for a lag it cannot compute (no stored / committed offset yet).
    An empty log (high == low watermark) has nothing to consume whatever the offsets are.
    """
    for field in ("consumer_lag_stored", "consumer_lag"):
        value = stats.get(field)
        if isinstance(value, int) and value >= 0:
            return value
    high, low = stats.get("hi_offset"), stats.get("lo_offset")
    if isinstance(high, int) and high >= 0 and high == low:
        return 0
    return None


class LagTracker:
    """Per-partition lag state, written by the poll thread and read by scrapes."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._messages: dict[PartitionKey, int] = {}
        self._last_record_s: dict[PartitionKey, float] = {}
        # None until the worker reports a rebalance; then statistics are limited to it.
        self._assigned: set[PartitionKey] | None = None

    def assign(self, keys: Iterable[PartitionKey]) -> int:
        with self._lock:
            if self._assigned is None:
                self._assigned = set()
            self._assigned.update(keys)
            return len(self._assigned)

    def revoke(self, keys: Iterable[PartitionKey]) -> int:
        with self._lock:
            if self._assigned is None:
                self._assigned = set()
            for key in keys:
                self._assigned.discard(key)
                self._messages.pop(key, None)
                self._last_record_s.pop(key, None)
            return len(self._assigned)

    def observe_record(self, key: PartitionKey, timestamp_s: float) -> None:
        with self._lock:
            if self._assigned is None or key in self._assigned:
                self._last_record_s[key] = timestamp_s

    def update(self, lags: dict[PartitionKey, int | None], unwanted: set[PartitionKey]) -> None:
        with self._lock:
            for key in unwanted:
                self._messages.pop(key, None)
            for key, lag in lags.items():
                if self._assigned is not None and key not in self._assigned:
                    continue
                if lag is None:
                    self._messages.pop(key, None)
                else:
                    self._messages[key] = lag

    def snapshot(self) -> tuple[dict[PartitionKey, int], dict[PartitionKey, float]]:
        """(lag in messages, lag in seconds) per partition, as defined in the module doc."""
        now = self._clock()
        with self._lock:
            messages = dict(self._messages)
            last_record = dict(self._last_record_s)
        seconds: dict[PartitionKey, float] = {}
        for key, lag in messages.items():
            if lag == 0:
                seconds[key] = 0.0
            elif key in last_record:
                seconds[key] = max(0.0, now - last_record[key])
        return messages, seconds


def parse_statistics(
    stats_json: str | bytes,
) -> tuple[dict[PartitionKey, int | None], set[PartitionKey]]:
    """Lag per wanted partition (None: unknown) and the partitions librdkafka no longer wants."""
    stats = orjson.loads(stats_json)
    lags: dict[PartitionKey, int | None] = {}
    unwanted: set[PartitionKey] = set()
    topics = stats.get("topics") if isinstance(stats, dict) else None
    if not isinstance(topics, dict):
        return lags, unwanted
    for topic, topic_stats in topics.items():
        partitions = topic_stats.get("partitions") if isinstance(topic_stats, dict) else None
        if not isinstance(partitions, dict):
            continue
        for partition_stats in partitions.values():
            if not isinstance(partition_stats, dict):
                continue
            partition = partition_stats.get("partition")
            if not isinstance(partition, int) or partition == UNASSIGNED_PARTITION:
                continue
            key = (str(topic), partition)
            if partition_stats.get("desired", True) is False:
                unwanted.add(key)
            else:
                lags[key] = _partition_lag(partition_stats)
    return lags, unwanted


class LagCollector(Collector):
    """Lag gauges computed at scrape time, so lag in seconds keeps growing while stuck."""

    def __init__(self, tracker: LagTracker) -> None:
        self._tracker = tracker

    def describe(self) -> list[Metric]:
        return list(self._families({}, {}))

    def collect(self) -> Iterator[Metric]:
        messages, seconds = self._tracker.snapshot()
        yield from self._families(messages, seconds)

    @staticmethod
    def _families(
        messages: dict[PartitionKey, int], seconds: dict[PartitionKey, float]
    ) -> Iterator[GaugeMetricFamily]:
        labels = ["topic", "partition"]
        lag_messages = GaugeMetricFamily(
            metric_name("consumer_lag_messages"),
            "Records of the partition not yet finished: high watermark minus stored "
            "(else committed) offset, from librdkafka statistics.",
            labels=labels,
        )
        for (topic, partition), lag in sorted(messages.items()):
            lag_messages.add_metric([topic, str(partition)], float(lag))
        yield lag_messages
        lag_seconds = GaugeMetricFamily(
            metric_name("consumer_lag_seconds"),
            "Age of the last consumed record while the partition has unfinished records; "
            "0 once drained.",
            labels=labels,
        )
        for (topic, partition), lag_s in sorted(seconds.items()):
            lag_seconds.add_metric([topic, str(partition)], lag_s)
        yield lag_seconds
