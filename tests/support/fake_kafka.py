"""In-memory stand-ins for the thin Kafka clients, for unit tests of the worker's logic.

They implement the pipeline's ports (:class:`worker.pipeline.intake.ConsumerClient`,
:class:`worker.pipeline.delivery.ProducerClient`) and nothing more: the integration tests
against the real broker stay the proof of the delivery guarantee; these make the commit
sequence and the rebalance callbacks readable and fast to test.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.kafka.consumer import CommitOutcome, CommitResult, RebalanceListener
from worker.kafka.errors import ClientError, ErrorKind, TxnAction, TxnError
from worker.kafka.producer import ClientErrorHook, DeliveryReport
from worker.kafka.records import InputRecord, OutHeaders, PartitionKey

# KafkaError.REBALANCE_IN_PROGRESS: the broker refuses a commit while the group rebalances.
REBALANCE_IN_PROGRESS = 27


def rebalance_in_progress() -> ClientError:
    return ClientError(
        REBALANCE_IN_PROGRESS, "REBALANCE_IN_PROGRESS", "rebalance", ErrorKind.RETRIABLE
    )


def record(
    topic: str, partition: int, offset: int, value: bytes, key: bytes | None = None
) -> InputRecord:
    return InputRecord(topic, partition, offset, key, value, (), 1_700_000_000_000 + offset)


@dataclass
class FakeConsumer:
    """A consumer whose records, rebalances and commit answers the test scripts."""

    on_commit: CommitResult
    incremental: bool = True
    listener: RebalanceListener | None = None
    assigned: list[PartitionKey] = field(default_factory=list)
    paused: set[PartitionKey] = field(default_factory=set)
    # Records waiting to be polled, and rebalance steps run at the start of the next poll.
    records: deque[InputRecord] = field(default_factory=deque)
    rebalances: deque[Callable[[], None]] = field(default_factory=deque)
    # Errors the next synchronous commits return, in order; then they succeed.
    sync_errors: deque[ClientError] = field(default_factory=deque)
    commits: list[tuple[str, dict[PartitionKey, int]]] = field(default_factory=list)
    # Asynchronous commits whose answer never comes (a broker that dropped the request).
    lose_async_results: bool = False
    closed: bool = False
    # Assignments of each partition so far (records are stamped with it when polled).
    generations: dict[PartitionKey, int] = field(default_factory=dict)
    # Close as librdkafka does: revoke the assignment (rebalance callback) first.
    revoke_on_close: bool = False
    # The wait of every close, in order (None: a close without a bound).
    close_waits: list[float | None] = field(default_factory=list)
    # Every seek, in order (exactly-once rewinds).
    seeks: list[dict[PartitionKey, int]] = field(default_factory=list)

    # -- ConsumerClient ---------------------------------------------------------------------

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self.listener = listener

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        while self.rebalances:
            self.rebalances.popleft()()
        out: list[InputRecord] = []
        while self.records and len(out) < max_records:
            head = self.records[0]
            if head.partition_key in self.paused or head.partition_key not in self.assigned:
                break
            polled = self.records.popleft()
            if polled.generation == 0:  # a record the test did not stamp itself
                polled = polled._replace(generation=self.generation(head.partition_key))
            out.append(polled)
        return out

    def generation(self, key: PartitionKey) -> int:
        return self.generations.get(key, 0)

    def assignment(self) -> list[PartitionKey]:
        return list(self.assigned)

    def pause(self, keys: Sequence[PartitionKey]) -> None:
        self.paused.update(keys)

    def resume(self, keys: Sequence[PartitionKey]) -> None:
        self.paused.difference_update(keys)

    def commit_async(self, positions: Mapping[PartitionKey, int]) -> ClientError | None:
        self.commits.append(("async", dict(positions)))
        if not self.lose_async_results:
            self.on_commit(None, [(key, offset, None) for key, offset in positions.items()])
        return None

    def commit_sync(self, positions: Mapping[PartitionKey, int]) -> ClientError | None:
        if self.sync_errors:
            error = self.sync_errors.popleft()
            self.on_commit(error, [])
            return error
        self.commits.append(("sync", dict(positions)))
        outcome: CommitOutcome = [(key, offset, None) for key, offset in positions.items()]
        self.on_commit(None, outcome)
        return None

    def group_metadata(self) -> object:
        return ("group-metadata", dict(self.generations))

    def seek(self, positions: Mapping[PartitionKey, int]) -> ClientError | None:
        """Like librdkafka: a new fetch generation; records past the position that were
        queued are dropped (the test queues the refetched ones itself)."""
        self.seeks.append(dict(positions))
        for key in positions:
            self.generations[key] = self.generation(key) + 1
        return None

    def abandon(self, wait_s: float) -> bool:
        """Close without the listener hearing of it (a consumer being replaced)."""
        self.listener = None
        self.close()
        return True

    def close(self, wait_s: float | None = None) -> bool:
        if self.revoke_on_close and self.assigned and self.listener is not None:
            self.listener.on_revoked(list(self.assigned))
            self.assigned = []
        self.closed = True
        self.close_waits.append(wait_s)
        return True

    # -- what the test does -----------------------------------------------------------------

    def assign(self, keys: list[PartitionKey]) -> None:
        """Schedule an assignment, delivered inside the next poll as librdkafka does."""

        def step() -> None:
            self.assigned.extend(keys)
            for key in keys:
                self.generations[key] = self.generation(key) + 1
            assert self.listener is not None
            self.listener.on_assigned(keys)

        self.rebalances.append(step)

    def revoke(self, keys: list[PartitionKey]) -> None:
        def step() -> None:
            assert self.listener is not None
            self.listener.on_revoked(keys)
            self.assigned = [key for key in self.assigned if key not in keys]

        self.rebalances.append(step)

    def lose(self, keys: list[PartitionKey]) -> None:
        def step() -> None:
            assert self.listener is not None
            self.listener.on_lost(keys)
            self.assigned = [key for key in self.assigned if key not in keys]

        self.rebalances.append(step)

    def committed(self, key: PartitionKey) -> int | None:
        """The last position committed for ``key`` (by either kind of commit)."""
        positions = [commit[key] for _, commit in self.commits if key in commit]
        return positions[-1] if positions else None


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: OutHeaders
    report: DeliveryReport


@dataclass
class FakeProducer:
    """A producer that acknowledges what it was given when the test says so (or at once,
    on the next poll, with ``auto_ack``)."""

    on_error: ClientErrorHook
    auto_ack: bool = True
    # Topics whose records the "broker" refuses, with the error it reports.
    refuse: dict[str, ClientError] = field(default_factory=dict)
    # Topics that refuse a record without a key (a compacted topic), with the error. As a
    # broker judges a whole produce request, every record acknowledged in the same
    # :meth:`ack_all` for that topic is refused with it.
    refuse_keyless: dict[str, ClientError] = field(default_factory=dict)
    in_flight: list[Sent] = field(default_factory=list)
    written: list[Sent] = field(default_factory=list)
    closed: bool = False
    # The waits of each abandon() (a producer being replaced closes on its own thread).
    abandon_waits: list[float] = field(default_factory=list)
    # librdkafka's local queue size: produce() raises BufferError while it is full.
    capacity: int | None = None
    # produce() runs on the inference thread too: librdkafka is thread-safe, so is this.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Transactions (exactly-once): the calls made, in order, with what each returned; the
    # errors the next calls of a name return (then they succeed); records per transaction.
    txn_calls: list[str] = field(default_factory=list)
    txn_errors: dict[str, deque[TxnError]] = field(default_factory=dict)
    txn_offsets: list[dict[PartitionKey, int]] = field(default_factory=list)
    # Records written in the open transaction; visible ones once it commits.
    pending: list[Sent] = field(default_factory=list)
    committed: list[Sent] = field(default_factory=list)
    purged: bool = False
    # Set once a transactional call returned a hang (TxnAction.STUCK), as the real one is.
    stuck: bool = False

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: OutHeaders,
        on_delivery: DeliveryReport,
    ) -> ClientError | None:
        with self.lock:
            if self.capacity is not None and len(self.in_flight) >= self.capacity:
                raise BufferError("Local: Queue full")
            self.in_flight.append(Sent(topic, key, value, headers, on_delivery))
        return None

    def poll(self, timeout_s: float) -> None:
        if self.auto_ack:
            self.ack_all()

    def __len__(self) -> int:
        return len(self.in_flight)

    def close(self) -> None:
        self.closed = True

    def abandon(self, wait_s: float) -> bool:
        self.abandon_waits.append(wait_s)
        self.close()
        return True

    def ack_all(self) -> None:
        with self.lock:
            sent, self.in_flight = self.in_flight, []
        # One "produce request" per topic: a keyless record fails all of them.
        failed_requests = {
            item.topic: self.refuse_keyless[item.topic]
            for item in sent
            if item.key is None and item.topic in self.refuse_keyless
        }
        for item in sent:
            refusal = self.refuse.get(item.topic) or failed_requests.get(item.topic)
            if refusal is None:
                self.written.append(item)
                self.pending.append(item)
            item.report(refusal)

    # -- transactions -----------------------------------------------------------------------

    def _txn(self, name: str) -> TxnError | None:
        self.txn_calls.append(name)
        errors = self.txn_errors.get(name)
        if errors:
            error = errors.popleft()
            self.stuck = self.stuck or error.action is TxnAction.STUCK
            return error
        return None

    def init_transactions(self, timeout_s: float) -> TxnError | None:
        return self._txn("init")

    def begin_transaction(self) -> TxnError | None:
        return self._txn("begin")

    def send_offsets_to_transaction(
        self, positions: Mapping[PartitionKey, int], group_metadata: object, timeout_s: float
    ) -> TxnError | None:
        error = self._txn("send_offsets")
        if error is None:
            self.txn_offsets.append(dict(positions))
        return error

    def commit_transaction(self, timeout_s: float) -> TxnError | None:
        error = self._txn("commit")
        if error is None:
            self.committed.extend(self.pending)
            self.pending = []
        return error

    def abort_transaction(self, timeout_s: float) -> TxnError | None:
        error = self._txn("abort")
        if error is None:
            self.pending = []
            with self.lock:
                self.in_flight = []
        return error

    def flush(self, timeout_s: float) -> int:
        if self.auto_ack:
            self.ack_all()
        return len(self.in_flight)

    def purge(self) -> None:
        self.purged = True
        with self.lock:
            self.in_flight = []


@dataclass
class FakeClients:
    """Factories for :class:`worker.pipeline.worker.Worker` that keep what they built."""

    auto_ack: bool = True
    consumer: FakeConsumer | None = None
    # Every consumer built, in order (the worker replaces one that stopped rejoining).
    consumers: list[FakeConsumer] = field(default_factory=list)
    producers: list[FakeProducer] = field(default_factory=list)
    # Shared by every producer built (the worker's one-record-per-request producer too).
    refuse: dict[str, ClientError] = field(default_factory=dict)
    refuse_keyless: dict[str, ClientError] = field(default_factory=dict)

    def make_consumer(
        self, config: Mapping[str, Any], incremental: bool, on_commit: CommitResult
    ) -> FakeConsumer:
        self.consumer = FakeConsumer(on_commit, incremental)
        self.consumers.append(self.consumer)
        return self.consumer

    def make_producer(self, config: Mapping[str, Any], on_error: ClientErrorHook) -> FakeProducer:
        producer = FakeProducer(
            on_error,
            auto_ack=self.auto_ack,
            refuse=self.refuse,
            refuse_keyless=self.refuse_keyless,
        )
        self.producers.append(producer)
        return producer

    @property
    def producer(self) -> FakeProducer:
        return self.producers[0]

    @property
    def input(self) -> FakeConsumer:
        assert self.consumer is not None
        return self.consumer


@dataclass
class FakeControlConsumer:
    """The control topic's reader (:class:`worker.pipeline.profiles.ControlConsumer`): the
    test appends records to :attr:`log`; once assigned, polls return them in order."""

    topic: str = "profiles"
    partition_count: int | None = 1
    log: dict[int, list[InputRecord]] = field(default_factory=dict)
    positions: dict[PartitionKey, int] = field(default_factory=dict)
    closed: bool = False

    def append(
        self, key: str | bytes | None, value: bytes | None, partition: int = 0
    ) -> InputRecord:
        """Write one control record; returns it (its offset is the profile version)."""
        entries = self.log.setdefault(partition, [])
        raw_key = key.encode() if isinstance(key, str) else key
        entry = InputRecord(self.topic, partition, len(entries), raw_key, value, (), None, 1)
        entries.append(entry)
        return entry

    def partitions(self, topic: str, timeout_s: float) -> list[int] | None:
        if topic != self.topic or self.partition_count is None:
            return None
        return list(range(self.partition_count))

    def watermarks(self, key: PartitionKey, timeout_s: float) -> tuple[int, int]:
        return 0, len(self.log.get(key[1], []))

    def assign_from_beginning(self, keys: Sequence[PartitionKey]) -> None:
        self.positions = dict.fromkeys(keys, 0)

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]:
        polled: list[InputRecord] = []
        for key, position in self.positions.items():
            entries = self.log.get(key[1], [])[position : position + max_records - len(polled)]
            polled += entries
            self.positions[key] = position + len(entries)
        return polled

    def position(self, keys: Sequence[PartitionKey]) -> dict[PartitionKey, int | None]:
        return {key: self.positions.get(key) for key in keys}

    def close(self) -> None:
        self.closed = True
