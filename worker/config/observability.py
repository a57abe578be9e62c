"""Settings of the metrics/health HTTP server, of logging and of tracing, from ``TAGSTREAM_*``
variables.

Kept apart from :mod:`worker.config.settings` so that logging can be configured before anything
else is validated (a bad model setting is then reported as a proper log line).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.config.settings import ENV_PREFIX

# Prometheus exporters conventionally live in the 9100-9999 range; 9400 is not taken by any
# widely deployed exporter.
DEFAULT_METRICS_PORT = 9400
MAX_PORT = 65_535
# Longest legitimate silence of the poll loop or the inference thread: one full-budget
# forward pass of bart-large on a few CPU cores takes about a minute, so 120 s only trips on
# a real hang. GPU deployments can lower it (TAGSTREAM_HEALTH_STALE_AFTER_S).
DEFAULT_HEALTH_STALE_AFTER_S = 120.0

# The OpenTelemetry variables that name a collector; either one set turns tracing on unless
# TAGSTREAM_TRACING says otherwise (the OTLP exporter reads them itself).
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

LogFormat = Literal["auto", "json", "console"]
# otlp: spans go to the OTLP/HTTP collector named by OTEL_EXPORTER_OTLP_ENDPOINT; none:
# spans are made and their context propagated in the records' headers, but not exported.
TracingExporter = Literal["otlp", "none"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ObservabilitySettings(BaseSettings):
    """``/metrics``, ``/healthz``, ``/readyz`` and the log output."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, frozen=True
    )

    metrics_port: int = Field(
        default=DEFAULT_METRICS_PORT,
        ge=0,
        le=MAX_PORT,
        description="Port of /metrics, /healthz and /readyz; 0 turns the HTTP server off.",
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the HTTP server binds.")
    health_stale_after_s: float = Field(
        default=DEFAULT_HEALTH_STALE_AFTER_S,
        gt=0,
        description="/healthz fails once a heartbeat is older than this.",
    )
    log_format: LogFormat = Field(
        default="auto", description="'json', 'console', or 'auto' (console on a terminal)."
    )
    log_level: LogLevel = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


class TracingSettings(BaseSettings):
    """OpenTelemetry tracing (needs the ``otel`` extra). The exporter itself is configured by
    the standard ``OTEL_*`` variables (endpoint, headers, service name, sampler)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, frozen=True
    )

    tracing: bool | None = Field(
        default=None,
        description="Trace every event (needs the otel extra); unset: on when "
        "OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )
    tracing_exporter: TracingExporter = Field(
        default="otlp",
        description="'otlp' (OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT) or 'none' (spans "
        "propagated in headers, not exported).",
    )

    def enabled(self, environ: Mapping[str, str]) -> bool:
        """Whether this worker traces: as set, else when a collector endpoint is named."""
        if self.tracing is not None:
            return self.tracing
        return any(environ.get(name) for name in OTLP_ENDPOINT_VARIABLES)

    @property
    def explicit(self) -> bool:
        """Tracing was asked for by ``TAGSTREAM_TRACING``, not only implied by an endpoint."""
        return self.tracing is True

    @field_validator("tracing_exporter", mode="before")
    @classmethod
    def _lower_exporter(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value
