"""Smoke tests of the real broker harness: the ground every integration test stands on."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.support.kafka_fixtures import KafkaCluster, unique_name

# Long enough for a first fetch on a cold broker, short enough that a hang fails fast.
POLL_DEADLINE_S = 60.0


def _consume_all(consumer: Consumer, expected: int) -> list[bytes]:
    import time

    values: list[bytes] = []
    deadline = time.monotonic() + POLL_DEADLINE_S
    while len(values) < expected and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=500, timeout=1.0):
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                raise AssertionError(str(error))
            if error is None:
                value = message.value()
                assert value is not None
                values.append(value)
    return values


def test_thousand_records_round_trip_with_committed_offsets(
    new_topic: Callable[..., str],
    make_producer: Callable[..., Producer],
    make_consumer: Callable[..., Consumer],
) -> None:
    topic = new_topic(partitions=3)
    producer = make_producer(**{"enable.idempotence": True, "acks": "all"})
    for index in range(1000):
        key, value = str(index).encode(), f"v{index}".encode()
        producer.produce(topic, key=key, value=value, partition=index % 3)
    assert producer.flush(30) == 0

    group = unique_name("g")
    consumer = make_consumer(group_id=group)
    consumer.subscribe([topic])
    values = _consume_all(consumer, 1000)
    assert sorted(values) == sorted(f"v{index}".encode() for index in range(1000))
    consumer.commit(asynchronous=False)

    committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in committed]
    assert [tp.offset for tp in committed] == ends
    assert sum(ends) == 1000


def test_describe_cluster_returns_the_broker(kafka: KafkaCluster, admin: AdminClient) -> None:
    description = admin.describe_cluster(request_timeout=10).result(timeout=30)
    assert len(description.nodes) >= 1
    if kafka.managed:
        assert [node.port for node in description.nodes] == [kafka.port]


def test_transactions_read_committed_sees_only_committed(
    new_topic: Callable[..., str],
    make_producer: Callable[..., Producer],
    make_consumer: Callable[..., Consumer],
) -> None:
    topic = new_topic(partitions=1)
    producer = make_producer(**{"transactional.id": unique_name("tx")})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed-1")
    producer.produce(topic, value=b"committed-2")
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    assert producer.flush(30) == 0  # written to the log, so only the abort hides it
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed-3")
    producer.commit_transaction(30)

    reader = make_consumer(**{"isolation.level": "read_committed"})
    reader.subscribe([topic])
    assert _consume_all(reader, 3) == [b"committed-1", b"committed-2", b"committed-3"]

    raw = make_consumer(**{"isolation.level": "read_uncommitted"})
    raw.subscribe([topic])
    expected = [b"aborted", b"committed-1", b"committed-2", b"committed-3"]
    assert sorted(_consume_all(raw, 4)) == expected
