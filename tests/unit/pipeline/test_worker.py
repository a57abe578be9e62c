"""The worker's commit sequence and rebalance callbacks, with in-memory Kafka clients.

The integration tests against the real broker prove the delivery guarantee; these pin the
logic down where it is cheap to read and to change: nothing is committed before its
output is acknowledged, a revoke settles its partitions synchronously, a commit refused by
a rebalance is tried again, and a lost partition commits nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Final

import orjson
import pytest
import structlog
from confluent_kafka import KafkaError

from tests.support.fake_kafka import FakeClients, rebalance_in_progress, record
from tests.support.scorers import FakeScorer
from worker.config.loading import RunSettings, load_run_settings
from worker.config.settings import ModelSettings
from worker.contract.deadletter import HEADER_STAGE, WorkerIdentity
from worker.errors import KafkaFatalError
from worker.exit_codes import EXIT_OK
from worker.kafka.errors import delivery_error
from worker.kafka.records import PartitionKey
from worker.pipeline.worker import CLIENT_CLOSE_MIN_S, Worker

TOPIC: Final = "news"
P0: Final[PartitionKey] = (TOPIC, 0)
P1: Final[PartitionKey] = (TOPIC, 1)
# Bounds a loop that waits for the inference thread; a passing test takes milliseconds.
WAIT_S: Final = 10.0


def _settings(**flags: object) -> RunSettings:
    given = {
        "input_topics": TOPIC,
        "output_topic": "news.tagged",
        "labels": "sports,finance",
        "commit_interval_ms": 1,
        "max_wait_ms": 0,
        **flags,
    }
    return load_run_settings(flags=given)


@pytest.fixture
def clients() -> FakeClients:
    return FakeClients(auto_ack=False)


@pytest.fixture
def worker(clients: FakeClients) -> Iterator[Worker]:
    built = _worker(clients, _settings(revoke_timeout_ms=200, shutdown_timeout_s=1.0))
    yield built
    built.handoff.close(discard_queued=True)
    built.inference.join(WAIT_S)


def _worker(clients: FakeClients, settings: RunSettings) -> Worker:
    scorer = FakeScorer(ModelSettings(scorer="tests.support.scorers:fake"))
    built = Worker(
        settings,
        scorer,
        WorkerIdentity(group="tagstream", worker="test:1", model="fake@v1"),
        consumer_factory=clients.make_consumer,
        producer_factory=clients.make_producer,
    )
    built.inference.start()
    built.intake.subscribe(settings.kafka.subscription, built)
    return built


def _events(partition: int, count: int) -> list[bytes]:
    return [orjson.dumps({"text": f"sports item {partition}-{offset}"}) for offset in range(count)]


def _feed(clients: FakeClients, partition: int, values: list[bytes]) -> None:
    for offset, value in enumerate(values):
        clients.input.records.append(record(TOPIC, partition, offset, value))


def _step_until(worker: Worker, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        worker.step()
        time.sleep(0.002)  # lets the commit interval pass and the inference thread run


def test_offsets_are_committed_only_once_their_outputs_are_acknowledged(
    worker: Worker, clients: FakeClients
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 3))
    _step_until(worker, lambda: len(clients.producer) == 3)
    for _ in range(20):  # many commit intervals, no acknowledgement
        worker.step()
        time.sleep(0.002)
    assert clients.input.committed(P0) == 0  # where the fetch started, not one past it
    clients.producer.ack_all()
    _step_until(worker, lambda: clients.input.committed(P0) == 3)
    assert [sent.topic for sent in clients.producer.written] == ["news.tagged"] * 3


def test_an_invalid_record_is_dead_lettered_and_its_offset_committed(
    worker: Worker, clients: FakeClients
) -> None:
    clients.producer.auto_ack = True
    clients.input.assign([P0])
    _feed(clients, 0, [b"not json", *_events(0, 1)])
    _step_until(worker, lambda: clients.input.committed(P0) == 2)
    by_topic = {sent.topic: sent for sent in clients.producer.written}
    assert set(by_topic) == {"news.tagged", "news.tagged.dlq"}
    headers = dict(by_topic["news.tagged.dlq"].headers)
    assert headers[HEADER_STAGE] == b"deserialize"
    assert by_topic["news.tagged.dlq"].value == b"not json"


def test_a_revoke_waits_for_acknowledgements_then_commits_synchronously(
    worker: Worker, clients: FakeClients
) -> None:
    clients.input.assign([P0, P1])
    _feed(clients, 0, _events(0, 2))
    _feed(clients, 1, _events(1, 2))
    _step_until(worker, lambda: len(clients.producer) == 4)
    clients.producer.auto_ack = True  # the acknowledgements arrive while the revoke waits
    clients.input.revoke([P0])
    worker.step()
    assert ("sync", {P0: 2}) in clients.input.commits
    assert P0 not in worker.tracker
    assert P1 in worker.tracker


def test_a_revoke_that_times_out_commits_nothing_unacknowledged(
    worker: Worker, clients: FakeClients
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 2))
    _step_until(worker, lambda: len(clients.producer) == 2)
    clients.input.revoke([P0])
    with structlog.testing.capture_logs() as logs:
        worker.step()
    assert clients.input.committed(P0) in (None, 0)
    assert "revoke timeout: unfinished work dropped" in [entry["event"] for entry in logs]
    clients.producer.ack_all()  # late acknowledgements of a past assignment change nothing
    worker.step()
    assert clients.input.committed(P0) in (None, 0)


def test_a_shutdown_commit_refused_by_a_rebalance_is_tried_again() -> None:
    clients = FakeClients(auto_ack=True)
    # An hour between periodic commits: only the shutdown commits.
    worker = _worker(clients, _settings(commit_interval_ms=3_600_000, shutdown_timeout_s=5.0))
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 3))
    _step_until(worker, lambda: len(clients.producer.written) == 3)
    clients.input.sync_errors.append(rebalance_in_progress())
    assert worker.shutdown() == EXIT_OK
    assert clients.input.commits == [("sync", {P0: 3})]
    assert clients.input.closed and clients.producer.closed
    assert worker.inference.join(WAIT_S)


def test_the_shutdown_waits_for_the_clients_to_close_no_longer_than_its_timeout() -> None:
    clients = FakeClients(auto_ack=False)
    worker = _worker(clients, _settings(shutdown_timeout_s=1.5))
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 2))
    _step_until(worker, lambda: len(clients.producer) == 2)
    # Never acknowledged (the broker is gone): the settle uses up the timeout.
    with structlog.testing.capture_logs() as logs:
        assert worker.shutdown() == EXIT_OK
    assert "shutdown timeout: unfinished work left uncommitted" in [e["event"] for e in logs]
    assert clients.input.committed(P0) in (None, 0)
    # Both closes are bounded: what is left of the timeout, else the floor.
    [consumer_wait_s] = clients.input.close_waits
    assert consumer_wait_s == pytest.approx(CLIENT_CLOSE_MIN_S, abs=0.5)
    [producer_wait_s] = clients.producer.abandon_waits
    assert producer_wait_s == pytest.approx(CLIENT_CLOSE_MIN_S, abs=0.5)
    assert clients.input.closed and clients.producer.closed


def test_a_lost_partition_commits_nothing_past_its_start(
    worker: Worker, clients: FakeClients
) -> None:
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 2))
    _step_until(worker, lambda: len(clients.producer) == 2)
    clients.input.lose([P0])
    worker.step()
    clients.producer.ack_all()
    for _ in range(5):
        worker.step()
        time.sleep(0.002)
    assert all(commit.get(P0, 0) == 0 for _, commit in clients.input.commits)
    assert P0 not in worker.tracker


REJOIN_TIMEOUT_S: Final = 0.05


def test_a_consumer_given_nothing_after_a_loss_is_replaced_once(clients: FakeClients) -> None:
    worker = _worker(clients, _settings(rejoin_timeout_s=REJOIN_TIMEOUT_S))
    clients.input.assign([P0])
    worker.step()
    clients.input.lose([P0])
    worker.step()
    first = clients.input
    time.sleep(REJOIN_TIMEOUT_S * 2)
    worker.step()

    assert len(clients.consumers) == 2
    assert first.closed and first.listener is None
    replacement = clients.consumers[1]
    assert replacement.listener is not None
    assert worker.intake.consumer is replacement
    # Once per loss: the new consumer is not replaced for the old loss.
    time.sleep(REJOIN_TIMEOUT_S * 2)
    worker.step()
    assert len(clients.consumers) == 2
    # The new consumer carries on: assigned, it is polled, and its commits go through it.
    replacement.assign([P0])
    _feed(clients, 0, _events(0, 1))
    _step_until(worker, lambda: len(clients.producer) == 1)
    clients.producer.ack_all()
    _step_until(worker, lambda: replacement.committed(P0) == 1)
    worker.handoff.close(discard_queued=True)
    worker.inference.join(WAIT_S)


def test_an_assignment_after_a_loss_keeps_the_consumer(clients: FakeClients) -> None:
    worker = _worker(clients, _settings(rejoin_timeout_s=REJOIN_TIMEOUT_S))
    clients.input.assign([P0])
    worker.step()
    clients.input.lose([P0])
    worker.step()
    # An empty assignment is an assignment: the group took this member back.
    clients.input.assign([])
    worker.step()
    time.sleep(REJOIN_TIMEOUT_S * 2)
    worker.step()
    assert len(clients.consumers) == 1
    worker.handoff.close(discard_queued=True)
    worker.inference.join(WAIT_S)


def test_a_partition_assigned_while_paused_starts_paused(
    worker: Worker, clients: FakeClients
) -> None:
    clients.input.assign([P0])
    worker.step()
    worker.intake.pause("test")
    clients.input.assign([P1])
    worker.intake.poll(1, 0.0)  # the assignment arrives inside a poll
    assert clients.input.paused == {P0, P1}
    worker.intake.resume("test")
    assert clients.input.paused == set()


def test_an_output_the_broker_rejects_for_what_it_is_dead_letters_its_input(
    worker: Worker, clients: FakeClients
) -> None:
    # A null key on a compacted output topic: INVALID_RECORD, the same answer every time.
    clients.refuse["news.tagged"] = delivery_error(KafkaError(KafkaError.INVALID_RECORD))
    clients.auto_ack = clients.producer.auto_ack = True
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 2))
    _step_until(worker, lambda: clients.input.committed(P0) == 2)
    assert worker.producer.fatal is None
    dead = [sent for sent in clients.producer.written if sent.topic == "news.tagged.dlq"]
    assert len(dead) == 2
    headers = dict(dead[0].headers)
    assert (headers[HEADER_STAGE], headers["tagstream.error.class"]) == (
        b"produce",
        b"INVALID_RECORD",
    )


def test_a_revoke_commits_what_an_unanswered_asynchronous_commit_only_sent(
    worker: Worker, clients: FakeClients
) -> None:
    clients.producer.auto_ack = True
    clients.input.lose_async_results = True
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 3))
    _step_until(worker, lambda: ("async", {P0: 3}) in clients.input.commits)
    clients.input.revoke([P0])
    worker.step()
    # Sent is not confirmed: the revoke commits position 3 and waits for the answer.
    assert clients.input.commits[-1] == ("sync", {P0: 3})


@pytest.mark.timeout(30)
def test_a_full_producer_queue_pauses_the_input_instead_of_blocking_the_loop(
    worker: Worker, clients: FakeClients
) -> None:
    # Invalid records are dead-lettered on the main thread itself: with librdkafka's queue
    # full, a blocking send would never return to the loop.
    clients.producer.capacity = 1
    clients.input.assign([P0])
    _feed(clients, 0, [b"not json"] * 4)
    _step_until(worker, lambda: worker.producer.congested)
    for _ in range(5):
        worker.step()  # returns: the loop keeps serving the group while the queue is full
    assert "producer queue full" in worker.intake.holds()
    assert clients.input.paused == {P0}
    clients.producer.capacity = None
    clients.producer.auto_ack = True
    _step_until(worker, lambda: clients.input.committed(P0) == 4)
    dead = [sent.value for sent in clients.producer.written if sent.topic == "news.tagged.dlq"]
    assert dead == [b"not json"] * 4  # in order, none lost
    assert not worker.intake.paused and clients.input.paused == set()


def test_a_partition_whose_uncommitted_window_is_full_is_paused_alone(
    clients: FakeClients,
) -> None:
    worker = _worker(clients, _settings(max_uncommitted_records=4))
    try:
        clients.input.assign([P0, P1])
        _feed(clients, 0, _events(0, 6))
        _step_until(worker, lambda: len(clients.producer) >= 4)
        worker.flow.check_windows()
        assert worker.intake.holds(P0) == {"uncommitted window full"}
        assert worker.intake.holds(P1) == frozenset()
        assert clients.input.paused == {P0}
        clients.producer.auto_ack = True
        _step_until(worker, lambda: clients.input.committed(P0) is not None)
        _step_until(worker, lambda: not worker.intake.holds(P0))
        _step_until(worker, lambda: clients.input.committed(P0) == 6)
        assert clients.input.paused == set()
    finally:
        worker.handoff.close(discard_queued=True)
        worker.inference.join(WAIT_S)


def test_a_record_that_stays_unwritable_past_the_retry_deadline_stops_the_worker(
    clients: FakeClients,
) -> None:
    clients.refuse["news.tagged.dlq"] = delivery_error(
        KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)  # the dead-letter topic was deleted
    )
    clients.auto_ack = True
    worker = _worker(clients, _settings(retry_deadline_s=0.3))
    try:
        clients.input.assign([P0])
        _feed(clients, 0, [b"not json"])
        with pytest.raises(KafkaFatalError) as raised:
            _step_until(worker, lambda: False)
        fatal = raised.value
        assert "TAGSTREAM_RETRY_DEADLINE_S" in str(fatal) and "news.tagged.dlq" in str(fatal)
        assert clients.input.committed(P0) in (None, 0)  # the offset stays uncommitted
    finally:
        worker.handoff.close(discard_queued=True)
        worker.inference.join(WAIT_S)


def test_an_event_whose_labels_times_text_cost_too_much_is_dead_lettered_at_validate(
    clients: FakeClients,
) -> None:
    clients.auto_ack = True
    worker = _worker(clients, _settings(max_event_tokens=500))
    try:
        clients.input.assign([P0])
        amplified = {"text": "word " * 400, "labels": [f"label {i}" for i in range(50)]}
        _feed(clients, 0, [orjson.dumps(amplified), *_events(0, 1)])
        _step_until(worker, lambda: clients.input.committed(P0) == 2)
        dead = [sent for sent in clients.producer.written if sent.topic == "news.tagged.dlq"]
        assert len(dead) == 1
        headers = dict(dead[0].headers)
        assert headers[HEADER_STAGE] == b"validate"
        assert headers["tagstream.error.class"] == b"EventTooCostlyError"
        message = headers["tagstream.error.message"]
        assert isinstance(message, bytes) and b"TAGSTREAM_MAX_EVENT_TOKENS=500" in message
    finally:
        worker.handoff.close(discard_queued=True)
        worker.inference.join(WAIT_S)


def test_a_record_fetched_under_a_previous_assignment_is_not_applied_to_the_new_one(
    worker: Worker, clients: FakeClients
) -> None:
    clients.producer.auto_ack = True
    clients.input.assign([P0])
    worker.step()
    assert clients.input.generation(P0) == 1
    # An eager rebalance gives P0 back at once; a record of offset 5 fetched before it
    # arrives afterwards, and then the new assignment's fetch from the committed offset 0.
    clients.input.revoke([P0])
    clients.input.assign([P0])
    values = _events(0, 6)
    clients.input.records.append(record(TOPIC, 0, 5, values[5])._replace(generation=1))
    _feed(clients, 0, values)
    _step_until(worker, lambda: clients.input.committed(P0) == 6)
    scored = [sent for sent in clients.producer.written if sent.topic == "news.tagged"]
    offsets = [dict(sent.headers)["tagstream.source.offset"] for sent in scored]
    assert offsets == [str(offset).encode() for offset in range(6)]  # 0..4 not skipped


@pytest.mark.timeout(20)
def test_closing_the_consumer_after_the_shutdown_drain_does_not_wait_again() -> None:
    clients = FakeClients(auto_ack=False)
    # A revoke would wait a minute for the unacknowledged outputs; the shutdown bound is
    # a tenth of a second, and closing the consumer revokes every partition once more.
    worker = _worker(clients, _settings(revoke_timeout_ms=60_000, shutdown_timeout_s=0.1))
    clients.input.revoke_on_close = True
    clients.input.assign([P0])
    _feed(clients, 0, _events(0, 2))
    _step_until(worker, lambda: len(clients.producer) == 2)
    with structlog.testing.capture_logs() as logs:
        assert worker.shutdown() == EXIT_OK
    assert clients.input.closed
    assert not any(entry["event"] == "revoke timeout: unfinished work dropped" for entry in logs)
    assert clients.input.committed(P0) in (None, 0)
