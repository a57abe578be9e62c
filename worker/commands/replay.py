"""``tagstream replay``: send dead-lettered inputs back into the stream once the cause is fixed.

``tagstream replay --from DLQ_TOPIC [--to TOPIC]`` reads the dead-letter topic in its own
consumer group (``--group``, default ``<TAGSTREAM_GROUP_ID>-replay``) up to the end offsets it
saw at start, and produces each matching record's original key, value and headers to
``--to`` or to the record's ``tagstream.source.topic`` (headers: see
:mod:`worker.contract.replay`). The Kafka connection and security settings are those of
``tagstream run``: ``TAGSTREAM_*`` environment variables and ``--config FILE``.

Safe to run again: offsets are committed only for records the target acknowledged
(idempotent producer, ``acks=all``) and for records skipped, so a second run in the same
group replays nothing twice, and an interrupted run resumes where it stopped. The group
remembers what it has looked at, filters included: a run with other filters over the same
records needs another ``--group``. ``--dry-run`` commits nothing and produces nothing.

Skipped and counted: records outside the filters, stubs (no value: the dead-letter topic
refused the full record), records already replayed ``--max-replays`` times, records with no
target. Exit status: 0 when every record looked at was replayed or skipped, 1 when a replay
was not acknowledged, the end was not reached or the run was interrupted, 2 for a usage
error (the message names the flag or setting), 3 for a fatal Kafka error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from tqdm import tqdm

from worker.config.loading import build_section, env_name, read_yaml
from worker.config.settings import KafkaSettings
from worker.contract.deadletter import Stage
from worker.contract.replay import (
    DEFAULT_MAX_REPLAYS,
    DeadLetter,
    ReplayFilter,
    Verdict,
    decide,
    parse_time,
    replay_headers,
    replay_of,
)
from worker.errors import ConfigError, KafkaFatalError
from worker.exit_codes import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNDELIVERED, EXIT_USAGE
from worker.kafka.config import consumer_config, producer_config
from worker.kafka.consumer import KafkaConsumer
from worker.kafka.errors import ClientError
from worker.kafka.producer import KafkaProducer
from worker.kafka.records import InputRecord, PartitionKey
from worker.observability.logs import configure_logging

GROUP_SUFFIX: Final = "-replay"
# Metadata, watermark and committed-offset questions at start: generous for a loaded
# cluster, short enough that a wrong bootstrap address fails within a minute.
METADATA_TIMEOUT_S: Final = 30.0
POLL_TIMEOUT_S: Final = 0.5
POLL_MAX_RECORDS: Final = 500
# Done offsets are committed this often, so an interrupted run redoes at most a second.
COMMIT_INTERVAL_S: Final = 1.0
# Everything produced must be acknowledged before the final commit; a minute covers a
# broker slow to accept the first requests (librdkafka retries within it).
FLUSH_TIMEOUT_S: Final = 60.0
# No record and no progress for this long while partitions remain short of their end: the
# partitions went to another member of the group (or the broker is gone); stop, commit.
STALL_TIMEOUT_S: Final = 60.0
# Placeholder for the output and input topics ``tagstream run`` requires and replay never
# uses, when the environment does not set them (a shell with only connection settings).
UNUSED_TOPIC: Final = "tagstream.replay.unused"
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


# -- arguments ----------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {number}")
    return number


def _rate(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, got {value}")
    return number


def _time(value: str) -> datetime:
    try:
        return parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time (2024-05-01T12:00:00Z): {value!r}"
        ) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument(
        "--from",
        dest="source",
        metavar="DLQ_TOPIC",
        help="dead-letter topic to read [TAGSTREAM_DLQ_TOPIC, or <TAGSTREAM_OUTPUT_TOPIC>.dlq]",
    )
    parser.add_argument(
        "--to", metavar="TOPIC", help="target topic (default: each record's source topic)"
    )
    parser.add_argument(
        "--group", help="consumer group of the replay (default: <TAGSTREAM_GROUP_ID>-replay)"
    )
    parser.add_argument(
        "--stage",
        action="append",
        default=[],
        choices=[stage.value for stage in Stage],
        help="only records dead-lettered at this stage (repeatable)",
    )
    parser.add_argument(
        "--error-class",
        action="append",
        default=[],
        metavar="NAME",
        help="only records with this tagstream.error.class (repeatable)",
    )
    parser.add_argument(
        "--since", type=_time, metavar="TIME", help="only failed_at at or after TIME (RFC 3339)"
    )
    parser.add_argument(
        "--until", type=_time, metavar="TIME", help="only failed_at before TIME (RFC 3339)"
    )
    parser.add_argument(
        "--source-partition",
        action="append",
        default=[],
        type=_non_negative_int,
        metavar="N",
        help="only records read from this input partition (repeatable)",
    )
    parser.add_argument(
        "--max-records", type=_positive_int, metavar="N", help="replay at most N records"
    )
    parser.add_argument(
        "--max-replays",
        type=_positive_int,
        default=DEFAULT_MAX_REPLAYS,
        metavar="N",
        help=f"skip records already replayed N times (default {DEFAULT_MAX_REPLAYS})",
    )
    parser.add_argument(
        "--rate", type=_rate, default=0.0, help="records per second (default 0: no limit)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be replayed, counts by stage and error class; send nothing",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML file of settings, as for `run`"
    )
    parser.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers [TAGSTREAM_BOOTSTRAP_SERVERS]"
    )


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """The validated arguments of one run."""

    source: str
    target: str | None
    group: str
    record_filter: ReplayFilter
    max_records: int | None
    max_replays: int
    rate: float
    dry_run: bool


def _is_given(name: str, file_values: dict[str, Any], flags: dict[str, Any]) -> bool:
    wanted = env_name(name)
    in_env = any(key.upper() == wanted for key in os.environ)
    return in_env or name in file_values or name in flags


def load_kafka_settings(args: argparse.Namespace) -> tuple[KafkaSettings, bool]:
    """The Kafka settings of ``tagstream run`` (flags > environment > file), and whether
    they name a dead-letter topic; raises :class:`ConfigError`."""
    file_values = read_yaml(args.config) if args.config is not None else {}
    flags: dict[str, Any] = {}
    if args.bootstrap_servers:
        flags["bootstrap_servers"] = args.bootstrap_servers
    names_output = _is_given("output_topic", file_values, flags)
    names_dlq = _is_given("dlq_topic", file_values, flags)
    if not names_output:
        flags["output_topic"] = UNUSED_TOPIC
    if not (
        _is_given("input_topics", file_values, flags)
        or _is_given("input_topic_regex", file_values, flags)
    ):
        flags["input_topics"] = UNUSED_TOPIC
    kafka = build_section(
        KafkaSettings, file_values, flags, {"bootstrap_servers": "bootstrap_servers"}
    )
    return kafka, names_output or names_dlq


def plan(args: argparse.Namespace, kafka: KafkaSettings, names_dlq: bool) -> ReplayPlan:
    """The run's plan; raises :class:`ConfigError` naming the flag that is missing or wrong."""
    source = args.source or (kafka.dead_letter_topic if names_dlq else None)
    if not source:
        raise ConfigError("--from is required (or TAGSTREAM_DLQ_TOPIC / TAGSTREAM_OUTPUT_TOPIC)")
    if args.to == source:
        raise ConfigError(f"--to {args.to}: the target must not be the dead-letter topic")
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise ConfigError("--since must be earlier than --until")
    record_filter = ReplayFilter(
        stages=frozenset(args.stage),
        error_classes=frozenset(args.error_class),
        since=args.since,
        until=args.until,
        source_partitions=frozenset(args.source_partition),
    )
    return ReplayPlan(
        source=source,
        target=args.to,
        group=args.group or f"{kafka.group_id}{GROUP_SUFFIX}",
        record_filter=record_filter,
        max_records=args.max_records,
        max_replays=args.max_replays,
        rate=args.rate,
        dry_run=args.dry_run,
    )


# -- offsets ------------------------------------------------------------------------------


class PartitionProgress:
    """The offsets of one dead-letter partition looked at, in order, and which are done
    (replayed and acknowledged, or skipped); :meth:`position` is what may be committed."""

    def __init__(self, start: int) -> None:
        self._committable = start
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self.next_offset = start

    def examine(self, offset: int) -> None:
        self._order.append(offset)
        self.next_offset = offset + 1

    def mark_done(self, offset: int) -> None:
        self._done.add(offset)

    def skip_to(self, offset: int) -> None:
        """Nothing to look at below ``offset`` (control records, the end of the log)."""
        self.next_offset = max(self.next_offset, offset)
        if not self._order:
            self._committable = max(self._committable, offset)

    def position(self) -> int:
        """The first offset looked at and not done, or where the next look begins."""
        while self._order and self._order[0] in self._done:
            self._done.discard(self._order.popleft())
        if self._order:
            return self._order[0]
        return max(self._committable, self.next_offset)


# -- the run ------------------------------------------------------------------------------


@dataclass
class Summary:
    """What one run did, for the closing lines."""

    replayed: Counter[str] = field(default_factory=Counter)  # by target topic
    skipped: Counter[Verdict] = field(default_factory=Counter)
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, error class)
    undelivered: list[str] = field(default_factory=list)
    examined: int = 0
    complete: bool = False
    interrupted: bool = False

    @property
    def replayed_total(self) -> int:
        return sum(self.replayed.values())


SKIP_WORDS: Final = {
    Verdict.FILTERED: "outside the filters",
    Verdict.STUB: "stubs without a value (cannot be replayed; find them by tagstream.value.sha256)",
    Verdict.EXHAUSTED: "already replayed --max-replays times",
    Verdict.NO_TARGET: "without tagstream.source.topic (give --to)",
}


def summary_lines(summary: Summary, plan_: ReplayPlan) -> list[str]:
    verb = "would replay" if plan_.dry_run else "replayed"
    targets = ", ".join(f"{topic} ({count})" for topic, count in sorted(summary.replayed.items()))
    lines = [
        f"{verb} {summary.replayed_total} of {summary.examined} dead letters from {plan_.source}"
        + (f" to {targets}" if targets else "")
    ]
    lines += [
        f"skipped {count}: {SKIP_WORDS[verdict]}"
        for verdict, count in sorted(summary.skipped.items())
        if count
    ]
    if summary.by_kind:
        lines.append(f"{verb}, by stage and error class:")
        width = max(len(stage) for stage, _ in summary.by_kind)
        class_width = max(len(error_class) for _, error_class in summary.by_kind)
        lines += [
            f"  {stage:<{width}}  {error_class:<{class_width}}  {count}"
            for (stage, error_class), count in sorted(summary.by_kind.items())
        ]
    if summary.undelivered:
        lines.append(f"not acknowledged: {len(summary.undelivered)}: {summary.undelivered[0]}")
    if _stopped_at_limit(summary, plan_):
        lines.append(f"stopped at --max-records {plan_.max_records}; run again to go on")
    elif not summary.complete:
        lines.append("stopped before the end offsets seen at start; run again to resume")
    return lines


class _Stop:
    """SIGTERM/SIGINT end the run after the current record: drained and committed."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True


class Replay:
    """One run: the consumer of the dead-letter topic, the producer to the targets, and the
    progress of every partition. Rebalance callbacks commit what is done before a partition
    goes (:class:`worker.kafka.consumer.RebalanceListener`)."""

    def __init__(
        self,
        plan_: ReplayPlan,
        consumer: KafkaConsumer,
        producer: KafkaProducer | None,
        ends: dict[PartitionKey, int],
        starts: dict[PartitionKey, int],
        *,
        table: TextIO,
        progress: tqdm[Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan_
        self.consumer = consumer
        self.producer = producer
        self.ends = ends
        self.starts = dict(starts)  # where a (re)assigned partition's look begins
        self.committed = dict(starts)  # what the group has committed, as far as we know
        self.progress: dict[PartitionKey, PartitionProgress] = {}
        self.remaining = {key for key, end in ends.items() if starts[key] < end}
        self.summary = Summary()
        self.table = table
        self.bar = progress
        self._clock = clock
        self._started = clock()
        self._last_commit = clock()
        self._last_progress = clock()

    # -- RebalanceListener ------------------------------------------------------------------

    def on_assigned(self, keys: list[PartitionKey]) -> None:
        for key in keys:
            if key in self.ends:
                self.progress[key] = PartitionProgress(self.starts[key])

    def on_revoked(self, keys: list[PartitionKey]) -> None:
        self.settle(keys)
        self._forget(keys)

    def on_lost(self, keys: list[PartitionKey]) -> None:
        self._forget(keys)

    def _forget(self, keys: list[PartitionKey]) -> None:
        for key in keys:
            state = self.progress.pop(key, None)
            if state is not None:
                self.starts[key] = state.position()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: _Stop) -> Summary:
        self.consumer.subscribe([self.plan.source], self)
        while self.remaining and not self._must_stop(stop):
            records = self.consumer.poll(POLL_MAX_RECORDS, POLL_TIMEOUT_S)
            for record in records:
                if self._must_stop(stop):
                    break
                self.handle(record)
            if not records:
                self._check_positions()
            self._serve()
            if self._clock() - self._last_progress > STALL_TIMEOUT_S:
                break
        self.summary.interrupted = stop.requested
        self.summary.complete = not self.remaining
        self.settle(list(self.progress))
        return self.summary

    def _must_stop(self, stop: _Stop) -> bool:
        if stop.requested or self.summary.undelivered:
            return True
        limit = self.plan.max_records
        return limit is not None and self.summary.replayed_total >= limit

    def handle(self, record: InputRecord) -> None:
        """Look at one dead-letter record: replay it, or skip and count it."""
        key = record.partition_key
        state = self.progress.get(key)
        end = self.ends.get(key)
        if state is None or end is None or record.generation != self.consumer.generation(key):
            return
        if record.offset < state.next_offset or record.offset >= end:
            return
        state.examine(record.offset)
        self.summary.examined += 1
        self.bar.update(1)
        self._last_progress = self._clock()
        dead_letter = DeadLetter.from_headers(record.headers)
        target = self.plan.target or dead_letter.source_topic
        verdict = decide(dead_letter, self.plan.record_filter, self.plan.max_replays, target)
        if verdict is Verdict.REPLAY and target is not None:
            self._replay(record, dead_letter, target, state)
        else:
            self.summary.skipped[verdict] += 1
            state.mark_done(record.offset)
        if state.next_offset >= end:
            self.remaining.discard(key)

    def _replay(
        self, record: InputRecord, dead_letter: DeadLetter, target: str, state: PartitionProgress
    ) -> None:
        kind = (dead_letter.stage or "-", dead_letter.error_class or "-")
        self.summary.by_kind[kind] += 1
        self.summary.replayed[target] += 1
        if self.producer is None:  # dry run
            self.table.write(
                f"{record.partition}\t{record.offset}\t{kind[0]}\t{kind[1]}\t"
                f"{dead_letter.failed_at.isoformat() if dead_letter.failed_at else '-'}\t"
                f"{dead_letter.replay_count}\t{target}\n"
            )
            state.mark_done(record.offset)
            return
        self._pace()
        headers = replay_headers(
            dead_letter, replay_of(record.topic, record.partition, record.offset)
        )
        offset = record.offset

        def delivered(error: ClientError | None) -> None:
            if error is None:
                state.mark_done(offset)
            else:
                self.summary.undelivered.append(f"{target}: {error.message}")

        while True:
            try:
                refused = self.producer.produce(
                    target, record.key, record.value, headers, delivered
                )
            except BufferError:
                self.producer.poll(POLL_TIMEOUT_S)
                continue
            if refused is not None:
                delivered(refused)
            return

    def _pace(self) -> None:
        if self.plan.rate <= 0:
            return
        due = self._started + self.summary.replayed_total / self.plan.rate
        time.sleep(max(0.0, due - self._clock()))

    def _check_positions(self) -> None:
        """After an empty poll: a partition whose fetch position passed its end (control
        records, no more data records) is finished."""
        keys = [key for key in self.remaining if key in self.progress]
        for key, position in self.consumer.position(keys).items():
            if position is not None and position >= self.ends[key]:
                self.progress[key].skip_to(self.ends[key])
                self.remaining.discard(key)
                self._last_progress = self._clock()

    def _serve(self) -> None:
        if self.producer is not None:
            self.producer.poll(0)
        if self._clock() - self._last_commit >= COMMIT_INTERVAL_S:
            self._commit(list(self.progress))

    def settle(self, keys: Sequence[PartitionKey]) -> None:
        """Wait for the replays in flight, then commit what is done in ``keys``."""
        if self.producer is not None:
            self.producer.flush(FLUSH_TIMEOUT_S)
        self._commit(keys)

    def _commit(self, keys: Sequence[PartitionKey]) -> None:
        self._last_commit = self._clock()
        if self.plan.dry_run:
            return
        positions = {key: self.progress[key].position() for key in keys if key in self.progress}
        moved = {key: pos for key, pos in positions.items() if pos > self.committed.get(key, 0)}
        error = self.consumer.commit_sync(moved)
        if error is None:
            self.committed.update(moved)
        elif error.fatal:
            raise KafkaFatalError(f"commit failed: {error.message}", error.as_info())


# -- wiring -------------------------------------------------------------------------------


def _ignore_commit_result(_error: ClientError | None, _outcome: list[Any]) -> None:
    """Commits are synchronous here; their results are read from ``commit_sync``."""


def _report_client_error(error: ClientError) -> None:
    if error.fatal:
        sys.stderr.write(f"tagstream replay: {error.message}\n")


def _clients(kafka: KafkaSettings, plan_: ReplayPlan) -> tuple[KafkaConsumer, KafkaProducer | None]:
    group_kafka = kafka.model_copy(
        update={"group_id": plan_.group, "group_instance_id": None, "auto_offset_reset": "earliest"}
    )
    incremental = (
        kafka.group_protocol == "consumer" or kafka.assignment_strategy == "cooperative-sticky"
    )
    consumer = KafkaConsumer(
        consumer_config(group_kafka), incremental=incremental, on_commit=_ignore_commit_result
    )
    producer = (
        None
        if plan_.dry_run
        else KafkaProducer(producer_config(kafka), on_error=_report_client_error)
    )
    return consumer, producer


def _bounds(
    consumer: KafkaConsumer, topic: str
) -> tuple[dict[PartitionKey, int], dict[PartitionKey, int]] | None:
    """(end offsets, start offsets) of every partition of ``topic``; None if it is missing.
    A partition starts at the group's committed offset, or at its low watermark when
    nothing is committed or retention removed what was."""
    partitions = consumer.partitions(topic, METADATA_TIMEOUT_S)
    if partitions is None:
        return None
    keys = [(topic, partition) for partition in partitions]
    committed = consumer.committed(keys, METADATA_TIMEOUT_S)
    ends: dict[PartitionKey, int] = {}
    starts: dict[PartitionKey, int] = {}
    for key in keys:
        low, high = consumer.watermarks(key, METADATA_TIMEOUT_S)
        ends[key] = high
        starts[key] = max(low, committed.get(key) or 0)
    return ends, starts


def _usage(message: str) -> int:
    sys.stderr.write(f"tagstream replay: {message}\n")
    return EXIT_USAGE


def execute(args: argparse.Namespace) -> int:
    configure_logging(stream=sys.stderr)
    try:
        kafka, names_dlq = load_kafka_settings(args)
        plan_ = plan(args, kafka, names_dlq)
    except ConfigError as exc:
        return _usage(str(exc))
    stop = _Stop()
    stop.install()
    try:
        return _execute(kafka, plan_, stop)
    except KafkaFatalError as exc:
        sys.stderr.write(f"tagstream replay: {exc}\n")
        return EXIT_FATAL
    finally:
        stop.restore()


def _execute(kafka: KafkaSettings, plan_: ReplayPlan, stop: _Stop) -> int:
    consumer, producer = _clients(kafka, plan_)
    try:
        bounds = _bounds(consumer, plan_.source)
        if bounds is None:
            return _usage(f"--from {plan_.source}: no such topic")
        ends, starts = bounds
        total = sum(max(0, ends[key] - starts[key]) for key in ends)
        if plan_.dry_run:
            sys.stdout.write("partition\toffset\tstage\terror_class\tfailed_at\treplays\ttarget\n")
        bar = tqdm(total=total, unit="record", file=sys.stderr, disable=not sys.stderr.isatty())
        with bar:
            replay = Replay(plan_, consumer, producer, ends, starts, table=sys.stdout, progress=bar)
            summary = replay.run(stop)
    finally:
        consumer.close()  # first: its revoke callback still settles through the producer
        if producer is not None:
            producer.close()
    for line in summary_lines(summary, plan_):
        sys.stderr.write(line + "\n")
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.undelivered or not (summary.complete or _stopped_at_limit(summary, plan_)):
        return EXIT_UNDELIVERED
    return EXIT_OK


def _stopped_at_limit(summary: Summary, plan_: ReplayPlan) -> bool:
    return plan_.max_records is not None and summary.replayed_total >= plan_.max_records
