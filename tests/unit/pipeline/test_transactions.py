"""Exactly-once mode with in-memory Kafka clients: the transaction's sequence and its aborts.

The integration tests (tests/integration/test_exactly_once.py) prove the guarantee against
the real broker; these pin down the order of the calls: outputs, dead letters and offsets in
one transaction, committed only after a drain, and an abort that rewinds to the committed
offsets and counts the aborted records as discarded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

import orjson
import pytest
from confluent_kafka import KafkaError

from tests.support.fake_kafka import FakeClients, FakeProducer, record
from tests.support.scorers import FakeScorer
from worker.config.loading import RunSettings, load_run_settings
from worker.config.settings import ModelSettings
from worker.contract.deadletter import HEADER_STAGE, WorkerIdentity
from worker.errors import ConfigError, TransactionStuckError
from worker.kafka.errors import (
    ClientError,
    ErrorKind,
    TxnAction,
    TxnError,
    delivery_error,
    stuck_error,
)
from worker.kafka.producer import DeliveryReport
from worker.kafka.records import OutHeaders, PartitionKey
from worker.observability.metrics import TRANSACTION_ABORT_REASONS
from worker.pipeline.delivery import PRODUCER_CLOSE_WAIT_S, Outbound, ProducerStage
from worker.pipeline.observer import Observer
from worker.pipeline.offsets import OffsetTracker, Tracked
from worker.pipeline.transactions import MAX_STUCK_PRODUCERS, AbortReason, transactional_id
from worker.pipeline.worker import Worker

TOPIC: Final = "news"
P0: Final[PartitionKey] = (TOPIC, 0)
P1: Final[PartitionKey] = (TOPIC, 1)
WAIT_S: Final = 10.0
# KafkaError._MSG_TIMED_OUT: a transient delivery failure (a broker away too long).
MSG_TIMED_OUT: Final = -192


class Counting(Observer):
    def __init__(self) -> None:
        self.discarded: list[str] = []
        self.committed: list[int] = []
        self.aborted: list[str] = []

    def record_discarded(self, key: PartitionKey, reason: str) -> None:
        self.discarded.append(reason)

    def transaction_committed(self, records: int, duration_s: float, commit_s: float) -> None:
        self.committed.append(records)

    def transaction_aborted(self, reason: str, records: int) -> None:
        self.aborted.append(reason)


def _settings(**flags: object) -> RunSettings:
    given = {
        "input_topics": TOPIC,
        "output_topic": "news.tagged",
        "labels": "sports,finance",
        "commit_interval_ms": 1,
        "max_wait_ms": 0,
        "processing_guarantee": "exactly-once",
        "revoke_timeout_ms": 500,
        **flags,
    }
    return load_run_settings(flags=given)


@pytest.fixture
def clients() -> FakeClients:
    return FakeClients(auto_ack=True)


@pytest.fixture
def observer() -> Counting:
    return Counting()


@pytest.fixture
def worker(clients: FakeClients, observer: Counting) -> Iterator[Worker]:
    built = _worker(clients, observer, _settings())
    yield built
    built.handoff.close(discard_queued=True)
    built.inference.join(WAIT_S)


@pytest.fixture
def slow_worker(clients: FakeClients, observer: Counting) -> Iterator[Worker]:
    """Commits only when told to (a revoke, a shutdown): the interval is 10 s."""
    built = _worker(clients, observer, _settings(commit_interval_ms=10_000))
    yield built
    built.handoff.close(discard_queued=True)
    built.inference.join(WAIT_S)


def _worker(clients: FakeClients, observer: Counting, settings: RunSettings) -> Worker:
    built = Worker(
        settings,
        FakeScorer(ModelSettings(scorer="tests.support.scorers:fake")),
        WorkerIdentity(group="tagstream", worker="test:1", model="fake@v1"),
        observer,
        consumer_factory=clients.make_consumer,
        producer_factory=clients.make_producer,
    )
    built.inference.start()
    assert built.transactions is not None
    built.transactions.start()
    built.intake.subscribe(settings.kafka.subscription, built)
    return built


def _feed(clients: FakeClients, partition: int, values: list[bytes], start: int = 0) -> None:
    for offset, value in enumerate(values, start):
        clients.input.records.append(record(TOPIC, partition, offset, value))


def _events(count: int) -> list[bytes]:
    return [orjson.dumps({"text": f"sports item {index}"}) for index in range(count)]


def _step_until(worker: Worker, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        worker.step()
        time.sleep(0.002)


def test_outputs_dead_letters_and_offsets_commit_in_one_transaction(
    worker: Worker, clients: FakeClients, observer: Counting
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, [*_events(2), b"not json", *_events(1)])
    _step_until(worker, lambda: P0 in (clients.producer.txn_offsets or [{}])[-1])
    producer = clients.producer
    assert producer.txn_offsets[-1] == {P0: 4}
    assert sorted(sent.topic for sent in producer.committed) == [
        *["news.tagged"] * 3,
        "news.tagged.dlq",
    ]
    # init, begin, then per checkpoint: offsets, commit, begin (the next transaction).
    assert producer.txn_calls[:2] == ["init", "begin"]
    index = producer.txn_calls.index("send_offsets")
    assert producer.txn_calls[index : index + 3] == ["send_offsets", "commit", "begin"]
    # No consumer commit at all: the offsets travel with the transaction.
    assert clients.input.commits == []
    assert sum(observer.committed) == 4


def test_a_failed_delivery_aborts_and_rewinds_to_the_committed_offsets(
    worker: Worker, clients: FakeClients, observer: Counting
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(2))
    _step_until(worker, lambda: clients.producer.txn_offsets == [{P0: 2}])
    refusal = ClientError(MSG_TIMED_OUT, "_MSG_TIMED_OUT", "timed out", ErrorKind.RETRIABLE)
    clients.refuse["news.tagged"] = refusal
    _feed(clients, 0, _events(3), start=2)
    _step_until(worker, lambda: "abort" in clients.producer.txn_calls)
    assert observer.aborted == [str(AbortReason.PRODUCE_ERROR)]
    assert clients.input.seeks == [{P0: 2}]
    assert observer.discarded.count("aborted") >= 1
    # The replay, once the broker takes records again, commits from the rewound position.
    del clients.refuse["news.tagged"]
    _feed(clients, 0, _events(3), start=2)
    _step_until(worker, lambda: clients.producer.txn_offsets[-1] == {P0: 5})
    assert len(clients.producer.committed) == 5


def test_an_output_the_broker_rejects_is_dead_lettered_inside_the_transaction_only(
    worker: Worker, clients: FakeClients, observer: Counting
) -> None:
    # A compacted output refuses the keyless output, and with it every record of its
    # produce request: the replay sends each suspect alone, the culprit is dead-lettered.
    rejected = delivery_error(KafkaError(KafkaError.INVALID_RECORD))
    clients.refuse_keyless["news.tagged"] = rejected
    clients.input.assign([P0])
    inputs = [
        record(TOPIC, 0, offset, value, None if offset == 2 else f"k{offset}".encode())
        for offset, value in enumerate(_events(6))
    ]
    clients.input.records.extend(inputs)
    refetched: list[int] = []

    def committed_all() -> bool:
        # The broker's answer to a seek: the records from its position are fetched again.
        for seek in clients.input.seeks[len(refetched) :]:
            refetched.append(seek[P0])
            clients.input.records.extend(inputs[seek[P0] :])
        return clients.producer.txn_offsets[-1:] == [{P0: 6}]

    _step_until(worker, committed_all)
    # Nothing was written outside the transactional producer: a record sent alone went
    # through it too (a non-transactional write is visible at once, never aborted).
    assert len(clients.producers) == 1
    committed = clients.producer.committed
    outputs = sorted(sent.key or b"" for sent in committed if sent.topic == "news.tagged")
    assert outputs == [b"k0", b"k1", b"k3", b"k4", b"k5"]
    dead = [sent for sent in committed if sent.topic == "news.tagged.dlq"]
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert (headers[HEADER_STAGE], headers["tagstream.error.class"]) == (
        b"produce",
        b"INVALID_RECORD",
    )
    # One abort for the request, one for the culprit refused alone.
    assert observer.aborted == [str(AbortReason.PRODUCE_ERROR)] * 2


def test_a_revoke_commits_the_open_transaction_before_the_partitions_go(
    slow_worker: Worker, clients: FakeClients
) -> None:
    clients.input.assign([P0, P1])
    _feed(clients, 0, _events(2))
    _step_until(slow_worker, lambda: len(clients.producer.pending) == 2)
    assert clients.producer.txn_offsets == []
    clients.input.revoke([P0])
    slow_worker.step()
    assert clients.producer.txn_offsets == [{P0: 2}]
    assert len(clients.producer.committed) == 2
    assert P0 not in slow_worker.tracker


def test_a_lost_partition_aborts_the_open_transaction(
    slow_worker: Worker, clients: FakeClients, observer: Counting
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(2))
    _step_until(slow_worker, lambda: len(clients.producer.pending) == 2)
    clients.input.lose([P0])
    slow_worker.step()
    assert observer.aborted == [str(AbortReason.LOST)]
    assert clients.producer.txn_offsets == []
    assert clients.producer.committed == []
    assert clients.input.seeks == []  # a lost partition is not sought
    assert observer.discarded.count("aborted") == 2
    assert P0 not in slow_worker.tracker


def test_a_fenced_producer_is_replaced(
    worker: Worker, clients: FakeClients, observer: Counting
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(1))
    fenced = TxnError(-144, "_FENCED", "fenced", TxnAction.FENCED)
    clients.producer.txn_errors["commit"] = deque([fenced])
    _step_until(worker, lambda: len(clients.producers) == 2)
    assert observer.aborted == [str(AbortReason.FENCED)]
    assert clients.producers[0].purged
    # Closed off the main thread, with a bounded wait: its close may hang on a coordinator.
    assert clients.producers[0].abandon_waits == [PRODUCER_CLOSE_WAIT_S]
    assert clients.producers[1].txn_calls[:2] == ["init", "begin"]


def test_a_producer_that_failed_fatally_is_replaced(
    worker: Worker, clients: FakeClients, observer: Counting
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(1))
    worker.step()
    # The sequence desynchronization a broker restart can leave: fatal for this producer.
    clients.producer.on_error(
        ClientError(45, "OUT_OF_ORDER_SEQUENCE_NUMBER", "out of order", ErrorKind.FATAL)
    )
    _step_until(worker, lambda: len(clients.producers) == 2)
    assert observer.aborted == [str(AbortReason.FENCED)]
    assert clients.producers[1].txn_calls[:2] == ["init", "begin"]
    worker.check_health()


def test_a_producer_stuck_in_a_transactional_call_is_replaced(
    worker: Worker, clients: FakeClients, observer: Counting
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(1))
    clients.producer.txn_errors["send_offsets"] = deque([stuck_error("send_offsets", 1.0)])
    _step_until(worker, lambda: len(clients.producers) == 2)
    assert observer.aborted == [str(AbortReason.STUCK)]
    # Not asked to abort: a stuck client refuses a second transactional call.
    assert "abort" not in clients.producers[0].txn_calls
    assert clients.producers[1].txn_calls[:2] == ["init", "begin"]
    assert clients.input.seeks == [{P0: 0}]
    # The replay after the rewind commits on the new producer.
    _feed(clients, 0, _events(1))
    _step_until(worker, lambda: clients.producers[1].txn_offsets == [{P0: 1}])
    assert len(clients.producers[1].committed) == 1


def test_a_worker_whose_producers_keep_getting_stuck_stops(
    worker: Worker, clients: FakeClients
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(1))
    built = 0
    with pytest.raises(TransactionStuckError, match="hung inside the client"):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for producer in clients.producers[built:]:
                producer.txn_errors["send_offsets"] = deque([stuck_error("send_offsets", 1.0)])
            built = len(clients.producers)
            worker.step()
            time.sleep(0.002)
    # The first producer and MAX_STUCK_PRODUCERS replacements; the last one hung as well.
    assert len(clients.producers) == MAX_STUCK_PRODUCERS + 1


def test_every_abort_reason_has_a_metric_series() -> None:
    assert {str(reason) for reason in AbortReason} == set(TRANSACTION_ABORT_REASONS)


def test_the_transactional_id_is_stable_per_replica_or_unique_per_process() -> None:
    kafka = _settings(group_id="g", group_instance_id="pod-0").kafka
    assert transactional_id(kafka) == "g-pod-0"
    explicit = _settings(transactional_id="tagstream-7").kafka
    assert transactional_id(explicit) == "tagstream-7"
    plain = _settings(group_id="g").kafka
    assert transactional_id(plain) != transactional_id(plain)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"commit_interval_ms": 40_000}, "TAGSTREAM_COMMIT_INTERVAL_MS"),
        ({"producer_config": '{"enable.idempotence": false}'}, "enable.idempotence"),
        ({"producer_config": '{"acks": "1"}'}, "acks"),
        ({"producer_config": '{"transactional.id": "x"}'}, "transactional.id"),
        ({"consumer_config": '{"isolation.level": "read_uncommitted"}'}, "isolation.level"),
        ({"processing_guarantee": "exactly-twice"}, "TAGSTREAM_PROCESSING_GUARANTEE"),
    ],
)
def test_bad_exactly_once_settings_are_refused_at_start_up(
    flags: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        _settings(**flags)


class _ReportsAtOnce(FakeProducer):
    """A producer whose delivery report runs before ``produce`` returns to its caller: what
    the main thread's poll can do while the inference thread is still in ``produce``."""

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: OutHeaders,
        on_delivery: DeliveryReport,
    ) -> ClientError | None:
        error = super().produce(topic, key, value, headers, on_delivery)
        self.ack_all()
        return error


def test_a_delivery_report_that_overtakes_its_produce_call_still_marks_the_offset_done() -> None:
    settings = _settings()
    stage = ProducerStage(
        settings.kafka,
        WorkerIdentity(group="tagstream", worker="test:1", model="fake@v1"),
        Observer(),
        producer_factory=lambda _config, on_error: _ReportsAtOnce(on_error),
        transactional_id="tagstream-test",
    )
    tracker = OffsetTracker()
    tracker.assign([P0])
    state = tracker.get(P0)
    assert state is not None and state.receive(0)
    origin = Tracked(record(TOPIC, 0, 0, b"{}"), state)
    stage.send(Outbound("news.tagged", None, b"{}", [], "output", origin))
    assert state.pending == 0  # done: the report belonged to the open transaction
    assert tracker.commits_due(unconfirmed=True) == {P0: 1}
