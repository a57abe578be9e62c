"""A hostile producer against one worker: every kind of abusive record, among good events.

One worker subprocess (the raising fake scorer) reads an input topic that allows 5 MiB
records, writes to a compacted output topic and to a dead-letter topic with the broker's
default (~1 MB) limit. The stream holds a few hundred good events across three partitions,
interleaved with records each built to break one protection:

* hypothesis templates that ``str.format`` would turn into a 1 GB string, an attribute
  walk, or a positional lookup (validate);
* a 3 MB value (validate: too long a text) whose dead-letter record the broker refuses, so
  a stub without the value must take its place, and a 2 MB metadata blob (validate, stub);
* label amplification: 10,000 labels, and 100 labels of 200 characters on a long text
  (validate: over ``TAGSTREAM_MAX_EVENT_TOKENS``);
* JSON nested 100,000 deep (deserialize), metadata nested deeper than allowed (validate),
  invalid UTF-8 and binary junk (deserialize);
* a valid event without a key, whose output the compacted topic rejects (produce);
* a text that makes the scorer raise, once inside a batch and once alone in its batch
  (inference).

The worker must stay up throughout, keep its peak RSS bounded, account for every input
offset exactly once (output or dead letter) and commit to the log end; then SIGTERM stops
it with exit 0.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
from confluent_kafka import KafkaError, Message, Producer

from tests.support.kafka_fixtures import create_topic, unique_name
from tests.support.ledger import RECHECK_INTERVAL_S, Coordinate, LedgerReport, Record
from tests.support.scorers import RAISE_MARKER
from tests.support.worker_process import (
    COMPLETE_TIMEOUT_S,
    LABELS,
    Harness,
    Pipeline,
    WorkerProcess,
    expected_label,
    good_event,
)

MIB: Final = 1024 * 1024
# The input topic takes the 3 MB record; the test's producer must be allowed to send it.
INPUT_MAX_MESSAGE_BYTES: Final = 5 * MIB
PRODUCER_MAX_MESSAGE_BYTES: Final = 8 * MIB
PARTITIONS: Final = 3
GOOD_EVENTS: Final = 300
# Good events produced after the lone scorer-raising record: the worker goes on scoring.
TAIL_EVENTS: Final = 30
BATCH_SIZE: Final = 16
BIG_TEXT_CHARS: Final = 3_000_000
METADATA_BLOB_BYTES: Final = 2_000_000
NESTING: Final = 100_000
# Worker VmHWM measured (fake scorer, 2 cores): good events only 56-57 MiB, this stream 71-73.
RSS_BASELINE_MIB: Final = 57
# +150 MiB holds the 3 MB/2 MB values a few times over, never a 1 GB format-string result.
MAX_PEAK_RSS_MIB: Final = RSS_BASELINE_MIB + 150


@dataclass(frozen=True)
class Hostile:
    """One hostile input record and the dead letter it must become."""

    name: str
    key: bytes | None
    value: bytes
    stage: str
    error_class: str
    # The dead-letter record is too large for its topic: a stub without the value.
    stub: bool = False


def _event(name: str, **fields: object) -> bytes:
    return orjson.dumps({"id": name, **fields})


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _deep_metadata(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = {"d": value}
    return value


def _hostile_records() -> list[Hostile]:
    """Each record is caught by one protection; without it the assertions below fail."""
    long_text = "finance " * 1_000  # 8,000 chars: 100 labels x ~2,000 tokens each
    wide_labels = [f"{i:03d}-" + "w" * 196 for i in range(100)]  # 100 labels of 200 chars
    return [
        # str.format would build a 1 GB string (RSS bound, or MemoryError).
        Hostile(
            "template-width",
            b"h-template-width",
            _event("h-template-width", text="sports", hypothesis_template="{:>1000000000}{{}}"),
            "validate",
            "ValidateError",
        ),
        Hostile(
            "template-attribute",
            b"h-template-attribute",
            _event(
                "h-template-attribute",
                text="sports",
                hypothesis_template="{.__class__.__mro__}{{}}",
            ),
            "validate",
            "ValidateError",
        ),
        Hostile(
            "template-positional",
            b"h-template-positional",
            _event("h-template-positional", text="sports", hypothesis_template="{0}{1}"),
            "validate",
            "ValidateError",
        ),
        # Unprotected, its dead letter is too large for the topic: a fatal stop (exit 3).
        Hostile(
            "value-3mb",
            b"h-value-3mb",
            _event("h-value-3mb", text="s" * BIG_TEXT_CHARS),
            "validate",
            "ValidateError",
            stub=True,
        ),
        Hostile(
            "labels-10000",
            b"h-labels-10000",
            _event("h-labels-10000", text="sports", labels=[f"l{i}" for i in range(10_000)]),
            "validate",
            "ValidateError",
        ),
        Hostile(
            "labels-costly",
            b"h-labels-costly",
            _event("h-labels-costly", text=long_text, labels=wide_labels),
            "validate",
            "EventTooCostlyError",
        ),
        Hostile(
            "metadata-2mb",
            b"h-metadata-2mb",
            _event("h-metadata-2mb", text="sports", metadata={"blob": "m" * METADATA_BLOB_BYTES}),
            "validate",
            "ValidateError",
            stub=True,
        ),
        Hostile(
            "nested-100000",
            b"h-nested-100000",
            b'{"text": "sports", "metadata": {"a": ' + _nested(NESTING) + b"}}",
            "deserialize",
            "DeserializeError",
        ),
        Hostile(
            "metadata-deep",
            b"h-metadata-deep",
            _event("h-metadata-deep", text="sports", metadata=_deep_metadata(200)),
            "validate",
            "ValidateError",
        ),
        Hostile(
            "invalid-utf8",
            b"h-invalid-utf8",
            b'{"id": "h-invalid-utf8", "text": "caf\xe9 \xff sports"}',
            "deserialize",
            "DeserializeError",
        ),
        Hostile(
            "binary",
            b"h-binary",
            bytes(range(256)) * 16,
            "deserialize",
            "DeserializeError",
        ),
        # A valid event: only the compacted output topic refuses it.
        Hostile(
            "null-key",
            None,
            _event("h-null-key", text="A short news item about weather today."),
            "produce",
            "INVALID_RECORD",
        ),
        # Inside a full batch: the batch fails, its events are scored one by one.
        Hostile(
            "raise-in-batch",
            b"h-raise-in-batch",
            _event("h-raise-in-batch", text=f"sports {RAISE_MARKER} news"),
            "inference",
            "RuntimeError",
        ),
    ]


# Produced on its own once everything before it is done, so that it is alone in its batch.
RAISE_ALONE: Final = Hostile(
    "raise-alone",
    b"h-raise-alone",
    _event("h-raise-alone", text=f"politics {RAISE_MARKER} news"),
    "inference",
    "RuntimeError",
)

Stream = list[tuple[Hostile | None, bytes | None, bytes]]


def _stream(first_good: int, good: int, hostile: list[Hostile]) -> Stream:
    """``good`` good events with the hostile records spread evenly among them."""
    stream: Stream = []
    gap = good // (len(hostile) + 1)
    pending = list(hostile)
    for index in range(first_good, first_good + good):
        if pending and index > first_good and (index - first_good) % gap == 0:
            record = pending.pop(0)
            stream.append((record, record.key, record.value))
        key, value = good_event(index)
        stream.append((None, key, value))
    for record in pending:
        stream.append((record, record.key, record.value))
    return stream


class StreamProducer:
    """Sends a stream round robin over the partitions; remembers where each hostile record
    landed."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._sent = 0
        self.hostile: dict[Coordinate, Hostile] = {}
        self.errors: list[str] = []

    def send(self, stream: Stream) -> None:
        for hostile, key, value in stream:
            partition = self._sent % PARTITIONS
            self._sent += 1
            self._producer.produce(
                self._topic,
                key=key,
                value=value,
                partition=partition,
                on_delivery=self._delivered(hostile),
            )
            self._producer.poll(0)
        assert self._producer.flush(30) == 0
        assert not self.errors, self.errors

    def _delivered(self, hostile: Hostile | None) -> Callable[[KafkaError | None, Message], None]:
        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                self.errors.append(error.str())
            elif hostile is not None:
                coordinate = (self._topic, message.partition() or 0, message.offset() or 0)
                self.hostile[coordinate] = hostile

        return report


def _hostile_pipeline(harness: Harness) -> Pipeline:
    """Input topic that takes 5 MiB records, compacted output, default-limit dead letters."""
    admin = harness.admin
    input_config = {"max.message.bytes": str(INPUT_MAX_MESSAGE_BYTES)}
    output = create_topic(admin, unique_name("out"), 1, {"cleanup.policy": "compact"})
    return Pipeline(
        bootstrap=harness.kafka.bootstrap,
        input_topic=create_topic(admin, unique_name("in"), PARTITIONS, input_config),
        output_topic=output,
        dead_letter_topic=create_topic(admin, f"{output}.dlq", 1),
        group_id=unique_name("group"),
        partitions=PARTITIONS,
    )


def _only(records: list[Record]) -> Record:
    assert len(records) == 1, records
    return records[0]


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _complete(pipeline: Pipeline, worker: WorkerProcess) -> LedgerReport:
    """Wait until every input is accounted for and committed; fail at once if the worker
    exits meanwhile."""
    ledger = pipeline.ledger()
    deadline = time.monotonic() + COMPLETE_TIMEOUT_S
    while True:
        assert worker.running(), f"worker exited ({worker.popen.returncode}):\n{worker.output()}"
        report = ledger.check()
        if report.complete:
            return report
        assert time.monotonic() < deadline, report.describe() + "\n" + worker.output()
        time.sleep(RECHECK_INTERVAL_S)


def _assert_dead_letter(report: LedgerReport, coordinate: Coordinate, hostile: Hostile) -> None:
    name = hostile.name
    assert coordinate not in report.outputs, name
    record = _only(report.dead_letters[coordinate])
    source = report.inputs[coordinate]
    assert record.key == hostile.key == source.key, name
    assert record.header("tagstream.error.stage") == hostile.stage, (name, record.headers)
    assert record.header("tagstream.error.class") == hostile.error_class, (name, record.headers)
    assert len(record.header("tagstream.error.message") or "") <= 1024, name
    if hostile.stub:
        assert record.value is None, name
        assert record.header("tagstream.value.truncated") == "true", name
        assert record.header("tagstream.value.size") == str(len(hostile.value)), name
        digest = hashlib.sha256(hostile.value).hexdigest()
        assert record.header("tagstream.value.sha256") == digest, name
    else:
        assert record.value == hostile.value == source.value, name


def _assert_scored(report: LedgerReport, coordinate: Coordinate) -> None:
    assert coordinate not in report.dead_letters, coordinate
    record = _only(report.outputs[coordinate])
    source = report.inputs[coordinate]
    assert record.key == source.key
    scored = orjson.loads(record.value or b"")
    assert scored["id"] == orjson.loads(source.value or b"")["id"]
    assert scored["tags"] == [expected_label(source.value or b"")]
    assert set(scored["labels"]) == set(LABELS)


def test_a_hostile_producer_cannot_stop_bloat_or_stall_the_worker(harness: Harness) -> None:
    pipeline = _hostile_pipeline(harness)
    producer = harness.make_producer(**{"message.max.bytes": PRODUCER_MAX_MESSAGE_BYTES})
    sender = StreamProducer(producer, pipeline.input_topic)
    hostile = _hostile_records()
    sender.send(_stream(0, GOOD_EVENTS, hostile))
    assert len(sender.hostile) == len(hostile)

    env = pipeline.env(scorer="tests.support.scorers:raising", max_batch_size=BATCH_SIZE)
    worker = harness.start(env)
    _complete(pipeline, worker)

    # Everything before it is done: the next record is alone in its batch.
    batch_failures = len(worker.lines("batch scoring failed"))
    sender.send([(RAISE_ALONE, RAISE_ALONE.key, RAISE_ALONE.value)])
    _complete(pipeline, worker)
    assert len(worker.lines("batch scoring failed")) == batch_failures, worker.output()

    sender.send(_stream(GOOD_EVENTS, TAIL_EVENTS, []))
    report = _complete(pipeline, worker)

    peak_rss_mib = _peak_rss_mib(worker.pid)
    output = worker.output()
    harness.stop_all()  # SIGTERM; requires exit code 0

    print(f"\nhostile stream: worker peak RSS {peak_rss_mib:.1f} MiB")
    assert peak_rss_mib < MAX_PEAK_RSS_MIB, f"peak RSS {peak_rss_mib:.1f} MiB\n{output}"
    assert report.clean, report.describe()
    assert report.committed_at_end, report.describe()
    assert report.duplicates == 0, report.describe()
    assert len(report.inputs) == GOOD_EVENTS + TAIL_EVENTS + len(hostile) + 1
    assert {partition for _, partition, _ in report.inputs} == set(range(PARTITIONS))
    for coordinate in report.inputs:
        if coordinate in sender.hostile:
            _assert_dead_letter(report, coordinate, sender.hostile[coordinate])
        else:
            _assert_scored(report, coordinate)
    assert len(report.dead_letters) == len(hostile) + 1
    # Both scorer-raising records were isolated and dead-lettered alone.
    assert len(worker.lines("scoring one event failed, dead-lettering it")) == 2, output
    assert len(worker.lines("writing a stub without the value")) == 2, output
    assert "output topic is compacted" in output
    for sign in ("fatal", "crashed", "unexpected error", "scorer failing", "circuit closed"):
        assert sign not in output, output
