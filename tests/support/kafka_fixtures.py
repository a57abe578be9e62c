"""The real-broker test harness: one Kafka broker per session and per-test factories.

``TAGSTREAM_TEST_BOOTSTRAP=host:port`` reuses an existing cluster; otherwise the session
starts the local broker (``dev/kafka/kafkactl.py``) on free ports in a temporary directory
and stops it at the end. Each test gets fresh topics and consumer groups (unique names).

``secure_kafka`` is a second broker, started only by the tests that ask for it, with a
``SASL_SSL`` listener (``kafkactl.py up --secure``: SCRAM-SHA-512 over TLS with a throwaway
CA). It is always the session's own: with ``TAGSTREAM_TEST_BOOTSTRAP`` set a broker that
cannot be started here skips those tests; without it (CI) that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

REPO = Path(__file__).resolve().parents[2]
KAFKACTL = REPO / "dev" / "kafka" / "kafkactl.py"
BOOTSTRAP_ENV = "TAGSTREAM_TEST_BOOTSTRAP"
# Topic creation is a controller round trip; generous for a loaded CI machine.
ADMIN_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together, so no two draws can collide)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class KafkaCluster:
    """A broker the tests talk to; ``managed`` when this session started it."""

    bootstrap: str
    managed: bool
    port: int | None = None
    controller_port: int | None = None
    data_dir: Path | None = None
    startup_output: str = field(default="")
    # Secured brokers: the SASL_SSL port and what kafkactl wrote to DATA_DIR/client.env.
    secure_port: int | None = None
    client_env: dict[str, str] = field(default_factory=dict)

    def kafkactl(self, action: str) -> subprocess.CompletedProcess[str]:
        """Run ``kafkactl.py ACTION`` against this broker (managed brokers only)."""
        if not self.managed:
            pytest.skip("needs the session's own broker (TAGSTREAM_TEST_BOOTSTRAP is set)")
        command = [
            sys.executable,
            str(KAFKACTL),
            action,
            "--port",
            str(self.port),
            "--controller-port",
            str(self.controller_port),
            "--data-dir",
            str(self.data_dir),
        ]
        if self.secure_port is not None:
            command += ["--secure-port", str(self.secure_port)]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=180)

    def restart(self) -> None:
        """Stop and start the broker, keeping its data directory."""
        result = self.kafkactl("restart")
        assert result.returncode == 0, result.stdout + result.stderr

    def stop(self) -> None:
        result = self.kafkactl("down")
        assert result.returncode == 0, result.stdout + result.stderr

    def start(self) -> None:
        result = self.kafkactl("up")
        assert result.returncode == 0, result.stdout + result.stderr

    @property
    def secure_bootstrap(self) -> str:
        return self.client_env["TAGSTREAM_BOOTSTRAP_SERVERS"]

    @property
    def sasl_password(self) -> str:
        return self.client_env["TAGSTREAM_SASL_PASSWORD"]

    def secure_config(self, password: str | None = None) -> dict[str, Any]:
        """librdkafka settings for the SASL_SSL listener (``password``: another one)."""
        env = self.client_env
        return {
            "bootstrap.servers": env["TAGSTREAM_BOOTSTRAP_SERVERS"],
            "security.protocol": env["TAGSTREAM_SECURITY_PROTOCOL"],
            "sasl.mechanism": env["TAGSTREAM_SASL_MECHANISM"],
            "sasl.username": env["TAGSTREAM_SASL_USERNAME"],
            "sasl.password": self.sasl_password if password is None else password,
            "ssl.ca.location": env["TAGSTREAM_SSL_CA_LOCATION"],
        }


def read_client_env(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of kafkactl's ``client.env`` (comments skipped)."""
    lines = path.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


# What `kafkactl up` printed (address and start-up time), shown in the terminal summary.
_STARTUP_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _STARTUP_LINES:
        terminalreporter.write_line(f"local broker: {line}")


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    existing = os.environ.get(BOOTSTRAP_ENV)
    if existing:
        yield KafkaCluster(bootstrap=existing, managed=False)
        return
    port, controller_port = free_port(), free_port()
    cluster = KafkaCluster(
        bootstrap=f"127.0.0.1:{port}",
        managed=True,
        port=port,
        controller_port=controller_port,
        data_dir=tmp_path_factory.mktemp("kafka"),
    )
    result = cluster.kafkactl("up")
    if result.returncode != 0:
        pytest.fail(f"local Kafka broker did not start:\n{result.stdout}\n{result.stderr}")
    cluster.startup_output = result.stdout.strip()
    _STARTUP_LINES.append(cluster.startup_output.splitlines()[-1])
    try:
        yield cluster
    finally:
        cluster.kafkactl("down")


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A second broker of this session's own, with a SASL_SSL listener (module docstring)."""
    port, controller_port, secure_port = free_ports(3)
    cluster = KafkaCluster(
        bootstrap=f"127.0.0.1:{port}",
        managed=True,
        port=port,
        controller_port=controller_port,
        data_dir=tmp_path_factory.mktemp("kafka-secure"),
        secure_port=secure_port,
    )
    result = cluster.kafkactl("up")
    if result.returncode != 0:
        cluster.kafkactl("down")  # a broker that started but never verified its TLS
        message = f"secured Kafka broker did not start:\n{result.stdout}\n{result.stderr}"
        if os.environ.get(BOOTSTRAP_ENV):
            pytest.skip(message)
        pytest.fail(message)
    assert cluster.data_dir is not None
    cluster.client_env = read_client_env(cluster.data_dir / "client.env")
    cluster.startup_output = result.stdout.strip()
    _STARTUP_LINES.extend(cluster.startup_output.splitlines()[-2:])
    try:
        yield cluster
    finally:
        cluster.kafkactl("down")


@pytest.fixture(scope="session")
def admin(kafka: KafkaCluster) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka.bootstrap})


def create_topic(
    admin: AdminClient, name: str, partitions: int = 1, config: dict[str, str] | None = None
) -> str:
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        operation_timeout=ADMIN_TIMEOUT_S,
    )
    futures[name].result(timeout=ADMIN_TIMEOUT_S)
    return name


@pytest.fixture
def new_topic(admin: AdminClient) -> Callable[..., str]:
    """``new_topic(partitions=1, config=None, prefix="t") -> name``: a fresh, unique topic."""

    def factory(
        partitions: int = 1, config: dict[str, str] | None = None, prefix: str = "t"
    ) -> str:
        return create_topic(admin, unique_name(prefix), partitions, config)

    return factory


@pytest.fixture
def make_producer(kafka: KafkaCluster) -> Iterator[Callable[..., Producer]]:
    """``make_producer(**librdkafka_conf) -> Producer``, flushed at teardown."""
    producers: list[Producer] = []

    def factory(**conf: Any) -> Producer:
        producer = Producer({"bootstrap.servers": kafka.bootstrap, **_dotted(conf)})
        producers.append(producer)
        return producer

    yield factory
    for producer in producers:
        producer.flush(10)


@pytest.fixture
def make_consumer(kafka: KafkaCluster) -> Iterator[Callable[..., Consumer]]:
    """``make_consumer(group_id=None, **librdkafka_conf) -> Consumer`` in a fresh group."""
    consumers: list[Consumer] = []

    def factory(group_id: str | None = None, **conf: Any) -> Consumer:
        settings = {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": group_id or unique_name("g"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **_dotted(conf),
        }
        consumer = Consumer(settings)
        consumers.append(consumer)
        return consumer

    yield factory
    for consumer in consumers:
        with contextlib.suppress(RuntimeError):  # already closed by the test
            consumer.close()


def _dotted(conf: dict[str, Any]) -> dict[str, Any]:
    """Allow ``enable_idempotence=True`` as well as ``**{"enable.idempotence": True}``."""
    return {key.replace("_", "."): value for key, value in conf.items()}
