"""Hooks at the worker's notable moments, for metrics (and anything else that watches).

The pipeline calls one method of an :class:`Observer` at each moment below; the base
class does nothing, so a metrics implementation overrides only what it measures. Hooks
run on the thread named in their docstring and must return quickly and never raise.

Logging is not done here: each stage logs for itself through structlog.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.kafka_client import InputRecord, PartitionKey


class Observer:
    """No-op hooks; subclass and override what you need."""

    def records_consumed(self, records: Sequence[InputRecord]) -> None:
        """Main thread: the records one poll returned (before decoding)."""

    def record_discarded(self, key: PartitionKey, reason: str) -> None:
        """Main thread: a record of a partition not (or no longer) assigned was skipped."""

    def batch_closed(self, size: int, tokens: int, reason: str, age_s: float) -> None:
        """Main thread: a micro-batch closed (``reason``: size, tokens, time, flush)."""

    def batch_submitted(self, size: int, in_flight: int) -> None:
        """Main thread: a batch went to the inference thread; ``in_flight`` counts it."""

    def batch_scored(self, size: int, failed: int, duration_s: float) -> None:
        """Inference thread: the scorer returned; ``failed`` events got a ScoreError."""

    def record_dead_lettered(self, stage: str, error_class: str) -> None:
        """Any thread: a dead-letter record was handed to the producer."""

    def delivery_acked(self, kind: str, latency_s: float | None) -> None:
        """Main thread: the broker acknowledged an ``output`` or ``dead_letter`` record;
        ``latency_s`` runs from the input record's timestamp (None without one)."""

    def produce_retried(self, error_name: str, attempt: int, delay_s: float) -> None:
        """Main thread: a transient produce error, retried after ``delay_s``."""

    def commit_done(self, partitions: int) -> None:
        """Main thread: the broker stored new committed offsets for ``partitions``."""

    def commit_failed(self, error_name: str) -> None:
        """Main thread: a commit failed (it is retried at the next interval)."""

    def rebalance(self, kind: str, partitions: Sequence[PartitionKey]) -> None:
        """Main thread: partitions ``assigned``, ``revoked`` or ``lost``."""

    def paused(self, partitions: int) -> None:
        """Main thread: the inference queue is full; fetching paused."""

    def resumed(self, partitions: int) -> None:
        """Main thread: there is room again; fetching resumed."""
