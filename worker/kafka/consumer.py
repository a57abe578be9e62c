"""The group consumer, typed: records out, rebalances as partition keys, commits of explicit
offsets. No policy here: what to do on a rebalance, when to pause and what to commit is
the pipeline's (:mod:`worker.pipeline.intake`, :mod:`worker.pipeline.commit`).

Rebalance callbacks run inside :meth:`KafkaConsumer.poll` on the calling thread. Newly
assigned partitions are assigned here, before the listener hears of them, so that the
listener can pause them at once: incrementally for the cooperative and the KIP-848
protocols, eagerly for ``range`` and ``roundrobin``.

Every record is stamped with the *generation* of its partition's assignment: how many
times the partition has been assigned to (or sought by, :meth:`KafkaConsumer.seek`) this
consumer when the record is returned. A poll
makes two ``consume()`` calls (see :meth:`KafkaConsumer.poll`); a rebalance inside the
second one leaves the first one's record stamped with the previous generation, so the
pipeline can tell it apart from the new assignment's records (librdkafka itself purges
outdated records within one call only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from worker.errors import KafkaFatalError
from worker.kafka.closing import close_within
from worker.kafka.errors import ClientError, client_error, fatal_error, is_fatal
from worker.kafka.records import InputRecord, PartitionKey

log = structlog.get_logger(__name__)

# Errors that only say "nothing new" or are reported elsewhere.
_QUIET_CODES: Final = frozenset({KafkaError._PARTITION_EOF, KafkaError._NO_OFFSET})

# [(partition, committed offset, partition error)] of one commit.
CommitOutcome = list[tuple[PartitionKey, int, ClientError | None]]
# Called with the request error (if any) and the per-partition outcome of a commit.
CommitResult = Callable[[ClientError | None, CommitOutcome], None]


class RebalanceListener(Protocol):
    """Told of partitions that come and go (on the polling thread, inside ``poll``)."""

    def on_assigned(self, keys: list[PartitionKey]) -> None: ...

    def on_revoked(self, keys: list[PartitionKey]) -> None: ...

    def on_lost(self, keys: list[PartitionKey]) -> None: ...


def _keys(partitions: Sequence[TopicPartition]) -> list[PartitionKey]:
    return [(tp.topic, tp.partition) for tp in partitions]


def _partitions(keys: Sequence[PartitionKey]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition) for topic, partition in keys]


def _positions(positions: Mapping[PartitionKey, int]) -> list[TopicPartition]:
    return [
        TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()
    ]


def _outcome(partitions: Sequence[TopicPartition]) -> CommitOutcome:
    return [
        ((tp.topic, tp.partition), tp.offset, None if tp.error is None else client_error(tp.error))
        for tp in partitions
    ]


class KafkaConsumer:
    """A group consumer with manual commits of explicit offsets.

    ``config``: the complete librdkafka configuration (:func:`worker.kafka.config.consumer_config`
    plus any client extras); ``incremental``: the group protocol assigns incrementally;
    ``on_commit``: results of asynchronous commits, delivered inside :meth:`poll`.
    """

    def __init__(
        self, config: Mapping[str, Any], *, incremental: bool, on_commit: CommitResult
    ) -> None:
        self._incremental = incremental
        self._on_commit_result = on_commit
        self._consumer = Consumer(
            {**config, "error_cb": self._on_error, "on_commit": self._on_commit}
        )
        self._listener: RebalanceListener | None = None
        self._fatal: KafkaFatalError | None = None
        self._generations: dict[PartitionKey, int] = {}

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._listener = listener
        self._consumer.subscribe(
            list(topics), on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    def assign_from_beginning(self, keys: Sequence[PartitionKey]) -> None:
        """Read these partitions from their first offset, outside any group (no join, no
        commits: a reader that must see every record, such as the control topic's)."""
        for key in keys:
            self._generations[key] = self._generations.get(key, 0) + 1
        self._consumer.assign(
            [TopicPartition(topic, partition, OFFSET_BEGINNING) for topic, partition in keys]
        )

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first.

        Raises :class:`KafkaFatalError` once the client reported a fatal error.
        """
        # consume() waits until it has max_records or the timeout passed: wait for the first
        # record only, then take what is already there. Each call's records are stamped
        # right after it, with the generations its rebalance callbacks left.
        first = self._consumer.consume(num_messages=1, timeout=timeout_s)
        records = self._records(first)
        if first and max_records > 1:
            records += self._records(
                self._consumer.consume(num_messages=max_records - 1, timeout=0)
            )
        if self._fatal is not None:
            raise self._fatal
        return records

    def generation(self, key: PartitionKey) -> int:
        """How many times ``key`` has been assigned to this consumer (0: never)."""
        return self._generations.get(key, 0)

    def assignment(self) -> list[PartitionKey]:
        return _keys(self._consumer.assignment())

    def pause(self, keys: Sequence[PartitionKey]) -> None:
        """Stop fetching these partitions (librdkafka drops what it prefetched of them)."""
        if keys:
            self._consumer.pause(_partitions(keys))

    def resume(self, keys: Sequence[PartitionKey]) -> None:
        if keys:
            self._consumer.resume(_partitions(keys))

    def group_metadata(self) -> object:
        """The consumer's group metadata (member, generation) for a transactional offset
        commit (:meth:`~worker.kafka.producer.KafkaProducer.send_offsets_to_transaction`)."""
        return self._consumer.consumer_group_metadata()

    def seek(self, positions: Mapping[PartitionKey, int]) -> ClientError | None:
        """Fetch each partition again from its position (records already fetched past it
        are dropped by librdkafka); the first error if a seek was refused. A seek starts a
        new generation: records returned before it are told apart by their stamp."""
        for tp in _positions(positions):
            key = (tp.topic, tp.partition)
            self._generations[key] = self._generations.get(key, 0) + 1
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                return client_error(exc.args[0])
        return None

    def commit_async(self, positions: Mapping[PartitionKey, int]) -> ClientError | None:
        """Commit ``positions`` (next offsets to read); the result arrives through
        ``on_commit``, unless the request is refused at once (the error is returned)."""
        if not positions:
            return None
        try:
            self._consumer.commit(offsets=_positions(positions))
        except KafkaException as exc:
            return self._commit_raised(exc.args[0])
        return None

    def commit_sync(self, positions: Mapping[PartitionKey, int]) -> ClientError | None:
        """Commit ``positions`` and wait for the broker; the first error if it failed."""
        if not positions:
            return None
        try:
            results = self._consumer.commit(offsets=_positions(positions), asynchronous=False)
        except KafkaException as exc:
            return self._commit_raised(exc.args[0])
        outcome = _outcome(results)
        self._on_commit_result(None, outcome)
        return next((error for _, _, error in outcome if error is not None), None)

    # -- metadata and positions (start-up and end-of-log checks of one-off commands) -------

    def partitions(self, topic: str, timeout_s: float) -> list[int] | None:
        """The partition numbers of ``topic``; ``None`` when the cluster does not have it.

        Raises :class:`KafkaFatalError` when the cluster does not answer within ``timeout_s``.
        """
        try:
            metadata = self._consumer.list_topics(topic, timeout=timeout_s)
        except KafkaException as exc:
            raise fatal_error(f"cannot read the metadata of {topic}", exc.args[0]) from None
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return None
        return sorted(found.partitions)

    def watermarks(self, key: PartitionKey, timeout_s: float) -> tuple[int, int]:
        """(low, high) watermark offsets of one partition, asked of the broker.

        Raises :class:`KafkaFatalError` when the broker does not answer within ``timeout_s``.
        """
        try:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(*key), timeout=timeout_s, cached=False
            )
        except KafkaException as exc:
            raise fatal_error(
                f"cannot read the offsets of {key[0]}[{key[1]}]", exc.args[0]
            ) from None
        return int(low), int(high)

    def committed(
        self, keys: Sequence[PartitionKey], timeout_s: float
    ) -> dict[PartitionKey, int | None]:
        """The group's committed position of each partition (``None``: nothing committed).

        Raises :class:`KafkaFatalError` when the coordinator does not answer within ``timeout_s``.
        """
        if not keys:
            return {}
        try:
            found = self._consumer.committed(_partitions(keys), timeout=timeout_s)
        except KafkaException as exc:
            raise fatal_error("cannot read the committed offsets", exc.args[0]) from None
        return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None for tp in found}

    def position(self, keys: Sequence[PartitionKey]) -> dict[PartitionKey, int | None]:
        """The next offset this consumer fetches in each partition (``None``: not known yet)."""
        if not keys:
            return {}
        found = self._consumer.position(_partitions(keys))
        return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None for tp in found}

    def abandon(self, wait_s: float) -> bool:
        """Close without the listener hearing of it, on a thread of its own, waiting at
        most ``wait_s``: for a client being replaced, whose close may hang with it. False if
        it did not finish in time; the client is then kept, never destroyed."""
        self._listener = None
        return self.close(wait_s)

    def close(self, wait_s: float | None = None) -> bool:
        """Leave the group (a static member stays until its session times out). With
        ``wait_s``: on a thread of its own, waited for at most that long, since a group
        coordinator that is gone can hold the close for good; False if it did not finish
        (the client is then kept, never destroyed)."""
        if wait_s is None:
            self._close_now()
            return True
        return close_within(self._consumer, self._close_now, wait_s, "tagstream-consumer-close")

    def _close_now(self) -> None:
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed", error=str(exc))

    # -- librdkafka callbacks (polling thread, inside poll/commit) ------------------------

    def _commit_raised(self, error: KafkaError) -> ClientError:
        described = client_error(error)
        self._on_commit_result(described, [])
        if is_fatal(error) and self._fatal is None:
            self._fatal = fatal_error(f"commit failed: {error.str()}", error)
        return described

    def _records(self, messages: list[Message]) -> list[InputRecord]:
        records: list[InputRecord] = []
        generations = self._generations
        for message in messages:
            error = message.error()
            if error is None:
                key = (message.topic() or "", message.partition() or 0)
                records.append(InputRecord.from_message(message, generations.get(key, 0)))
            else:
                self._on_error(error)
        return records

    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for key in _keys(partitions):
            self._generations[key] = self._generations.get(key, 0) + 1
        if self._incremental:
            self._consumer.incremental_assign(partitions)
        else:
            self._consumer.assign(partitions)
        if self._listener is not None:
            self._listener.on_assigned(_keys(partitions))

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._listener is not None:
            self._listener.on_revoked(_keys(partitions))

    def _lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._listener is not None:
            self._listener.on_lost(_keys(partitions))

    def _on_error(self, error: KafkaError) -> None:
        if error.code() in _QUIET_CODES:
            return
        if is_fatal(error):
            log.error("fatal consumer error", error=error.str())
            if self._fatal is None:
                self._fatal = fatal_error(f"consumer error: {error.str()}", error)
            return
        log.warning("consumer error (retried by librdkafka)", error=error.str())

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._on_commit_result(None if error is None else client_error(error), _outcome(partitions))
