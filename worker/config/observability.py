"""Settings of the metrics/health HTTP server and of logging, from ``TAGSTREAM_*`` variables.

Kept apart from :mod:`worker.config.settings` so that logging can be configured before anything
else is validated (a bad model setting is then reported as a proper log line).
"""

from __future__ import annotations

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

LogFormat = Literal["auto", "json", "console"]
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
