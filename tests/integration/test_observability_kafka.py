"""WorkerMetrics and the log bridge against a real broker and a real librdkafka consumer.

The consumer is wired the way the worker wires it: ``stats_cb`` feeds the lag gauges,
rebalance callbacks feed ``record_rebalance``, explicit offsets are committed without being
stored, and librdkafka logs through :func:`worker.observability.logs.librdkafka_logger`.
"""

from __future__ import annotations

import io
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import structlog
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from tests.support.kafka_fixtures import KafkaCluster, unique_name
from tests.support.observability import samples_of
from worker.config.observability import ObservabilitySettings
from worker.observability.health import HealthState
from worker.observability.logs import LIBRDKAFKA_LOGGER_NAME, configure_logging, librdkafka_logger
from worker.observability.metrics import WorkerMetrics
from worker.observability.server import ObservabilityServer

PARTITIONS = 3
RECORDS_PER_PARTITION = 10
# Fast statistics keep the test short; production uses metrics.STATISTICS_INTERVAL_MS.
STATISTICS_INTERVAL_MS = 200
# Generous bounds for a loaded machine: each only fails a test that would otherwise hang.
DEADLINE_S = 60.0
HTTP_TIMEOUT_S = 10.0
# Records are produced this long before they are consumed, so lag in seconds is visibly > 0.
RECORD_AGE_S = 2.0


def _lags(metrics: WorkerMetrics, unit: str, topic: str) -> dict[int, float]:
    return {
        int(dict(labels)["partition"]): value
        for (name, labels), value in samples_of(metrics.exposition().decode()).items()
        if name == f"tagstream_consumer_lag_{unit}" and dict(labels)["topic"] == topic
    }


def _poll_until(consumer: Consumer, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        for message in consumer.consume(num_messages=100, timeout=0.2):
            error = message.error()
            assert error is None or error.code() == KafkaError._PARTITION_EOF, str(error)


def _consume(consumer: Consumer, count: int) -> list[Message]:
    messages: list[Message] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(messages) < count:
        assert time.monotonic() < deadline, f"consumed {len(messages)} of {count}"
        for message in consumer.consume(num_messages=count - len(messages), timeout=0.5):
            if message.error() is None:
                messages.append(message)
    return messages


def _commit_next_offsets(consumer: Consumer, messages: list[Message]) -> None:
    """Commit explicit offsets (last consumed + 1 per partition), as the worker does."""
    positions: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic() or "", message.partition() or 0)
        positions[key] = max(positions.get(key, 0), (message.offset() or 0) + 1)
    offsets = [TopicPartition(topic, part, offset) for (topic, part), offset in positions.items()]
    consumer.commit(offsets=offsets, asynchronous=False)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(ObservabilitySettings(log_format="json", log_level="DEBUG"), stream=stream)
    yield stream
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)
    structlog.reset_defaults()


def test_lag_gauges_follow_a_real_consumer_down_to_zero(
    new_topic: Callable[..., str],
    make_producer: Callable[..., Producer],
    kafka: KafkaCluster,
    log_stream: io.StringIO,
) -> None:
    topic = new_topic(partitions=PARTITIONS)
    producer = make_producer()
    for index in range(PARTITIONS * RECORDS_PER_PARTITION):
        producer.produce(topic, value=b"x", partition=index % PARTITIONS)
    assert producer.flush(30) == 0
    time.sleep(RECORD_AGE_S)

    metrics = WorkerMetrics(process_metrics=False)
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": unique_name("g"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "statistics.interval.ms": STATISTICS_INTERVAL_MS,
            "stats_cb": metrics.update_from_statistics,
            "logger": librdkafka_logger(),
            "debug": "cgrp",
        }
    )

    def assigned(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
        metrics.record_rebalance("assigned", [(tp.topic, tp.partition) for tp in partitions])

    def revoked(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
        metrics.record_rebalance("revoked", [(tp.topic, tp.partition) for tp in partitions])

    try:
        consumer.subscribe([topic], on_assign=assigned, on_revoke=revoked)
        health = HealthState(stale_after_s=60)
        with ObservabilityServer(metrics.registry, health, host="127.0.0.1", port=0) as server:
            # Half of partition 0 done and committed: 5 behind there, the rest not committed yet.
            first = _consume(consumer, PARTITIONS * RECORDS_PER_PARTITION)
            half = [m for m in first if m.partition() == 0][: RECORDS_PER_PARTITION // 2]
            _commit_next_offsets(consumer, half)
            for message in first:
                _, timestamp_ms = message.timestamp()
                metrics.observe_record_timestamp(
                    message.topic() or "", message.partition() or 0, timestamp_ms
                )
            _poll_until(consumer, lambda: _lags(metrics, "messages", topic).get(0) == 5)
            behind = _lags(metrics, "seconds", topic)
            assert behind[0] >= RECORD_AGE_S

            _commit_next_offsets(consumer, first)
            _poll_until(
                consumer,
                lambda: _lags(metrics, "messages", topic) == dict.fromkeys(range(PARTITIONS), 0.0),
            )
            assert _lags(metrics, "seconds", topic) == dict.fromkeys(range(PARTITIONS), 0.0)

            url = f"http://127.0.0.1:{server.port}/metrics"
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                scraped = samples_of(response.read().decode())
            assert scraped[("tagstream_assigned_partitions", frozenset())] == PARTITIONS
            lag_keys = {
                dict(labels)["partition"]
                for name, labels in scraped
                if name == "tagstream_consumer_lag_messages"
            }
            assert lag_keys == {str(p) for p in range(PARTITIONS)}
    finally:
        consumer.close()  # leaves the group: on_revoke drops every lag series
    assert _lags(metrics, "messages", topic) == {}
    assert (
        samples_of(metrics.exposition().decode())[("tagstream_assigned_partitions", frozenset())]
        == 0
    )

    lines: list[dict[str, Any]] = [
        orjson.loads(line) for line in log_stream.getvalue().splitlines()
    ]
    rdkafka = [line for line in lines if line["logger"] == LIBRDKAFKA_LOGGER_NAME]
    assert rdkafka, "librdkafka's cgrp debug lines should have been routed through structlog"
    assert all(line["rdkafka_client"].startswith("rdkafka#consumer-") for line in rdkafka)
