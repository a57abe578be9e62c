"""Prometheus metrics of one worker, on a registry of its own.

Every metric lives on the :class:`WorkerMetrics` instance's own ``CollectorRegistry``, not the
process-global one, so tests and several workers in one process never clash. Names follow the
Prometheus conventions: ``tagstream_`` prefix, unit in the name, ``_total`` on counters.

The record counters form a ledger. Every record the consumer hands the worker is counted in
``tagstream_events_consumed_total{topic}`` and, once its fate is settled, in exactly one of

* ``tagstream_events_scored_total``: its output record was acknowledged by the broker;
* ``tagstream_events_dead_lettered_total{stage,error_class}``: its dead-letter record was
  acknowledged by the broker;
* ``tagstream_events_discarded_total{reason}``: the worker dropped it without writing anything:
  ``not_assigned`` / ``seen`` / ``stale`` (polled for a partition it does not hold, an offset it
  already received, or a record fetched under a previous assignment of its partition),
  ``revoked`` / ``lost`` (its partition went away before its result was written;
  the next owner processes it), ``shutdown`` (the worker stopped before processing it),
  ``aborted`` (exactly-once: its transaction was aborted; the input is read again).

In exactly-once mode ``scored`` and ``dead_lettered`` are counted when the transaction that
holds the record commits (only then is it visible), so they equal the visible records.

So, per worker and summed over labels, whenever no work is in flight (the input drained, or
after a graceful stop that finished within ``shutdown_timeout_s``)::

    consumed == scored + dead_lettered + discarded

A record's output that is acknowledged after its partition was revoked counts as scored: it
is in the output topic, and the next owner writes it again (at-least-once). Summed over a
fleet, ``scored`` and ``dead_lettered`` therefore equal the records written to the output and
dead-letter topics, duplicates included. After a fatal error (exit code 3) the work still in
flight is not counted.

Consumer lag comes from two sources:

* **messages** (``tagstream_consumer_lag_messages{topic,partition}``): librdkafka's statistics
  (``statistics.interval.ms`` > 0 and ``stats_cb=metrics.update_from_statistics``). The value is
  the partition's high watermark (last stable offset under ``read_committed``) minus the offset
  the worker has finished up to: librdkafka's ``consumer_lag_stored`` (hi - *stored* offset)
  when offsets are stored, else ``consumer_lag`` (hi - *committed* offset; the tagstream loop
  commits explicit offsets without storing them, so there it is the committed lag), and 0 for
  an empty partition (librdkafka reports -1 for both when nothing was ever committed).
* **seconds** (``tagstream_consumer_lag_seconds{topic,partition}``): how far behind real time
  the worker's read position is. While the partition's message lag is above 0, it is
  ``now - timestamp of the last record consumed from the partition`` (wall clock, never
  negative); it is exactly 0 once the message lag is 0 (input drained and committed). A
  partition with no statistics yet, or no timestamped record yet, has no series rather than
  a guess. Drain detection comes from the statistics, so both gauges reach 0 at most one
  statistics interval (``STATISTICS_INTERVAL_MS``) after the commit that drains the partition.

Both lag gauges are computed at scrape time and only for partitions the worker holds: a
revoked or lost partition's series disappear at once (:meth:`WorkerMetrics.record_rebalance`),
and statistics for partitions librdkafka no longer wants (``desired: false``) are dropped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable
from typing import Any, Literal

import orjson
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from worker.contract.profiles import REJECT_REASONS
from worker.contract.scorer import ModelInfo
from worker.kafka.records import PartitionKey
from worker.observability.gpu import GpuMemoryCollector, GpuMemoryProbe, torch_cuda_memory
from worker.observability.lag import LagCollector, LagTracker, parse_statistics
from worker.observability.names import metric_name

log = structlog.get_logger(__name__)

# librdkafka statistics cadence the worker should configure (``statistics.interval.ms``): one
# payload per Prometheus scrape interval (15 s default) would leave lag up to 15 s stale;
# 5 s keeps it fresh while the JSON (a few KiB per partition) stays negligible to parse.
STATISTICS_INTERVAL_MS = 5_000

# fmt: off
# Batch sizes are capped by max_batch_size (tens to a few hundred events); powers of two
# resolve both the "nearly empty" and the "full" ends of that range: 1 .. 1024.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**exp) for exp in range(11))
# Padded tokens per forward pass, bounded by max_batch_tokens (>= 64, default 16,384).
BATCH_TOKENS_BUCKETS: tuple[float, ...] = tuple(float(2**exp) for exp in range(6, 17))
# events / max_batch_size lies in 0..1; tenths show whether batches close full or on timeout.
BATCH_FILL_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# The batcher holds the first event a few ms (busy) to its max wait (idle, ~0.1-1 s).
BATCH_WAIT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# One forward pass: ~5 ms (small model, GPU) up to a minute (bart-large, full budget, CPU).
INFERENCE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# Record timestamp to acknowledged output: ~10 ms when caught up, up to an hour while
# working off a backlog (old records), so the buckets span 10 ms .. 1 h.
END_TO_END_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)
# A transaction lives one commit interval (1 s default, 0.2 s in tests) plus its drain, and
# at most transaction_timeout_ms (60 s default); its drain-and-commit takes ms to seconds.
TRANSACTION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# fmt: on

# The reasons of worker/pipeline/transactions.py:AbortReason, each exposed from the start.
TRANSACTION_ABORT_REASONS: tuple[str, ...] = (
    "produce_error",
    "fenced",
    "timeout",
    "commit_refused",
    "rebalance",
    "lost",
    "stuck",
)

# worker/contract/profiles.py's REJECT_REASONS and the changes a control record makes.
PROFILE_REJECT_REASONS: tuple[str, ...] = REJECT_REASONS
PROFILE_CHANGE_KINDS: tuple[str, ...] = ("set", "deleted")

RebalanceKind = Literal["assigned", "revoked", "lost"]
REBALANCE_KINDS: tuple[RebalanceKind, ...] = ("assigned", "revoked", "lost")


class WorkerMetrics:
    """All metrics of one worker; every method is thread-safe and cheap on the hot path.

    ``registry`` is what the ``/metrics`` endpoint serves. ``clock`` is the wall clock used for
    lag and end-to-end latency against record timestamps (epoch milliseconds), so it must be
    ``time.time``-like, not monotonic. ``gpu_memory_probe`` defaults to torch's CUDA allocator.
    ``process_metrics`` adds the standard process/python/gc collectors to the registry.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
        gpu_memory_probe: GpuMemoryProbe = torch_cuda_memory,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lag = LagTracker(clock)
        self._define_counters()
        self._define_histograms()
        self._define_gauges()
        self.registry.register(LagCollector(self._lag))
        self.registry.register(GpuMemoryCollector(gpu_memory_probe))
        if process_metrics:
            self._register_process_collectors()

    # -- definitions -------------------------------------------------------------------------

    def _define_counters(self) -> None:
        reg = self.registry
        self._consumed = Counter(
            metric_name("events_consumed"),
            "Records read from the input topics.",
            ["topic"],
            registry=reg,
        )
        self._scored = Counter(
            metric_name("events_scored"),
            "Scored events whose output the broker acknowledged.",
            registry=reg,
        )
        self._dead_lettered = Counter(
            metric_name("events_dead_lettered"),
            "Dead-letter records the broker acknowledged, by failing stage and error class.",
            ["stage", "error_class"],
            registry=reg,
        )
        self._discarded = Counter(
            metric_name("events_discarded"),
            "Consumed records dropped without output or dead-letter record, by reason "
            "(not_assigned, seen, stale, revoked, lost, shutdown, aborted).",
            ["reason"],
            registry=reg,
        )
        self._produce_retries = Counter(
            metric_name("produce_retries"),
            "Produce calls retried after a transient error.",
            ["error"],
            registry=reg,
        )
        self._batches = Counter(
            metric_name("batches"),
            "Micro-batches closed, by what closed them (size, tokens, time, flush).",
            ["reason"],
            registry=reg,
        )
        self._commits = Counter(
            metric_name("offset_commits"), "Offset commits attempted.", registry=reg
        )
        self._commit_failures = Counter(
            metric_name("offset_commit_failures"), "Offset commits that failed.", registry=reg
        )
        self._transactions_committed = Counter(
            metric_name("transactions_committed"),
            "Exactly-once: transactions committed.",
            registry=reg,
        )
        self._transactions_aborted = Counter(
            metric_name("transactions_aborted"),
            "Exactly-once: transactions aborted, by reason (produce_error, fenced, timeout, "
            "commit_refused, rebalance, lost).",
            ["reason"],
            registry=reg,
        )
        self._rebalances = Counter(
            metric_name("rebalances"), "Rebalance callbacks, by kind.", ["kind"], registry=reg
        )
        self._rebalance_partitions = Counter(
            metric_name("rebalance_partitions"),
            "Partitions assigned, revoked or lost in rebalances, by kind.",
            ["kind"],
            registry=reg,
        )
        self._profile_rejected = Counter(
            metric_name("profile_records_rejected"),
            "Control records rejected and not applied, by reason (key, too_large, json, "
            "invalid, too_many).",
            ["reason"],
            registry=reg,
        )
        self._profile_changes = Counter(
            metric_name("profile_changes"),
            "Label profiles set or deleted by control records, by kind.",
            ["kind"],
            registry=reg,
        )
        for reason in PROFILE_REJECT_REASONS:
            self._profile_rejected.labels(reason=reason)
        for kind in PROFILE_CHANGE_KINDS:
            self._profile_changes.labels(kind=kind)
        for reason in TRANSACTION_ABORT_REASONS:
            self._transactions_aborted.labels(reason=reason)
        for kind in REBALANCE_KINDS:
            self._rebalances.labels(kind=kind)
            self._rebalance_partitions.labels(kind=kind)

    def _define_histograms(self) -> None:
        reg = self.registry
        self._batch_size = Histogram(
            metric_name("batch_size_events"),
            "Events per scored micro-batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self._batch_tokens = Histogram(
            metric_name("batch_tokens"),
            "Estimated tokens per scored micro-batch.",
            buckets=BATCH_TOKENS_BUCKETS,
            registry=reg,
        )
        self._batch_fill = Histogram(
            metric_name("batch_fill_ratio"),
            "Events per batch divided by max_batch_size.",
            buckets=BATCH_FILL_BUCKETS,
            registry=reg,
        )
        self._batch_wait = Histogram(
            metric_name("batch_wait_seconds"),
            "How long the first event of a batch waited for the batch to close.",
            buckets=BATCH_WAIT_BUCKETS,
            registry=reg,
        )
        self._inference = Histogram(
            metric_name("inference_seconds"),
            "Scorer time per micro-batch.",
            buckets=INFERENCE_BUCKETS,
            registry=reg,
        )
        self._end_to_end = Histogram(
            metric_name("end_to_end_latency_seconds"),
            "Record timestamp to acknowledged output (scored or dead-lettered).",
            buckets=END_TO_END_BUCKETS,
            registry=reg,
        )

        self._transaction_duration = Histogram(
            metric_name("transaction_duration_seconds"),
            "Exactly-once: a committed transaction, from its begin to its commit.",
            buckets=TRANSACTION_BUCKETS,
            registry=reg,
        )
        self._transaction_commit = Histogram(
            metric_name("transaction_commit_seconds"),
            "Exactly-once: the drain and commit of a transaction (the input waits meanwhile).",
            buckets=TRANSACTION_BUCKETS,
            registry=reg,
        )

    def _define_gauges(self) -> None:
        reg = self.registry
        self._in_flight = Gauge(
            metric_name("in_flight_batches"),
            "Micro-batches handed to the inference thread and not yet scored.",
            registry=reg,
        )
        self._paused = Gauge(
            metric_name("paused_partitions"),
            "Assigned partitions paused for backpressure.",
            registry=reg,
        )
        self._oldest_pending = Gauge(
            metric_name("oldest_pending_seconds"),
            "Age of the oldest consumed record whose output is not acknowledged yet.",
            registry=reg,
        )
        self._uncommitted_window = Gauge(
            metric_name("uncommitted_window_messages"),
            "Largest per-partition count of records a crash would replay.",
            registry=reg,
        )
        self._circuit_open = Gauge(
            metric_name("circuit_open"),
            "1 while most events fail to score (nothing dead-lettered, input paused).",
            registry=reg,
        )
        self._ready = Gauge(
            metric_name("ready"),
            "1 while /readyz answers 200 (model warmed up, profiles read, group joined, "
            "circuit closed).",
            registry=reg,
        )
        self._profiles = Gauge(
            metric_name("label_profiles"),
            "Label profiles in force (read from TAGSTREAM_CONTROL_TOPIC).",
            registry=reg,
        )
        self._assigned = Gauge(
            metric_name("assigned_partitions"),
            "Partitions assigned to this worker.",
            registry=reg,
        )
        self._model_info = Info(
            metric_name("model"), "The model that scores the events.", registry=reg
        )

    def _register_process_collectors(self) -> None:
        # prometheus_client's own instances live on the global REGISTRY; fresh ones bound to
        # this registry give the same process_/python_ series without touching global state.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    # -- counters ----------------------------------------------------------------------------

    def record_consumed(self, topic: str, n: int = 1) -> None:
        """Records handed to the worker by ``poll``/``consume`` (before any validation)."""
        self._consumed.labels(topic=topic).inc(n)

    def record_scored(self, n: int = 1) -> None:
        """Scored events whose output produce the broker acknowledged."""
        self._scored.inc(n)

    def record_dead_lettered(self, stage: str, error_class: str, n: int = 1) -> None:
        """Dead-letter records the broker acknowledged."""
        self._dead_lettered.labels(stage=stage, error_class=error_class).inc(n)

    def record_discarded(self, reason: str, n: int = 1) -> None:
        """Consumed records dropped without output or dead-letter record (see the module
        docstring for the reasons)."""
        self._discarded.labels(reason=reason).inc(n)

    def record_produce_retry(self, error: str) -> None:
        """A produce hit a transient error (``KafkaError`` name) and is retried."""
        self._produce_retries.labels(error=error).inc()

    def record_commit(self, ok: bool) -> None:
        """One offset commit attempt and whether it succeeded."""
        self._commits.inc()
        if not ok:
            self._commit_failures.inc()

    def record_transaction_committed(self, duration_s: float, commit_s: float) -> None:
        """Exactly-once: a transaction committed after ``duration_s``; its drain and commit
        took ``commit_s``."""
        self._transactions_committed.inc()
        self._transaction_duration.observe(duration_s)
        self._transaction_commit.observe(commit_s)

    def record_transaction_aborted(self, reason: str) -> None:
        """Exactly-once: a transaction was aborted for ``reason``."""
        self._transactions_aborted.labels(reason=reason).inc()

    def record_profile_rejected(self, reason: str) -> None:
        """A control record was rejected for ``reason`` and not applied."""
        self._profile_rejected.labels(reason=reason).inc()

    def record_profile_change(self, kind: str, profiles: int) -> None:
        """A control record set or deleted a profile; ``profiles`` are in force now."""
        self._profile_changes.labels(kind=kind).inc()
        self._profiles.set(profiles)

    def set_profiles(self, profiles: int) -> None:
        self._profiles.set(profiles)

    def record_rebalance(self, kind: RebalanceKind, partitions: Collection[PartitionKey]) -> None:
        """A rebalance callback; keeps ``assigned_partitions`` and the lag series in step.

        Call from ``on_assign`` ("assigned"), ``on_revoke`` ("revoked") and ``on_lost``
        ("lost") with the callback's (topic, partition) pairs; incremental (cooperative) and
        eager protocols both work. Revoked and lost partitions lose their lag series at once.
        """
        self._rebalances.labels(kind=kind).inc()
        self._rebalance_partitions.labels(kind=kind).inc(len(partitions))
        held = self._lag.assign(partitions) if kind == "assigned" else self._lag.revoke(partitions)
        self._assigned.set(held)

    # -- histograms --------------------------------------------------------------------------

    def observe_batch(
        self, size: int, tokens: int, max_batch_size: int, wait_s: float, reason: str = "unknown"
    ) -> None:
        """A micro-batch closed: its events, tokens, fill ratio, first-event wait, and why."""
        self._batches.labels(reason=reason).inc()
        self._batch_size.observe(size)
        self._batch_tokens.observe(tokens)
        if max_batch_size > 0:
            self._batch_fill.observe(size / max_batch_size)
        self._batch_wait.observe(max(0.0, wait_s))

    def observe_inference(self, seconds: float) -> None:
        """Duration of one ``Scorer.score`` call."""
        self._inference.observe(max(0.0, seconds))

    def observe_end_to_end(self, seconds: float) -> None:
        """Latency of one record from its timestamp to its acknowledged output."""
        self._end_to_end.observe(max(0.0, seconds))

    def observe_end_to_end_many(self, seconds: Iterable[float]) -> None:
        """:meth:`observe_end_to_end` of every value, as one update per bucket."""
        observe_all(self._end_to_end, (max(0.0, value) for value in seconds))

    def observe_end_to_end_since(self, timestamp_ms: int) -> None:
        """End-to-end latency of a record with this Kafka timestamp (ignored when absent)."""
        if timestamp_ms > 0:
            self.observe_end_to_end(self._clock() - timestamp_ms / 1000.0)

    # -- gauges ------------------------------------------------------------------------------

    def set_in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def track_in_flight(self, source: Callable[[], float]) -> None:
        """Sample in-flight batches at scrape time (e.g. ``lambda: handoff.in_flight``);
        exact, and later :meth:`set_in_flight` calls no longer matter."""
        self._in_flight.set_function(source)

    def set_paused(self, n: int) -> None:
        self._paused.set(n)

    def set_uncommitted_window(self, oldest_pending_s: float, largest_window: int) -> None:
        self._oldest_pending.set(oldest_pending_s)
        self._uncommitted_window.set(largest_window)

    def track_ready(self, source: Callable[[], bool]) -> None:
        """Sample readiness at scrape time (e.g. ``lambda: health.readiness().ok``), so the
        gauge and ``/readyz`` never disagree."""
        self._ready.set_function(lambda: 1.0 if source() else 0.0)

    def set_circuit_open(self, is_open: bool) -> None:
        self._circuit_open.set(1 if is_open else 0)

    def set_model_info(self, info: ModelInfo) -> None:
        self._model_info.info(
            {
                "name": info.name,
                "revision": info.revision,
                "scorer": info.scorer,
                "device": info.device,
                "dtype": info.dtype,
            }
        )

    # -- lag ---------------------------------------------------------------------------------

    def update_from_statistics(self, stats_json: str | bytes) -> None:
        """librdkafka ``stats_cb``: refresh the lag in messages of every wanted partition.

        Never raises: an exception in a confluent-kafka callback would surface from ``poll``.
        """
        try:
            lags, unwanted = parse_statistics(stats_json)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.warning("unreadable librdkafka statistics ignored", exc_info=True)
            return
        self._lag.update(lags, unwanted)

    def observe_record_timestamp(self, topic: str, partition: int, timestamp_ms: int) -> None:
        """The Kafka timestamp (epoch ms) of the last record consumed from a partition.

        Records without a timestamp (``TIMESTAMP_NOT_AVAILABLE``, -1) are ignored.
        """
        if timestamp_ms > 0:
            self._lag.observe_record((topic, partition), timestamp_ms / 1000.0)

    # -- exposition --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)


def observe_all(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe(value)`` for every value, with one locked update per bucket and
    one for the sum instead of two per value: the worker observes one latency per record.

    prometheus-client has no bulk observe, so this reads the (unlabelled) histogram's
    bucket bounds and value cells, which it keeps in private attributes; where those are
    not there (another version of the client), it observes value by value.
    ``tests/unit/observability/test_metrics.py`` checks that both give the same exposition.
    """
    bounds: list[float] | None = getattr(histogram, "_upper_bounds", None)
    buckets: list[Any] | None = getattr(histogram, "_buckets", None)
    total_cell: Any = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total_cell is None or len(buckets) != len(bounds):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        # The first bucket whose bound is >= value (the last bound is +Inf), as observe().
        counts[bisect_left(bounds, value)] += 1
        total += value
    total_cell.inc(total)
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
