"""``tagstream run``'s tracing wiring: OpenTelemetry only when asked for, and a start-up error
naming the setting when it is asked for but not installed."""

from __future__ import annotations

import sys

import pytest
from structlog.testing import capture_logs

from worker.commands import run
from worker.config.loading import RunSettings, load_run_settings
from worker.exit_codes import EXIT_USAGE
from worker.pipeline.tracing import Tracer

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


def _settings(**flags: object) -> RunSettings:
    return load_run_settings(flags={"input_topics": "news", "output_topic": "out", **flags})


@pytest.fixture
def without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the tracing module fails as it does without the otel extra."""
    monkeypatch.setitem(sys.modules, "worker.observability.tracing", None)


@pytest.mark.usefixtures("without_the_extra")
def test_tracing_asked_for_without_the_extra_stops_start_up_naming_the_setting() -> None:
    with capture_logs() as logs, pytest.raises(run._StartUpError) as raised:
        run.start_tracer(_settings(tracing="true"), {})
    assert raised.value.exit_code == EXIT_USAGE
    (error,) = [entry for entry in logs if entry["log_level"] == "error"]
    assert error["error"].startswith("TAGSTREAM_TRACING: tracing needs the otel extra")


@pytest.mark.usefixtures("without_the_extra")
def test_an_endpoint_alone_without_the_extra_warns_and_runs_untraced() -> None:
    with capture_logs() as logs:
        tracer = run.start_tracer(_settings(), ENDPOINT)
    assert type(tracer) is Tracer
    assert any(entry["log_level"] == "warning" for entry in logs)


def test_tracing_on_gives_the_opentelemetry_tracer() -> None:
    tracer = run.start_tracer(_settings(tracing="true", tracing_exporter="none"), {})
    assert tracer.enabled
    assert type(tracer).__module__ == "worker.observability.tracing"


def test_an_endpoint_turns_tracing_on_and_false_turns_it_off() -> None:
    assert run.start_tracer(_settings(), ENDPOINT).enabled
    assert type(run.start_tracer(_settings(tracing="false"), ENDPOINT)) is Tracer
    assert type(run.start_tracer(_settings(), {})) is Tracer


def test_an_unknown_exporter_is_a_setting_error() -> None:
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match="TAGSTREAM_TRACING_EXPORTER"):
        _settings(tracing_exporter="jaeger")
    with pytest.raises(ConfigError, match="TAGSTREAM_TRACING "):
        _settings(tracing="maybe")
