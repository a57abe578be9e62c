"""The :class:`~worker.pipeline.observer.Observer` that feeds
:class:`~worker.observability.metrics.WorkerMetrics`
(and, optionally, the heartbeats, group membership and shutdown mark of a
:class:`~worker.observability.health.HealthState`).

Ledger (see :mod:`worker.observability.metrics`): every consumed record is counted once in
``events_consumed_total`` and once more in exactly one of ``events_scored_total`` (its output
was acknowledged), ``events_dead_lettered_total`` (its dead-letter record was acknowledged) or
``events_discarded_total`` (dropped, with a reason), so once the work in flight is settled
``consumed == scored + dead_lettered + discarded``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

from worker.contract.events import RecordCoordinates
from worker.kafka.records import PartitionKey
from worker.observability.health import HealthState
from worker.observability.metrics import REBALANCE_KINDS, WorkerMetrics
from worker.pipeline.observer import DiscardReason, Observer


class MetricsObserver(Observer):
    """Translates the pipeline's hooks into metric updates. Thread-safe, never raises.

    ``max_batch_size`` (``BatchSettings.max_batch_size``) turns batch sizes into fill ratios.
    With ``health``: every poll-loop turn is a poll heartbeat, a scored batch and the end of
    a wait for work are inference heartbeats (the wait itself counts as idle, not stuck),
    the first assignment (even an empty one) marks the consumer as joined, a lost assignment
    marks it as left, the start-up read of the control topic holds readiness back until it
    reaches the end, and :meth:`stopping` marks the worker as shutting down.
    """

    def __init__(
        self, metrics: WorkerMetrics, *, max_batch_size: int, health: HealthState | None = None
    ) -> None:
        self.metrics = metrics
        self.health = health
        self._max_batch_size = max_batch_size
        self._lock = threading.Lock()
        self._in_flight = 0
        # Every reason's series exists from the start: rate() and alerts see 0, not no data.
        for reason in DiscardReason:
            metrics.record_discarded(reason, 0)

    # -- Observer ----------------------------------------------------------------------------

    def records_consumed(self, records: Iterable[RecordCoordinates]) -> None:
        """Main thread: every record one poll returned, before any discard (counts per
        topic, and the newest timestamp per partition for the lag in seconds)."""
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

    def deliveries_acked(self, records: int, outputs: int, latencies_s: Sequence[float]) -> None:
        if outputs:
            self.metrics.record_scored(outputs)
        if latencies_s:
            self.metrics.observe_end_to_end_many(latencies_s)

    def produce_retried(self, error_name: str, attempt: int, delay_s: float) -> None:
        self.metrics.record_produce_retry(error_name)

    def commit_done(self, partitions: int) -> None:
        self.metrics.record_commit(ok=True)

    def commit_failed(self, error_name: str) -> None:
        self.metrics.record_commit(ok=False)

    def transaction_committed(self, records: int, duration_s: float, commit_s: float) -> None:
        self.metrics.record_transaction_committed(duration_s, commit_s)

    def transaction_aborted(self, reason: str, records: int) -> None:
        self.metrics.record_transaction_aborted(reason)

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

    def profiles_loading(self) -> None:
        if self.health is not None:
            self.health.mark_profiles_loading()

    def profiles_loaded(self, profiles: int) -> None:
        self.metrics.set_profiles(profiles)
        if self.health is not None:
            self.health.mark_profiles_loaded()

    def profile_changed(self, kind: str, profiles: int) -> None:
        self.metrics.record_profile_change(kind, profiles)

    def profile_rejected(self, reason: str) -> None:
        self.metrics.record_profile_rejected(reason)

    def paused(self, partitions: int) -> None:
        self.metrics.set_paused(partitions)

    def resumed(self, partitions: int) -> None:
        self.metrics.set_paused(0)

    def uncommitted_window(self, oldest_pending_s: float, largest_window: int) -> None:
        self.metrics.set_uncommitted_window(oldest_pending_s, largest_window)

    def circuit_changed(self, is_open: bool, failure_share: float) -> None:
        self.metrics.set_circuit_open(is_open)
        if self.health is not None:
            self.health.mark_scorer_failing(is_open)

    def loop_iteration(self) -> None:
        if self.health is not None:
            self.health.beat_poll()

    def waiting_for_batch(self) -> AbstractContextManager[None]:
        if self.health is None:
            return contextlib.nullcontext()
        return self.health.inference_idle()

    def stopping(self) -> None:
        if self.health is not None:
            self.health.mark_shutting_down()
