"""Run ``python -m worker run`` as real subprocesses, so that kill -9 and signals are real.

:class:`Pipeline` names the topics and group of one test and builds the environment of
its workers; :class:`Fleet` starts workers and makes sure none outlives the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.support.kafka_fixtures import REPO, KafkaCluster, create_topic, unique_name
from tests.support.ledger import Ledger

ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")
FAKE_SCORER: Final = "tests.support.scorers:fake"
LABELS: Final = ("sports", "finance", "politics", "weather")
# Worker defaults for tests: commit often so the ledger sees the end quickly.
TEST_COMMIT_INTERVAL_MS: Final = 200
# How long a test waits for a worker to exit after SIGTERM before calling it a failure.
EXIT_TIMEOUT_S: Final = 60.0
# Default deadline for "the ledger is complete".
COMPLETE_TIMEOUT_S: Final = 120.0


def good_event(index: int) -> tuple[bytes, bytes]:
    """(key, value) of a valid event whose text mentions exactly one of :data:`LABELS`."""
    label = LABELS[index % len(LABELS)]
    event_id = f"e-{index}"
    text = f"Event {index}: a short news item about {label} today."
    return event_id.encode(), orjson.dumps({"id": event_id, "text": text})


def expected_label(value: bytes) -> str:
    text = orjson.loads(value)["text"]
    return next(label for label in LABELS if label in text)


@dataclass
class Pipeline:
    """The topics and consumer group one test's workers share."""

    bootstrap: str
    input_topic: str
    output_topic: str
    dead_letter_topic: str
    group_id: str
    partitions: int

    @classmethod
    def create(
        cls,
        bootstrap: str,
        admin: AdminClient,
        partitions: int,
        output_config: dict[str, str] | None = None,
        dead_letter_config: dict[str, str] | None = None,
    ) -> Pipeline:
        """Fresh input (``partitions``), output and ``<output>.dlq`` topics, a fresh group."""
        output = create_topic(admin, unique_name("out"), 1, output_config)
        return cls(
            bootstrap=bootstrap,
            input_topic=create_topic(admin, unique_name("in"), partitions),
            output_topic=output,
            dead_letter_topic=create_topic(admin, f"{output}.dlq", 1, dead_letter_config),
            group_id=unique_name("group"),
            partitions=partitions,
        )

    def env(self, **settings: Any) -> dict[str, str]:
        """The worker environment: the test scorer, this pipeline, and ``settings``
        (``max_batch_size=8`` sets ``TAGSTREAM_MAX_BATCH_SIZE=8``)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("TAGSTREAM_")}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "NO_COLOR": "1",
                "TAGSTREAM_BOOTSTRAP_SERVERS": self.bootstrap,
                "TAGSTREAM_INPUT_TOPICS": self.input_topic,
                "TAGSTREAM_OUTPUT_TOPIC": self.output_topic,
                "TAGSTREAM_DLQ_TOPIC": self.dead_letter_topic,
                "TAGSTREAM_GROUP_ID": self.group_id,
                "TAGSTREAM_SCORER": FAKE_SCORER,
                "TAGSTREAM_LABELS": ",".join(LABELS),
                "TAGSTREAM_COMMIT_INTERVAL_MS": str(TEST_COMMIT_INTERVAL_MS),
                "TAGSTREAM_METRICS_PORT": "0",
            }
        )
        for name, value in settings.items():
            text = orjson.dumps(value).decode() if isinstance(value, dict) else str(value)
            env[f"TAGSTREAM_{name.upper()}"] = text
        return env

    def ledger(self, isolation: str = "read_uncommitted") -> Ledger:
        return Ledger(
            self.bootstrap,
            [self.input_topic],
            self.output_topic,
            self.dead_letter_topic,
            self.group_id,
            isolation=isolation,
        )

    def produce(
        self, producer: Producer, records: Iterable[tuple[bytes | None, bytes | None]], **kw: Any
    ) -> int:
        """Send (key, value) records to the input topic and wait for all acks."""
        count = 0
        for key, value in records:
            producer.produce(self.input_topic, key=key, value=value, **kw)
            producer.poll(0)
            count += 1
        assert producer.flush(30) == 0
        return count


class WorkerProcess:
    """One ``python -m worker run`` subprocess with its output in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: Iterable[str] = ()) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return ANSI.sub("", self.log_path.read_text(encoding="utf-8", errors="replace"))

    def lines(self, text: str) -> list[str]:
        return [line for line in self.output().splitlines() if text in line]

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, text: str, timeout_s: float = 60.0, count: int = 1) -> None:
        """Wait until ``text`` appears ``count`` times in the output."""
        deadline = time.monotonic() + timeout_s
        while len(self.lines(text)) < count:
            if not self.running():
                raise AssertionError(f"worker exited ({self.popen.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the worker output:\n{self.output()}")
            time.sleep(0.1)

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def kill(self) -> None:
        """``kill -9``."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def wait(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit:\n{self.output()}") from None

    def close(self) -> None:
        if self.running():
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


class Fleet:
    """Starts workers for one test; kills whichever is still running at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.workers: list[WorkerProcess] = []

    def start(self, env: dict[str, str], args: Iterable[str] = ()) -> WorkerProcess:
        log_path = self.directory / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess(env, log_path, args)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def outputs(self) -> str:
        return "\n".join(
            f"--- {worker.log_path.name} ---\n{worker.output()}" for worker in self.workers
        )


@dataclass
class Harness:
    """What a worker test needs, in one fixture: the broker, topic factory, producers and
    the fleet of worker subprocesses."""

    kafka: KafkaCluster
    admin: AdminClient
    make_producer: Callable[..., Producer]
    fleet: Fleet

    def pipeline(
        self,
        partitions: int,
        output_config: dict[str, str] | None = None,
        dead_letter_config: dict[str, str] | None = None,
    ) -> Pipeline:
        return Pipeline.create(
            self.kafka.bootstrap, self.admin, partitions, output_config, dead_letter_config
        )

    def producer(self) -> Producer:
        return self.make_producer()

    def start(self, env: dict[str, str], args: Iterable[str] = ()) -> WorkerProcess:
        return self.fleet.start(env, args)

    def stop_all(self) -> None:
        """SIGTERM every running worker and require exit code 0."""
        running = [worker for worker in self.fleet.workers if worker.running()]
        for worker in running:
            worker.send(signal.SIGTERM)
        for worker in running:
            assert worker.wait() == 0, worker.output()


def harness_fixture(
    kafka: KafkaCluster,
    admin: AdminClient,
    make_producer: Callable[..., Producer],
    tmp_path: Path,
) -> Iterator[Harness]:
    """Body of a per-module ``harness`` fixture."""
    fleet = Fleet(tmp_path)
    try:
        yield Harness(kafka, admin, make_producer, fleet)
    finally:
        fleet.close()


def output_count(pipeline: Pipeline) -> int:
    """Records appended to the output topic so far (its high watermark; one partition),
    committed or not: transaction markers count too."""
    consumer = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": "watermarks"})
    try:
        _, high = consumer.get_watermark_offsets(
            TopicPartition(pipeline.output_topic, 0), timeout=10
        )
        return int(high)
    finally:
        consumer.close()


def wait_for_outputs(pipeline: Pipeline, count: int, timeout_s: float = 60.0) -> None:
    """Until the output topic holds ``count`` records (see :func:`output_count`)."""
    deadline = time.monotonic() + timeout_s
    while output_count(pipeline) < count:
        assert time.monotonic() < deadline, f"fewer than {count} outputs after {timeout_s}s"
        time.sleep(0.05)
