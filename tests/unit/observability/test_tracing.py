"""OpenTelemetry tracing through a whole worker (in-memory Kafka clients, the SDK's in-memory
exporter): the input's trace context continues into the output and dead-letter records, one
span per event from poll to acknowledgement, one linked span per scorer call, and the
messaging attributes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Final

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.support.fake_kafka import FakeClients, Sent
from tests.support.scorers import FakeScorer
from worker.config.loading import RunSettings, load_run_settings
from worker.config.settings import ModelSettings
from worker.contract.deadletter import HEADER_STAGE, WorkerIdentity
from worker.kafka.records import InputRecord, PartitionKey
from worker.observability.tracing import OtelTracer, parent_context, start_tracing
from worker.pipeline.worker import Worker

TOPIC: Final = "news"
P0: Final[PartitionKey] = (TOPIC, 0)
GROUP: Final = "taggers"
WAIT_S: Final = 10.0
TRACE_ID: Final = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID: Final = "00f067aa0ba902b7"
TRACEPARENT: Final = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()
TRACESTATE: Final = b"vendor=abc"


def _settings(**flags: object) -> RunSettings:
    given = {
        "input_topics": TOPIC,
        "output_topic": "news.tagged",
        "group_id": GROUP,
        "labels": "sports,finance",
        "commit_interval_ms": 1,
        "max_wait_ms": 0,
        "tracing": "true",
        "tracing_exporter": "none",
        **flags,
    }
    return load_run_settings(flags=given)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def _worker(clients: FakeClients, exporter: InMemorySpanExporter, settings: RunSettings) -> Worker:
    tracer = start_tracing(
        settings.tracing,
        group=GROUP,
        max_batch_size=settings.batch.max_batch_size,
        processor=SimpleSpanProcessor(exporter),
    )
    built = Worker(
        settings,
        FakeScorer(ModelSettings(scorer="tests.support.scorers:fake")),
        WorkerIdentity(group=GROUP, worker="test:1", model="fake@v1"),
        consumer_factory=clients.make_consumer,
        producer_factory=clients.make_producer,
        tracer=tracer,
    )
    built.inference.start()
    built.intake.subscribe(settings.kafka.subscription, built)
    return built


@pytest.fixture
def clients() -> FakeClients:
    return FakeClients(auto_ack=True)


@pytest.fixture
def worker(clients: FakeClients, exporter: InMemorySpanExporter) -> Iterator[Worker]:
    built = _worker(clients, exporter, _settings())
    yield built
    built.handoff.close(discard_queued=True)
    built.inference.join(WAIT_S)


def _event(text: str) -> bytes:
    return orjson.dumps({"text": text})


def _feed(
    clients: FakeClients, values: list[bytes], headers: tuple[tuple[str, bytes], ...]
) -> None:
    for offset, value in enumerate(values):
        clients.input.records.append(InputRecord(TOPIC, 0, offset, None, value, headers, None))


def _step_until(worker: Worker, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        worker.step()
        time.sleep(0.002)


def _spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def _headers(sent: Sent) -> dict[str, list[bytes | None]]:
    found: dict[str, list[bytes | None]] = {}
    for name, value in sent.headers:
        found.setdefault(name, []).append(value if not isinstance(value, str) else value.encode())
    return found


def _offset(span: ReadableSpan) -> int:
    assert span.attributes is not None
    offset = span.attributes["messaging.kafka.offset"]
    assert isinstance(offset, int)
    return offset


def _span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def _traceparent(span: ReadableSpan) -> bytes:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()


def _run(worker: Worker, clients: FakeClients, exporter: InMemorySpanExporter, count: int) -> None:
    clients.input.assign([P0])
    _step_until(worker, lambda: len(_spans(exporter, f"process {TOPIC}")) == count)


def test_the_input_trace_continues_into_the_output_records(
    worker: Worker, clients: FakeClients, exporter: InMemorySpanExporter
) -> None:
    _feed(
        clients,
        [_event("sports one"), _event("sports two")],
        (("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)),
    )
    _run(worker, clients, exporter, 2)
    events = sorted(_spans(exporter, f"process {TOPIC}"), key=_offset)
    outputs = [sent for sent in clients.producer.written if sent.topic == "news.tagged"]
    assert len(outputs) == 2
    for span, output in zip(events, outputs, strict=True):
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None
        assert f"{span.parent.trace_id:032x}" == TRACE_ID
        assert f"{span.parent.span_id:016x}" == PARENT_ID
        assert span.parent.is_remote
        headers = _headers(output)
        assert headers["traceparent"] == [_traceparent(span)]
        assert headers["tracestate"] == [TRACESTATE]
        assert span.attributes is not None
        assert span.attributes["tagstream.outcome"] == "scored"


def test_event_spans_carry_the_messaging_attributes(
    worker: Worker, clients: FakeClients, exporter: InMemorySpanExporter
) -> None:
    _feed(clients, [_event("sports")], ())
    _run(worker, clients, exporter, 1)
    (span,) = _spans(exporter, f"process {TOPIC}")
    attributes = span.attributes
    assert attributes is not None
    assert {key: attributes[key] for key in attributes if key.startswith("messaging.")} == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": TOPIC,
        "messaging.destination.partition.id": "0",
        "messaging.kafka.offset": 0,
        "messaging.consumer.group.name": GROUP,
        "messaging.message.body.size": len(_event("sports")),
    }
    # No input context: the event's span starts a trace, which the output carries on.
    assert span.parent is None
    (output,) = clients.producer.written
    assert _headers(output)["traceparent"] == [_traceparent(span)]


def test_the_batch_span_links_every_event_span_and_parents_none(
    worker: Worker, clients: FakeClients, exporter: InMemorySpanExporter
) -> None:
    _feed(clients, [_event(f"sports {n}") for n in range(3)], (("traceparent", TRACEPARENT),))
    _run(worker, clients, exporter, 3)
    events = _spans(exporter, f"process {TOPIC}")
    batches = _spans(exporter, "score")
    linked = {link.context.span_id for batch in batches for link in batch.links}
    assert linked == {_span_id(span) for span in events}
    for batch in batches:
        assert batch.parent is None
        assert batch.attributes is not None
        assert batch.attributes["messaging.batch.message_count"] == len(batch.links)
        assert batch.attributes["messaging.system"] == "kafka"
        assert batch.attributes["messaging.consumer.group.name"] == GROUP
        assert batch.attributes["tagstream.batch.failed"] == 0
        # A batch span ends before its events' spans (they end on the acknowledgement).
        assert batch.end_time is not None
    for span in events:
        (scored,) = [event for event in span.events if event.name == "scored"]
        assert scored.attributes is not None
        batch_ids = {b.attributes["tagstream.batch.id"] for b in batches if b.attributes}
        assert scored.attributes["tagstream.batch.id"] in batch_ids


def test_a_dead_letter_carries_its_event_span_and_not_the_input_context_twice(
    worker: Worker, clients: FakeClients, exporter: InMemorySpanExporter
) -> None:
    _feed(clients, [b"not json"], (("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)))
    _run(worker, clients, exporter, 1)
    (span,) = _spans(exporter, f"process {TOPIC}")
    (dead,) = clients.producer.written
    headers = _headers(dead)
    assert headers[HEADER_STAGE] == [b"deserialize"]
    assert headers["traceparent"] == [_traceparent(span)]
    assert headers["tracestate"] == [TRACESTATE]
    assert span.parent is not None and f"{span.parent.trace_id:032x}" == TRACE_ID
    assert span.attributes is not None
    assert span.attributes["tagstream.outcome"] == "dead_lettered"
    assert span.attributes["tagstream.error.stage"] == "deserialize"
    assert span.attributes["error.type"] == "DeserializeError"
    assert span.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    "value",
    [b"00-zz-yy-01", b"\xff\xfe" * 40, b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01", b""],
    ids=["malformed", "not-ascii", "all-zero-ids", "empty"],
)
def test_a_bad_traceparent_is_ignored_and_a_new_trace_started(
    worker: Worker, clients: FakeClients, exporter: InMemorySpanExporter, value: bytes
) -> None:
    _feed(clients, [_event("sports")], (("traceparent", value),))
    _run(worker, clients, exporter, 1)
    (span,) = _spans(exporter, f"process {TOPIC}")
    assert span.parent is None
    (output,) = clients.producer.written
    assert output.topic == "news.tagged"
    assert _headers(output)["traceparent"] == [_traceparent(span)]


def test_events_dropped_with_a_lost_partition_end_their_spans_as_discarded(
    clients: FakeClients, exporter: InMemorySpanExporter
) -> None:
    # Batches that never close: the events wait in the batcher when the partition is lost.
    built = _worker(clients, exporter, _settings(max_wait_ms=60_000, max_batch_size=100))
    try:
        _feed(clients, [_event(f"sports {n}") for n in range(2)], ())
        clients.input.assign([P0])
        _step_until(built, lambda: built.batcher.open_size == 2)
        clients.input.lose([P0])
        _step_until(built, lambda: len(_spans(exporter, f"process {TOPIC}")) == 2)
    finally:
        built.handoff.close(discard_queued=True)
        built.inference.join(WAIT_S)
    for span in _spans(exporter, f"process {TOPIC}"):
        assert span.attributes is not None
        assert span.attributes["tagstream.outcome"] == "discarded"
        assert span.attributes["tagstream.discard.reason"] == "lost"
    assert not _spans(exporter, "score")
    assert not clients.producer.written


def test_more_events_in_a_batch_than_the_default_link_limit_are_all_linked(
    clients: FakeClients, exporter: InMemorySpanExporter
) -> None:
    built = _worker(clients, exporter, _settings(max_batch_size=200, max_wait_ms=60_000))
    try:
        _feed(clients, [_event(f"sports {n}") for n in range(200)], ())
        clients.input.assign([P0])
        _step_until(built, lambda: len(_spans(exporter, f"process {TOPIC}")) == 200)
    finally:
        built.handoff.close(discard_queued=True)
        built.inference.join(WAIT_S)
    (batch,) = _spans(exporter, "score")
    assert len(batch.links) == 200


def test_parent_context_reads_only_a_valid_w3c_context() -> None:
    assert parent_context(()) is None
    # An oversized traceparent (valid, then padded) is not parsed.
    assert parent_context((("traceparent", TRACEPARENT + b" " * 5000),)) is None
    oversized_state = (("traceparent", TRACEPARENT), ("tracestate", b"a=" + b"b" * 5000))
    context = parent_context(oversized_state)
    assert context is not None  # the traceparent still counts, the tracestate is dropped
    assert parent_context((("other", TRACEPARENT),)) is None
    assert parent_context((("traceparent", None),)) is None
    assert parent_context((("TraceParent", TRACEPARENT),)) is not None


def test_the_service_name_defaults_to_tagstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    tracer = start_tracing(_settings().tracing, group=GROUP, max_batch_size=64)
    assert tracer.provider.resource.attributes["service.name"] == "tagstream"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "taggers-eu")
    named = start_tracing(_settings().tracing, group=GROUP, max_batch_size=64)
    assert named.provider.resource.attributes["service.name"] == "taggers-eu"


def test_close_exports_what_a_batching_processor_still_holds(
    exporter: InMemorySpanExporter,
) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tracer = start_tracing(
        _settings().tracing,
        group=GROUP,
        max_batch_size=64,
        # A delay no test waits for: only the flush in close() exports the span.
        processor=BatchSpanProcessor(exporter, schedule_delay_millis=600_000),
    )
    assert isinstance(tracer, OtelTracer)
    trace = tracer.start_event(InputRecord(TOPIC, 0, 7, None, b"{}", (), None))
    trace.end("scored")
    assert not exporter.get_finished_spans()
    tracer.close()
    assert len(exporter.get_finished_spans()) == 1
