"""``tagstream serve``: the scorer and the worker's micro-batcher behind an HTTP API.

``POST /v1/classify`` takes the Hugging Face Inference API's zero-shot payload; the texts
of concurrent requests join the same micro-batches (``TAGSTREAM_MAX_BATCH_SIZE``, the
scorer's token budget) on one inference thread, as a stream's events would; a batch goes
to an idle model at once (``TAGSTREAM_SERVE_BATCHING``, :mod:`worker.serve.batcher`).
``/openapi.json``, ``/healthz``, ``/readyz`` and ``/metrics`` share
the port. No Kafka setting is read.

Settings: the model, tagging and batching ones of ``tagstream run`` and the
``TAGSTREAM_SERVE_*`` ones, from the environment or the flags below (flags win); every
setting has a flag named after it, and ``--host`` / ``--port`` are short for
``--serve-host`` / ``--serve-port``.

Start-up: logging, the settings, the port (bound before the model loads, so the probes
answer at once), then the model and its warm-up on a thread; ``/readyz`` is 200 from then
on. Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 2 for an invalid setting, a port
that is taken or a scorer that cannot be configured, 3 when the model cannot be loaded or
warmed up.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Mapping
from types import FrameType
from typing import Any, Final

import structlog
from pydantic_settings import BaseSettings

from worker.config.loading import build_section, env_name
from worker.config.observability import ObservabilitySettings
from worker.config.serve import ServeSettings
from worker.config.settings import BatchSettings, ModelSettings, TaggingSettings
from worker.contract.scorer import Scorer
from worker.errors import ConfigError, ScorerConfigError
from worker.exit_codes import EXIT_FATAL, EXIT_OK, EXIT_USAGE
from worker.observability.health import HealthState
from worker.observability.logs import configure_logging
from worker.observability.metrics import WorkerMetrics
from worker.observability.observer import MetricsObserver
from worker.pipeline.inference import warm_up
from worker.scoring.factory import build_scorer

log = structlog.get_logger(__name__)

# The settings classes ``tagstream serve`` reads; every field is a flag and an env var.
SECTIONS: Final[tuple[type[BaseSettings], ...]] = (
    ServeSettings,
    ModelSettings,
    TaggingSettings,
    BatchSettings,
    ObservabilitySettings,
)
# Settings of the worker's own metrics server, which ``serve`` does not start: its
# /metrics is on the serve port.
NOT_READ: Final = frozenset({"metrics_port", "metrics_host"})
SHORT_FLAGS: Final = {"serve_host": "--host", "serve_port": "--port"}
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# The CPUs TAGSTREAM_SERVE_TORCH_THREADS=0 keeps out of torch's pool: the event loop's.
EVENT_LOOP_CPUS: Final = 1


def torch_threads(setting: int, cpus: int, environ: Mapping[str, str]) -> int | None:
    """The torch CPU thread count ``serve`` sets: the setting when given; for 0 (auto) all
    CPUs but the event loop's, at least one; None (torch decides) when 0 and the
    environment sets OMP_NUM_THREADS."""
    if setting > 0:
        return setting
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cpus - EVENT_LOOP_CPUS)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _set_torch_threads(setting: int) -> None:
    threads = torch_threads(setting, _cpus(), os.environ)
    if threads is None:
        return
    import torch  # the model's own import, on the loader thread

    torch.set_num_threads(threads)
    log.info("torch CPU threads", threads=threads)


def setting_names() -> dict[str, type[BaseSettings]]:
    """Every setting ``tagstream serve`` reads, and its class."""
    return {name: cls for cls in SECTIONS for name in cls.model_fields if name not in NOT_READ}


def configure(parser: argparse.ArgumentParser) -> None:
    for name, cls in setting_names().items():
        field = cls.model_fields[name]
        flags = [f"--{name.replace('_', '-')}"]
        if name in SHORT_FLAGS:
            flags.append(SHORT_FLAGS[name])
        parser.add_argument(
            *flags,
            dest=name,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"{field.description or ''} [{env_name(name)}]".strip(),
        )


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in setting_names() if hasattr(args, name)}


def _usage_error(message: str) -> int:
    log.error("cannot start", error=message, exit_code=EXIT_USAGE)
    return EXIT_USAGE


class _Outcome:
    """The exit code the model loader decided, if it failed."""

    def __init__(self) -> None:
        self.exit_code = EXIT_OK


def _quiet_stop(_signum: int, _frame: FrameType | None) -> None:
    """uvicorn raises the signal it drained on again once it is done; by then the stop is
    complete, so the re-raised signal must not kill the process with it."""


def execute(args: argparse.Namespace) -> int:
    flags = _flags(args)
    try:
        observability = build_section(ObservabilitySettings, {}, flags)
    except ConfigError as exc:
        configure_logging(ObservabilitySettings.model_construct())
        return _usage_error(str(exc))
    configure_logging(observability)
    try:
        serve = build_section(ServeSettings, {}, flags)
        model = build_section(ModelSettings, {}, flags)
        tagging = build_section(TaggingSettings, {}, flags)
        batch = build_section(BatchSettings, {}, flags)
    except ConfigError as exc:
        return _usage_error(str(exc))
    try:
        from worker.serve.app import ServeContext, build_app
        from worker.serve.server import bind, build_server
    except ImportError as exc:  # the web stack is the optional `serve` extra
        return _usage_error(f"tagstream serve needs pip install 'tagstream[serve]': {exc}")
    try:
        sock = bind(serve.serve_host, serve.serve_port)
    except OSError as exc:
        where = f"{serve.serve_host}:{serve.serve_port}"
        return _usage_error(f"{env_name('serve_port')}: cannot listen on {where}: {exc}")
    metrics = WorkerMetrics()
    health = HealthState(observability.health_stale_after_s, needs_group=False)
    metrics.track_ready(lambda: health.readiness().ok)
    observer = MetricsObserver(metrics, max_batch_size=batch.max_batch_size, health=health)
    outcome = _Outcome()

    def load_scorer() -> Scorer:
        _set_torch_threads(serve.serve_torch_threads)
        scorer = build_scorer(model, include_nli_probs=False)
        metrics.set_model_info(scorer.info)
        warm_up(scorer, tagging)
        return scorer

    def on_fatal(exc: BaseException) -> None:
        if isinstance(exc, ScorerConfigError):
            outcome.exit_code = _usage_error(str(exc))
        else:
            log.error("the scorer cannot score: stopping", error=repr(exc))
            outcome.exit_code = EXIT_FATAL
        server.should_exit = True

    context = ServeContext(serve, tagging, batch, health, metrics.registry, observer,
                           load_scorer, on_fatal)  # fmt: skip
    server = build_server(build_app(context), serve, health)
    host, port = sock.getsockname()[:2]
    log.info("serving", host=host, port=port, model=model.model, scorer=model.scorer)
    previous = {signum: signal.signal(signum, _quiet_stop) for signum in STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()
    return outcome.exit_code
