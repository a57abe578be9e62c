"""The inference thread: scores each batch and produces one record per input.

The scorer never raises for a single event (it returns a :class:`ScoreError`), but a
whole call can still fail (out of memory, a bug on one odd input). The batch is then
scored again one event at a time, so only the events that fail on their own are
dead-lettered (stage ``inference``); the others are scored normally. A batch of one that
fails dead-letters its event at once. Only a :class:`~worker.errors.DeviceError` (a sticky
CUDA error: every later call would fail too) ends the thread, and so the worker.

Two kinds of failure are not the event's fault and are not dead-lettered at once:

* a *transient* one (:func:`~worker.contract.scorer.is_transient`: a timeout, CUDA memory
  another process holds): the event is scored again, ``TRANSIENT_RETRIES`` times with a
  growing pause, and dead-lettered only if it still fails;
* most events failing (:mod:`worker.pipeline.circuit`): the batch is kept and retried with
  a backoff while the input pauses, until the model works again or the circuit gives up.

Events of a partition revoked while their batch waited are skipped (and reported through
``on_abandoned``): the partition's new owner scores them.

Every batch carries the number the main thread gave it on submission
(``Batch.batch_id``); the inference thread binds it as ``batch_id`` to every log line
it writes while processing that batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import structlog

from worker.config.settings import CircuitSettings, TaggingSettings
from worker.contract.codec import encode_output
from worker.contract.deadletter import Failure, Stage, source_headers
from worker.contract.scorer import (
    LabelScores,
    ModelInfo,
    ScoreError,
    ScoreOutcome,
    Scorer,
    ScoreRequest,
)
from worker.errors import DeviceError, ScorerFailingError, WarmUpError
from worker.pipeline.batching import Batch, Handoff, PendingEvent
from worker.pipeline.circuit import CircuitBreaker
from worker.pipeline.delivery import AbandonHook, Outbound, ProducerStage, abandon_as_revoked
from worker.pipeline.observer import DiscardReason, Observer
from worker.pipeline.tracing import Tracer, discard_trace, with_trace

log = structlog.get_logger(__name__)
# The stdlib logger structlog's level filter asks: a per-batch debug line costs tens of
# microseconds even when dropped, so it is built only when it would be written.
_level = logging.getLogger(__name__)

THREAD_NAME = "tagstream-inference"
# The start-up warm-up request: an ordinary sentence, so the first forward pass (CUDA
# context, kernels, compilation, allocator) happens before any real event waits for it.
WARM_UP_TEXT: Final = "Tagstream warm-up: the model scores one short sentence before it starts."
# Used when no default labels are configured (the events bring their own).
WARM_UP_LABEL: Final = "warm-up"
# An event failing transiently is scored again this many times before it is dead-lettered:
# memory pressure from another tenant or a slow dependency passes within seconds.
TRANSIENT_RETRIES: Final = 3
# Pause before the first transient retry; doubled for each one after (0.5 s, 1 s, 2 s).
TRANSIENT_RETRY_DELAY_S: Final = 0.5


def warm_up(scorer: Scorer, tagging: TaggingSettings) -> None:
    """Score one synthetic request with the configured defaults; raises :class:`WarmUpError`
    when the scorer raises or returns a :class:`ScoreError` for it."""
    labels = tuple(tagging.labels) or (WARM_UP_LABEL,)
    request = ScoreRequest(
        text=WARM_UP_TEXT,
        labels=labels,
        multi_label=tagging.multi_label,
        hypothesis_template=tagging.hypothesis_template,
    )
    try:
        outcomes = scorer.score([request])
    except Exception as exc:
        raise WarmUpError(f"the scorer raised on the warm-up request: {exc!r}") from exc
    if len(outcomes) != 1:
        raise WarmUpError(f"the scorer returned {len(outcomes)} results for 1 warm-up request")
    outcome = outcomes[0]
    if isinstance(outcome, ScoreError):
        raise WarmUpError(f"the warm-up request failed: {outcome.error_class}: {outcome.message}")


def score_isolated(scorer: Scorer, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
    """One outcome per request: the whole batch in one call, or, when that call raises (or
    returns the wrong number of outcomes), each request alone, so that only the requests
    that fail on their own get a :class:`ScoreError`. Raises only :class:`DeviceError`."""
    try:
        outcomes = scorer.score(requests)
        if len(outcomes) != len(requests):
            raise RuntimeError(f"scorer returned {len(outcomes)} results for {len(requests)}")
        return outcomes
    except DeviceError:
        raise  # the device is gone for this process: stop, do not dead-letter the rest
    except Exception as exc:
        if len(requests) == 1:
            # Alone in its batch, the event is the cause: it is dead-lettered, and the
            # thread goes on (a one-event batch is common: low traffic, revokes).
            log.warning("scoring one event failed, dead-lettering it", exc_info=True)
            return [ScoreError.from_exception(exc)]
        log.warning("batch scoring failed, scoring events one by one", exc_info=True)
    return [score_isolated(scorer, [request])[0] for request in requests]


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
        on_abandoned: AbandonHook | None = None,
        circuit: CircuitSettings | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._scorer = scorer
        self._tracer = tracer or Tracer()
        self._circuit = CircuitBreaker(circuit or CircuitSettings())
        self._handoff = handoff
        self._producer = producer
        self._tagging = tagging
        self._output_topic = output_topic
        self._observer = observer
        self._on_abandoned = on_abandoned or abandon_as_revoked(observer)
        # Daemon: a scorer stuck in native code must not keep a stopping worker alive.
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.crashed: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def circuit_open(self) -> bool:
        """Most events fail: the input should pause (read by the main thread)."""
        return self._circuit.is_open

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end (after :meth:`Handoff.close`); False on timeout."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                # bind/unbind rather than the bound_contextvars() context manager, which
                # copies the whole context twice per batch.
                structlog.contextvars.bind_contextvars(batch_id=batch.batch_id)
                try:
                    self.process(batch)
                finally:
                    structlog.contextvars.unbind_contextvars("batch_id")
                    self._handoff.finished()
        except BaseException as exc:  # the main thread reports it and stops the worker
            log.exception("inference thread crashed")
            self.crashed = exc

    def _next_batch(self) -> Batch | None:
        with self._observer.waiting_for_batch():
            return self._handoff.take()

    def process(self, batch: Batch) -> None:
        """Score one batch and hand its output and dead-letter records to the producer."""
        items = self._active(batch.items)
        if not items:
            log.debug("batch skipped: its partitions were revoked", size=len(batch))
            return
        scored = self._score_until_healthy(items, batch)
        if scored is None:
            return
        items, outcomes = scored
        scored_at = datetime.now(UTC)
        model = self._scorer.info
        outputs: list[Outbound] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if not item.origin.active:
                self._on_abandoned(item.origin)
                continue
            output = self._output(item, outcome, scored_at, model)
            if output is not None:
                outputs.append(output)
        self._producer.send_all(outputs)

    def _score_until_healthy(
        self, items: list[PendingEvent], batch: Batch
    ) -> tuple[list[PendingEvent], list[ScoreOutcome]] | None:
        """Score the items; while the circuit says the model is failing, keep them and try
        again after a backoff. None: the worker is stopping, or every item's partition went
        elsewhere meanwhile. Raises :class:`ScorerFailingError` when the circuit gives up."""
        while True:
            outcomes = self._score_batch(items, batch)
            failed = sum(isinstance(outcome, ScoreError) for outcome in outcomes)
            if not self._circuit.would_trip(len(items), failed):
                if self._circuit.is_open:
                    log.warning("scorer recovered, circuit closed", failed=failed, size=len(items))
                    self._circuit.record(len(items), failed)
                    self._observer.circuit_changed(False, self._circuit.failure_share)
                else:
                    self._circuit.record(len(items), failed)
                return items, outcomes
            if not self._hold(items, failed, outcomes):
                return None
            items = self._active(items)
            if not items:
                return None

    def _hold(
        self, items: Sequence[PendingEvent], failed: int, outcomes: Sequence[ScoreOutcome]
    ) -> bool:
        """The circuit is open: wait a backoff before the batch is scored again. False when
        the worker stops meanwhile (the batch stays uncommitted for the next owner)."""
        first_error = next(o for o in outcomes if isinstance(o, ScoreError))
        if not self._circuit.is_open:
            self._circuit.open()
            self._observer.circuit_changed(True, failed / len(items))
        if self._circuit.gave_up():
            raise ScorerFailingError(
                f"{failed} of {len(items)} events still fail to score after "
                f"{self._circuit.open_for():.0f} s of retries (TAGSTREAM_CIRCUIT_MAX_OPEN_S): "
                f"{first_error.error_class}: {first_error.message[:200]}; nothing was "
                "dead-lettered, the batch stays uncommitted"
            )
        delay = self._circuit.next_backoff()
        log.error(
            "scorer failing: batch kept, input paused, retrying",
            failed=failed,
            size=len(items),
            error_class=first_error.error_class,
            error=first_error.message[:200],
            retry_in_s=delay,
            open_for_s=round(self._circuit.open_for(), 1),
        )
        with self._observer.waiting_for_batch():
            stopping = self._handoff.wait_closed(delay)
        if stopping:
            for item in items:
                key = item.origin.record.partition_key
                self._observer.record_discarded(key, DiscardReason.SHUTDOWN)
                discard_trace(item.origin.trace, DiscardReason.SHUTDOWN)
        return not stopping

    def _score_batch(self, items: Sequence[PendingEvent], batch: Batch) -> list[ScoreOutcome]:
        """One scorer call for the batch, then retries of its transient failures."""
        started = time.monotonic()
        requests = [item.request for item in items]
        if self._tracer.enabled:
            outcomes, failed = self._score_traced(items, requests, batch.batch_id)
        else:
            outcomes = self._score_with_retries(requests)
            failed = sum(isinstance(outcome, ScoreError) for outcome in outcomes)
        duration_s = time.monotonic() - started
        self._observer.batch_scored(len(items), failed, duration_s)
        if _level.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch scored",
                size=len(items),
                skipped=len(batch) - len(items),
                failed=failed,
                tokens=batch.tokens,
                duration_s=round(duration_s, 4),
            )
        return outcomes

    def _score_traced(
        self, items: Sequence[PendingEvent], requests: list[ScoreRequest], batch_id: int
    ) -> tuple[list[ScoreOutcome], int]:
        """Tracing on: the scorer call inside its span, linked to the events' traces."""
        traces = [trace for item in items if (trace := item.origin.trace) is not None]
        with self._tracer.scoring(traces, batch_id) as span:
            outcomes = self._score_with_retries(requests)
            failed = sum(isinstance(outcome, ScoreError) for outcome in outcomes)
            span.finished(failed)
        return outcomes, failed

    def _score_with_retries(self, requests: list[ScoreRequest]) -> list[ScoreOutcome]:
        """One scorer call, then retries of its transient failures."""
        outcomes = self._score(requests)
        for attempt in range(TRANSIENT_RETRIES):
            retry = [i for i, o in enumerate(outcomes) if isinstance(o, ScoreError) and o.transient]
            if not retry:
                break
            delay = TRANSIENT_RETRY_DELAY_S * 2**attempt
            log.warning("transient scoring failure, retrying", events=len(retry), delay_s=delay)
            if self._handoff.wait_closed(delay):
                break
            for index, outcome in zip(
                retry, self._score([requests[i] for i in retry]), strict=True
            ):
                outcomes[index] = outcome
        return outcomes

    def _active(self, items: Sequence[PendingEvent]) -> list[PendingEvent]:
        """The items whose partition is still assigned; the others are abandoned."""
        active: list[PendingEvent] = []
        for item in items:
            if item.origin.active:
                active.append(item)
            else:
                self._on_abandoned(item.origin)
        return active

    def _score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        return score_isolated(self._scorer, requests)

    def _output(
        self, item: PendingEvent, outcome: ScoreOutcome, scored_at: datetime, model: ModelInfo
    ) -> Outbound | None:
        """The event's output record (the batch's are sent together), or None when its
        input is dead-lettered instead (now)."""
        origin = item.origin
        if isinstance(outcome, LabelScores):
            try:
                value = encode_output(
                    item.event,
                    item.request,
                    outcome,
                    origin.record,
                    self._tagging,
                    model,
                    scored_at,
                    item.profile,
                )
            except Exception as exc:  # scores that break the output contract
                outcome = ScoreError.from_exception(exc)
            else:
                headers = with_trace(source_headers(origin.record), origin.trace)
                return Outbound(
                    self._output_topic, origin.record.key, value, headers, "output", origin
                )
        failure = Failure(Stage.INFERENCE, outcome.error_class, outcome.message)
        self._producer.dead_letter(origin, failure)
        return None
