"""Label profiles from a compacted control topic, with two real worker processes: a profile
changed mid-stream switches every worker from one batch to the next, never inside one.

The profiles are written with ``tagstream profiles set`` (a subprocess, as an operator would)
and read back with ``tagstream profiles list``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Final

import orjson

from tests.support.kafka_fixtures import REPO, create_topic, unique_name
from tests.support.ledger import Record
from tests.support.worker_process import (
    COMPLETE_TIMEOUT_S,
    Harness,
    Pipeline,
    WorkerProcess,
    output_count,
    wait_for_outputs,
)

OLD_LABELS: Final = ("sports", "finance")
NEW_LABELS: Final = ("politics", "weather", "science")
# Events per second while the profile changes: with 100 ms batches over 4 partitions and
# two workers, several events wait in every open batch when the change arrives.
RATE: Final = 300
# Outputs before the change, and events sent once every worker applied it.
BEFORE: Final = 300
AFTER: Final = 300
# Whole-second waits for a subprocess or a log line; they bound a broken test only.
COMMAND_TIMEOUT_S: Final = 60.0


def profiles_command(pipeline: Pipeline, control: str, *argv: str) -> str:
    """Run ``tagstream profiles ARGV`` against the test broker; its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "worker", "profiles", *argv, "--topic", control],
        cwd=REPO,
        env=pipeline.env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Stream:
    """Sends events naming the profile at :data:`RATE` until stopped, counting them."""

    def __init__(self, harness: Harness, pipeline: Pipeline) -> None:
        self.producer = harness.producer()
        self.pipeline = pipeline
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            event_id = f"e-{self.sent}"
            value = orjson.dumps({"id": event_id, "text": f"{event_id}: sports", "profile": "news"})
            self.producer.produce(self.pipeline.input_topic, key=event_id.encode(), value=value)
            self.producer.poll(0)
            self.sent += 1
            time.sleep(max(0.0, started + self.sent / RATE - time.monotonic()))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(COMMAND_TIMEOUT_S)
        assert self.producer.flush(30) == 0
        return self.sent


def _scored(record: Record) -> dict[str, Any]:
    scored: dict[str, Any] = orjson.loads(record.value or b"")
    return scored


def _wait_until_sent(stream: Stream, count: int) -> None:
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while stream.sent < count:
        assert time.monotonic() < deadline, "the stream did not send in time"
        time.sleep(0.05)


def _holds(worker: WorkerProcess) -> set[str]:
    """The partitions a worker holds now, from its rebalance log lines (JSON)."""
    held: set[str] = set()
    for line in worker.output().splitlines():
        if not line.startswith("{"):
            continue
        entry = orjson.loads(line)
        if entry.get("event") == "partitions assigned":
            held |= set(entry["partitions"])
        elif entry.get("event") in ("partitions revoked", "partitions lost"):
            held -= set(entry["partitions"])
    return held


def _start_workers(harness: Harness, env: dict[str, str], partitions: int) -> list[WorkerProcess]:
    """Two workers, each holding its share of the partitions before any event is sent (so
    no start-up rebalance redoes an event under another version)."""
    workers = [harness.start(env), harness.start(env)]
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while True:
        held = [_holds(worker) for worker in workers]
        if all(held) and len(held[0] | held[1]) == partitions and not held[0] & held[1]:
            break
        assert time.monotonic() < deadline, "\n".join(w.output() for w in workers)
        assert all(worker.running() for worker in workers), harness.fleet.outputs()
        time.sleep(0.1)
    for worker in workers:
        assert worker.lines("profiles loaded"), worker.output()
    return workers


def test_a_profile_changed_mid_stream_switches_every_worker_between_batches(
    harness: Harness,
) -> None:
    pipeline = harness.pipeline(partitions=4)
    control = create_topic(harness.admin, unique_name("profiles"), 1, {"cleanup.policy": "compact"})
    profiles_command(pipeline, control, "set", "news", "--labels", ",".join(OLD_LABELS))
    env = pipeline.env(control_topic=control, max_batch_size=64, max_wait_ms=100)
    workers = _start_workers(harness, env, pipeline.partitions)

    stream = Stream(harness, pipeline)
    stream.start()
    wait_for_outputs(pipeline, BEFORE)
    written_before_change = output_count(pipeline)
    profiles_command(pipeline, control, "set", "news", "--labels", ",".join(NEW_LABELS))
    for worker in workers:
        worker.wait_for("profile set", count=2, timeout_s=COMMAND_TIMEOUT_S)
    applied_everywhere = stream.sent
    _wait_until_sent(stream, applied_everywhere + AFTER)
    total = stream.stop()

    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()
    listed = profiles_command(pipeline, control, "list", "--json")

    assert report.clean, report.describe()
    assert not report.dead_letters
    assert len(report.inputs) == total
    old_version, new_version = 0, 1  # the offsets of the two control records
    assert [orjson.loads(line)["version"] for line in listed.splitlines()] == [new_version]
    labels_of = {old_version: set(OLD_LABELS), new_version: set(NEW_LABELS)}

    outputs = sorted(
        (record for records in report.outputs.values() for record in records),
        key=lambda record: record.offset,
    )
    versions: dict[tuple[int, int], int] = {}  # (input partition, offset) -> version
    batches: dict[str, set[int]] = defaultdict(set)  # scored_at -> versions in that batch
    for record in outputs:
        scored = _scored(record)
        version = scored["profile"]["version"]
        assert scored["profile"]["name"] == "news"
        assert set(scored["labels"]) == labels_of[version], scored
        source = scored["source"]
        versions[(source["partition"], source["offset"])] = version
        batches[scored["scored_at"]].add(version)
        if record.offset < written_before_change:
            assert version == old_version, f"written before the change: {scored}"
        if int(scored["id"].removeprefix("e-")) >= applied_everywhere:
            assert version == new_version, f"sent after every worker applied it: {scored}"

    # Per input partition, all old-version events come first, then all new-version ones.
    for partition in range(pipeline.partitions):
        in_order = [versions[key] for key in sorted(versions) if key[0] == partition]
        assert in_order == sorted(in_order), f"partition {partition} switched back"
        assert in_order[0] == old_version and in_order[-1] == new_version, partition
    # One batch, one scored_at: no batch holds both versions.
    mixed = {scored_at: found for scored_at, found in batches.items() if len(found) > 1}
    assert not mixed, f"batches with both versions: {mixed}"
    # Both workers applied the change while running (each logged the second version).
    for worker in workers:
        applied = [orjson.loads(line)["version"] for line in worker.lines('"profile set"')]
        assert applied == [old_version, new_version], worker.output()


def test_an_invalid_control_record_keeps_the_last_valid_version(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    control = create_topic(harness.admin, unique_name("profiles"), 1, {"cleanup.policy": "compact"})
    profiles_command(pipeline, control, "set", "news", "--labels", ",".join(OLD_LABELS))
    producer = harness.producer()
    producer.produce(control, key=b"news", value=b'{"labels": []}')
    assert producer.flush(30) == 0
    worker = harness.start(pipeline.env(control_topic=control, metrics_port=0))
    worker.wait_for("partitions assigned")
    assert worker.lines("control record rejected"), worker.output()
    events = [
        (b"a", orjson.dumps({"id": "a", "text": "sports", "profile": "news"})),
        (b"b", orjson.dumps({"id": "b", "text": "sports", "profile": "unknown"})),
    ]
    pipeline.produce(producer, events)
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()
    assert report.clean, report.describe()
    (output,) = next(iter(report.outputs.values()))
    scored = _scored(output)
    assert scored["profile"] == {"name": "news", "version": 0}
    assert set(scored["labels"]) == set(OLD_LABELS)
    (dead_letter,) = next(iter(report.dead_letters.values()))
    assert dead_letter.header("tagstream.error.stage") == "validate"
    assert dead_letter.header("tagstream.error.class") == "UnknownProfileError"


def test_a_missing_control_topic_stops_the_worker_at_start_up(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    missing = unique_name("no-such-profiles")
    worker = harness.start(pipeline.env(control_topic=missing))
    assert worker.wait() == 2
    assert missing in worker.output()
    assert "do not exist" in worker.output()
