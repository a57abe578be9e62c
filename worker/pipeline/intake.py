"""The input stage: poll records, pause and resume the input, follow rebalances.

Wraps the thin :class:`~worker.kafka.consumer.KafkaConsumer` with what the worker decides
about it: whether the input is paused (and so whether a newly assigned partition starts
paused), what the observer hears of it, and polling while stopping without keeping
records. Rebalance callbacks run inside :meth:`Intake.poll` on the main thread and are
forwarded to a :class:`~worker.kafka.consumer.RebalanceListener` (the worker).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Protocol

import structlog

from worker.kafka.consumer import RebalanceListener
from worker.kafka.errors import ClientError
from worker.kafka.records import InputRecord, PartitionKey, describe_partitions
from worker.pipeline.observer import DiscardReason, Observer

log = structlog.get_logger(__name__)

# Records one stopping poll may drop (the broker refetches them for the next owner).
POLL_DISCARD_MAX: Final = 500


class ConsumerClient(Protocol):
    """What the stage needs of a consumer (:class:`~worker.kafka.consumer.KafkaConsumer`)."""

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]: ...

    def assignment(self) -> list[PartitionKey]: ...

    def pause(self, keys: Sequence[PartitionKey]) -> None: ...

    def resume(self, keys: Sequence[PartitionKey]) -> None: ...

    def commit_async(self, positions: Mapping[PartitionKey, int]) -> ClientError | None: ...

    def commit_sync(self, positions: Mapping[PartitionKey, int]) -> ClientError | None: ...

    def close(self) -> None: ...


class Intake:
    """The worker's input: one consumer, paused as a whole or not at all."""

    def __init__(self, consumer: ConsumerClient, observer: Observer) -> None:
        self.consumer = consumer
        self._observer = observer
        self._listener: RebalanceListener | None = None
        self.paused = False

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._listener = listener
        self.consumer.subscribe(topics, self)

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        """Up to ``max_records`` records; raises ``KafkaFatalError`` on a fatal error."""
        return self.consumer.poll(max_records, timeout_s)

    def pause(self, reason: str) -> None:
        """Stop fetching every assigned partition (and those assigned later) until resumed."""
        if not self.paused:
            self.paused = True
            partitions = self.consumer.assignment()
            self.consumer.pause(partitions)
            log.info("input paused", reason=reason, partitions=len(partitions))
            self._observer.paused(len(partitions))

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            partitions = self.consumer.assignment()
            self.consumer.resume(partitions)
            log.info("input resumed", partitions=len(partitions))
            self._observer.resumed(len(partitions))

    def discard(self, timeout_s: float) -> int:
        """Poll without keeping the records (a stopping worker still serves the group
        protocol: rebalance callbacks, heartbeats); returns how many were dropped. They
        count as consumed and discarded (``shutdown``)."""
        records = self.consumer.poll(POLL_DISCARD_MAX, timeout_s)
        if records:
            self._observer.records_consumed(records)
            for record in records:
                self._observer.record_discarded(record.partition_key, DiscardReason.SHUTDOWN)
        return len(records)

    def close(self) -> None:
        self.consumer.close()

    # -- RebalanceListener (main thread, inside poll) --------------------------------------

    def on_assigned(self, keys: list[PartitionKey]) -> None:
        log.info("partitions assigned", partitions=describe_partitions(keys))
        if keys:
            # librdkafka keeps a partition's pause flag across unassign/assign: one that was
            # revoked while paused would come back paused. Set the current state explicitly.
            if self.paused:
                self.consumer.pause(keys)
                self._observer.paused(len(self.consumer.assignment()))
            else:
                self.consumer.resume(keys)
        self._observer.rebalance("assigned", keys)
        if self._listener is not None:
            self._listener.on_assigned(keys)

    def on_revoked(self, keys: list[PartitionKey]) -> None:
        log.info("partitions revoked", partitions=describe_partitions(keys))
        self._report_paused_without(keys)
        self._observer.rebalance("revoked", keys)
        if self._listener is not None:
            self._listener.on_revoked(keys)

    def on_lost(self, keys: list[PartitionKey]) -> None:
        log.warning("partitions lost", partitions=describe_partitions(keys))
        self._report_paused_without(keys)
        self._observer.rebalance("lost", keys)
        if self._listener is not None:
            self._listener.on_lost(keys)

    def _report_paused_without(self, keys: list[PartitionKey]) -> None:
        """While paused, the paused-partitions gauge follows the shrinking assignment (the
        partitions leave the assignment only after this callback returns)."""
        if self.paused:
            remaining = set(self.consumer.assignment()) - set(keys)
            self._observer.paused(len(remaining))
