"""The pure helpers of ``bench/pipeline.py`` and ``bench/common.py``: input events of a given
size, the Prometheus text parser, the inference busy fraction, and the latency helpers
(``bench/latency.py``) the pipeline bench shares."""

from __future__ import annotations

import json

import pytest

from bench.common import (
    LABELS,
    MAX_EVENT_BYTES,
    MIN_EVENT_BYTES,
    SAMPLE_TEXTS,
    event,
    metric_value,
)
from bench.latency import Phase, phase_latencies
from bench.pipeline import BusySample, Result, busy_fraction, latency_rate
from worker.config.settings import TaggingSettings
from worker.contract.codec import decode_input, to_request
from worker.scoring.noop import NoopScorer

SIZES = (MIN_EVENT_BYTES, 1024, 4096, MAX_EVENT_BYTES)


def test_small_events_are_unchanged_without_a_size() -> None:
    key, value = event(3)
    assert key == b"e-3"
    assert json.loads(value) == {
        "id": "e-3",
        "text": "A new smartphone with a foldable screen goes on sale next month.",
    }
    assert event(3, None) == (key, value)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("index", [0, 7, 12_345, 199_999])
def test_a_padded_event_is_about_its_size_and_valid(size: int, index: int) -> None:
    key, value = event(index, size)
    # Cut after the last whole word that fits: a word or so short of the size, never over.
    assert size - 16 <= len(value) <= size
    tagging = TaggingSettings(labels=list(LABELS))
    decoded = decode_input(value, tagging)
    request = to_request(decoded, tagging)
    assert key == f"e-{index}".encode()
    # Whole words of the sample sentences, starting with the small event's own one.
    assert request.text.startswith(SAMPLE_TEXTS[index % len(SAMPLE_TEXTS)])
    assert set(request.text.split(" ")) <= set(" ".join(SAMPLE_TEXTS).split(" "))
    # Not dead-lettered as too costly by the noop scorer's estimate.
    assert NoopScorer().estimate_tokens(request) <= tagging.max_event_tokens


METRICS_TEXT = """\
# HELP tagstream_inference_seconds Scorer time per micro-batch.
# TYPE tagstream_inference_seconds histogram
tagstream_inference_seconds_bucket{le="0.005"} 3.0
tagstream_inference_seconds_bucket{le="+Inf"} 10.0
tagstream_inference_seconds_count 10.0
tagstream_inference_seconds_sum 1.25
tagstream_inference_seconds_sum_total 99.0
tagstream_events_scored_total{topic="a b}"} 4.0
tagstream_events_scored_total{topic="c"} 6.0 1700000000000
"""


def test_metric_value_reads_samples_and_sums_label_sets() -> None:
    assert metric_value(METRICS_TEXT, "tagstream_inference_seconds_sum") == 1.25
    assert metric_value(METRICS_TEXT, "tagstream_inference_seconds_count") == 10.0
    assert metric_value(METRICS_TEXT, "tagstream_events_scored_total") == 10.0
    assert metric_value(METRICS_TEXT, "tagstream_inference_seconds") is None
    assert metric_value("", "tagstream_inference_seconds_sum") is None
    assert metric_value("tagstream_x garbage\n", "tagstream_x") is None


def test_busy_fraction_uses_the_saturated_stretch() -> None:
    samples = [
        BusySample(wall_s=10.0, outputs=100, inference_s=1.0, batches=5),
        BusySample(wall_s=10.5, outputs=600, inference_s=1.4, batches=20),
        BusySample(wall_s=12.0, outputs=900, inference_s=2.6, batches=45),
        # All outputs in: the tail is idle and left out.
        BusySample(wall_s=13.0, outputs=1000, inference_s=2.7, batches=48),
    ]
    busy = busy_fraction(samples, 1000)
    assert busy is not None
    assert busy.fraction == pytest.approx(0.8)
    assert busy.window_s == pytest.approx(2.0)
    assert busy.batches == 40


def test_busy_fraction_of_a_short_run_and_without_samples() -> None:
    short = [
        BusySample(wall_s=1.0, outputs=10, inference_s=0.0, batches=1),
        BusySample(wall_s=2.0, outputs=50, inference_s=0.5, batches=4),
    ]
    busy = busy_fraction(short, 50)
    assert busy is not None
    assert busy.fraction == pytest.approx(0.5)
    assert busy_fraction(short[:1], 50) is None
    assert busy_fraction([], 50) is None


def test_phase_latencies_keep_each_phase_after_its_warm_up_sorted() -> None:
    phases = [Phase(0.5, 100.0, 1_000, 5_000, 400), Phase(0.75, 150.0, 6_000, 9_000, 450)]
    samples = [
        (1_500, 1_600),  # inside the first phase's warm-up: left out
        (3_000, 3_250),
        (2_500, 2_520),
        (5_500, 5_600),  # between the phases: left out
        (8_000, 8_090),
    ]
    assert phase_latencies(samples, phases, warmup_s=1.0) == [[20.0, 250.0], [90.0]]


def _measured(scenario: str, events_per_s: float) -> Result:
    return Result(scenario, 10, 10, 0, 0, 1.0, events_per_s, None, 0)


def test_the_latency_rate_is_a_share_of_the_slower_mode_unless_given() -> None:
    results = [_measured("ceiling", 30_000.0), _measured("noop", 9_000.0)]
    results.append(_measured("noop-eos", 8_000.0))
    assert latency_rate(results, 0.5, None) == pytest.approx(4_000.0)
    assert latency_rate(results, 0.5, 1_234.0) == 1_234.0
    with pytest.raises(SystemExit, match="latency-rate"):
        latency_rate(results[:1], 0.5, None)
