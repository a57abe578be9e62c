"""Tracing against the real broker: ``tagstream run`` with ``TAGSTREAM_TRACING=true`` writes
the input's trace, continued by its own span, into the output and dead-letter records."""

from __future__ import annotations

from typing import Final

from tests.support.ledger import Record
from tests.support.worker_process import COMPLETE_TIMEOUT_S, Harness, good_event

TRACE_ID: Final = "4bf92f3577b34da6a3ce929d0e0e4736"
INPUT_SPAN_ID: Final = "00f067aa0ba902b7"
TRACEPARENT: Final = f"00-{TRACE_ID}-{INPUT_SPAN_ID}-01".encode()
EVENTS: Final = 5


def _trace_headers(record: Record) -> list[bytes | None]:
    return [value for name, value in record.header_list if name == "traceparent"]


def _continues_the_input_trace(record: Record) -> None:
    (traceparent,) = _trace_headers(record)
    assert traceparent is not None
    version, trace_id, span_id, _flags = traceparent.decode().split("-")
    assert (version, trace_id) == ("00", TRACE_ID)
    assert span_id != INPUT_SPAN_ID  # the worker's own span, a child of the input's
    assert record.headers["tracestate"] == b"vendor=abc"


def test_outputs_and_dead_letters_carry_the_continued_trace(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    headers = [("traceparent", TRACEPARENT), ("tracestate", b"vendor=abc")]
    producer = harness.producer()
    pipeline.produce(producer, (good_event(i) for i in range(EVENTS)), headers=headers)
    pipeline.produce(producer, [(b"bad", b"not json")], headers=headers)

    worker = harness.start(pipeline.env(tracing="true", tracing_exporter="none"))
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert len(report.outputs) == EVENTS
    assert len(report.dead_letters) == 1
    for records in [*report.outputs.values(), *report.dead_letters.values()]:
        (record,) = records
        _continues_the_input_trace(record)
    assert worker.lines("tracing on")
