"""``tagstream serve``'s application on a real uvicorn server, in a thread of the test.

:func:`running_server` binds a free port on 127.0.0.1, serves the application built from
the given scorer and settings, waits until ``/readyz`` says the model is ready, and stops
the server (with its drain) on leaving. ``load_gate`` holds the model load until the test
sets it, so the start-up window can be probed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from prometheus_client import CollectorRegistry

from worker.config.serve import ServeSettings
from worker.config.settings import BatchSettings, TaggingSettings
from worker.contract.scorer import Scorer
from worker.observability.health import HealthState
from worker.observability.metrics import WorkerMetrics
from worker.observability.observer import MetricsObserver
from worker.pipeline.inference import warm_up
from worker.serve.app import ServeContext, build_app
from worker.serve.server import bind, build_server

# Generous: a loaded CI machine may take seconds to start a thread and a server.
START_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.02


@dataclass
class LiveServer:
    """A running server: its address, metrics and health state, and what stopped it."""

    base_url: str
    registry: CollectorRegistry
    health: HealthState
    fatal: list[BaseException] = field(default_factory=list)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60.0, **kwargs)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"server did not get {what} within {START_TIMEOUT_S} s")
        time.sleep(POLL_S)


@contextmanager
def running_server(
    scorer: Scorer,
    *,
    serve: ServeSettings | None = None,
    tagging: TaggingSettings | None = None,
    batch: BatchSettings | None = None,
    load_gate: threading.Event | None = None,
    wait_ready: bool = True,
) -> Iterator[LiveServer]:
    serve = serve or ServeSettings(serve_host="127.0.0.1", serve_port=0)
    tagging = tagging or TaggingSettings()
    batch = batch or BatchSettings()
    metrics = WorkerMetrics(process_metrics=False)
    health = HealthState(needs_group=False)
    observer = MetricsObserver(metrics, max_batch_size=batch.max_batch_size, health=health)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    live = LiveServer(f"http://127.0.0.1:{port}", metrics.registry, health)

    def load_scorer() -> Scorer:
        if load_gate is not None:
            load_gate.wait()
        warm_up(scorer, tagging)
        return scorer

    def on_fatal(exc: BaseException) -> None:
        live.fatal.append(exc)
        server.should_exit = True

    context = ServeContext(
        serve, tagging, batch, health, metrics.registry, observer, load_scorer, on_fatal
    )
    server = build_server(build_app(context), serve, health)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "started")
        if wait_ready:
            wait_until(lambda: health.readiness().ok or bool(live.fatal), "ready")
        yield live
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_S)
        sock.close()
