"""The inference stage (worker/scorer_stage.py) without Kafka: what it hands the producer."""

from __future__ import annotations

from typing import cast

import orjson

from tests.support.scorers import ERROR_MARKER, RAISE_MARKER, FakeScorer
from worker.batcher import Batch, Handoff, PendingEvent
from worker.deadletter import Failure
from worker.events import InputEvent
from worker.kafka_client import InputRecord
from worker.observer import Observer
from worker.offsets import OffsetTracker, Tracked
from worker.producer import Outbound, ProducerStage
from worker.scorer_stage import InferenceStage
from worker.settings import ModelSettings, TaggingSettings
from worker.tagging import to_request

TAGGING = TaggingSettings(labels=["sports", "finance"])


class RecordingProducer:
    """Stands in for ProducerStage: remembers what it was asked to write."""

    def __init__(self) -> None:
        self.sent: list[Outbound] = []
        self.dead: list[tuple[int, Failure]] = []

    def send(self, record: Outbound) -> None:
        self.sent.append(record)

    def dead_letter(self, origin: Tracked, failure: Failure) -> None:
        self.dead.append((origin.record.offset, failure))


def _stage(*, raising: bool = False) -> tuple[InferenceStage, RecordingProducer]:
    settings = ModelSettings(scorer="tests.support.scorers:fake")
    scorer = FakeScorer(settings, raise_marker=RAISE_MARKER if raising else None)
    producer = RecordingProducer()
    stage = InferenceStage(
        scorer,
        Handoff(2),
        producer=cast(ProducerStage, producer),
        tagging=TAGGING,
        output_topic="tagged",
        observer=Observer(),
    )
    return stage, producer


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
    stage, producer = _stage()
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
    stage, producer = _stage()
    stage.process(_batch(["sports", f"finance {ERROR_MARKER}", "sports"], OffsetTracker()))
    assert [record.origin.record.offset for record in producer.sent] == [0, 2]
    assert [(offset, f.stage.value, f.error_class) for offset, f in producer.dead] == [
        (1, "inference", "FakeScoreError")
    ]


def test_a_batch_that_makes_the_scorer_raise_is_scored_event_by_event() -> None:
    stage, producer = _stage(raising=True)
    stage.process(_batch(["sports", "finance", f"x {RAISE_MARKER}", "sports"], OffsetTracker()))
    assert [record.origin.record.offset for record in producer.sent] == [0, 1, 3]
    assert [(offset, f.stage.value, f.error_class) for offset, f in producer.dead] == [
        (2, "inference", "RuntimeError")
    ]


def test_events_of_a_revoked_partition_are_skipped() -> None:
    stage, producer = _stage()
    tracker = OffsetTracker()
    batch = _batch(["sports", "finance"], tracker)
    tracker.remove([("news", 0)])
    stage.process(batch)
    assert not producer.sent and not producer.dead
