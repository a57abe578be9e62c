"""The :class:`~worker.observer.Observer` that feeds :class:`~worker.metrics.WorkerMetrics`
(and, optionally, the liveness heartbeats and group membership of a
:class:`~worker.health.HealthState`).

Ledger: once the input is drained, ``events_consumed_total`` (summed over topics) equals
``events_scored_total + events_dead_lettered_total + events_discarded_total``. Scored events
count when the broker acknowledges their output; dead-lettered records count when they are
handed to the producer (the hook that carries stage and error class), which is final once
the producer is flushed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

from worker.health import HealthState
from worker.kafka_client import PartitionKey
from worker.metrics import REBALANCE_KINDS, WorkerMetrics
from worker.observer import Observer

OUTPUT_KIND = "output"


class ConsumedRecord(Protocol):
    """What the metrics need of a consumed record (``worker.kafka_client.InputRecord``)."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def timestamp_ms(self) -> int | None: ...


class MetricsObserver(Observer):
    """Translates the pipeline's hooks into metric updates. Thread-safe, never raises.

    ``max_batch_size`` (``BatchSettings.max_batch_size``) turns batch sizes into fill ratios.
    With ``health``, a scored batch is an inference heartbeat, and the first assignment (even
    an empty one) marks the consumer as joined; a lost assignment marks it as left.
    """

    def __init__(
        self, metrics: WorkerMetrics, *, max_batch_size: int, health: HealthState | None = None
    ) -> None:
        self.metrics = metrics
        self.health = health
        self._max_batch_size = max_batch_size
        self._lock = threading.Lock()
        self._in_flight = 0

    # -- hooks beyond the base Observer ------------------------------------------------------

    def records_consumed(self, records: Iterable[ConsumedRecord]) -> None:
        """Main thread: records returned by one poll (counts per topic, lag timestamps).

        Not a hook of :class:`Observer` yet: call it next to ``records_polled``.
        """
        per_topic: Counter[str] = Counter()
        latest: dict[PartitionKey, int] = {}
        for record in records:
            per_topic[record.topic] += 1
            if record.timestamp_ms is not None:
                latest[(record.topic, record.partition)] = record.timestamp_ms
        for topic, count in per_topic.items():
            self.metrics.record_consumed(topic, count)
        for (topic, partition), timestamp_ms in latest.items():
            self.metrics.observe_record_timestamp(topic, partition, timestamp_ms)

    # -- Observer ----------------------------------------------------------------------------

    def record_discarded(self, key: PartitionKey, reason: str) -> None:
        self.metrics.record_discarded(reason)

    def batch_closed(self, size: int, tokens: int, reason: str, age_s: float) -> None:
        self.metrics.observe_batch(size, tokens, self._max_batch_size, age_s, reason)

    def batch_submitted(self, size: int, in_flight: int) -> None:
        with self._lock:
            self._in_flight = in_flight
        self.metrics.set_in_flight(in_flight)

    def batch_scored(self, size: int, failed: int, duration_s: float) -> None:
        self.metrics.observe_inference(duration_s)
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            in_flight = self._in_flight
        self.metrics.set_in_flight(in_flight)
        if self.health is not None:
            self.health.beat_inference()

    def record_dead_lettered(self, stage: str, error_class: str) -> None:
        self.metrics.record_dead_lettered(stage, error_class)

    def delivery_acked(self, kind: str, latency_s: float | None) -> None:
        if kind == OUTPUT_KIND:
            self.metrics.record_scored()
        if latency_s is not None:
            self.metrics.observe_end_to_end(latency_s)

    def produce_retried(self, error_name: str, attempt: int, delay_s: float) -> None:
        self.metrics.record_produce_retry(error_name)

    def commit_done(self, partitions: int) -> None:
        self.metrics.record_commit(ok=True)

    def commit_failed(self, error_name: str) -> None:
        self.metrics.record_commit(ok=False)

    def rebalance(self, kind: str, partitions: Sequence[PartitionKey]) -> None:
        if kind not in REBALANCE_KINDS:
            return
        self.metrics.record_rebalance(kind, partitions)
        if self.health is None:
            return
        if kind == "assigned":
            self.health.mark_joined()
        elif kind == "lost":
            self.health.mark_left()

    def paused(self, partitions: int) -> None:
        self.metrics.set_paused(partitions)

    def resumed(self, partitions: int) -> None:
        self.metrics.set_paused(0)
