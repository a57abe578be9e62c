"""Shared by the metrics, health and dashboard tests: a fully exercised WorkerMetrics and a
parser of its exposition."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from worker.contract.scorer import ModelInfo
from worker.observability.gpu import GpuMemory
from worker.observability.metrics import WorkerMetrics

STATS_PAYLOAD = Path(__file__).parent / "data" / "librdkafka_consumer_stats.json"
# The real payload (librdkafka 2.16 consumer, captured from the dev broker) covers topic
# "tagstream-input": partition 0 drained and stored (consumer_lag_stored 0), partition 1
# committed at 4 of 10 (consumer_lag 6, nothing stored), partition 2 empty (hi = lo = 0,
# both lags -1), and librdkafka's internal partition -1.
STATS_TOPIC = "tagstream-input"
NOW_S = 1_700_000_000.0
MODEL = ModelInfo(
    name="tiny-nli", revision="abc123", scorer="nli", device="cuda:0", dtype="float16"
)
GPU = GpuMemory(device="cuda:0", allocated_bytes=1_000, reserved_bytes=4_000)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = NOW_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_metrics(clock: FakeClock | None = None, gpu: bool = True) -> WorkerMetrics:
    return WorkerMetrics(
        clock=clock or FakeClock(),
        gpu_memory_probe=(lambda: [GPU]) if gpu else (lambda: []),
        process_metrics=False,
    )


def record_everything(metrics: WorkerMetrics) -> None:
    """One call of every recording method, so every tagstream_* series exists."""
    metrics.record_rebalance("assigned", [(STATS_TOPIC, 0), (STATS_TOPIC, 1), (STATS_TOPIC, 2)])
    metrics.record_rebalance("revoked", [])
    metrics.record_rebalance("lost", [])
    metrics.record_consumed(STATS_TOPIC, 3)
    metrics.record_scored(1)
    metrics.record_dead_lettered("validate", "ValidateError")
    metrics.record_discarded("not_assigned")
    metrics.record_produce_retry("_MSG_TIMED_OUT")
    metrics.record_commit(ok=True)
    metrics.record_commit(ok=False)
    metrics.observe_batch(size=8, tokens=1_000, max_batch_size=32, wait_s=0.02, reason="time")
    metrics.observe_inference(0.2)
    metrics.observe_end_to_end(1.5)
    metrics.set_in_flight(2)
    metrics.set_paused(1)
    metrics.set_model_info(MODEL)
    metrics.update_from_statistics(STATS_PAYLOAD.read_text(encoding="utf-8"))
    metrics.observe_record_timestamp(STATS_TOPIC, 1, int((NOW_S - 30) * 1000))


def samples(metrics: WorkerMetrics) -> Samples:
    """Every sample of the exposition, keyed by (sample name, labels)."""
    return samples_of(metrics.exposition().decode())


def samples_of(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: WorkerMetrics, metric: str, /, **labels: str) -> float | None:
    return samples(metrics).get((metric, frozenset(labels.items())))
