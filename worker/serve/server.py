"""uvicorn under tagstream's rules: a socket bound before anything loads (a taken port is a
usage error, not a crash), no logging set-up of its own (structlog already owns it), and a
drain on SIGTERM that fails ``/readyz`` first.

On the first SIGTERM or SIGINT uvicorn stops accepting connections, closes idle ones, and
waits up to ``TAGSTREAM_SERVE_DRAIN_TIMEOUT_S`` for the requests in flight; their texts are
still batched and scored meanwhile. Then the application's lifespan ends, which drains the
request batcher and stops its inference thread. A second SIGINT cuts the wait short.
"""

from __future__ import annotations

import math
import socket
from typing import Final

import structlog
import uvicorn
from starlette.types import ASGIApp

from worker.config.serve import ServeSettings
from worker.observability.health import HealthState

log = structlog.get_logger(__name__)

# Pending connections the kernel queues before uvicorn accepts them (uvicorn's default).
LISTEN_BACKLOG: Final = 2048


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown first marks the health state as shutting down."""

    def __init__(self, config: uvicorn.Config, health: HealthState) -> None:
        super().__init__(config)
        self._health = health

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._health.mark_shutting_down()
        log.info("draining requests in flight", timeout_s=self.config.timeout_graceful_shutdown)
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; raises :class:`OSError` when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets that say
    # they are TCP; without it a keep-alive client waits ~40 ms per answer (Nagle against
    # delayed ACKs, measured with httpx).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def build_server(app: ASGIApp, settings: ServeSettings, health: HealthState) -> DrainingServer:
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,  # tagstream_http_requests_total counts every answer
        limit_concurrency=settings.serve_max_connections,
        timeout_graceful_shutdown=math.ceil(settings.serve_drain_timeout_s),
        server_header=False,
    )
    return DrainingServer(config, health)
