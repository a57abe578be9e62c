"""The HTTP series of ``tagstream serve``, on the worker's registry beside the batch and
inference series the shared :class:`~worker.observability.observer.MetricsObserver` records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.observability.names import metric_name

# From a cached single-text answer (milliseconds) to a full queue on a CPU (tens of seconds).
REQUEST_SECONDS_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Requests to a path of no route share one label value: paths are the caller's choice.
UNMATCHED_PATH: Final = "unmatched"


class ServeMetrics:
    """Requests by route and status, their durations, and the texts waiting for the model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            metric_name("http_requests"),
            "HTTP requests answered, by route and status code.",
            ["path", "status"],
            registry=registry,
        )
        self._seconds = Histogram(
            metric_name("http_request_seconds"),
            "Time from a request's arrival to its answer, by route.",
            ["path"],
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=registry,
        )
        self._pending = Gauge(
            metric_name("serve_pending_texts"),
            "Texts accepted by /v1/classify and not yet answered.",
            registry=registry,
        )

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        self._requests.labels(path=path, status=str(status)).inc()
        self._seconds.labels(path=path).observe(max(0.0, seconds))

    def track_pending(self, source: Callable[[], float]) -> None:
        self._pending.set_function(source)
