"""Every test under this folder talks to the real broker: marked ``integration`` here, once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from tests.support.kafka_fixtures import KafkaCluster
from tests.support.worker_process import Harness, harness_fixture

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def harness(
    kafka: KafkaCluster,
    admin: AdminClient,
    make_producer: Callable[..., Producer],
    tmp_path: Path,
) -> Iterator[Harness]:
    """Worker subprocesses on a fresh pipeline of topics, stopped after the test."""
    yield from harness_fixture(kafka, admin, make_producer, tmp_path)
