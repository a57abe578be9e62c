"""Throughput of ``tagstream run`` against the Kafka ceiling, on a real local broker.

Six scenarios, each on fresh topics (8 partitions) filled with small events *before* it
starts (``--events``, default 200,000; ~110-byte JSON events, keyed by id). With
``--event-bytes N`` every event's JSON value is about N bytes instead (its ``text`` padded
with more news-like sentences, cut at a word; 128 .. 60,000, within the worker's default
input limits), the same events in every scenario:

* ``ceiling``: a plain confluent-kafka loop in this process that consumes each record and
  produces it unchanged to the output topic: the most any consume-produce pipeline in
  Python gets from this broker on this machine. For fairness it uses the worker's own
  client settings (``worker.kafka.config.consumer_config`` / ``producer_config``: manual
  commits, idempotent producer, ``acks=all``, ``linger.ms=5``), the worker's poll (up to
  500 records: ``consume(1, timeout)`` then ``consume(499, 0)``) and commit interval (1 s,
  asynchronous, of acknowledged offsets).
* ``steps``: the ceiling loop doing, on its one thread, the worker's own per-record
  functions: per poll, ``decode_input``, ``to_request`` and the no-model scorer's
  ``estimate_tokens`` for every record, one ``score`` call for the poll, then
  ``encode_output`` and the source headers for each output. The worker's architecture
  (its second thread, batcher, offset tracking, delivery bookkeeping, metrics) is left
  out: what the per-record work alone costs, between ``ceiling`` and ``noop``.
* ``noop``: ``tagstream run`` as a subprocess with ``worker.scoring.noop:NoopScorer``:
  every step of the worker, no model work. Goal: noop / ceiling >= 0.5.
* ``noop-eos``: ``noop`` with ``TAGSTREAM_PROCESSING_GUARANTEE=exactly-once``: the cost of
  the transactions (a checkpoint that drains every commit interval) against ``noop``.
* ``latency``: the two delivery modes, ``noop`` and ``noop-eos``, each a fresh worker under
  an open-loop load (``bench/latency.py``'s generator) at ``--latency-fraction`` (0.5) of
  the slower mode's events/s measured before it in the same run (or ``--latency-rate``),
  for ``--latency-seconds`` (20; the first ``--latency-warmup-s``, 3, left out). Latency of
  an event = the moment a ``read_committed`` reader in this process got its output - its
  input's LogAppendTime: what a downstream consumer sees, so an exactly-once output counts
  from its transaction's commit. p50 / p95 / p99 / max per mode, and the p99 to the
  output's own append time (bench/latency.py's measure) next to it.
* ``nli``: ``tagstream run`` with the tiny 2+2-layer NLI model of the tests (CPU, float32;
  ``--nli-events``, default 20,000, because the model is the bottleneck there).

The worker runs with its default settings (``max_batch_size`` 64, ``max_wait_ms`` 50,
2 batches in flight, commits every second) and 4 default labels, unless ``--set`` says
otherwise.

Measured: events/s = (outputs - 1) / (last - first output timestamp); MB/s of input =
events/s x the mean input value size (bytes; keys and headers left out; MB = 10^6 bytes).
The output topic
uses LogAppendTime, so that is the span from the first record the broker appended (a
batch after the first input was consumed) to the last one it appended (just before it
acknowledged it). Each run then waits until the group's committed offsets reach the input's
log end; ``to_commit_s`` is the time from the first output to that moment (checked twice a
second). Outputs are counted as records a ``read_committed`` reader gets (never by offsets:
an exactly-once run's log also holds transaction markers and aborted records), and for the
worker checked for duplicates and dead letters.

``busy %`` (noop, nli): the share of wall time the worker's inference thread spends inside
``Scorer.score`` under saturation. The worker serves ``/metrics`` on a free local port;
``tagstream_inference_seconds_sum`` is scraped at every progress check (twice a second),
and busy = its growth / the wall time between the first check that sees outputs and the
last one before all outputs are in (the input is all there beforehand, so the worker is
saturated in between). Near 100 %: the model is the bottleneck; far below: the rest of
the pipeline is. ``n/a`` when the scrapes failed or the run was too short for two.

``--profile`` attaches py-spy to the ``noop`` worker and prints where its CPU time goes
(per function, self and inclusive, all threads); the raw stacks go to the results folder.

Run from the repository root: ``python -m bench.pipeline [--events N] [--event-bytes N]
[--scenarios ceiling,noop,nli] [--bootstrap HOST:PORT] [--out DIR] [--profile]``. It
starts (and stops) its own broker on free ports unless ``--bootstrap`` names one.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from bench.common import (
    ADMIN_TIMEOUT_S,
    LABELS,
    MAX_EVENT_BYTES,
    MIN_EVENT_BYTES,
    READ_BATCH,
    RESULTS,
    InputWritten,
    Topics,
    broker,
    check_alive,
    free_port,
    machine_info,
    metric_value,
    percentile,
    print_table,
    produce_events,
    read_topic,
    scrape_metrics,
    start_worker,
    stop_worker,
    unique,
    worker_env,
    write_report,
)
from worker.config.settings import DEFAULT_COMMIT_INTERVAL_MS, KafkaSettings, TaggingSettings
from worker.contract.codec import decode_input, encode_output, to_request
from worker.contract.deadletter import source_headers
from worker.contract.scorer import LabelScores
from worker.kafka.config import consumer_config, producer_config
from worker.kafka.records import InputRecord
from worker.pipeline.worker import POLL_MAX_RECORDS
from worker.scoring.noop import NoopScorer

REPO = Path(__file__).resolve().parents[1]

SCENARIOS: Final = ("ceiling", "steps", "noop", "noop-eos", "latency", "nli")
# The two delivery modes the latency scenario compares, by the scenario that sets them up.
LATENCY_MODES: Final = ("noop", "noop-eos")
EXACTLY_ONCE: Final = {"TAGSTREAM_PROCESSING_GUARANTEE": "exactly-once"}
DEFAULT_EVENTS: Final = 200_000
# The tiny NLI model scores ~1-3k events/s on 2 cores: 20k events keep that run near 10-20 s.
DEFAULT_NLI_EVENTS: Final = 20_000
DEFAULT_PARTITIONS: Final = 8
# Latency scenario: an open-loop load at this share of the slower mode's measured maximum
# (saturated, every event waits behind the backlog and latency is only the run's length),
# for this long, the first seconds left out as in bench/latency.py.
DEFAULT_LATENCY_FRACTION: Final = 0.5
DEFAULT_LATENCY_SECONDS: Final = 20.0
DEFAULT_LATENCY_WARMUP_S: Final = 3.0
LATENCY_PERCENTILES: Final = (0.5, 0.95, 0.99)
NOOP_SCORER: Final = "worker.scoring.noop:NoopScorer"
# Ceiling loop: poll timeout while waiting for input, as the worker's idle poll.
CEILING_POLL_S: Final = 0.1
# A run that makes no progress for this long has failed (broker or worker stuck).
STALL_TIMEOUT_S: Final = 120.0
# Progress and completion checks while a worker runs.
PROGRESS_EVERY_S: Final = 0.5
# The output reader's wait for more records at each check: short, it drains what is there.
TAIL_POLL_S: Final = 0.05
# Longest one progress check reads outputs before it reports the count so far.
TAIL_READ_BUDGET_S: Final = 0.25
PRINT_EVERY_S: Final = 10.0
# py-spy: samples per second (low enough not to slow the worker noticeably; --nonblocking
# reads the stacks without stopping the process).
PROFILE_RATE_HZ: Final = 97
PROFILE_TOP: Final = 30
# The worker's histogram of Scorer.score durations (worker/observability/metrics.py).
INFERENCE_METRIC: Final = "tagstream_inference_seconds"
# The worker's /metrics server listens on loopback only, on a free port per run.
METRICS_HOST: Final = "127.0.0.1"
# What the small events of today weigh, for the report (value bytes vary with the id).
SMALL_EVENTS: Final = "small (~110 bytes)"
# MB/s of input are decimal megabytes.
BYTES_PER_MB: Final = 1_000_000


@dataclass
class Result:
    scenario: str
    events: int
    outputs: int
    dead_letters: int
    duplicates: int | None
    span_s: float
    events_per_s: float
    to_commit_s: float | None
    exit_code: int | None
    # CPU seconds (user + system, all threads) the consume-produce process spent per event
    # while outputs were being written: robust to other work sharing the machine.
    cpu_us_per_event: float | None = None
    note: str = ""
    # Mean size of the input values (JSON, bytes) and events/s times that, in MB/s.
    value_bytes_mean: float | None = None
    input_mb_per_s: float | None = None
    # Worker runs: the inference thread's share of wall time in Scorer.score, the window
    # it was measured over and the batches scored in it; None where not measured.
    busy_percent: float | None = None
    busy_window_s: float | None = None
    busy_batches: int | None = None


# -- (a) the Kafka ceiling -----------------------------------------------------------------


class CeilingLoop:
    """Consume, produce unchanged, commit acknowledged offsets: nothing else.

    Committing ``max acknowledged offset + 1`` per input partition is correct here because
    every record of an input partition goes to one output partition (the same keys and the
    same partition count), where the idempotent producer acknowledges in order.
    """

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        kafka = KafkaSettings(
            bootstrap_servers=bootstrap,
            input_topics=[topics.input],
            output_topic=topics.output,
            group_id=topics.group,
            client_id="bench-ceiling",
        )
        self.topics = topics
        self.consumer = Consumer(consumer_config(kafka))
        self.producer = Producer(producer_config(kafka))
        self.acked: dict[int, int] = {}
        self.done = 0
        self.failed: list[str] = []
        # Set (by a signal handler) to end run() before ``events`` are done.
        self.stopping = False

    def _delivered(self, partition: int, offset: int, error: KafkaError | None, _msg: Any) -> None:
        if error is not None:
            self.failed.append(error.str())
            return
        self.done += 1
        if offset >= self.acked.get(partition, -1):
            self.acked[partition] = offset + 1

    def _poll(self) -> list[Message]:
        """Up to 500 records as the worker polls them: wait for the first only, then take
        what is already there (``consume(500, timeout)`` alone would wait for all 500 or
        the whole timeout, which costs nothing saturated but is latency under a load)."""
        first = self.consumer.consume(1, CEILING_POLL_S)
        if not first:
            return first
        return first + self.consumer.consume(POLL_MAX_RECORDS - 1, 0)

    def outputs(self, messages: list[Message]) -> Iterator[tuple[Message, Any, Any]]:
        """Each polled record with the value and headers to produce: unchanged here."""
        for message in messages:
            if message.error() is None:
                yield message, message.value(), message.headers()

    def _commit(self, *, wait: bool) -> None:
        if not self.acked:
            return
        offsets = [TopicPartition(self.topics.input, p, o) for p, o in self.acked.items()]
        if wait:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        else:
            self.consumer.commit(offsets=offsets, asynchronous=True)

    def run(self, events: int) -> tuple[float, float]:
        """Until every event is acknowledged; (first consumed, last acknowledged) times."""
        self.consumer.subscribe([self.topics.input])
        out = self.topics.output
        interval = DEFAULT_COMMIT_INTERVAL_MS / 1000
        next_commit = time.monotonic() + interval
        first: float | None = None
        last_progress, last_done = time.monotonic(), 0
        while self.done < events and not self.stopping:
            messages = self._poll()
            if messages and first is None:
                first = time.time()
            for message, value, headers in self.outputs(messages):
                partition, offset = message.partition(), message.offset()
                if partition is None or offset is None:
                    continue
                callback = functools.partial(self._delivered, partition, offset)
                while True:
                    try:
                        self.producer.produce(
                            out,
                            value=value,
                            key=message.key(),
                            headers=headers,
                            on_delivery=callback,
                        )
                        break
                    except BufferError:
                        self.producer.poll(0.01)
            self.producer.poll(0)
            now = time.monotonic()
            if now >= next_commit:
                next_commit = now + interval
                self._commit(wait=False)
            if self.done != last_done:
                last_progress, last_done = now, self.done
            elif now - last_progress > STALL_TIMEOUT_S or self.failed:
                raise SystemExit(f"ceiling loop stalled at {self.done}: {self.failed[:3]}")
        last = time.time()
        self._commit(wait=True)
        self.consumer.close()
        self.producer.flush(ADMIN_TIMEOUT_S)
        return first or last, last


class StepsLoop(CeilingLoop):
    """The ceiling loop doing the worker's own per-record work, on one thread: per poll,
    decode and validate every record (``decode_input``), build its request, estimate its
    tokens and score the poll's requests in one call (the no-model scorer), then encode
    each output (``encode_output``) with the worker's source headers. What is left out
    against ``noop`` is the worker's architecture: the second thread and its handoff, the
    batcher, offset tracking, delivery bookkeeping, metrics, health."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        super().__init__(bootstrap, topics)
        self.tagging = TaggingSettings(labels=list(LABELS))
        self.scorer = NoopScorer()

    def outputs(self, messages: list[Message]) -> Iterator[tuple[Message, Any, Any]]:
        tagging, scorer = self.tagging, self.scorer
        records = [InputRecord.from_message(m) for m in messages if m.error() is None]
        events = [decode_input(record.value, tagging) for record in records]
        requests = [to_request(event, tagging) for event in events]
        for request in requests:
            scorer.estimate_tokens(request)
        outcomes = scorer.score(requests)
        scored_at = datetime.now(UTC)
        info = scorer.info
        for message, record, event, request, outcome in zip(
            messages, records, events, requests, outcomes, strict=True
        ):
            assert isinstance(outcome, LabelScores)
            value = encode_output(event, request, outcome, record, tagging, info, scored_at)
            yield message, value, source_headers(record)


def write_input(bootstrap: str, topic: str, events: int, event_bytes: int | None) -> InputWritten:
    written = produce_events(bootstrap, topic, events, event_bytes)
    print(
        f"  {events:,} input events ({written.mean_value_bytes:,.0f} bytes each on average) "
        f"written in {written.seconds:.1f} s",
        flush=True,
    )
    return written


def add_input_rate(result: Result, written: InputWritten) -> None:
    """The mean input value size and the MB/s of input it makes at the measured rate."""
    result.value_bytes_mean = round(written.mean_value_bytes, 1)
    result.input_mb_per_s = round(result.events_per_s * written.mean_value_bytes / BYTES_PER_MB, 3)


def run_ceiling(
    bootstrap: str,
    events: int,
    partitions: int,
    event_bytes: int | None = None,
    *,
    scenario: str = "ceiling",
    loop: type[CeilingLoop] = CeilingLoop,
) -> Result:
    topics = Topics.create(bootstrap, scenario, partitions)
    written = write_input(bootstrap, topics.input, events, event_bytes)
    cpu_before = time.process_time()
    first, last = loop(bootstrap, topics).run(events)
    cpu = time.process_time() - cpu_before
    committed = time.time()
    output = read_topic(bootstrap, topics.output, partitions)
    result = _result(
        scenario,
        events,
        output.timestamps,
        dead_letters=0,
        duplicates=None,
        committed_wall=committed,
        exit_code=None,
    )
    result.cpu_us_per_event = round(cpu / events * 1e6, 2)
    add_input_rate(result, written)
    result.note = (
        f"in-process clock: first consumed -> last acknowledged {last - first:.2f} s, "
        f"{(events - 1) / (last - first):,.0f} events/s"
    )
    return result


# -- (b), (c) the worker -------------------------------------------------------------------


class Progress:
    """Watches a run from outside: the outputs a downstream reader sees, committed offsets of
    the group.

    Outputs are counted by reading the output topic as a ``read_committed`` consumer, not by
    its end offsets: in exactly-once mode every transaction writes markers (one offset per
    partition it touched) and aborted records occupy offsets too, and neither is ever read.
    With ``visibility`` it also keeps, for every output, its input's timestamp and the wall
    time (ms) this reader got it: the end-to-end latency a downstream consumer sees.
    """

    def __init__(self, bootstrap: str, topics: Topics, *, visibility: bool = False) -> None:
        self.topics = topics
        self._peek = Consumer({"bootstrap.servers": bootstrap, "group.id": topics.group})
        self._tail = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("bench-tail"),
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        self._tail.assign([TopicPartition(topics.output, p, 0) for p in range(topics.partitions)])
        self._input_ends: dict[int, int] | None = None
        self._count = 0
        self._visibility = visibility
        # (input timestamp ms, ms this reader got the output) per output, with visibility.
        self.visible: list[tuple[int, int]] = []
        # With visibility the reader runs on its own thread all along, so that the moment it
        # gets an output does not wait for the next check (an open loop checks only after).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        if visibility:
            self._reader = threading.Thread(target=self._read_until_closed, daemon=True)
            self._reader.start()

    def _ends(self, topic: str) -> dict[int, int]:
        """Log end offsets; retried while a new topic's leaders are still being elected."""
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while True:
            try:
                return {
                    p: self._peek.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=ADMIN_TIMEOUT_S, cached=False
                    )[1]
                    for p in range(self.topics.partitions)
                }
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(PROGRESS_EVERY_S)

    def outputs(self) -> int:
        """Outputs a read_committed reader has seen so far (without visibility: reads what
        has arrived first)."""
        if self._reader is None:
            # Bounded: while the worker writes, there is always more within TAIL_POLL_S, and
            # an unbounded read would return only once the run is over (no CPU or busy
            # sample in between).
            deadline = time.monotonic() + TAIL_READ_BUDGET_S
            while self._read_once() and time.monotonic() < deadline:
                pass
        with self._lock:
            return self._count

    def _read_until_closed(self) -> None:
        while not self._stop.is_set():
            self._read_once()

    def _read_once(self) -> bool:
        """One batch of outputs, if any arrived within :data:`TAIL_POLL_S`."""
        messages = self._tail.consume(READ_BATCH, TAIL_POLL_S)
        seen_ms = int(time.time() * 1000)
        read = [message for message in messages if message.error() is None]
        visible = [
            (int(orjson.loads(message.value() or b"{}")["source"]["timestamp"]), seen_ms)
            for message in read
            if self._visibility
        ]
        with self._lock:
            self._count += len(read)
            self.visible.extend(visible)
        return bool(messages)

    def committed_at_end(self) -> bool:
        if self._input_ends is None:
            self._input_ends = self._ends(self.topics.input)
        partitions = [TopicPartition(self.topics.input, p) for p in range(self.topics.partitions)]
        committed = self._peek.committed(partitions, timeout=ADMIN_TIMEOUT_S)
        return all(tp.offset == self._input_ends[tp.partition] for tp in committed)

    def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join()
        self._peek.close()
        self._tail.close()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BusySample(NamedTuple):
    """One scrape of the worker's inference histogram, with the outputs seen just before."""

    wall_s: float  # time.monotonic() half-way through the scrape
    outputs: int
    inference_s: float  # tagstream_inference_seconds_sum
    batches: float  # tagstream_inference_seconds_count


class Busy(NamedTuple):
    """The inference thread's busy fraction over a saturated window."""

    fraction: float
    window_s: float
    batches: int


class BusyProbe:
    """Scrapes the worker's /metrics; a failed scrape is skipped (and counted)."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.samples: list[BusySample] = []
        self.failures = 0

    def sample(self, outputs: int) -> None:
        if self.port is None:
            return
        before = time.monotonic()
        text = scrape_metrics(self.port, METRICS_HOST)
        wall = (before + time.monotonic()) / 2
        total = None if text is None else metric_value(text, f"{INFERENCE_METRIC}_sum")
        count = None if text is None else metric_value(text, f"{INFERENCE_METRIC}_count")
        if total is None or count is None:
            self.failures += 1
            return
        self.samples.append(BusySample(wall, outputs, total, count))


def busy_fraction(samples: Sequence[BusySample], events: int) -> Busy | None:
    """Growth of the inference time over wall time, from the first sample that saw outputs
    to the last one before all ``events`` outputs were in (the saturated stretch); to the
    first one after, when the run was too short for two inside. None without two samples."""
    started = [s for s in samples if s.outputs > 0]
    saturated = [s for s in started if s.outputs < events]
    if len(saturated) >= 2:
        first, last = saturated[0], saturated[-1]
    elif len(started) >= 2:
        first, last = started[0], started[1]
    else:
        return None
    window = last.wall_s - first.wall_s
    if window <= 0:
        return None
    fraction = (last.inference_s - first.inference_s) / window
    return Busy(fraction, window, round(last.batches - first.batches))


def wait_for_worker(
    progress: Progress,
    process: subprocess.Popen[bytes],
    log_path: Path,
    events: int,
    probe: BusyProbe | None = None,
) -> tuple[float, float | None]:
    """Until the group's committed offsets reach the input's end; the wall time then, and
    the worker's CPU µs per event from its first outputs to then. ``probe`` samples the
    worker's metrics at every check while outputs are coming in."""
    last_change, last_count, last_print = time.monotonic(), -1, 0.0
    cpu_start: tuple[float, int] | None = None
    while True:
        check_alive(process, log_path)
        count = progress.outputs()
        now = time.monotonic()
        if probe is not None and count > 0 and count != last_count:
            probe.sample(count)
        if cpu_start is None and count > 0:
            cpu_start = (process_cpu_s(process.pid), count)
        if count >= events and progress.committed_at_end():
            cpu_us = None
            if cpu_start is not None and count > cpu_start[1]:
                spent = process_cpu_s(process.pid) - cpu_start[0]
                cpu_us = round(spent / (count - cpu_start[1]) * 1e6, 2)
            return time.time(), cpu_us
        if count != last_count:
            last_change, last_count = now, count
        elif now - last_change > STALL_TIMEOUT_S:
            raise SystemExit(f"no progress for {STALL_TIMEOUT_S:.0f} s at {count} outputs")
        if now - last_print >= PRINT_EVERY_S:
            last_print = now
            print(f"    {count:,} / {events:,} outputs", flush=True)
        time.sleep(PROGRESS_EVERY_S)


@dataclass(frozen=True)
class WorkerRun:
    """One ``tagstream run`` scenario: its name, input size and worker settings."""

    scenario: str
    events: int
    settings: dict[str, str]
    profile_to: Path | None = None
    # The checkout whose worker runs (--worker-root, to compare two versions).
    root: Path = REPO
    # Size of each input event's JSON value (bytes); None: the small events.
    event_bytes: int | None = None


def metrics_settings(settings: dict[str, str]) -> dict[str, str]:
    """``settings`` with the worker's /metrics server on a free loopback port (unless they
    name a port themselves)."""
    return {
        "TAGSTREAM_METRICS_HOST": METRICS_HOST,
        "TAGSTREAM_METRICS_PORT": str(free_port()),
        **settings,
    }


def metrics_port(env: dict[str, str]) -> int | None:
    """The port the worker's /metrics server will listen on; None when it is off."""
    try:
        port = int(env.get("TAGSTREAM_METRICS_PORT", ""))
    except ValueError:
        return None
    return port if port > 0 else None


def run_worker(bootstrap: str, partitions: int, run: WorkerRun, logs: Path) -> Result:
    topics = Topics.create(bootstrap, run.scenario, partitions)
    written = write_input(bootstrap, topics.input, run.events, run.event_bytes)
    log_path = logs / f"worker-{run.scenario}.log"
    env = worker_env(bootstrap, topics, metrics_settings(run.settings), run.root)
    process = start_worker(env, log_path, run.root)
    profiler = None if run.profile_to is None else _attach_profiler(process.pid, run.profile_to)
    progress = Progress(bootstrap, topics)
    probe = BusyProbe(metrics_port(env))
    try:
        committed, cpu_us = wait_for_worker(progress, process, log_path, run.events, probe)
    finally:
        progress.close()
        if profiler is not None:
            _detach_profiler(profiler)
        code = stop_worker(process, log_path)
    output = read_topic(bootstrap, topics.output, partitions)
    dead = read_topic(bootstrap, topics.dead_letter, 1)
    result = _result(
        run.scenario,
        run.events,
        output.timestamps,
        dead_letters=dead.count,
        duplicates=output.count - len(output.coordinates),
        committed_wall=committed,
        exit_code=code,
    )
    result.cpu_us_per_event = cpu_us
    add_input_rate(result, written)
    add_busy(result, probe, run.events)
    return result


def add_busy(result: Result, probe: BusyProbe, events: int) -> None:
    busy = busy_fraction(probe.samples, events)
    if busy is None:
        print(
            f"  busy %: n/a ({len(probe.samples)} scrapes of /metrics, {probe.failures} failed)",
            flush=True,
        )
        return
    result.busy_percent = round(100 * busy.fraction, 1)
    result.busy_window_s = round(busy.window_s, 2)
    result.busy_batches = busy.batches


def _result(
    scenario: str,
    events: int,
    timestamps: list[int],
    *,
    dead_letters: int,
    duplicates: int | None,
    committed_wall: float,
    exit_code: int | None,
) -> Result:
    first, last = min(timestamps), max(timestamps)
    span = (last - first) / 1000
    return Result(
        scenario=scenario,
        events=events,
        outputs=len(timestamps),
        dead_letters=dead_letters,
        duplicates=duplicates,
        span_s=round(span, 3),
        events_per_s=round((len(timestamps) - 1) / span, 1) if span > 0 else float("nan"),
        to_commit_s=round(committed_wall - first / 1000, 2),
        exit_code=exit_code,
    )


# -- (d) latency, at-least-once against exactly-once ---------------------------------------


@dataclass
class LatencyResult:
    """One delivery mode under an open-loop load: end-to-end latency percentiles (ms).

    ``p*_ms``: input append (LogAppendTime) -> the moment a read_committed reader in this
    process got the output: what a downstream consumer sees (in exactly-once mode, at the
    commit). ``append_p99_ms``: to the output's own append time instead, as bench/latency.py
    measures (an exactly-once output is appended before its transaction commits).
    """

    scenario: str
    rate: float
    seconds: float
    events: int
    measured: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    append_p99_ms: float


def latency_rate(results: Sequence[Result], fraction: float, given: float | None) -> float:
    """The open-loop rate: ``given``, else ``fraction`` of the slower measured mode."""
    if given is not None:
        return given
    measured = [r.events_per_s for r in results if r.scenario in LATENCY_MODES]
    if not measured:
        raise SystemExit("the latency scenario needs noop or noop-eos before it, or --latency-rate")
    return fraction * min(measured)


def run_latency(
    bootstrap: str, scenario: str, settings: dict[str, str], rate: float, args: argparse.Namespace
) -> LatencyResult:
    """A fresh worker in one delivery mode under an open-loop ``rate`` (bench/latency.py)."""
    from bench import latency  # at run time: bench.latency imports this module

    run = latency.OpenLoop(
        f"{scenario}-latency",
        settings,
        [(args.latency_fraction, rate)],
        args.latency_seconds,
        args.partitions,
        args.out or RESULTS,
        args.worker_root or REPO,
    )
    measured = latency.measure(bootstrap, run)
    warmup = args.latency_warmup_s
    visible = latency.phase_latencies(measured.visible, measured.phases, warmup)[0]
    appended = latency.phase_latencies(
        latency.appended(bootstrap, measured.topics), measured.phases, warmup
    )[0]
    p50, p95, p99 = (percentile(visible, q) for q in LATENCY_PERCENTILES)
    phase = measured.phases[0]
    return LatencyResult(
        scenario=scenario,
        rate=round(rate, 1),
        seconds=args.latency_seconds,
        events=phase.sent,
        measured=len(visible),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        max_ms=visible[-1] if visible else float("nan"),
        append_p99_ms=percentile(appended, LATENCY_PERCENTILES[-1]),
    )


def print_latency(results: Sequence[LatencyResult]) -> None:
    print("\nend-to-end latency, ms (input append -> read_committed reader got the output)")
    print_table(
        ["mode", "rate", "events", "measured", "p50", "p95", "p99", "max", "p99 to append"],
        [
            [
                r.scenario,
                r.rate,
                r.events,
                r.measured,
                r.p50_ms,
                r.p95_ms,
                r.p99_ms,
                r.max_ms,
                r.append_p99_ms,
            ]
            for r in results
        ],
    )


# -- profiling -----------------------------------------------------------------------------


def _attach_profiler(pid: int, raw_path: Path) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        raise SystemExit("--profile needs py-spy: pip install -e '.[bench]'")
    command = [
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(PROFILE_RATE_HZ),
        "--nonblocking",
        "--function",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(raw_path),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _detach_profiler(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        profiler.wait(60)
    except subprocess.TimeoutExpired:
        profiler.kill()


def _frame_name(frame: str) -> str:
    """``encode_scored_event (worker/tagging.py:230)`` -> short, path from site-packages."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def summarize_profile(raw_path: Path, top: int = PROFILE_TOP) -> dict[str, Any]:
    """Self and inclusive sample shares per function, and per thread, from py-spy's raw
    (collapsed-stack) output."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], [_frame_name(f) for f in frames[1:]]
        total += count
        threads[thread] += count
        if frames:
            self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 2)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "rate_hz": PROFILE_RATE_HZ,
        "threads_percent": share(threads),
        "self_percent": share(self_counts),
        "inclusive_percent": share(inclusive),
    }


def print_profile(summary: dict[str, Any]) -> None:
    print(f"\nprofile of the noop worker: {summary['samples']} samples (on-CPU, all threads)")
    for title, key in (("thread", "threads_percent"), ("self", "self_percent")):
        print(f"\n{title:>8} %  function")
        for name, percent in summary[key]:
            print(f"{percent:10.2f}  {name}")
    print("\ninclusive %  function")
    for name, percent in summary["inclusive_percent"]:
        print(f"{percent:10.2f}  {name}")


# -- main ----------------------------------------------------------------------------------


def busy_note(result: Result) -> str:
    if result.busy_percent is None:
        return ""
    return f", inference busy {result.busy_percent:.1f} % of {result.busy_window_s:.2f} s"


def busy_cell(result: Result) -> object:
    """The busy % of a worker run, ``n/a`` where it could not be measured; blank for the
    ceiling loop (it has no inference thread)."""
    if result.scenario == "ceiling":
        return None
    return "n/a" if result.busy_percent is None else result.busy_percent


def print_results(results: Sequence[Result]) -> None:
    print_table(
        [
            "scenario",
            "events",
            "event B",
            "events/s",
            "MB/s",
            "busy %",
            "span s",
            "to commit s",
            "CPU µs/event",
            "dead",
            "dupes",
            "exit",
        ],
        [
            [
                r.scenario,
                r.outputs,
                r.value_bytes_mean,
                r.events_per_s,
                r.input_mb_per_s,
                busy_cell(r),
                r.span_s,
                r.to_commit_s,
                r.cpu_us_per_event,
                r.dead_letters,
                r.duplicates,
                r.exit_code,
            ]
            for r in results
        ],
    )


def tiny_nli_model(directory: Path) -> Path:
    from tests.support.models import build_tiny_bart

    return build_tiny_bart(directory / "tiny-bart")


def nli_settings(scratch: Path, extra: dict[str, str]) -> dict[str, str]:
    return {
        "TAGSTREAM_SCORER": "nli",
        "TAGSTREAM_MODEL": str(tiny_nli_model(scratch)),
        "TAGSTREAM_DEVICE": "cpu",
        "TAGSTREAM_DTYPE": "float32",
        **extra,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def scenarios(value: str) -> list[str]:
        chosen = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(chosen) - set(SCENARIOS))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown scenario(s): {', '.join(unknown)}")
        return chosen

    def event_bytes(value: str) -> int:
        size = int(value)
        if not MIN_EVENT_BYTES <= size <= MAX_EVENT_BYTES:
            raise argparse.ArgumentTypeError(
                f"expected {MIN_EVENT_BYTES} .. {MAX_EVENT_BYTES} bytes, got {size}"
            )
        return size

    def setting(value: str) -> tuple[str, str]:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError("expected NAME=VALUE, e.g. max_batch_size=128")
        return f"TAGSTREAM_{key.upper()}", val

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--nli-events", type=int, default=DEFAULT_NLI_EVENTS)
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)
    parser.add_argument(
        "--event-bytes",
        type=event_bytes,
        default=None,
        metavar="N",
        help="each input event's JSON value about N bytes (default: small, ~110 bytes)",
    )
    parser.add_argument("--scenarios", type=scenarios, default=list(SCENARIOS))
    parser.add_argument(
        "--set",
        type=setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a worker setting for the noop and nli runs, e.g. max_batch_size=128",
    )
    parser.add_argument(
        "--latency-fraction",
        type=float,
        default=DEFAULT_LATENCY_FRACTION,
        help="latency scenario: open-loop rate as a share of the slower mode's events/s",
    )
    parser.add_argument(
        "--latency-rate", type=float, default=None, help="latency scenario: this rate instead"
    )
    parser.add_argument("--latency-seconds", type=float, default=DEFAULT_LATENCY_SECONDS)
    parser.add_argument("--latency-warmup-s", type=float, default=DEFAULT_LATENCY_WARMUP_S)
    parser.add_argument("--bootstrap", default=None, help="reuse this broker (host:port)")
    parser.add_argument("--profile", action="store_true", help="py-spy the noop worker")
    parser.add_argument(
        "--worker-root",
        type=Path,
        default=None,
        help="run the worker package of this checkout (to compare two versions)",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"results folder ({RESULTS})")
    parser.add_argument("--name", default="pipeline", help="results file name (no .json)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(args.set)
    machine = machine_info()
    results: list[Result] = []
    latencies: list[LatencyResult] = []
    profile: dict[str, Any] | None = None
    with (
        tempfile.TemporaryDirectory(prefix="tagstream-bench-") as scratch,
        broker(args.bootstrap) as bootstrap,
    ):
        root = args.worker_root or REPO
        profile_to = out / "profile-noop.raw" if args.profile else None
        noop = {"TAGSTREAM_SCORER": NOOP_SCORER, **extra}
        runs: dict[str, Callable[[], Result]] = {
            "ceiling": lambda: run_ceiling(
                bootstrap, args.events, args.partitions, args.event_bytes
            ),
            "steps": lambda: run_ceiling(
                bootstrap,
                args.events,
                args.partitions,
                args.event_bytes,
                scenario="steps",
                loop=StepsLoop,
            ),
            "noop": lambda: run_worker(
                bootstrap,
                args.partitions,
                WorkerRun("noop", args.events, noop, profile_to, root, args.event_bytes),
                out,
            ),
            "noop-eos": lambda: run_worker(
                bootstrap,
                args.partitions,
                WorkerRun(
                    "noop-eos",
                    args.events,
                    {**noop, **EXACTLY_ONCE},
                    None,
                    root,
                    args.event_bytes,
                ),
                out,
            ),
            "nli": lambda: run_worker(
                bootstrap,
                args.partitions,
                WorkerRun(
                    "nli",
                    args.nli_events,
                    nli_settings(Path(scratch), extra),
                    None,
                    root,
                    args.event_bytes,
                ),
                out,
            ),
        }
        modes = {"noop": noop, "noop-eos": {**noop, **EXACTLY_ONCE}}
        for scenario in args.scenarios:
            print(f"\n[{scenario}]", flush=True)
            if scenario == "latency":
                rate = latency_rate(results, args.latency_fraction, args.latency_rate)
                for mode in LATENCY_MODES:
                    latencies.append(run_latency(bootstrap, mode, modes[mode], rate, args))
                continue
            result = runs[scenario]()
            results.append(result)
            print(
                f"  {result.events_per_s:,.0f} events/s = {result.input_mb_per_s or 0:.2f} MB/s "
                f"over {result.span_s:.2f} s ({result.outputs:,} outputs){busy_note(result)} "
                f"{result.note}",
                flush=True,
            )
    if args.profile and (out / "profile-noop.raw").exists():
        profile = summarize_profile(out / "profile-noop.raw")
        print_profile(profile)
    by_name = {r.scenario: r for r in results}
    ratio = None
    if "ceiling" in by_name and "noop" in by_name:
        ratio = round(by_name["noop"].events_per_s / by_name["ceiling"].events_per_s, 3)
    print()
    print_results(results)
    if ratio is not None:
        print(f"\nnoop / ceiling = {ratio:.3f} (goal >= 0.5)")
    if latencies:
        print_latency(latencies)
    load = os.getloadavg()
    path = write_report(
        args.out,
        args.name,
        {
            "machine": machine,
            "load_average_at_end": list(load),
            "settings": {
                "events": args.events,
                "nli_events": args.nli_events,
                "partitions": args.partitions,
                "event_bytes": args.event_bytes or SMALL_EVENTS,
                "worker_settings": extra or "defaults",
                "labels_per_event": 4,
                "timestamps": "LogAppendTime on the output topic",
                "latency": {
                    "fraction": args.latency_fraction,
                    "rate": args.latency_rate or "fraction of the slower mode's events/s",
                    "seconds": args.latency_seconds,
                    "warmup_s": args.latency_warmup_s,
                    "end": "a read_committed reader in the bench process got the output",
                },
                "bootstrap": "reused" if args.bootstrap else "own broker",
                "worker_root": str(args.worker_root or REPO),
                "command": sys.argv,
            },
            "results": [asdict(r) for r in results],
            "latency": [asdict(r) for r in latencies],
            "noop_over_ceiling": ratio,
            "profile": profile,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
