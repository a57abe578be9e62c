"""``tagstream run`` through a ``SASL_SSL`` listener: SCRAM-SHA-512 over TLS.

The broker is ``secure_kafka`` (``kafkactl.py up --secure``: a throwaway CA, a SCRAM user
created at format time). Every client here, the worker's and the test's own, talks to the
SASL_SSL listener only and trusts nothing but that CA. With the right password the worker
scores and commits; with a wrong one it stops with a non-zero exit code and an
authentication message, and the password appears nowhere in its output.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from tests.support.kafka_fixtures import KafkaCluster, unique_name
from tests.support.worker_process import (
    Fleet,
    Pipeline,
    WorkerProcess,
    expected_label,
    good_event,
)
from worker.exit_codes import EXIT_FATAL

# A handful: enough for both input partitions, few enough to stay a few seconds.
EVENTS: Final = 24
INPUT_PARTITIONS: Final = 2
# Reading the output and waiting for the commit: seconds on an idle machine, and the worker
# joins a fresh group first; 120 s only trips on a real failure.
SCORED_TIMEOUT_S: Final = 120.0
# The start-up topic checks wait 2 x 10 s on a cluster that refuses the login, then the
# consumer's first failed login is fatal: ~25 s in all. 90 s means "it would hang".
WRONG_PASSWORD_EXIT_TIMEOUT_S: Final = 90.0
# One consume or committed() round trip; a slow one is asked again until the deadline.
CLIENT_TIMEOUT_S: Final = 5.0
RECHECK_INTERVAL_S: Final = 0.5
FATAL_EVENT: Final = "stopping on a fatal error"
AUTH_FAILURE: Final = "Authentication failed"


@pytest.fixture(scope="module")
def secure_admin(secure_kafka: KafkaCluster) -> AdminClient:
    return AdminClient(secure_kafka.secure_config())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def _pipeline(cluster: KafkaCluster, admin: AdminClient) -> Pipeline:
    """Fresh topics on the secured broker, created through its SASL_SSL listener."""
    return Pipeline.create(cluster.secure_bootstrap, admin, partitions=INPUT_PARTITIONS)


def _worker_env(pipeline: Pipeline, cluster: KafkaCluster, password: str) -> dict[str, str]:
    """The pipeline's worker environment plus kafkactl's client.env, with ``password``."""
    env = pipeline.env()
    env.update(cluster.client_env)
    env["TAGSTREAM_SASL_PASSWORD"] = password
    return env


def _read(config: dict[str, Any], topic: str, count: int, timeout_s: float) -> list[Message]:
    """The first ``count`` records of the single-partition ``topic``."""
    consumer = Consumer(
        {
            **config,
            "group.id": unique_name("reader"),
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    records: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        while len(records) < count and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=count, timeout=RECHECK_INTERVAL_S):
                error = message.error()
                assert error is None, f"reading {topic}: {error}"
                records.append(message)
    finally:
        consumer.close()
    return records


def _lag(config: dict[str, Any], group: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per input partition: (committed offset, log end), for those where they differ."""
    consumer = Consumer({**config, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = [TopicPartition(topic, p) for p in range(INPUT_PARTITIONS)]
        committed = consumer.committed(partitions, timeout=CLIENT_TIMEOUT_S)
        lag: dict[int, tuple[int, int]] = {}
        for tp in committed:
            _, end = consumer.get_watermark_offsets(tp, timeout=CLIENT_TIMEOUT_S)
            if tp.offset != end:
                lag[tp.partition] = (tp.offset, end)
        return lag
    finally:
        consumer.close()


def _wait_committed(config: dict[str, Any], pipeline: Pipeline, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + SCORED_TIMEOUT_S
    lag = _lag(config, pipeline.group_id, pipeline.input_topic)
    while lag and time.monotonic() < deadline:
        assert worker.running(), worker.output()
        time.sleep(RECHECK_INTERVAL_S)
        lag = _lag(config, pipeline.group_id, pipeline.input_topic)
    assert not lag, f"committed != log end: {lag}\n{worker.output()}"


def _log_events(output: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines (librdkafka's own stderr lines, if any, skipped)."""
    events = []
    for line in output.splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def test_the_right_password_scores_through_sasl_ssl(
    secure_kafka: KafkaCluster, secure_admin: AdminClient, fleet: Fleet
) -> None:
    config = secure_kafka.secure_config()
    pipeline = _pipeline(secure_kafka, secure_admin)
    events = dict(good_event(i) for i in range(EVENTS))
    pipeline.produce(Producer(config), events.items())

    worker = fleet.start(_worker_env(pipeline, secure_kafka, secure_kafka.sasl_password))
    outputs = _read(config, pipeline.output_topic, EVENTS, SCORED_TIMEOUT_S)
    _wait_committed(config, pipeline, worker)
    worker.send(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()

    assert len(outputs) == EVENTS, worker.output()
    for message in outputs:
        key = message.key()
        assert key is not None and key in events
        scored = orjson.loads(message.value() or b"")
        assert scored["id"] == key.decode()
        assert scored["tags"] == [expected_label(events[key])]
    assert {message.key() for message in outputs} == set(events)
    dead_letters = _read(config, pipeline.dead_letter_topic, 1, RECHECK_INTERVAL_S * 4)
    assert dead_letters == []
    output = worker.output()
    starting = next(e for e in _log_events(output) if e.get("event") == "worker starting")
    assert starting["settings"]["kafka"]["security_protocol"] == "SASL_SSL"
    assert secure_kafka.sasl_password not in output


def test_a_wrong_password_stops_the_worker_without_showing_it(
    secure_kafka: KafkaCluster, secure_admin: AdminClient, fleet: Fleet
) -> None:
    pipeline = _pipeline(secure_kafka, secure_admin)
    wrong = f"wrong-{secrets.token_hex(8)}"

    started = time.monotonic()
    worker = fleet.start(_worker_env(pipeline, secure_kafka, wrong))
    code = worker.wait(WRONG_PASSWORD_EXIT_TIMEOUT_S)
    elapsed = time.monotonic() - started

    output = worker.output()
    assert code == EXIT_FATAL, f"exit code {code} after {elapsed:.1f}s:\n{output}"
    fatal = [e for e in _log_events(output) if e.get("event") == FATAL_EVENT]
    assert fatal, output
    assert AUTH_FAILURE in fatal[0]["error"], fatal[0]
    assert "SCRAM-SHA-512" in fatal[0]["error"], fatal[0]
    assert wrong not in output
    assert secure_kafka.sasl_password not in output


def test_a_client_that_does_not_trust_the_ca_cannot_connect(
    secure_kafka: KafkaCluster,
) -> None:
    """The listener really is TLS with its own CA: the system trust store does not do."""
    config = secure_kafka.secure_config()
    del config["ssl.ca.location"]
    errors: list[KafkaError] = []
    settings: dict[str, Any] = {**config, "error_cb": errors.append}
    admin = AdminClient(settings)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=CLIENT_TIMEOUT_S)
    admin.poll(RECHECK_INTERVAL_S)
    assert any(error.code() == KafkaError._SSL for error in errors), errors
