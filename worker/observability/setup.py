"""Everything observable about one worker, built in one call: metrics, health, the observer
the pipeline drives, the HTTP server, and the librdkafka settings that feed them.

``tagstream run`` wiring::

    obs_settings = ObservabilitySettings()
    configure_logging(obs_settings)                      # first: later errors log as JSON
    obs = start_observability(obs_settings, max_batch_size=run.batch.max_batch_size)
    register_settings_secrets(run)
    log.info("starting", settings=redacted_settings(run, obs_settings))
    ...  # pass obs.observer to the pipeline, obs.consumer_config() into the Consumer config,
    ...  # obs.client_config() into the Producers
    obs.health.mark_model_ready()                        # after the warm-up batch
    ...
    obs.health.beat_poll()                               # main loop, every iteration
    with obs.health.inference_idle():                    # inference thread, around its
        batch = handoff.take()                           # blocking wait for work
    ...
    obs.health.mark_shutting_down()                      # on SIGTERM, before draining
    obs.close()                                          # last
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.config.observability import ObservabilitySettings
from worker.observability.health import HealthState
from worker.observability.logs import librdkafka_logger
from worker.observability.metrics import STATISTICS_INTERVAL_MS, WorkerMetrics
from worker.observability.observer import MetricsObserver
from worker.observability.server import ObservabilityServer, start_observability_server


@dataclass(frozen=True, slots=True)
class Observability:
    """The worker's metrics, health state, pipeline observer and (optional) HTTP server."""

    settings: ObservabilitySettings
    metrics: WorkerMetrics
    health: HealthState
    observer: MetricsObserver
    server: ObservabilityServer | None

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings for every client: its log lines go through structlog."""
        return {"logger": librdkafka_logger()}

    def consumer_config(self) -> dict[str, Any]:
        """librdkafka settings for the input consumer: logs, and statistics for the lag."""
        return {
            **self.client_config(),
            "statistics.interval.ms": STATISTICS_INTERVAL_MS,
            "stats_cb": self.metrics.update_from_statistics,
        }

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        if self.server is not None:
            self.server.stop()


def start_observability(
    settings: ObservabilitySettings, *, max_batch_size: int, metrics: WorkerMetrics | None = None
) -> Observability:
    """Build the metrics and health state and start ``/metrics``, ``/healthz``, ``/readyz``
    (unless ``TAGSTREAM_METRICS_PORT`` is 0). Raises ``ObservabilityServerError`` when the
    port is taken."""
    metrics = metrics if metrics is not None else WorkerMetrics()
    health = HealthState(settings.health_stale_after_s)
    metrics.track_ready(lambda: health.readiness().ok)
    observer = MetricsObserver(metrics, max_batch_size=max_batch_size, health=health)
    server = start_observability_server(settings, metrics.registry, health)
    return Observability(settings, metrics, health, observer, server)
