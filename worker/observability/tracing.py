"""OpenTelemetry tracing: the :class:`~worker.pipeline.tracing.Tracer` of a worker that traces.

Needs the ``otel`` extra; ``worker/commands/run.py`` imports this module only when tracing
is on (``TAGSTREAM_TRACING=true``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` set), so a worker
without it never loads OpenTelemetry.

What is traced, after the OpenTelemetry messaging conventions for Kafka:

* one ``process <topic>`` span (kind ``CONSUMER``) per accepted input record, from its poll
  to the acknowledgement of its output or dead-letter record (or its discard). Its parent is
  the W3C trace context of the input's ``traceparent`` / ``tracestate`` headers, when they
  hold a valid one; the records written for the input carry this span's context in theirs,
  so the trace goes on downstream. Attributes: ``messaging.system=kafka``,
  ``messaging.destination.name``, ``messaging.destination.partition.id``,
  ``messaging.kafka.offset``, ``messaging.consumer.group.name``,
  ``messaging.operation.type=process``; at its end ``tagstream.outcome`` (``scored``,
  ``dead_lettered``, ``discarded``) and, for a dead letter, ``error.type`` and
  ``tagstream.error.stage`` with an error status;
* one ``score`` span per scorer call on a batch: a batch has many parents, so the span is
  a root with one link per event span (``messaging.batch.message_count`` of them), and each
  event span gets a ``scored`` event naming the batch.

Only the W3C Trace Context format is read and written, whatever ``OTEL_PROPAGATORS`` says:
it is the format of the records' headers. Spans go to an OTLP/HTTP collector through a
batching processor that drops spans rather than wait when its queue is full (the standard
``OTEL_BSP_*`` and ``OTEL_EXPORTER_OTLP_*`` variables apply), so the pipeline never waits
for the collector.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker.config.observability import TracingSettings
from worker.contract.deadletter import Failure, Header
from worker.kafka.records import InputRecord
from worker.pipeline.tracing import TRACE_HEADERS, BatchTrace, EventTrace, Tracer

INSTRUMENTATION_NAME: Final = "tagstream"
# The service name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one.
DEFAULT_SERVICE_NAME: Final = "tagstream"
# The SDK's default link limit; raised to the batch size so that every event of a batch is
# linked from its scoring span.
DEFAULT_MAX_LINKS: Final = 128
# How long a stopping worker waits for the last spans to reach the collector: a collector
# that is down must not hold up the exit (the exporter's own timeout is 10 s, retries aside).
FLUSH_TIMEOUT_S: Final = 5.0
# Longest trace-context header read from an input: a traceparent is 55 characters and a
# tracestate of 32 members fits well within it, so a longer value is hostile or broken and
# is ignored rather than parsed on the hot path.
MAX_TRACE_HEADER_BYTES: Final = 4096
# A dead letter's error message on its span's status: enough to say what went wrong.
MAX_STATUS_CHARS: Final = 256

MESSAGING_SYSTEM: Final = "messaging.system"
DESTINATION: Final = "messaging.destination.name"
PARTITION: Final = "messaging.destination.partition.id"
OFFSET: Final = "messaging.kafka.offset"
CONSUMER_GROUP: Final = "messaging.consumer.group.name"
OPERATION_TYPE: Final = "messaging.operation.type"
OPERATION_NAME: Final = "messaging.operation.name"
BATCH_COUNT: Final = "messaging.batch.message_count"
BODY_SIZE: Final = "messaging.message.body.size"
ERROR_TYPE: Final = "error.type"
OUTCOME: Final = "tagstream.outcome"
ERROR_STAGE: Final = "tagstream.error.stage"
DISCARD_REASON: Final = "tagstream.discard.reason"
BATCH_ID: Final = "tagstream.batch.id"
BATCH_FAILED: Final = "tagstream.batch.failed"
KAFKA: Final = "kafka"

_PROPAGATOR: Final = TraceContextTextMapPropagator()


def parent_context(headers: Sequence[tuple[str, bytes | None]]) -> otel_context.Context | None:
    """The W3C trace context of an input record's headers; None when it has no valid one
    (a malformed or oversized header is ignored, never an error)."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in TRACE_HEADERS and value is not None and len(value) <= MAX_TRACE_HEADER_BYTES:
            carrier[lowered] = value.decode("latin-1")
    if not carrier:
        return None
    try:
        extracted = _PROPAGATOR.extract(carrier)
    except Exception:  # hostile header bytes: the record is processed, only untraced-from
        return None
    if not trace.get_current_span(extracted).get_span_context().is_valid:
        return None
    return extracted


class _EventTrace:
    """One input record's span."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    @property
    def span(self) -> Span:
        return self._span

    def headers(self) -> list[Header]:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(self._span))
        return [(name, value.encode("ascii")) for name, value in carrier.items()]

    def scored(self, batch_id: int) -> None:
        self._span.add_event("scored", {BATCH_ID: batch_id})

    def end(self, outcome: str, failure: Failure | None = None, reason: str | None = None) -> None:
        span = self._span
        span.set_attribute(OUTCOME, outcome)
        if failure is not None:
            span.set_attribute(ERROR_TYPE, failure.error_class)
            span.set_attribute(ERROR_STAGE, failure.stage.value)
            span.set_status(Status(StatusCode.ERROR, failure.message[:MAX_STATUS_CHARS]))
        if reason is not None:
            span.set_attribute(DISCARD_REASON, reason)
        span.end()


class _BatchTrace:
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def finished(self, failed: int) -> None:
        self._span.set_attribute(BATCH_FAILED, failed)


class OtelTracer(Tracer):
    """Spans per event and per scorer call (see the module docstring). Thread-safe."""

    enabled = True

    def __init__(self, provider: TracerProvider, *, group: str) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        self._group = group

    def start_event(self, record: InputRecord) -> EventTrace:
        value = record.value
        span = self._tracer.start_span(
            f"process {record.topic}",
            context=parent_context(record.headers) if record.headers else None,
            kind=SpanKind.CONSUMER,
            attributes={
                MESSAGING_SYSTEM: KAFKA,
                OPERATION_TYPE: "process",
                OPERATION_NAME: "process",
                DESTINATION: record.topic,
                PARTITION: str(record.partition),
                OFFSET: record.offset,
                CONSUMER_GROUP: self._group,
                BODY_SIZE: 0 if value is None else len(value),
            },
        )
        return _EventTrace(span)

    @contextlib.contextmanager
    def scoring(self, traces: Sequence[EventTrace], batch_id: int) -> Iterator[BatchTrace]:
        links = [Link(t.span.get_span_context()) for t in traces if isinstance(t, _EventTrace)]
        span = self._tracer.start_span(
            "score",
            # A root: the events' spans are linked, none of them is the parent.
            context=otel_context.Context(),
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={
                MESSAGING_SYSTEM: KAFKA,
                OPERATION_TYPE: "process",
                OPERATION_NAME: "score",
                BATCH_COUNT: len(traces),
                CONSUMER_GROUP: self._group,
                BATCH_ID: batch_id,
            },
        )
        try:
            yield _BatchTrace(span)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()
        for event in traces:
            event.scored(batch_id)

    def close(self) -> None:
        """Export the buffered spans, waiting at most :data:`FLUSH_TIMEOUT_S` (on a helper
        thread: the SDK's flush waits for the exporter however long it takes)."""
        flusher = threading.Thread(
            target=self.provider.force_flush, name="tagstream-trace-flush", daemon=True
        )
        flusher.start()
        flusher.join(FLUSH_TIMEOUT_S)


def _resource() -> Resource:
    """``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, with ``service.name`` defaulting
    to ``tagstream`` instead of the SDK's ``unknown_service``."""
    detected = Resource.create()
    name = str(detected.attributes.get(SERVICE_NAME, ""))
    if name and not name.startswith("unknown_service"):
        return detected
    return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))


def _otlp_processor() -> SpanProcessor:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter())


def start_tracing(
    settings: TracingSettings,
    *,
    group: str,
    max_batch_size: int,
    processor: SpanProcessor | None = None,
) -> OtelTracer:
    """The worker's tracer: spans to the OTLP collector (``tracing_exporter=otlp``), to
    ``processor`` when one is given (tests), or nowhere (``none``). Raises ImportError when
    the ``otel`` extra (or its OTLP exporter) is not installed."""
    provider = TracerProvider(
        resource=_resource(),
        span_limits=SpanLimits(max_links=max(DEFAULT_MAX_LINKS, max_batch_size)),
        shutdown_on_exit=False,
    )
    if processor is None and settings.tracing_exporter == "otlp":
        processor = _otlp_processor()
    if processor is not None:
        provider.add_span_processor(processor)
    return OtelTracer(provider, group=group)
