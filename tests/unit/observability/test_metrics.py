"""WorkerMetrics: naming conventions, librdkafka statistics, lag in messages and seconds,
and the Observer adapter that the pipeline drives."""

from __future__ import annotations

import sys
import types

import orjson
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from tests.support.observability import (
    GPU,
    NOW_S,
    STATS_PAYLOAD,
    STATS_TOPIC,
    FakeClock,
    new_metrics,
    record_everything,
    samples,
    value,
)
from worker.config.observability import ObservabilitySettings
from worker.observability.gpu import GpuMemory, torch_cuda_memory
from worker.observability.health import HealthState
from worker.observability.lag import parse_statistics
from worker.observability.metrics import WorkerMetrics, observe_all
from worker.observability.observer import MetricsObserver
from worker.observability.setup import start_observability

# Every metric issue 5 asks for, by family name as prometheus_client reports it
# (counters without their _total suffix).
EXPECTED_FAMILIES = {
    "counter": {
        "tagstream_events_consumed",
        "tagstream_events_scored",
        "tagstream_events_dead_lettered",
        "tagstream_events_discarded",
        "tagstream_offset_commits",
        "tagstream_offset_commit_failures",
        "tagstream_rebalances",
        "tagstream_rebalance_partitions",
        "tagstream_produce_retries",
        "tagstream_batches",
    },
    "histogram": {
        "tagstream_batch_size_events",
        "tagstream_batch_tokens",
        "tagstream_batch_fill_ratio",
        "tagstream_batch_wait_seconds",
        "tagstream_inference_seconds",
        "tagstream_end_to_end_latency_seconds",
    },
    "gauge": {
        "tagstream_in_flight_batches",
        "tagstream_paused_partitions",
        "tagstream_oldest_pending_seconds",
        "tagstream_uncommitted_window_messages",
        "tagstream_circuit_open",
        "tagstream_ready",
        "tagstream_assigned_partitions",
        "tagstream_label_profiles",
        "tagstream_consumer_lag_messages",
        "tagstream_consumer_lag_seconds",
        "tagstream_gpu_memory_allocated_bytes",
        "tagstream_gpu_memory_reserved_bytes",
        "tagstream_model_info",  # an Info metric is a gauge of value 1 in the text format
    },
}
UNIT_SUFFIXES = (
    "_seconds",
    "_bytes",
    "_ratio",
    "_events",
    "_tokens",
    "_messages",
    "_partitions",
    "_batches",
    "_profiles",
    "_info",
)

# Gauges of a state, 0 or 1, which have no unit.
FLAGS = {"tagstream_circuit_open", "tagstream_ready"}


def _lag(metrics: WorkerMetrics, unit: str, partition: int) -> float | None:
    return value(
        metrics, f"tagstream_consumer_lag_{unit}", topic=STATS_TOPIC, partition=str(partition)
    )


def _payload() -> dict[str, object]:
    stats = orjson.loads(STATS_PAYLOAD.read_bytes())
    assert isinstance(stats, dict)
    return stats


def _partition(stats: dict[str, object], partition: int) -> dict[str, object]:
    topics = stats["topics"]
    assert isinstance(topics, dict)
    result = topics[STATS_TOPIC]["partitions"][str(partition)]
    assert isinstance(result, dict)
    return result


# -- naming ------------------------------------------------------------------------------


def test_every_issue_metric_is_exposed_with_prefix_units_and_total() -> None:
    metrics = new_metrics()
    record_everything(metrics)
    families = {
        family.name: family
        for family in text_string_to_metric_families(metrics.exposition().decode())
        if family.name.startswith("tagstream_")
    }
    for kind, names in EXPECTED_FAMILIES.items():
        for name in names:
            assert name in families, name
            assert families[name].type == kind, name
    for name, family in families.items():
        sample_names = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert f"{name}_total" in sample_names, name
        elif family.type == "histogram":
            assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= sample_names
            assert name.endswith(UNIT_SUFFIXES), name
        elif family.type == "gauge" and not name.endswith("_created") and name not in FLAGS:
            # (*_created: prometheus_client's creation timestamps of counters and histograms)
            assert name.endswith(UNIT_SUFFIXES), name


def test_each_instance_has_its_own_registry() -> None:
    first, second = new_metrics(), new_metrics()
    first.record_scored(5)
    assert value(first, "tagstream_events_scored_total") == 5
    assert value(second, "tagstream_events_scored_total") == 0


def test_several_default_instances_coexist_with_process_metrics() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    for metrics in (first, second):
        names = {name for name, _ in samples(metrics)}
        assert "process_cpu_seconds_total" in names or "python_info" in names


def test_model_info_carries_the_model_labels() -> None:
    metrics = new_metrics()
    record_everything(metrics)
    labels = {
        "name": "tiny-nli",
        "revision": "abc123",
        "scorer": "nli",
        "device": "cuda:0",
        "dtype": "float16",
    }
    assert value(metrics, "tagstream_model_info", **labels) == 1


def test_batch_observations_land_in_their_buckets() -> None:
    metrics = new_metrics()
    metrics.observe_batch(size=8, tokens=1_000, max_batch_size=32, wait_s=0.02, reason="size")
    assert value(metrics, "tagstream_batch_fill_ratio_sum") == 0.25
    assert value(metrics, "tagstream_batch_fill_ratio_bucket", le="0.2") == 0
    assert value(metrics, "tagstream_batch_fill_ratio_bucket", le="0.3") == 1
    assert value(metrics, "tagstream_batch_tokens_bucket", le="1024.0") == 1
    assert value(metrics, "tagstream_batch_tokens_bucket", le="512.0") == 0
    assert value(metrics, "tagstream_batches_total", reason="size") == 1


def test_end_to_end_since_uses_the_record_timestamp_and_skips_missing_ones() -> None:
    metrics = new_metrics(FakeClock(NOW_S))
    metrics.observe_end_to_end_since(int((NOW_S - 2.5) * 1000))
    metrics.observe_end_to_end_since(-1)
    assert value(metrics, "tagstream_end_to_end_latency_seconds_count") == 1
    assert value(metrics, "tagstream_end_to_end_latency_seconds_sum") == pytest.approx(2.5)


def test_commit_failures_count_separately() -> None:
    metrics = new_metrics()
    metrics.record_commit(ok=True)
    metrics.record_commit(ok=False)
    assert value(metrics, "tagstream_offset_commits_total") == 2
    assert value(metrics, "tagstream_offset_commit_failures_total") == 1


def test_in_flight_can_be_sampled_at_scrape_time() -> None:
    metrics = new_metrics()
    queue_depth = [3]
    metrics.track_in_flight(lambda: queue_depth[0])
    assert value(metrics, "tagstream_in_flight_batches") == 3
    queue_depth[0] = 0
    assert value(metrics, "tagstream_in_flight_batches") == 0


# -- GPU memory --------------------------------------------------------------------------


def test_gpu_memory_is_sampled_from_the_probe() -> None:
    metrics = new_metrics()
    assert value(metrics, "tagstream_gpu_memory_allocated_bytes", device="cuda:0") == 1_000
    assert value(metrics, "tagstream_gpu_memory_reserved_bytes", device="cuda:0") == 4_000


def test_no_gpu_series_without_cuda() -> None:
    names = {name for name, _ in samples(new_metrics(gpu=False))}
    assert not any(name.startswith("tagstream_gpu_") for name in names)


def test_default_probe_reads_torch_only_once_cuda_is_initialised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = types.SimpleNamespace(
        is_initialized=lambda: False,
        device_count=lambda: 2,
        memory_allocated=lambda index: GPU.allocated_bytes * (index + 1),
        memory_reserved=lambda index: GPU.reserved_bytes,
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert torch_cuda_memory() == []
    cuda.is_initialized = lambda: True
    devices = torch_cuda_memory()
    assert [(gpu.device, gpu.allocated_bytes) for gpu in devices] == [
        ("cuda:0", 1_000),
        ("cuda:1", 2_000),
    ]


# -- lag in messages (librdkafka statistics) -----------------------------------------------


def test_statistics_parser_reads_the_real_payload() -> None:
    lags, unwanted = parse_statistics(STATS_PAYLOAD.read_text(encoding="utf-8"))
    assert lags == {
        (STATS_TOPIC, 0): 0,  # consumer_lag_stored: drained and stored
        (STATS_TOPIC, 1): 6,  # consumer_lag: committed 4 of 10, nothing stored
        (STATS_TOPIC, 2): 0,  # empty partition, librdkafka reports -1 for both lags
    }
    assert unwanted == set()


def test_statistics_update_the_lag_gauges_without_the_internal_partition() -> None:
    metrics = new_metrics()
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    assert [_lag(metrics, "messages", p) for p in (0, 1, 2)] == [0, 6, 0]
    assert _lag(metrics, "messages", -1) is None


def test_an_unknown_lag_removes_the_series_instead_of_keeping_a_stale_value() -> None:
    metrics = new_metrics()
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    stats = _payload()
    _partition(stats, 1).update(consumer_lag=-1, consumer_lag_stored=-1)
    metrics.update_from_statistics(orjson.dumps(stats))
    assert _lag(metrics, "messages", 1) is None
    assert _lag(metrics, "messages", 0) == 0


def test_partitions_librdkafka_no_longer_wants_lose_their_series() -> None:
    metrics = new_metrics()
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    stats = _payload()
    _partition(stats, 1)["desired"] = False
    metrics.update_from_statistics(orjson.dumps(stats))
    assert _lag(metrics, "messages", 1) is None


def test_revoked_partitions_lose_their_series_even_if_stale_statistics_arrive() -> None:
    metrics = new_metrics()
    metrics.record_rebalance("assigned", [(STATS_TOPIC, p) for p in (0, 1, 2)])
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    metrics.observe_record_timestamp(STATS_TOPIC, 1, int((NOW_S - 5) * 1000))
    metrics.record_rebalance("revoked", [(STATS_TOPIC, 1)])
    assert _lag(metrics, "messages", 1) is None
    assert _lag(metrics, "seconds", 1) is None
    assert value(metrics, "tagstream_assigned_partitions") == 2
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())  # emitted before the revoke
    assert _lag(metrics, "messages", 1) is None
    assert _lag(metrics, "messages", 0) == 0


def test_lost_partitions_count_as_rebalances_and_leave_the_assignment() -> None:
    metrics = new_metrics()
    metrics.record_rebalance("assigned", [(STATS_TOPIC, 0), (STATS_TOPIC, 1)])
    metrics.record_rebalance("lost", [(STATS_TOPIC, 0), (STATS_TOPIC, 1)])
    assert value(metrics, "tagstream_assigned_partitions") == 0
    assert value(metrics, "tagstream_rebalances_total", kind="lost") == 1
    assert value(metrics, "tagstream_rebalance_partitions_total", kind="assigned") == 2


def test_unreadable_statistics_are_ignored_and_keep_the_last_values() -> None:
    metrics = new_metrics()
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    metrics.update_from_statistics("{not json")
    metrics.update_from_statistics('{"topics": {"t": {"partitions": {"0": []}}}}')
    assert _lag(metrics, "messages", 1) == 6


def test_a_failing_gpu_probe_does_not_break_the_scrape() -> None:
    def broken() -> list[GpuMemory]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    metrics = WorkerMetrics(gpu_memory_probe=broken, process_metrics=False)
    metrics.record_scored()
    assert value(metrics, "tagstream_events_scored_total") == 1


# -- lag in seconds ------------------------------------------------------------------------


def test_lag_seconds_is_the_age_of_the_last_consumed_record_while_behind() -> None:
    clock = FakeClock(NOW_S)
    metrics = new_metrics(clock)
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())  # partition 1: 6 behind
    metrics.observe_record_timestamp(STATS_TOPIC, 1, int((NOW_S - 30) * 1000))
    assert _lag(metrics, "seconds", 1) == pytest.approx(30.0)
    clock.now += 10  # still behind, nothing new consumed: the lag keeps growing
    assert _lag(metrics, "seconds", 1) == pytest.approx(40.0)


def test_lag_seconds_reaches_zero_once_the_partition_is_drained() -> None:
    clock = FakeClock(NOW_S)
    metrics = new_metrics(clock)
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    metrics.observe_record_timestamp(STATS_TOPIC, 1, int((NOW_S - 30) * 1000))
    drained = _payload()
    _partition(drained, 1).update(committed_offset=10, consumer_lag=0)
    metrics.update_from_statistics(orjson.dumps(drained))
    clock.now += 60
    assert _lag(metrics, "messages", 1) == 0
    assert _lag(metrics, "seconds", 1) == 0


def test_lag_seconds_has_no_series_without_a_record_timestamp() -> None:
    metrics = new_metrics()
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    metrics.observe_record_timestamp(STATS_TOPIC, 1, -1)  # TIMESTAMP_NOT_AVAILABLE
    assert _lag(metrics, "seconds", 1) is None
    assert _lag(metrics, "seconds", 0) == 0  # drained partitions are 0 regardless


def test_lag_seconds_is_never_negative_under_clock_skew() -> None:
    metrics = new_metrics(FakeClock(NOW_S))
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    metrics.observe_record_timestamp(STATS_TOPIC, 1, int((NOW_S + 5) * 1000))
    assert _lag(metrics, "seconds", 1) == 0


# -- the Observer adapter ------------------------------------------------------------------


class _Record:
    def __init__(self, topic: str, partition: int, timestamp_ms: int | None) -> None:
        self.topic, self.partition, self.timestamp_ms = topic, partition, timestamp_ms
        self.offset = 0


def test_observer_keeps_the_ledger_consumed_equals_scored_dead_lettered_discarded() -> None:
    metrics = new_metrics()
    observer = MetricsObserver(metrics, max_batch_size=4)
    observer.records_consumed(
        [_Record("a", 0, 1), _Record("a", 0, 2), _Record("b", 0, None), _Record("a", 1, 3)]
    )
    observer.deliveries_acked(2, 2, [0.5])
    observer.record_dead_lettered("validate", "ValidateError")
    observer.deliveries_acked(1, 0, [0.7])
    observer.record_discarded(("a", 1), "seen")
    consumed = sum(
        value(metrics, "tagstream_events_consumed_total", topic=topic) or 0 for topic in "ab"
    )
    scored = value(metrics, "tagstream_events_scored_total") or 0
    dead_lettered = (
        value(
            metrics,
            "tagstream_events_dead_lettered_total",
            stage="validate",
            error_class="ValidateError",
        )
        or 0
    )
    discarded = value(metrics, "tagstream_events_discarded_total", reason="seen") or 0
    assert consumed == 4
    assert scored + dead_lettered + discarded == consumed
    assert value(metrics, "tagstream_end_to_end_latency_seconds_count") == 2


def _histogram_samples(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for metric in histogram.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    ]


@pytest.mark.parametrize(
    "values",
    [
        [],
        [0.0, 0.01, 0.0100001, 0.3, 0.3, 7.0, 1e9],
        [float(i) / 7 for i in range(200)],
        [0.025] * 5,
    ],
)
def test_observing_many_values_at_once_equals_observing_each(values: list[float]) -> None:
    buckets = (0.01, 0.025, 0.05, 0.5, 5.0)
    one_by_one = Histogram("one", "one", buckets=buckets, registry=CollectorRegistry())
    for amount in values:
        one_by_one.observe(amount)
    at_once = Histogram("one", "one", buckets=buckets, registry=CollectorRegistry())
    observe_all(at_once, values)
    got, expected = _histogram_samples(at_once), _histogram_samples(one_by_one)
    assert [(name, labels) for name, labels, _ in got] == [
        (name, labels) for name, labels, _ in expected
    ]
    # The sum may differ in the last bits: the values are added in another order.
    assert [v for *_, v in got] == pytest.approx([v for *_, v in expected])


def test_observing_many_values_falls_back_without_the_private_cells() -> None:
    class Plain:
        def __init__(self) -> None:
            self.observed: list[float] = []

        def observe(self, amount: float) -> None:
            self.observed.append(amount)

    plain = Plain()
    observe_all(plain, [0.5, 2.0])  # type: ignore[arg-type]
    assert plain.observed == [0.5, 2.0]


def test_the_end_to_end_histogram_takes_many_latencies_clamped_at_zero() -> None:
    metrics = new_metrics()
    metrics.observe_end_to_end_many([0.004, -1.0, 0.3])
    assert value(metrics, "tagstream_end_to_end_latency_seconds_count") == 3
    assert value(metrics, "tagstream_end_to_end_latency_seconds_bucket", le="0.01") == 2
    assert value(metrics, "tagstream_end_to_end_latency_seconds_sum") == pytest.approx(0.304)


def test_observer_tracks_batches_in_flight_and_pauses() -> None:
    metrics = new_metrics()
    health = HealthState(stale_after_s=60, clock=FakeClock(0.0))
    observer = MetricsObserver(metrics, max_batch_size=10, health=health)
    observer.batch_closed(size=5, tokens=100, reason="time", age_s=0.05)
    observer.batch_submitted(size=5, in_flight=2)
    assert value(metrics, "tagstream_in_flight_batches") == 2
    observer.batch_scored(size=5, failed=1, duration_s=0.3)
    assert value(metrics, "tagstream_in_flight_batches") == 1
    assert value(metrics, "tagstream_inference_seconds_sum") == pytest.approx(0.3)
    assert value(metrics, "tagstream_batch_fill_ratio_sum") == pytest.approx(0.5)
    assert health.liveness().body["components"]["inference"] == {"age_s": 0.0}
    observer.paused(3)
    assert value(metrics, "tagstream_paused_partitions") == 3
    observer.resumed(3)
    assert value(metrics, "tagstream_paused_partitions") == 0


def test_observer_rebalances_drive_membership_and_assignment() -> None:
    metrics = new_metrics()
    health = HealthState(stale_after_s=60, clock=FakeClock(0.0))
    health.mark_model_ready()
    observer = MetricsObserver(metrics, max_batch_size=10, health=health)
    observer.rebalance("assigned", [])  # an empty assignment is still a join
    assert health.readiness().ok
    observer.rebalance("assigned", [("a", 0), ("a", 1)])
    observer.rebalance("revoked", [("a", 1)])
    assert health.readiness().ok
    assert value(metrics, "tagstream_assigned_partitions") == 1
    observer.rebalance("lost", [("a", 0)])
    assert not health.readiness().ok
    assert value(metrics, "tagstream_assigned_partitions") == 0


def test_observer_drives_the_heartbeats_and_the_shutdown_mark() -> None:
    clock = FakeClock(0.0)
    health = HealthState(stale_after_s=10, clock=clock)
    health.mark_model_ready()
    observer = MetricsObserver(new_metrics(), max_batch_size=10, health=health)
    observer.rebalance("assigned", [])
    observer.loop_iteration()
    with observer.waiting_for_batch():
        clock.now += 100  # an empty queue for a long time is idle, not stuck
        observer.loop_iteration()
        assert health.liveness().ok
    clock.now += 11  # now busy scoring for longer than the bound
    observer.loop_iteration()
    assert health.liveness().body["stale"] == ["inference"]
    assert health.readiness().ok
    observer.stopping()
    assert health.readiness().body == {"status": "shutting_down"}


def test_observer_without_health_has_working_no_op_health_hooks() -> None:
    observer = MetricsObserver(new_metrics(), max_batch_size=10)
    observer.loop_iteration()
    with observer.waiting_for_batch():
        pass
    observer.stopping()


def test_every_discard_reason_is_exposed_from_the_start() -> None:
    metrics = new_metrics()
    MetricsObserver(metrics, max_batch_size=10)
    reasons = {"not_assigned", "seen", "stale", "revoked", "lost", "shutdown"}
    for reason in reasons:
        assert value(metrics, "tagstream_events_discarded_total", reason=reason) == 0


def test_observer_commits_and_retries() -> None:
    metrics = new_metrics()
    observer = MetricsObserver(metrics, max_batch_size=10)
    observer.commit_done(3)
    observer.commit_failed("REBALANCE_IN_PROGRESS")
    observer.produce_retried("_MSG_TIMED_OUT", attempt=1, delay_s=0.1)
    assert value(metrics, "tagstream_offset_commits_total") == 2
    assert value(metrics, "tagstream_offset_commit_failures_total") == 1
    assert value(metrics, "tagstream_produce_retries_total", error="_MSG_TIMED_OUT") == 1


def test_observer_records_consumed_feed_lag_seconds() -> None:
    clock = FakeClock(NOW_S)
    metrics = new_metrics(clock)
    observer = MetricsObserver(metrics, max_batch_size=10)
    metrics.update_from_statistics(STATS_PAYLOAD.read_bytes())
    observer.records_consumed(
        [
            _Record(STATS_TOPIC, 1, int((NOW_S - 50) * 1000)),
            _Record(STATS_TOPIC, 1, int((NOW_S - 20) * 1000)),  # the last one counts
        ]
    )
    assert _lag(metrics, "seconds", 1) == pytest.approx(20.0)


def test_full_exposition_is_parseable_with_everything_recorded() -> None:
    metrics = new_metrics()
    record_everything(metrics)
    names = {name for name, _ in samples(metrics)}
    assert "tagstream_consumer_lag_seconds" in names
    assert "tagstream_model_info" in names


def test_ready_follows_the_readiness_probe_at_scrape_time() -> None:
    obs = start_observability(
        ObservabilitySettings(metrics_port=0), max_batch_size=8, metrics=new_metrics()
    )
    try:
        assert value(obs.metrics, "tagstream_ready") == 0  # model not loaded, group not joined
        obs.health.mark_model_ready()
        obs.health.mark_joined()
        assert value(obs.metrics, "tagstream_ready") == 1
        obs.health.mark_scorer_failing(True)
        assert value(obs.metrics, "tagstream_ready") == 0
        obs.health.mark_scorer_failing(False)
        obs.health.mark_shutting_down()
        assert value(obs.metrics, "tagstream_ready") == 0
    finally:
        obs.close()
