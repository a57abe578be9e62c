"""The inference stage (worker/pipeline/inference.py) without Kafka: what it hands the producer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import cast

import orjson
import pytest
import structlog

from tests.support.scorers import ERROR_MARKER, RAISE_MARKER, FakeScorer
from worker.config.settings import CircuitSettings, ModelSettings, TaggingSettings
from worker.contract.codec import to_request
from worker.contract.deadletter import Failure
from worker.contract.events import InputEvent
from worker.contract.scorer import ScoreError, ScoreOutcome, ScoreRequest, is_transient
from worker.errors import DeviceError, ScorerFailingError, TransientScoreError, WarmUpError
from worker.kafka.records import InputRecord, PartitionKey
from worker.pipeline.batching import Batch, Handoff, PendingEvent
from worker.pipeline.delivery import Outbound, ProducerStage
from worker.pipeline.inference import TRANSIENT_RETRIES, WARM_UP_LABEL, InferenceStage, warm_up
from worker.pipeline.observer import Observer
from worker.pipeline.offsets import OffsetTracker, Tracked

TAGGING = TaggingSettings(labels=["sports", "finance"])


class RecordingProducer:
    """Stands in for ProducerStage: remembers what it was asked to write."""

    def __init__(self) -> None:
        self.sent: list[Outbound] = []
        self.dead: list[tuple[int, Failure]] = []

    def send_all(self, records: list[Outbound]) -> None:
        self.sent.extend(records)

    def dead_letter(self, origin: Tracked, failure: Failure) -> None:
        self.dead.append((origin.record.offset, failure))


class RecordingObserver(Observer):
    """Remembers discards and the inference thread's waits for work."""

    def __init__(self) -> None:
        self.discarded: list[tuple[PartitionKey, str]] = []
        self.waits = 0

    def record_discarded(self, key: PartitionKey, reason: str) -> None:
        self.discarded.append((key, reason))

    def waiting_for_batch(self) -> AbstractContextManager[None]:
        @contextlib.contextmanager
        def waiting() -> Iterator[None]:
            self.waits += 1
            yield

        return waiting()


def _stage(
    *,
    raising: bool = False,
    scorer: FakeScorer | None = None,
    observer: Observer | None = None,
    handoff: Handoff | None = None,
) -> tuple[InferenceStage, RecordingProducer, list[int]]:
    settings = ModelSettings(scorer="tests.support.scorers:fake")
    producer = RecordingProducer()
    abandoned: list[int] = []
    stage = InferenceStage(
        scorer or FakeScorer(settings, raise_marker=RAISE_MARKER if raising else None),
        handoff or Handoff(2),
        producer=cast(ProducerStage, producer),
        tagging=TAGGING,
        output_topic="tagged",
        observer=observer or Observer(),
        on_abandoned=lambda origin: abandoned.append(origin.record.offset),
    )
    return stage, producer, abandoned


def _batch(texts: list[str], tracker: OffsetTracker) -> Batch:
    tracker.assign([("news", 0)])
    state = tracker.get(("news", 0))
    assert state is not None
    items = []
    for offset, text in enumerate(texts):
        state.receive(offset)
        record = InputRecord("news", 0, offset, f"k{offset}".encode(), b"{}", (), 1000 + offset)
        event = InputEvent(text=text, id=f"id-{offset}")
        items.append(PendingEvent(Tracked(record, state), event, to_request(event, TAGGING), 10))
    return Batch(opened_at=0.0, items=items)


def test_every_event_becomes_one_output_record_with_key_and_source_headers() -> None:
    stage, producer, _ = _stage()
    stage.process(_batch(["sports today", "finance news"], OffsetTracker()))

    assert not producer.dead
    assert [record.key for record in producer.sent] == [b"k0", b"k1"]
    first = producer.sent[0]
    assert first.topic == "tagged" and first.kind == "output"
    assert first.headers == [
        ("tagstream.source.topic", b"news"),
        ("tagstream.source.partition", b"0"),
        ("tagstream.source.offset", b"0"),
    ]
    scored = orjson.loads(first.value or b"")
    assert scored["tags"] == ["sports"]
    assert scored["source"] == {"topic": "news", "partition": 0, "offset": 0, "timestamp": 1000}


def test_a_score_error_dead_letters_only_that_event() -> None:
    stage, producer, _ = _stage()
    stage.process(_batch(["sports", f"finance {ERROR_MARKER}", "sports"], OffsetTracker()))
    assert [record.origin.record.offset for record in producer.sent] == [0, 2]
    assert [(offset, f.stage.value, f.error_class) for offset, f in producer.dead] == [
        (1, "inference", "FakeScoreError")
    ]


def test_a_batch_that_makes_the_scorer_raise_is_scored_event_by_event() -> None:
    stage, producer, _ = _stage(raising=True)
    stage.process(_batch(["sports", "finance", f"x {RAISE_MARKER}", "sports"], OffsetTracker()))
    assert [record.origin.record.offset for record in producer.sent] == [0, 1, 3]
    assert [(offset, f.stage.value, f.error_class) for offset, f in producer.dead] == [
        (2, "inference", "RuntimeError")
    ]


def test_an_event_that_makes_the_scorer_raise_alone_in_its_batch_is_dead_lettered() -> None:
    stage, producer, _ = _stage(raising=True)
    stage.process(_batch([f"x {RAISE_MARKER}"], OffsetTracker()))  # no exception escapes
    stage.process(_batch(["sports"], OffsetTracker()))  # and the stage goes on
    assert [(offset, f.stage.value, f.error_class) for offset, f in producer.dead] == [
        (0, "inference", "RuntimeError")
    ]
    assert [record.origin.record.offset for record in producer.sent] == [0]


class BrokenDeviceScorer(FakeScorer):
    """A scorer whose device is gone for good."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        raise DeviceError("CUDA error: device-side assert triggered")


def test_a_device_error_ends_the_stage_instead_of_dead_lettering_the_batch() -> None:
    stage, producer, _ = _stage(scorer=BrokenDeviceScorer(ModelSettings(scorer="x:y")))
    with pytest.raises(DeviceError):
        stage.process(_batch(["sports", "finance"], OffsetTracker()))
    assert not producer.dead and not producer.sent


def test_events_of_a_revoked_partition_are_skipped_and_reported_abandoned() -> None:
    stage, producer, abandoned = _stage()
    tracker = OffsetTracker()
    batch = _batch(["sports", "finance"], tracker)
    tracker.remove([("news", 0)])
    stage.process(batch)
    assert not producer.sent and not producer.dead
    assert abandoned == [0, 1]


class RevokingScorer(FakeScorer):
    """Scores normally, but the partition is revoked while it does."""

    def __init__(self, tracker: OffsetTracker) -> None:
        super().__init__(ModelSettings(scorer="tests.support.scorers:fake"))
        self._tracker = tracker

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        outcomes = super().score(requests)
        self._tracker.remove([("news", 0)])
        return outcomes


def test_events_revoked_while_being_scored_are_abandoned_not_written() -> None:
    tracker = OffsetTracker()
    stage, producer, abandoned = _stage(scorer=RevokingScorer(tracker))
    stage.process(_batch(["sports", f"finance {ERROR_MARKER}"], tracker))
    assert not producer.sent and not producer.dead
    assert abandoned == [0, 1]


def test_the_thread_waits_inside_the_idle_hook_and_logs_each_batch_with_its_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.pipeline.inference")
    observer = RecordingObserver()
    handoff = Handoff(2)
    stage, producer, _ = _stage(observer=observer, handoff=handoff)
    batch = _batch(["sports"], OffsetTracker())
    batch.batch_id = 7
    assert handoff.try_submit(batch)
    handoff.close()  # the thread scores the queued batch, then ends
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        stage.start()
        assert stage.join(timeout_s=10)
    assert stage.crashed is None
    assert len(producer.sent) == 1
    assert observer.waits == 2  # one wait that got the batch, one that saw the close
    (scored,) = [entry for entry in logs if entry["event"] == "batch scored"]
    assert (scored["batch_id"], scored["size"], scored["log_level"]) == (7, 1, "debug")
    assert "batch_id" not in structlog.contextvars.get_contextvars()  # unbound after it


def test_the_per_batch_debug_line_is_not_built_below_debug_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker.pipeline.inference")
    handoff = Handoff(2)
    stage, producer, _ = _stage(handoff=handoff)
    assert handoff.try_submit(_batch(["sports"], OffsetTracker()))
    handoff.close()
    with structlog.testing.capture_logs() as logs:
        stage.start()
        assert stage.join(timeout_s=10)
    assert len(producer.sent) == 1
    assert [entry for entry in logs if entry["event"] == "batch scored"] == []


# -- warm-up ------------------------------------------------------------------------------


class RecordingScorer(FakeScorer):
    def __init__(self, outcome: ScoreOutcome | None = None) -> None:
        super().__init__(ModelSettings(scorer="tests.support.scorers:fake"))
        self.requests: list[ScoreRequest] = []
        self._outcome = outcome

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        self.requests.extend(requests)
        return [self._outcome] if self._outcome is not None else super().score(requests)


def test_the_warm_up_scores_one_request_with_the_configured_defaults() -> None:
    scorer = RecordingScorer()
    tagging = TaggingSettings(labels=["sports", "finance"], hypothesis_template="About {}.")
    warm_up(scorer, tagging)
    (request,) = scorer.requests
    assert request.labels == ("sports", "finance")
    assert request.hypothesis_template == "About {}."
    assert request.text


def test_the_warm_up_works_without_default_labels() -> None:
    scorer = RecordingScorer()
    warm_up(scorer, TaggingSettings())
    assert scorer.requests[0].labels == (WARM_UP_LABEL,)


def test_a_model_that_cannot_score_the_warm_up_request_fails_it() -> None:
    failing = RecordingScorer(ScoreError(error_class="OutOfMemoryError", message="CUDA OOM"))
    with pytest.raises(WarmUpError, match="OutOfMemoryError"):
        warm_up(failing, TAGGING)
    with pytest.raises(WarmUpError, match="raised"):
        warm_up(FakeScorer(ModelSettings(), raise_marker="warm-up"), TAGGING)


class BrokenModelScorer(FakeScorer):
    """Fails every event (weights gone bad) for its first ``broken_calls`` calls."""

    def __init__(self, broken_calls: int, *, transient: bool = False) -> None:
        super().__init__(ModelSettings(scorer="tests.support.scorers:fake"))
        self.broken_calls = broken_calls
        self.transient = transient
        self.calls = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        self.calls += 1
        if self.calls > self.broken_calls:
            return super().score(requests)
        error = ScoreError("BadWeights", "nan everywhere", transient=self.transient)
        return [error for _ in requests]


class CircuitObserver(RecordingObserver):
    def __init__(self) -> None:
        super().__init__()
        self.circuit: list[bool] = []

    def circuit_changed(self, is_open: bool, failure_share: float) -> None:
        self.circuit.append(is_open)


def _circuit_stage(
    scorer: FakeScorer, monkeypatch: pytest.MonkeyPatch, *, max_open_s: float = 60.0
) -> tuple[InferenceStage, RecordingProducer, CircuitObserver, Handoff]:
    monkeypatch.setattr("worker.pipeline.circuit.CIRCUIT_BACKOFF_INITIAL_S", 0.001)
    monkeypatch.setattr("worker.pipeline.inference.TRANSIENT_RETRY_DELAY_S", 0.001)
    observer, producer, handoff = CircuitObserver(), RecordingProducer(), Handoff(2)
    stage = InferenceStage(
        scorer,
        handoff,
        producer=cast(ProducerStage, producer),
        tagging=TAGGING,
        output_topic="tagged",
        observer=observer,
        circuit=CircuitSettings(circuit_window=20, circuit_max_open_s=max_open_s),
    )
    return stage, producer, observer, handoff


def test_a_failing_model_opens_the_circuit_instead_of_dead_lettering_every_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = BrokenModelScorer(broken_calls=3)
    stage, producer, observer, _ = _circuit_stage(scorer, monkeypatch)
    stage.process(_batch([f"sports {i}" for i in range(20)], OffsetTracker()))
    assert not producer.dead  # kept and retried until the model worked again
    assert len(producer.sent) == 20 and scorer.calls == 4
    assert observer.circuit == [True, False]
    assert not stage.circuit_open


def test_a_circuit_open_past_its_bound_stops_the_stage_with_nothing_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = BrokenModelScorer(broken_calls=10**6)
    stage, producer, _, _ = _circuit_stage(scorer, monkeypatch, max_open_s=0.05)
    with pytest.raises(ScorerFailingError, match="TAGSTREAM_CIRCUIT_MAX_OPEN_S"):
        stage.process(_batch([f"sports {i}" for i in range(20)], OffsetTracker()))
    assert not producer.dead and not producer.sent


def test_a_stop_while_the_circuit_is_open_leaves_the_batch_uncommitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = BrokenModelScorer(broken_calls=10**6)
    stage, producer, observer, handoff = _circuit_stage(scorer, monkeypatch)
    handoff.close()
    stage.process(_batch([f"sports {i}" for i in range(20)], OffsetTracker()))
    assert not producer.dead and not producer.sent
    assert [reason for _, reason in observer.discarded] == ["shutdown"] * 20


def test_failures_below_the_share_are_dead_lettered_as_usual(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stage, producer, observer, _ = _circuit_stage(
        FakeScorer(ModelSettings(scorer="x:y")), monkeypatch
    )
    texts = [f"finance {ERROR_MARKER}" if i % 4 == 0 else "sports" for i in range(20)]
    stage.process(_batch(texts, OffsetTracker()))
    assert [offset for offset, _ in producer.dead] == [0, 4, 8, 12, 16]
    assert observer.circuit == []


def test_a_transient_failure_is_scored_again_not_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = BrokenModelScorer(broken_calls=2, transient=True)
    stage, producer, observer, _ = _circuit_stage(scorer, monkeypatch)
    stage.process(_batch(["sports"], OffsetTracker()))
    assert not producer.dead and [r.origin.record.offset for r in producer.sent] == [0]
    assert scorer.calls == 3 and observer.circuit == []


def test_a_failure_that_stays_transient_is_dead_lettered_after_the_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = BrokenModelScorer(broken_calls=10**6, transient=True)
    stage, producer, _, _ = _circuit_stage(scorer, monkeypatch)
    stage.process(_batch(["sports"], OffsetTracker()))
    assert [(offset, f.error_class) for offset, f in producer.dead] == [(0, "BadWeights")]
    assert scorer.calls == 1 + TRANSIENT_RETRIES


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (TimeoutError("slow"), True),
        (TransientScoreError("busy"), True),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), True),
        (ValueError("bad input"), False),
        (RuntimeError("shape mismatch"), False),
    ],
)
def test_which_exceptions_are_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient
    assert ScoreError.from_exception(exc).transient is transient
