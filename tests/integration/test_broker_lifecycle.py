"""The local broker script against its own running broker: idempotent up, restart keeps data."""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from tests.support.kafka_fixtures import KafkaCluster

# After a restart the partition leader is elected again; allow a cold JVM on a busy machine.
RECOVERY_DEADLINE_S = 90.0


def _broker_pids(kafka: KafkaCluster) -> set[int]:
    import subprocess

    command = ["ps", "-eww", "-o", "pid,args"]
    listing = subprocess.run(command, capture_output=True, text=True, check=True)
    marker = f"{kafka.data_dir}/server.properties"
    return {
        int(line.split(None, 1)[0])
        for line in listing.stdout.splitlines()
        if "kafka.Kafka" in line and marker in line
    }


def test_up_twice_leaves_one_broker(kafka: KafkaCluster) -> None:
    before = _broker_pids(kafka)
    result = kafka.kafkactl("up")
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert _broker_pids(kafka) == before
    assert len(before) == 1


def test_restart_keeps_topics_and_data(
    kafka: KafkaCluster,
    admin: AdminClient,
    new_topic: Callable[..., str],
    make_producer: Callable[..., Producer],
    make_consumer: Callable[..., Consumer],
) -> None:
    topic = new_topic(partitions=2)
    producer = make_producer(acks="all")
    for index in range(50):
        producer.produce(topic, value=f"before-{index}".encode())
    assert producer.flush(30) == 0

    kafka.restart()
    assert "up on" in kafka.kafkactl("status").stdout or kafka.kafkactl("status").returncode == 0

    assert topic in admin.list_topics(timeout=30).topics
    consumer = make_consumer()
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while len(values) < 50 and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=100, timeout=1.0):
            if message.error() is None:
                value = message.value()
                assert value is not None
                values.append(value)
    assert sorted(values) == sorted(f"before-{index}".encode() for index in range(50))
