"""The tracing port with tracing off: nothing of OpenTelemetry is imported, no trace is made,
the records are written as before; and the header helper every record goes through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Final

import pytest

from worker.config.loading import load_run_settings
from worker.contract.deadletter import Failure, Header
from worker.pipeline.tracing import TRACEPARENT, TRACESTATE, Tracer, with_trace

ROOT: Final = Path(__file__).resolve().parents[3]
# Starting Python and importing the worker (torch among it) takes seconds; a minute only
# trips on a hang.
SUBPROCESS_TIMEOUT_S: Final = 120

# A short pipeline with the run command's own wiring and tracing off, then the loaded
# OpenTelemetry modules as JSON on the last line of stdout.
NO_TRACING_SCRIPT: Final = textwrap.dedent(
    """
    import json, sys, time

    import orjson

    from tests.support.fake_kafka import FakeClients, record
    from tests.support.scorers import FakeScorer
    from worker.commands.run import start_tracer
    from worker.config.loading import load_run_settings
    from worker.config.settings import ModelSettings
    from worker.contract.deadletter import WorkerIdentity
    from worker.pipeline.worker import Worker

    settings = load_run_settings(flags={
        "input_topics": "news", "output_topic": "news.tagged", "labels": "sports",
        "commit_interval_ms": 1, "max_wait_ms": 0,
    })
    tracer = start_tracer(settings, {})
    clients = FakeClients(auto_ack=True)
    worker = Worker(
        settings,
        FakeScorer(ModelSettings(scorer="tests.support.scorers:fake")),
        WorkerIdentity(group="tagstream", worker="test:1", model="fake@v1"),
        consumer_factory=clients.make_consumer,
        producer_factory=clients.make_producer,
        tracer=tracer,
    )
    worker.inference.start()
    worker.intake.subscribe(settings.kafka.subscription, worker)
    clients.input.assign([("news", 0)])
    for offset in range(20):
        value = b"not json" if offset == 3 else orjson.dumps({"text": f"sports {offset}"})
        clients.input.records.append(record("news", 0, offset, value))
    deadline = time.monotonic() + 30
    while clients.input.committed(("news", 0)) != 20:
        assert time.monotonic() < deadline, "the pipeline did not finish"
        worker.step()
        time.sleep(0.002)
    worker.shutdown()
    tracer.close()
    print(json.dumps({
        "outputs": len(clients.producer.written),
        "modules": sorted(name for name in sys.modules if name.startswith("opentelemetry")),
    }))
    """
)


def test_without_tracing_no_opentelemetry_module_is_imported() -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TAGSTREAM_", "OTEL_"))
    }
    result = subprocess.run(
        [sys.executable, "-c", NO_TRACING_SCRIPT],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report["outputs"] == 20  # 19 scored, 1 dead-lettered: the pipeline did run
    assert report["modules"] == []


def test_tracing_is_off_unless_asked_for_or_a_collector_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TAGSTREAM_TRACING", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    base = {"input_topics": "news", "output_topic": "out"}
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    traces_endpoint = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}
    unset = load_run_settings(flags=base).tracing
    assert not unset.enabled({})
    assert unset.enabled(endpoint)
    assert unset.enabled(traces_endpoint)
    assert not unset.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    off = load_run_settings(flags={**base, "tracing": "false"}).tracing
    assert not off.enabled(endpoint)
    on = load_run_settings(flags={**base, "tracing": "true"}).tracing
    assert on.enabled({}) and on.explicit


def test_the_no_op_tracer_makes_no_trace() -> None:
    tracer = Tracer()
    assert not tracer.enabled
    with tracer.scoring([], 1) as batch:
        batch.finished(0)
    tracer.close()


class _Trace:
    def headers(self) -> list[Header]:
        return [(TRACEPARENT, b"00-new-01"), (TRACESTATE, b"a=b")]

    def scored(self, batch_id: int) -> None:
        raise AssertionError("not called here")

    def end(self, outcome: str, failure: Failure | None = None, reason: str | None = None) -> None:
        raise AssertionError("not called here")


def test_with_trace_replaces_the_trace_headers_and_keeps_the_others() -> None:
    headers: list[Header] = [
        ("id", b"1"),
        (TRACEPARENT, b"00-old-01"),
        ("TraceState", b"old=1"),
        ("tagstream.source.topic", b"news"),
    ]
    assert with_trace(headers, None) is headers
    assert with_trace(headers, _Trace()) == [
        ("id", b"1"),
        ("tagstream.source.topic", b"news"),
        (TRACEPARENT, b"00-new-01"),
        (TRACESTATE, b"a=b"),
    ]
