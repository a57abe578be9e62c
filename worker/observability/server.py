"""The HTTP server of ``/metrics``, ``/healthz`` and ``/readyz`` (see
:mod:`worker.observability.health` for what the two probes answer).

* ``/metrics``: the worker's Prometheus registry (OpenMetrics when the scraper asks for it).

The server is the standard library's ``ThreadingHTTPServer`` on a daemon thread rather than
``prometheus_client.start_http_server``, which answers every path with the metrics and so
cannot serve the two health endpoints on the same port. No extra dependency is needed.
"""

from __future__ import annotations

import threading
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

from worker.config.observability import ObservabilitySettings
from worker.errors import ObservabilityServerError
from worker.observability.health import Check, HealthState

# A scrape or probe is a few KiB on loopback or the pod network; a client silent for 10 s
# is gone, and its handler thread should not wait for it any longer.
REQUEST_TIMEOUT_S = 10.0
# ``shutdown()`` returns once the serve loop notices, which polls every 0.5 s by default.
SERVE_POLL_INTERVAL_S = 0.5
JSON_CONTENT_TYPE = "application/json"

log = structlog.get_logger("tagstream.http")


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
