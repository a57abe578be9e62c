"""The inference thread: scores each batch and produces one record per input.

The scorer never raises for a single event (it returns a :class:`ScoreError`), but a
whole call can still fail (out of memory, a bug on one odd input). The batch is then
scored again one event at a time, so only the events that fail on their own are
dead-lettered (stage ``inference``); the others are scored normally.

Events of a partition revoked while their batch waited are skipped: the partition's
new owner scores them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from worker.batcher import Batch, Handoff, PendingEvent
from worker.deadletter import Failure, Stage, source_headers
from worker.events import Source
from worker.observer import Observer
from worker.producer import Outbound, ProducerStage
from worker.scoring.base import LabelScores, ScoreError, ScoreOutcome, Scorer, ScoreRequest
from worker.settings import TaggingSettings
from worker.tagging import build_scored_event, encode_scored_event

log = structlog.get_logger(__name__)

THREAD_NAME = "tagstream-inference"


def source_of(item: PendingEvent) -> Source:
    record = item.origin.record
    return Source(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp=record.timestamp_ms,
    )


class InferenceStage:
    """Runs the scorer on its own thread, fed by a :class:`Handoff`."""

    def __init__(
        self,
        scorer: Scorer,
        handoff: Handoff,
        *,
        producer: ProducerStage,
        tagging: TaggingSettings,
        output_topic: str,
        observer: Observer,
    ) -> None:
        self._scorer = scorer
        self._handoff = handoff
        self._producer = producer
        self._tagging = tagging
        self._output_topic = output_topic
        self._observer = observer
        # Daemon: a scorer stuck in native code must not keep a stopping worker alive.
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.crashed: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end (after :meth:`Handoff.close`); False on timeout."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while (batch := self._handoff.take()) is not None:
                try:
                    self.process(batch)
                finally:
                    self._handoff.finished()
        except BaseException as exc:  # the main thread reports it and stops the worker
            log.exception("inference thread crashed")
            self.crashed = exc

    def process(self, batch: Batch) -> None:
        """Score one batch and hand its output and dead-letter records to the producer."""
        items = [item for item in batch.items if item.origin.active]
        if not items:
            return
        started = time.monotonic()
        outcomes = self._score([item.request for item in items])
        failed = sum(isinstance(outcome, ScoreError) for outcome in outcomes)
        self._observer.batch_scored(len(items), failed, time.monotonic() - started)
        scored_at = datetime.now(UTC)
        for item, outcome in zip(items, outcomes, strict=True):
            if item.origin.active:
                self._emit(item, outcome, scored_at)

    def _score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        try:
            outcomes = self._scorer.score(requests)
            if len(outcomes) != len(requests):
                raise RuntimeError(f"scorer returned {len(outcomes)} results for {len(requests)}")
            return outcomes
        except Exception:
            if len(requests) == 1:
                raise
            log.warning("batch scoring failed, scoring events one by one", exc_info=True)
        return [self._score_one(request) for request in requests]

    def _score_one(self, request: ScoreRequest) -> ScoreOutcome:
        try:
            return self._score([request])[0]
        except Exception as exc:
            return ScoreError.from_exception(exc)

    def _emit(self, item: PendingEvent, outcome: ScoreOutcome, scored_at: datetime) -> None:
        if isinstance(outcome, LabelScores):
            try:
                value = self._encode(item, outcome, scored_at)
            except Exception as exc:  # scores that break the output contract
                outcome = ScoreError.from_exception(exc)
            else:
                self._producer.send(
                    Outbound(
                        topic=self._output_topic,
                        key=item.origin.record.key,
                        value=value,
                        headers=source_headers(item.origin.record),
                        kind="output",
                        origin=item.origin,
                    )
                )
                return
        failure = Failure(Stage.INFERENCE, outcome.error_class, outcome.message)
        self._producer.dead_letter(item.origin, failure)

    def _encode(self, item: PendingEvent, scores: LabelScores, scored_at: datetime) -> bytes:
        scored = build_scored_event(
            item.event,
            item.request,
            scores,
            source_of(item),
            self._tagging,
            self._scorer.info,
            scored_at,
        )
        return encode_scored_event(scored)
