"""The input stage: poll records, pause and resume the input, follow rebalances.

Wraps the thin :class:`~worker.kafka.consumer.KafkaConsumer` with what the worker decides
about it: whether the input is paused (and so whether a newly assigned partition starts
paused), what the observer hears of it, and polling while stopping without keeping
records. Rebalance callbacks run inside :meth:`Intake.poll` on the main thread and are
forwarded to a :class:`~worker.kafka.consumer.RebalanceListener` (the worker).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

import structlog

from worker.kafka.consumer import RebalanceListener
from worker.kafka.errors import ClientError
from worker.kafka.records import InputRecord, PartitionKey, describe_partitions
from worker.pipeline.observer import DiscardReason, Observer

log = structlog.get_logger(__name__)

# Records one stopping poll may drop (the broker refetches them for the next owner).
POLL_DISCARD_MAX: Final = 500
# How long a replaced consumer's close may take before it is abandoned: a client stuck on
# its coordinator may never finish leaving the group (its session then times out).
CONSUMER_CLOSE_WAIT_S: Final = 10.0


class ConsumerClient(Protocol):
    """What the stage needs of a consumer (:class:`~worker.kafka.consumer.KafkaConsumer`)."""

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]: ...

    def assignment(self) -> list[PartitionKey]: ...

    def generation(self, key: PartitionKey) -> int: ...

    def pause(self, keys: Sequence[PartitionKey]) -> None: ...

    def resume(self, keys: Sequence[PartitionKey]) -> None: ...

    def commit_async(self, positions: Mapping[PartitionKey, int]) -> ClientError | None: ...

    def commit_sync(self, positions: Mapping[PartitionKey, int]) -> ClientError | None: ...

    def group_metadata(self) -> object: ...

    def seek(self, positions: Mapping[PartitionKey, int]) -> ClientError | None: ...

    def abandon(self, wait_s: float) -> bool: ...

    def close(self, wait_s: float | None = None) -> bool: ...


class Intake:
    """The worker's input: one consumer, whose partitions are paused for named reasons.

    A reason holds either the whole input (the model or the producer is behind, the
    worker is stopping) or single partitions (one partition's uncommitted window is
    full). A partition is fetched only while nothing holds it; newly assigned
    partitions start in the state the current reasons give them.
    """

    def __init__(
        self,
        consumer: ConsumerClient,
        observer: Observer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self._observer = observer
        self._clock = clock
        self._listener: RebalanceListener | None = None
        self._topics: list[str] = []
        # When partitions were last lost with no assignment since (see rejoin_overdue).
        self._lost_at: float | None = None
        # Reasons that hold every partition, and those that hold single ones.
        self._holds: set[str] = set()
        self._partition_holds: dict[PartitionKey, set[str]] = {}
        # What the consumer has paused now, so that only changes reach it.
        self._paused: set[PartitionKey] = set()

    @property
    def paused(self) -> bool:
        """Whether the whole input is held."""
        return bool(self._holds)

    @property
    def paused_partitions(self) -> frozenset[PartitionKey]:
        return frozenset(self._paused)

    def holds(self, key: PartitionKey | None = None) -> frozenset[str]:
        """The reasons holding the whole input, or (with ``key``) that partition alone."""
        if key is None:
            return frozenset(self._holds)
        return frozenset(self._partition_holds.get(key, ()))

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._listener = listener
        self._topics = list(topics)
        self.consumer.subscribe(topics, self)

    def rejoin_overdue(self, timeout_s: float) -> bool:
        """Whether partitions were lost ``timeout_s`` ago or more and no assignment (not
        even an empty one) came since: the client has stopped rejoining the group."""
        return self._lost_at is not None and self._clock() - self._lost_at >= timeout_s

    def replace_consumer(self, consumer: ConsumerClient) -> bool:
        """Swap in a new consumer, subscribed as the old one was; the old one is closed
        without the listener hearing of it (it holds no partitions: they were lost).
        False if the old one's close did not finish in :data:`CONSUMER_CLOSE_WAIT_S`.
        Called once per loss: the new consumer's loss clock starts at the next loss."""
        old, self.consumer = self.consumer, consumer
        self._lost_at = None
        self._paused.clear()
        closed = old.abandon(CONSUMER_CLOSE_WAIT_S)
        if self._listener is not None:
            consumer.subscribe(self._topics, self)
        return closed

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        """Up to ``max_records`` records; raises ``KafkaFatalError`` on a fatal error."""
        return self.consumer.poll(max_records, timeout_s)

    def pause(self, reason: str) -> None:
        """Hold every assigned partition (and those assigned later) until ``reason`` is
        released."""
        if reason not in self._holds:
            self._holds.add(reason)
            log.info("input paused", reason=reason)
            self._apply()

    def resume(self, reason: str) -> None:
        """Release ``reason``; partitions nothing else holds are fetched again."""
        if reason in self._holds:
            self._holds.discard(reason)
            if self._holds:
                log.info("input pause released", reason=reason, still_held_by=sorted(self._holds))
            else:
                log.info("input resumed", reason=reason)
            self._apply()

    def pause_partition(self, key: PartitionKey, reason: str) -> None:
        reasons = self._partition_holds.setdefault(key, set())
        if reason not in reasons:
            reasons.add(reason)
            log.info("partition paused", partition=describe_partitions([key]), reason=reason)
            self._apply()

    def resume_partition(self, key: PartitionKey, reason: str) -> None:
        reasons = self._partition_holds.get(key)
        if reasons is not None and reason in reasons:
            reasons.discard(reason)
            if not reasons:
                del self._partition_holds[key]
            log.info("partition pause released", partition=describe_partitions([key]))
            self._apply()

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

    def close(self, wait_s: float | None = None) -> bool:
        """Close the consumer (its revoke callback still reaches the listener); with
        ``wait_s`` at most that long: False if it was left closing."""
        closed = self.consumer.close(wait_s)
        if not closed:
            log.warning("consumer still closing, left to itself", wait_s=round(wait_s or 0, 1))
        return closed

    # -- RebalanceListener (main thread, inside poll) --------------------------------------

    def on_assigned(self, keys: list[PartitionKey]) -> None:
        log.info("partitions assigned", partitions=describe_partitions(keys))
        self._lost_at = None
        if keys:
            # librdkafka keeps a partition's pause flag across unassign/assign: one that was
            # revoked while paused would come back paused. Set the current state explicitly.
            held = [key for key in keys if self._is_held(key)]
            free = [key for key in keys if not self._is_held(key)]
            if held:
                self.consumer.pause(held)
                self._paused.update(held)
            if free:
                self.consumer.resume(free)
                self._paused.difference_update(free)
            self._observer.paused(len(self._paused))
        self._observer.rebalance("assigned", keys)
        if self._listener is not None:
            self._listener.on_assigned(keys)

    def on_revoked(self, keys: list[PartitionKey]) -> None:
        log.info("partitions revoked", partitions=describe_partitions(keys))
        self._forget(keys)
        self._observer.rebalance("revoked", keys)
        if self._listener is not None:
            self._listener.on_revoked(keys)

    def on_lost(self, keys: list[PartitionKey]) -> None:
        log.warning("partitions lost", partitions=describe_partitions(keys))
        self._lost_at = self._clock()
        self._forget(keys)
        self._observer.rebalance("lost", keys)
        if self._listener is not None:
            self._listener.on_lost(keys)

    # -- internals --------------------------------------------------------------------------

    def _is_held(self, key: PartitionKey) -> bool:
        return bool(self._holds) or key in self._partition_holds

    def _apply(self) -> None:
        """Bring the consumer's paused partitions in line with the holds."""
        assigned = self.consumer.assignment()
        wanted = {key for key in assigned if self._is_held(key)}
        to_pause = sorted(wanted - self._paused)
        to_resume = sorted(key for key in self._paused - wanted if key in assigned)
        if to_pause:
            self.consumer.pause(to_pause)
        if to_resume:
            self.consumer.resume(to_resume)
        if to_pause or to_resume or self._paused != wanted:
            self._paused = wanted
            if wanted:
                self._observer.paused(len(wanted))
            else:
                self._observer.resumed(len(assigned))

    def _forget(self, keys: list[PartitionKey]) -> None:
        """The partitions leave the assignment after this callback: drop their holds, and
        let the paused-partitions gauge follow the shrinking assignment."""
        for key in keys:
            self._partition_holds.pop(key, None)
        before = len(self._paused)
        self._paused.difference_update(keys)
        if len(self._paused) != before:
            self._observer.paused(len(self._paused))
