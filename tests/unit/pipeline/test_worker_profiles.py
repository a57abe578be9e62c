"""The worker with label profiles, on in-memory clients: a change applies from the next
batch on and never inside one; unknown profiles are dead-lettered; ``default`` replaces
the configured labels."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import orjson
import pytest

from tests.support.fake_kafka import FakeClients, FakeControlConsumer, record
from tests.support.scorers import FakeScorer
from worker.config.loading import load_run_settings
from worker.config.settings import ModelSettings
from worker.contract.deadletter import HEADER_CLASS, HEADER_STAGE, WorkerIdentity
from worker.kafka.consumer import RebalanceListener
from worker.kafka.records import PartitionKey
from worker.pipeline.observer import Observer
from worker.pipeline.worker import Worker

TOPIC: Final = "news"
CONTROL: Final = "profiles"
P0: Final[PartitionKey] = (TOPIC, 0)
WAIT_S: Final = 10.0


class Batches(Observer):
    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    def batch_closed(self, size: int, tokens: int, reason: str, age_s: float) -> None:
        self.closed.append((size, reason))


class Setup:
    def __init__(self, **flags: object) -> None:
        self.clients = FakeClients(auto_ack=True)
        self.control = FakeControlConsumer(CONTROL)
        self.observer = Batches()
        given = {
            "input_topics": TOPIC,
            "output_topic": "news.tagged",
            "labels": "weather",
            "commit_interval_ms": 1,
            "control_topic": CONTROL,
            **flags,
        }
        self.worker = Worker(
            load_run_settings(flags=given),
            FakeScorer(ModelSettings(scorer="tests.support.scorers:fake")),
            WorkerIdentity(group="tagstream", worker="test:1", model="fake@v1"),
            self.observer,
            consumer_factory=self.clients.make_consumer,
            producer_factory=self.clients.make_producer,
            control_consumer_factory=self._control,
        )
        self.offset = 0

    def _control(self, config: Any) -> FakeControlConsumer:
        self.config = dict(config)
        return self.control

    def start(self) -> None:
        assert self.worker.profile_feed is not None
        self.worker.profile_feed.start(timeout_s=5.0)
        self.worker.inference.start()
        self.worker.intake.subscribe([TOPIC], self.worker)
        self.clients.input.assign([P0])

    def send(self, count: int, **fields: object) -> None:
        for _ in range(count):
            value = orjson.dumps({"text": f"sports item {self.offset}", **fields})
            self.clients.input.records.append(record(TOPIC, 0, self.offset, value))
            self.offset += 1

    def outputs(self) -> list[dict[str, Any]]:
        return [
            orjson.loads(sent.value or b"")
            for sent in self.clients.producer.written
            if sent.topic == "news.tagged"
        ]

    def step_until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, "the worker did not get there in time"
            self.worker.step()
            time.sleep(0.002)


@pytest.fixture
def setup() -> Iterator[Setup]:
    built = Setup(max_batch_size=4, max_wait_ms=100)
    yield built
    built.worker.handoff.close(discard_queued=True)
    built.worker.inference.join(WAIT_S)


def _profile(*labels: str) -> bytes:
    return orjson.dumps({"labels": list(labels)})


def test_a_change_applies_from_the_next_batch_and_no_batch_mixes_versions(setup: Setup) -> None:
    setup.control.append("news", _profile("sports", "finance"))
    setup.start()
    setup.send(2, profile="news")
    setup.worker.step()  # two events wait in the open batch (size 4, 100 ms)
    assert setup.worker.batcher.open_size == 2
    setup.control.append("news", _profile("politics", "weather"))
    setup.send(2, profile="news")
    setup.step_until(lambda: len(setup.outputs()) == 4)
    versions = [(out["profile"]["version"], sorted(out["labels"])) for out in setup.outputs()]
    assert versions == [
        (0, ["finance", "sports"]),
        (0, ["finance", "sports"]),
        (1, ["politics", "weather"]),
        (1, ["politics", "weather"]),
    ]
    # Without the profile cut the four events would have made one batch of 4 (size).
    assert setup.observer.closed == [(2, "profiles"), (2, "time")]


def test_an_event_naming_an_unknown_profile_is_dead_lettered_at_validate(setup: Setup) -> None:
    setup.start()
    setup.send(1, profile="missing")
    setup.step_until(lambda: len(setup.clients.producer.written) == 1)
    dead = setup.clients.producer.written[0]
    assert dead.topic == "news.tagged.dlq"
    headers = dict(dead.headers)
    assert headers[HEADER_STAGE] == b"validate"
    assert headers[HEADER_CLASS] == b"UnknownProfileError"


def test_the_default_profile_replaces_the_configured_labels_when_present(setup: Setup) -> None:
    setup.start()
    setup.send(1)
    setup.step_until(lambda: len(setup.outputs()) == 1)
    assert setup.outputs()[0]["labels"] == ["weather"]  # TAGSTREAM_LABELS
    assert "profile" not in setup.outputs()[0]
    setup.control.append("default", _profile("sports", "finance"))
    setup.send(1)
    setup.step_until(lambda: len(setup.outputs()) == 2)
    latest = setup.outputs()[1]
    assert sorted(latest["labels"]) == ["finance", "sports"]
    assert latest["tags"] == ["sports"]
    assert latest["profile"] == {"name": "default", "version": 0}


def test_the_control_reader_never_joins_the_input_group(setup: Setup) -> None:
    setup.start()
    assert setup.config["group.id"] != "tagstream"
    assert setup.config["enable.auto.commit"] is False


def test_profiles_are_read_before_the_worker_subscribes() -> None:
    built = Setup()
    built.control.append("news", _profile("sports"))
    order: list[str] = []
    original_poll = built.control.poll

    def poll(max_records: int, timeout_s: float) -> list[Any]:
        order.append("control")
        return original_poll(max_records, timeout_s)

    built.control.poll = poll  # type: ignore[method-assign]
    original_subscribe = built.worker.intake.subscribe

    def subscribe(topics: Sequence[str], listener: RebalanceListener) -> None:
        order.append(f"subscribe, news known: {built.worker.profiles.get('news') is not None}")
        built.worker.request_stop()
        original_subscribe(topics, listener)

    built.worker.intake.subscribe = subscribe  # type: ignore[method-assign]
    assert built.worker.run() == 0
    assert order[0] == "control"
    assert "subscribe, news known: True" in order
    assert built.control.closed
