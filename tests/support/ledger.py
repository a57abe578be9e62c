"""The ledger: proof that every input record was accounted for exactly once.

It reads the input, output and dead-letter topics to their end and checks that

* every input coordinate (topic, partition, offset) appears in the output topic or in the
  dead-letter topic (through the ``tagstream.source.*`` headers), never in both;
* no output or dead-letter record points at an offset that is not an input;
* the group's committed offsets equal the input partitions' log end offsets;

and counts duplicates: records beyond the first for the same input coordinate (what an
at-least-once pipeline may write after a crash).

``isolation="read_committed"`` reads the output and dead-letter topics as a downstream
consumer of an exactly-once worker does: records of aborted or still open transactions are
not seen, and each partition is read up to its last stable offset.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from tests.support.kafka_fixtures import unique_name

Coordinate = tuple[str, int, int]  # (topic, partition, offset)
PartitionKey = tuple[str, int]

# A single read of a topic gives up after this long without reaching the end.
READ_DEADLINE_S: Final = 60.0
# How often wait_until_clean looks again.
RECHECK_INTERVAL_S: Final = 0.5
WATERMARK_TIMEOUT_S: Final = 10.0
# Right after a broker restart the group coordinator is still loading: the question of the
# committed offsets is asked again for this long before the answer counts as an error.
COORDINATOR_SETTLE_S: Final = 30.0
COORDINATOR_RETRY_S: Final = 0.5
_COORDINATOR_MOVING: Final = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        # read_committed asks for stable offsets: while a transaction that commits offsets
        # for the group is still open (a broker restart left it so), the answer waits.
        KafkaError._TIMED_OUT,
    }
)
# What reading a topic can meet while a restarted broker elects its partition leaders.
SETTLING_ERRORS: Final = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


@dataclass(frozen=True)
class Record:
    """One record read back from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    header_list: list[tuple[str, bytes | None]]

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("utf-8", errors="replace")

    @property
    def source(self) -> Coordinate | None:
        topic = self.header("tagstream.source.topic")
        partition = self.header("tagstream.source.partition")
        offset = self.header("tagstream.source.offset")
        if topic is None or partition is None or offset is None:
            return None
        return (topic, int(partition), int(offset))


@dataclass
class LedgerReport:
    """What the ledger found; :attr:`clean` is the verdict."""

    inputs: dict[Coordinate, Record]
    outputs: dict[Coordinate, list[Record]]
    dead_letters: dict[Coordinate, list[Record]]
    committed: dict[PartitionKey, int | None]
    log_end: dict[PartitionKey, int]
    unknown: list[Record] = field(default_factory=list)

    @property
    def missing(self) -> list[Coordinate]:
        return sorted(
            c for c in self.inputs if c not in self.outputs and c not in self.dead_letters
        )

    @property
    def in_both(self) -> list[Coordinate]:
        return sorted(c for c in self.outputs if c in self.dead_letters)

    @property
    def output_duplicates(self) -> int:
        return sum(len(records) - 1 for records in self.outputs.values())

    @property
    def dead_letter_duplicates(self) -> int:
        return sum(len(records) - 1 for records in self.dead_letters.values())

    @property
    def duplicates(self) -> int:
        return self.output_duplicates + self.dead_letter_duplicates

    @property
    def committed_at_end(self) -> bool:
        return all(self.committed.get(key) == end for key, end in self.log_end.items())

    @property
    def complete(self) -> bool:
        """Every input has a result and the group committed everything."""
        return not self.missing and self.committed_at_end

    @property
    def clean(self) -> bool:
        """Complete, and nothing in both topics or pointing nowhere (duplicates allowed)."""
        return self.complete and not self.in_both and not self.unknown

    def describe(self) -> str:
        lagging = {
            f"{t}[{p}]": (self.committed.get((t, p)), end)
            for (t, p), end in self.log_end.items()
            if self.committed.get((t, p)) != end
        }
        return (
            f"inputs={len(self.inputs)} outputs={sum(map(len, self.outputs.values()))} "
            f"dead_letters={sum(map(len, self.dead_letters.values()))} "
            f"missing={len(self.missing)} {self.missing[:5]} in_both={self.in_both[:5]} "
            f"unknown={len(self.unknown)} duplicates={self.duplicates} "
            f"(output {self.output_duplicates}, dead-letter {self.dead_letter_duplicates}) "
            f"committed!=end: {lagging}"
        )


def _headers(message: Message) -> list[tuple[str, bytes | None]]:
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return [(name, value.encode() if isinstance(value, str) else value) for name, value in pairs]


class Ledger:
    """Reads the topics of one worker group and checks them (see the module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        input_topics: Iterable[str],
        output_topic: str,
        dead_letter_topic: str,
        group_id: str,
        *,
        isolation: str = "read_uncommitted",
    ) -> None:
        self.bootstrap = bootstrap
        self.isolation = isolation
        self.input_topics = list(input_topics)
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.group_id = group_id

    def _consumer(self, group_id: str | None = None) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": group_id or unique_name("ledger"),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": self.isolation,
                # read_committed ends at the last stable offset, before the high watermark
                # (transaction markers, open transactions): the end of a partition is its EOF.
                "enable.partition.eof": self.isolation == "read_committed",
            }
        )

    def _partitions(self, consumer: Consumer, topic: str) -> list[TopicPartition]:
        metadata = consumer.list_topics(topic, timeout=WATERMARK_TIMEOUT_S)
        return [TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)]

    def read(self, topic: str) -> list[Record]:
        """Every record of ``topic`` up to its current end."""
        consumer = self._consumer()
        try:
            ends: dict[int, int] = {}
            starts: list[TopicPartition] = []
            for tp in self._partitions(consumer, topic):
                low, high = consumer.get_watermark_offsets(tp, timeout=WATERMARK_TIMEOUT_S)
                if high > low:
                    ends[tp.partition] = high
                    starts.append(TopicPartition(topic, tp.partition, low))
            if not starts:
                return []
            consumer.assign(starts)
            return self._read_until(consumer, topic, ends)
        finally:
            consumer.close()

    def _read_until(self, consumer: Consumer, topic: str, ends: dict[int, int]) -> list[Record]:
        records: list[Record] = []
        remaining = dict(ends)
        deadline = time.monotonic() + READ_DEADLINE_S
        while remaining:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end: {remaining}")
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.pop(message.partition() or 0, None)
                        continue
                    raise AssertionError(f"reading {topic}: {error.str()}")
                partition, offset = message.partition() or 0, message.offset() or 0
                if offset >= ends.get(partition, 0):
                    continue
                header_list = _headers(message)
                records.append(
                    Record(
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        key=message.key(),
                        value=message.value(),
                        headers=dict(header_list),
                        header_list=header_list,
                    )
                )
                if offset + 1 >= remaining.get(partition, 0):
                    remaining.pop(partition, None)
        return records

    def committed(self) -> dict[PartitionKey, int | None]:
        consumer = self._consumer(self.group_id)
        try:
            partitions = [
                tp for topic in self.input_topics for tp in self._partitions(consumer, topic)
            ]
            result = _committed(consumer, partitions)
            return {
                (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in result
            }
        finally:
            consumer.close()

    def log_end(self) -> dict[PartitionKey, int]:
        consumer = self._consumer()
        try:
            ends: dict[PartitionKey, int] = {}
            for topic in self.input_topics:
                for tp in self._partitions(consumer, topic):
                    _, high = consumer.get_watermark_offsets(tp, timeout=WATERMARK_TIMEOUT_S)
                    ends[(topic, tp.partition)] = high
            return ends
        finally:
            consumer.close()

    def check(self) -> LedgerReport:
        inputs = {
            (r.topic, r.partition, r.offset): r
            for topic in self.input_topics
            for r in self.read(topic)
        }
        report = LedgerReport(
            inputs=inputs,
            outputs=defaultdict(list),
            dead_letters=defaultdict(list),
            committed=self.committed(),
            log_end=self.log_end(),
        )
        for target, topic in (
            (report.outputs, self.output_topic),
            (report.dead_letters, self.dead_letter_topic),
        ):
            for record in self.read(topic):
                source = record.source
                if source is None or source not in inputs:
                    report.unknown.append(record)
                else:
                    target[source].append(record)
        report.outputs = dict(report.outputs)
        report.dead_letters = dict(report.dead_letters)
        return report

    def wait_until_complete(self, timeout_s: float) -> LedgerReport:
        """Check again and again until every input is accounted for and committed."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                report = self.check()
            except KafkaException as exc:
                # A broker just started again may not have its partition leaders yet.
                error: KafkaError = exc.args[0]
                settling = error.retriable() or error.code() in SETTLING_ERRORS
                if not settling or time.monotonic() > deadline:
                    raise
                time.sleep(RECHECK_INTERVAL_S)
                continue
            if report.complete or time.monotonic() > deadline:
                return report
            time.sleep(RECHECK_INTERVAL_S)


def count_by_stage(report: LedgerReport) -> Counter[str]:
    """Dead-letter records per ``tagstream.error.stage``."""
    return Counter(
        record.header("tagstream.error.stage") or "?"
        for records in report.dead_letters.values()
        for record in records
    )


def _committed(consumer: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition]:
    """``consumer.committed``, asked again while the group coordinator moves or loads."""
    deadline = time.monotonic() + COORDINATOR_SETTLE_S
    while True:
        try:
            return list(consumer.committed(partitions, timeout=WATERMARK_TIMEOUT_S))
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() not in _COORDINATOR_MOVING or time.monotonic() >= deadline:
                raise
        time.sleep(COORDINATOR_RETRY_S)
