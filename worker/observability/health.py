"""Liveness and readiness state, and the HTTP server for ``/metrics``, ``/healthz``, ``/readyz``.

* ``/healthz`` (Kubernetes liveness): 200 while the poll loop and the inference thread have
  each heartbeaten within ``stale_after_s`` (an inference thread blocked on an empty queue
  inside :meth:`HealthState.inference_idle` counts as healthy); 503 with a JSON body naming
  the stale component otherwise. A component that has not beaten yet is "starting" and does
  not fail the check (model loading can take minutes; a startup probe on ``/readyz`` bounds
  that phase). Once shutdown has begun the check passes: restarting a pod that is already
  draining helps no one.
* ``/readyz`` (readiness): 200 only after :meth:`HealthState.mark_model_ready` (model loaded
  and warmed by one scored batch) and :meth:`HealthState.mark_joined` (consumer joined its
  group); 503 again after :meth:`HealthState.mark_left` or :meth:`HealthState.mark_shutting_down`.
* ``/metrics``: the worker's Prometheus registry (OpenMetrics when the scraper asks for it).

The server is the standard library's ``ThreadingHTTPServer`` on a daemon thread rather than
``prometheus_client.start_http_server``, which answers every path with the metrics and so
cannot serve the two health endpoints on the same port. No extra dependency is needed.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import AF_INET6
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from worker.config.observability import DEFAULT_HEALTH_STALE_AFTER_S, ObservabilitySettings
from worker.errors import ObservabilityServerError

# A scrape or probe is a few KiB on loopback or the pod network; a client silent for 10 s
# is gone, and its handler thread should not wait for it any longer.
REQUEST_TIMEOUT_S = 10.0
# ``shutdown()`` returns once the serve loop notices, which polls every 0.5 s by default.
SERVE_POLL_INTERVAL_S = 0.5
JSON_CONTENT_TYPE = "application/json"

log = structlog.get_logger("tagstream.http")


class Component(enum.StrEnum):
    """The threads whose progress /healthz watches."""

    POLL = "poll"
    INFERENCE = "inference"


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one probe: pass or fail, and the JSON body explaining it."""

    ok: bool
    body: dict[str, Any]


class HealthState:
    """Heartbeats and lifecycle marks, shared by the worker threads and the HTTP server.

    Every method is thread-safe. Ages use ``clock`` (monotonic by default), so wall-clock
    jumps never make a component look stale or fresh.
    """

    def __init__(
        self,
        stale_after_s: float = DEFAULT_HEALTH_STALE_AFTER_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be positive")
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat: dict[Component, float] = {}
        self._waiting: set[Component] = set()
        self._model_ready = False
        self._joined = False
        self._shutting_down = False

    # -- heartbeats --------------------------------------------------------------------------

    def beat_poll(self) -> None:
        """The poll loop made progress (call once per loop iteration, records or not)."""
        self._beat(Component.POLL)

    def beat_inference(self) -> None:
        """The inference thread made progress: it took a batch, scored one, or a queue wait
        timed out. An idle thread must not look stuck: either wait on the queue with a
        timeout well below ``stale_after_s`` and beat on every wake-up, or call
        :meth:`inference_idle` around a blocking wait."""
        self._beat(Component.INFERENCE)

    @contextlib.contextmanager
    def inference_idle(self) -> Iterator[None]:
        """Wrap the inference thread's blocking wait on its queue::

            with health.inference_idle():
                batch = handoff.take()

        While inside, the thread counts as healthy however long the queue stays empty; on
        leaving (a batch arrived) it beats and the bound applies again while it scores.
        """
        now = self._clock()
        with self._lock:
            self._last_beat[Component.INFERENCE] = now
            self._waiting.add(Component.INFERENCE)
        try:
            yield
        finally:
            self._beat(Component.INFERENCE)

    def _beat(self, component: Component) -> None:
        now = self._clock()
        with self._lock:
            self._last_beat[component] = now
            self._waiting.discard(component)

    # -- lifecycle ---------------------------------------------------------------------------

    def mark_model_ready(self) -> None:
        """The model is loaded and one warm-up batch has been scored."""
        with self._lock:
            self._model_ready = True

    def mark_joined(self) -> None:
        """The consumer joined its group (first assignment, possibly empty)."""
        with self._lock:
            self._joined = True

    def mark_left(self) -> None:
        """The consumer lost its group membership (``on_lost``) or left it."""
        with self._lock:
            self._joined = False

    def mark_shutting_down(self) -> None:
        """Shutdown began: /readyz fails from now on; /healthz no longer checks heartbeats."""
        with self._lock:
            self._shutting_down = True

    # -- probes ------------------------------------------------------------------------------

    def liveness(self) -> Check:
        now = self._clock()
        with self._lock:
            beats = dict(self._last_beat)
            waiting = set(self._waiting)
            shutting_down = self._shutting_down
        components: dict[str, Any] = {}
        stale: list[str] = []
        for component in Component:
            if component not in beats:
                components[component.value] = {"state": "starting"}
                continue
            age = max(0.0, now - beats[component])
            if component in waiting:
                components[component.value] = {"state": "waiting", "age_s": round(age, 3)}
                continue
            components[component.value] = {"age_s": round(age, 3)}
            if age > self.stale_after_s:
                stale.append(component.value)
        status = "shutting_down" if shutting_down else ("stale" if stale else "ok")
        body = {
            "status": status,
            "stale": stale,
            "stale_after_s": self.stale_after_s,
            "components": components,
        }
        return Check(ok=shutting_down or not stale, body=body)

    def readiness(self) -> Check:
        with self._lock:
            model_ready, joined, shutting_down = (
                self._model_ready,
                self._joined,
                self._shutting_down,
            )
        if shutting_down:
            return Check(ok=False, body={"status": "shutting_down"})
        waiting_for = [
            name for name, done in (("model", model_ready), ("group", joined)) if not done
        ]
        if waiting_for:
            return Check(ok=False, body={"status": "not_ready", "waiting_for": waiting_for})
        return Check(ok=True, body={"status": "ready"})


class _Server(ThreadingHTTPServer):
    """The HTTP server, carrying what the handlers serve."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], registry: CollectorRegistry, health: HealthState
    ) -> None:
        if ":" in address[0]:
            self.address_family = AF_INET6
        self.registry = registry
        self.health = health
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_S
    server_version = "tagstream"

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def _respond(self, *, with_body: bool) -> None:
        server = cast(_Server, self.server)
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                status, content_type, body = self._metrics(server.registry)
            elif path == "/healthz":
                status, content_type, body = _json(server.health.liveness())
            elif path == "/readyz":
                status, content_type, body = _json(server.health.readiness())
            else:
                status, content_type, body = (
                    HTTPStatus.NOT_FOUND,
                    JSON_CONTENT_TYPE,
                    orjson.dumps({"error": "not found", "paths": _PATHS}),
                )
        except Exception:
            log.exception("observability endpoint failed", path=path)
            status, content_type, body = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                JSON_CONTENT_TYPE,
                orjson.dumps({"error": "internal error"}),
            )
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def _metrics(self, registry: CollectorRegistry) -> tuple[HTTPStatus, str, bytes]:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        return HTTPStatus.OK, content_type, encoder(registry)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes and scrapes arrive every few seconds: debug, never info.
        log.debug("http request", detail=format % args)


_PATHS = ["/metrics", "/healthz", "/readyz"]


def _json(check: Check) -> tuple[HTTPStatus, str, bytes]:
    status = HTTPStatus.OK if check.ok else HTTPStatus.SERVICE_UNAVAILABLE
    return status, JSON_CONTENT_TYPE, orjson.dumps(check.body)


class ObservabilityServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, served from a daemon thread.

    ``port=0`` binds a free port (tests); read the bound one from :attr:`port`.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthState,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
    ) -> None:
        self._registry = registry
        self._health = health
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            server = _Server(self._address, self._registry, self._health)
        except OSError as exc:
            host, port = self._address
            raise ObservabilityServerError(
                f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SERVE_POLL_INTERVAL_S},
            name="tagstream-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> ObservabilityServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_observability_server(
    settings: ObservabilitySettings, registry: CollectorRegistry, health: HealthState
) -> ObservabilityServer | None:
    """Start the server on ``TAGSTREAM_METRICS_HOST:TAGSTREAM_METRICS_PORT``; None when the
    port is 0 (several workers on one host)."""
    if settings.metrics_port == 0:
        return None
    server = ObservabilityServer(
        registry, health, host=settings.metrics_host, port=settings.metrics_port
    )
    server.start()
    return server
