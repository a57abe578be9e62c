"""The input side: subscribe, poll in batches, pause/resume, commit, rebalance callbacks.

Rebalance callbacks run inside :meth:`InputConsumer.poll` on the main thread and are
forwarded to a :class:`RebalanceListener` (the worker). Newly assigned partitions are
assigned here explicitly, so that they can be paused at once while the worker is paused:
incrementally for the cooperative and the KIP-848 protocols, eagerly for ``range`` and
``roundrobin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from worker.config.settings import KafkaSettings
from worker.errors import KafkaFatalError
from worker.kafka.config import consumer_config
from worker.kafka.errors import is_fatal
from worker.kafka.records import InputRecord, PartitionKey, describe_partitions
from worker.pipeline.observer import DiscardReason, Observer

log = structlog.get_logger(__name__)

# Errors that only say "nothing new" or are reported elsewhere.
_QUIET_CODES: Final = frozenset({KafkaError._PARTITION_EOF, KafkaError._NO_OFFSET})

# Records one stopping poll may drop (the broker refetches them for the next owner).
POLL_DISCARD_MAX: Final = 500
# [(partition, committed offset, partition error)] of one commit.
CommitOutcome = list[tuple[PartitionKey, int, KafkaError | None]]
# Called with the request error (if any) and the per-partition outcome of a commit.
CommitResult = Callable[[KafkaError | None, CommitOutcome], None]


class RebalanceListener(Protocol):
    """What the worker does when partitions come and go (called on the main thread)."""

    def on_assigned(self, keys: list[PartitionKey]) -> None: ...

    def on_revoked(self, keys: list[PartitionKey]) -> None: ...

    def on_lost(self, keys: list[PartitionKey]) -> None: ...


def _keys(partitions: Sequence[TopicPartition]) -> list[PartitionKey]:
    return [(tp.topic, tp.partition) for tp in partitions]


def _partitions(positions: dict[PartitionKey, int]) -> list[TopicPartition]:
    return [
        TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()
    ]


class InputConsumer:
    """A group consumer with manual commits of explicit offsets.

    ``client_config``: extra librdkafka settings (the structlog ``logger``, the statistics
    interval and ``stats_cb`` for the lag gauges). They rank below the worker's own settings,
    so ``TAGSTREAM_CONSUMER_CONFIG`` can still tune ``statistics.interval.ms``.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        observer: Observer,
        on_commit: CommitResult,
        *,
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._kafka = kafka
        self._observer = observer
        self._on_commit_result = on_commit
        self._incremental = (
            kafka.group_protocol == "consumer" or kafka.assignment_strategy == "cooperative-sticky"
        )
        config = {
            **(client_config or {}),
            **consumer_config(kafka),
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
        }
        self._consumer = Consumer(config)
        self._listener: RebalanceListener | None = None
        self.paused = False
        self.fatal: KafkaFatalError | None = None

    def subscribe(self, listener: RebalanceListener) -> None:
        self._listener = listener
        self._consumer.subscribe(
            self._kafka.subscription,
            on_assign=self._assigned,
            on_revoke=self._revoked,
            on_lost=self._lost,
        )

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first."""
        records: list[InputRecord] = []
        # consume() waits until it has max_records or the timeout passed: wait for the first
        # record only, then take what is already there.
        messages = self._consumer.consume(num_messages=1, timeout=timeout_s)
        if messages and max_records > 1:
            messages += self._consumer.consume(num_messages=max_records - 1, timeout=0)
        for message in messages:
            error = message.error()
            if error is None:
                records.append(InputRecord.from_message(message))
            else:
                self._on_error(error)
        if self.fatal is not None:
            raise self.fatal
        return records

    def assignment(self) -> list[PartitionKey]:
        return _keys(self._consumer.assignment())

    def pause(self, reason: str) -> None:
        """Stop fetching every assigned partition (and those assigned later) until resumed."""
        if not self.paused:
            self.paused = True
            partitions = self._consumer.assignment()
            self._consumer.pause(partitions)
            log.info("input paused", reason=reason, partitions=len(partitions))
            self._observer.paused(len(partitions))

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            partitions = self._consumer.assignment()
            self._consumer.resume(partitions)
            log.info("input resumed", partitions=len(partitions))
            self._observer.resumed(len(partitions))

    def commit_async(self, positions: dict[PartitionKey, int]) -> None:
        """Commit ``positions`` (next offsets to read); results arrive through ``on_commit``."""
        if not positions:
            return
        try:
            self._consumer.commit(offsets=_partitions(positions))
        except KafkaException as exc:
            self._commit_raised(exc.args[0])

    def commit_sync(self, positions: dict[PartitionKey, int]) -> KafkaError | None:
        """Commit ``positions`` and wait for the broker; the error if it failed."""
        if not positions:
            return None
        try:
            results = self._consumer.commit(offsets=_partitions(positions), asynchronous=False)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            self._commit_raised(error)
            return error
        self._report_commit(None, results)
        return next((tp.error for tp in results if tp.error is not None), None)

    def discard(self, timeout_s: float) -> int:
        """Poll without keeping the records (a stopping worker still serves the group
        protocol: rebalance callbacks, heartbeats); returns how many were dropped. They
        count as consumed and discarded (``shutdown``)."""
        records = self.poll(POLL_DISCARD_MAX, timeout_s)
        if records:
            self._observer.records_consumed(records)
            for record in records:
                self._observer.record_discarded(record.partition_key, DiscardReason.SHUTDOWN)
        return len(records)

    def _commit_raised(self, error: KafkaError) -> None:
        self._report_commit(error, [])
        if is_fatal(error):
            self.fatal = KafkaFatalError(f"commit failed: {error.str()}")

    def close(self) -> None:
        """Leave the group (a static member stays until its session times out)."""
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed", error=str(exc))

    # -- librdkafka callbacks (main thread, inside poll/commit) -------------------------

    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = _keys(partitions)
        log.info("partitions assigned", partitions=describe_partitions(keys))
        if self._incremental:
            self._consumer.incremental_assign(partitions)
        else:
            self._consumer.assign(partitions)
        if partitions:
            # librdkafka keeps a partition's pause flag across unassign/assign: one that was
            # revoked while paused would come back paused. Set the current state explicitly.
            if self.paused:
                self._consumer.pause(partitions)
                self._observer.paused(len(self._consumer.assignment()))
            else:
                self._consumer.resume(partitions)
        self._observer.rebalance("assigned", keys)
        if self._listener is not None:
            self._listener.on_assigned(keys)

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = _keys(partitions)
        log.info("partitions revoked", partitions=describe_partitions(keys))
        self._report_paused_without(keys)
        self._observer.rebalance("revoked", keys)
        if self._listener is not None:
            self._listener.on_revoked(keys)

    def _lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = _keys(partitions)
        log.warning("partitions lost", partitions=describe_partitions(keys))
        self._report_paused_without(keys)
        self._observer.rebalance("lost", keys)
        if self._listener is not None:
            self._listener.on_lost(keys)

    def _report_paused_without(self, keys: list[PartitionKey]) -> None:
        """While paused, the paused-partitions gauge follows the shrinking assignment (the
        partitions leave the assignment only after this callback returns)."""
        if self.paused:
            remaining = set(self.assignment()) - set(keys)
            self._observer.paused(len(remaining))

    def _on_error(self, error: KafkaError) -> None:
        if error.code() in _QUIET_CODES:
            return
        if is_fatal(error):
            log.error("fatal consumer error", error=error.str())
            if self.fatal is None:
                self.fatal = KafkaFatalError(f"consumer error: {error.str()}")
            return
        log.warning("consumer error (retried by librdkafka)", error=error.str())

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._report_commit(error, partitions)

    def _report_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        results = [((tp.topic, tp.partition), tp.offset, tp.error) for tp in partitions]
        self._on_commit_result(error, results)
