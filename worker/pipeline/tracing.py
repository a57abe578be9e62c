"""The tracing port: what the pipeline tells a tracer, and what it gets back.

The pipeline knows no tracing library. It asks a :class:`Tracer` for one
:class:`EventTrace` per accepted record (main thread, when its offset is tracked), carries
it on the record's :class:`~worker.pipeline.offsets.Tracked`, writes its
:meth:`EventTrace.headers` (W3C ``traceparent`` / ``tracestate``) on the output or
dead-letter record, and ends it once the record's fate is known: its output or dead-letter
record acknowledged, or the record discarded. Each scorer call on a batch is wrapped in
:meth:`Tracer.scoring` (inference thread), which sees the traces of all the batch's events.

The base :class:`Tracer` does nothing and returns no traces, so with tracing off no object
is built per event and :attr:`Tracer.enabled` lets the inference thread skip even the list
of a batch's traces. :mod:`worker.observability.tracing` implements it with OpenTelemetry,
imported only when tracing is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Final, Protocol

from worker.contract.deadletter import Failure, Header
from worker.kafka.records import InputRecord

# The W3C Trace Context header names (https://www.w3.org/TR/trace-context/): a record
# carries at most one of each, the context of the span that wrote it.
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
TRACE_HEADERS: Final = frozenset({TRACEPARENT, TRACESTATE})


class EventTrace(Protocol):
    """The trace of one input record during its stay in this worker (any thread)."""

    def headers(self) -> list[Header]:
        """The trace-context headers for the records written for this input."""
        ...

    def scored(self, batch_id: int) -> None:
        """Inference thread: the scorer returned this event's result (batch ``batch_id``)."""
        ...

    def end(self, outcome: str, failure: Failure | None = None, reason: str | None = None) -> None:
        """Main (or inference) thread: the record's fate is known: ``scored``,
        ``dead_lettered`` (with its ``failure``) or ``discarded`` (with a
        :class:`~worker.pipeline.observer.DiscardReason`). Called once."""
        ...


class BatchTrace(Protocol):
    """The trace of one scorer call."""

    def finished(self, failed: int) -> None:
        """The call returned; ``failed`` events got a ScoreError."""
        ...


class _NoBatchTrace:
    def finished(self, failed: int) -> None:
        """Nothing to record."""

    def __enter__(self) -> BatchTrace:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None


_NO_BATCH_TRACE: Final = _NoBatchTrace()


class Tracer:
    """No tracing: the default; :mod:`worker.observability.tracing` overrides it."""

    # False: callers may skip preparing what only a tracer would read.
    enabled: bool = False

    def start_event(self, record: InputRecord) -> EventTrace | None:
        """Main thread: a record was accepted (its offset is tracked); its trace, if any."""
        return None

    def scoring(
        self, traces: Sequence[EventTrace], batch_id: int
    ) -> AbstractContextManager[BatchTrace]:
        """Inference thread: wraps one scorer call on the events of ``traces``."""
        return _NO_BATCH_TRACE

    def close(self) -> None:
        """Export what is still buffered (bounded); called once, after the worker stopped."""


def with_trace(headers: list[Header], trace: EventTrace | None) -> list[Header]:
    """``headers`` with any trace-context header replaced by ``trace``'s (unchanged without
    a trace): a record never carries two ``traceparent`` headers."""
    if trace is None:
        return headers
    kept = [header for header in headers if header[0].lower() not in TRACE_HEADERS]
    return [*kept, *trace.headers()]


def discard_trace(trace: EventTrace | None, reason: str) -> None:
    """End ``trace`` (if any) for a record dropped for ``reason``."""
    if trace is not None:
        trace.end("discarded", reason=reason)
