"""``tagstream run``: the streaming worker.

Settings come from ``TAGSTREAM_*`` environment variables, an optional YAML file
(``--config``) and the flags below; flags win over the environment, which wins over the
file (see :mod:`worker.config.loading`). Every setting has a flag named after it
(``--max-batch-size`` for ``TAGSTREAM_MAX_BATCH_SIZE``), except the secrets.

Start-up, in order: logging (so that every later line, errors included, is structured),
the settings, the start-up line with the effective settings (secrets masked), the
``/metrics`` ``/healthz`` ``/readyz`` server (so probes get answers while the model loads),
the topic check (output, dead-letter and control topics), the model, one warm-up batch,
the worker loop, which first reads the label profiles of the control topic to its end
(``TAGSTREAM_CONTROL_TOPIC``, when set) and then joins the group; ``/readyz`` waits for all
of them.

Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 1 when a second signal cut the
stop short, 2 for an invalid or missing setting (the message names it), a missing topic
or a metrics port that is taken, 3 when a fatal runtime error stopped the worker (a model
that cannot be loaded or warmed up included).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Final, get_args

import structlog
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from worker.config.loading import (
    RunSettings,
    env_name,
    load_observability_settings,
    load_run_settings,
    setting_names,
)
from worker.config.observability import ObservabilitySettings
from worker.config.settings import KafkaSettings
from worker.contract.deadletter import WorkerIdentity
from worker.contract.scorer import Scorer
from worker.errors import ConfigError, ObservabilityServerError, ScorerConfigError, WarmUpError
from worker.exit_codes import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE
from worker.kafka.admin import missing_topics, topic_configs
from worker.observability.logs import bind_process_context, configure_logging
from worker.observability.redaction import redacted_settings, register_settings_secrets
from worker.observability.setup import Observability, start_observability
from worker.pipeline.inference import warm_up
from worker.pipeline.tracing import Tracer
from worker.pipeline.worker import Worker
from worker.scoring.factory import build_scorer

log = structlog.get_logger(__name__)

# How long start-up waits for the cluster to say which topics exist; a broker that does not
# answer by then is not a configuration error, so start-up goes on (and retries).
TOPIC_CHECK_TIMEOUT_S: Final = 10.0
# Allocations between two young-generation collections. The loop allocates a few tuples
# per record, so at CPython's default (700) a collection ran every couple of hundred
# records and cyclic GC took about a fifth of the worker's CPU (perf, no-model worker);
# at 50,000 it is a few per cent. Older generations keep CPython's ratios.
GC_YOUNG_THRESHOLD: Final = 50_000
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# Topic configuration keys the start-up check reads.
MAX_MESSAGE_BYTES: Final = "max.message.bytes"
CLEANUP_POLICY: Final = "cleanup.policy"


def _is_secret(field: FieldInfo) -> bool:
    annotation = field.annotation
    return annotation is SecretStr or SecretStr in get_args(annotation)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML file of settings (flat mapping)."
    )
    for name, cls in setting_names().items():
        field = cls.model_fields[name]
        if _is_secret(field):
            continue  # secrets stay out of the process list: environment or YAML only
        description = field.description or ""
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"{description} [{env_name(name)}]".strip(),
        )


class _Signals:
    """First SIGTERM/SIGINT: graceful stop. Second: exit 1 at once, committing nothing.

    The handler only sets flags and logs: marking the health state (a lock the interrupted
    main thread may hold) is left to the worker loop, which notices the request within one
    poll timeout.
    """

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.received = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def attach(self, worker: Worker) -> None:
        """Route stop requests to ``worker``, including one that arrived before it existed."""
        self.worker = worker
        if self.received:
            worker.request_stop()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received > 1:
            log.critical(f"second {name}, exiting at once without committing", signal=name)
            os._exit(EXIT_INTERRUPTED)
        log.info("stop requested", signal=name)
        if self.worker is not None:
            self.worker.request_stop()


class _StartUpError(Exception):
    """Start-up cannot go on; already logged."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


def worker_identity(worker_id: str, settings: RunSettings, scorer: Scorer) -> WorkerIdentity:
    info = scorer.info
    return WorkerIdentity(
        group=settings.kafka.group_id,
        worker=worker_id,
        model=f"{info.name}@{info.revision}",
    )


def _usage_error(message: str) -> int:
    log.error("cannot start", error=message, exit_code=EXIT_USAGE)
    return EXIT_USAGE


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in setting_names() if hasattr(args, name)}


def execute(args: argparse.Namespace) -> int:
    signals = _Signals()
    signals.install()
    try:
        return _run(args, signals)
    finally:
        signals.restore()


def _run(args: argparse.Namespace, signals: _Signals) -> int:
    flags = _flags(args)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    bind_process_context(worker_id=worker_id)
    try:
        observability = load_observability_settings(args.config, flags)
    except ConfigError as exc:
        # Defaults, without reading the environment that just failed to validate.
        configure_logging(ObservabilitySettings.model_construct())
        return _usage_error(str(exc))
    configure_logging(observability)
    try:
        settings = load_run_settings(args.config, flags)
    except ConfigError as exc:
        return _usage_error(str(exc))
    register_settings_secrets(settings)
    bind_process_context(group=settings.kafka.group_id)
    log.info("worker starting", settings=redacted_settings(settings))
    try:
        tracer = start_tracer(settings)
    except _StartUpError as exc:
        return exc.exit_code
    try:
        obs = start_observability(
            settings.observability, max_batch_size=settings.batch.max_batch_size
        )
    except ObservabilityServerError as exc:
        return _usage_error(f"{env_name('metrics_port')}: {exc}")
    try:
        return _serve(settings, obs, worker_id, signals, tracer)
    finally:
        obs.close()
        tracer.close()


def start_tracer(settings: RunSettings, environ: Mapping[str, str] = os.environ) -> Tracer:
    """The worker's tracer: the no-op one unless tracing is on, then OpenTelemetry's, imported
    only now. Without the ``otel`` extra, ``TAGSTREAM_TRACING=true`` stops start-up (exit 2);
    an endpoint alone only warns (it may be set for every pod of a cluster)."""
    tracing = settings.tracing
    if not tracing.enabled(environ):
        return Tracer()
    try:
        from worker.observability.tracing import start_tracing

        tracer = start_tracing(
            tracing,
            group=settings.kafka.group_id,
            max_batch_size=settings.batch.max_batch_size,
        )
    except ImportError as exc:
        message = (
            f"{env_name('tracing')}: tracing needs the otel extra "
            f"(pip install 'tagstream[otel]'): {exc}"
        )
        if tracing.explicit:
            raise _StartUpError(_usage_error(message)) from exc
        log.warning("tracing off: " + message, endpoint_set=True)
        return Tracer()
    log.info(
        "tracing on",
        exporter=tracing.tracing_exporter,
        endpoint=environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    return tracer


def _serve(
    settings: RunSettings, obs: Observability, worker_id: str, signals: _Signals, tracer: Tracer
) -> int:
    """Everything after the observability server is up: topics, model, warm-up, the loop."""
    kafka = settings.kafka
    topics = [kafka.output_topic, kafka.dead_letter_topic]
    if settings.profiles.control_topic is not None:
        topics.append(settings.profiles.control_topic)
    missing = missing_topics(
        kafka,
        topics,
        TOPIC_CHECK_TIMEOUT_S,
        obs.client_config(),
    )
    if missing:
        return _usage_error(f"topic(s) do not exist: {', '.join(missing)}")
    configs = topic_configs(kafka, topics, TOPIC_CHECK_TIMEOUT_S, obs.client_config())
    _report_topics(kafka, configs)
    _report_control_topic(settings.profiles.control_topic, configs)
    try:
        scorer = _load_scorer(settings, obs)
    except _StartUpError as exc:
        return exc.exit_code
    if signals.received:
        return 0
    worker = Worker(
        settings,
        scorer,
        worker_identity(worker_id, settings, scorer),
        obs.observer,
        client_config=obs.client_config(),
        consumer_config=obs.consumer_config(),
        tracer=tracer,
    )
    handoff = worker.handoff
    obs.metrics.track_in_flight(lambda: handoff.in_flight)
    signals.attach(worker)
    _settle_garbage_collector()
    return worker.run()


def _settle_garbage_collector() -> None:
    """Before the loop: what start-up built (the model, the settings, the clients) lives as
    long as the process, so it moves to the permanent generation and no collection walks it
    again; young collections run less often (:data:`GC_YOUNG_THRESHOLD`)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _report_topics(kafka: KafkaSettings, configs: dict[str, dict[str, str]]) -> None:
    """Log what the output topics' configuration means for the records written to them."""
    limit = configs.get(kafka.dead_letter_topic, {}).get(MAX_MESSAGE_BYTES)
    if limit is None:
        log.warning(
            "dead-letter topic's record size limit is unknown; a record it refuses is "
            "replaced by a stub without the value",
            topic=kafka.dead_letter_topic,
        )
    else:
        log.info(
            "dead-letter topic record size limit",
            topic=kafka.dead_letter_topic,
            max_message_bytes=int(limit),
        )
    policy = configs.get(kafka.output_topic, {}).get(CLEANUP_POLICY, "")
    if "compact" in policy:
        log.warning(
            "output topic is compacted: the broker rejects a scored event without a key, "
            "and its input is dead-lettered (stage produce)",
            topic=kafka.output_topic,
            cleanup_policy=policy,
        )


def _report_control_topic(topic: str | None, configs: dict[str, dict[str, str]]) -> None:
    """A control topic that is not compacted loses deleted and old profiles only to
    retention, and the oldest ones first: warn, the worker still reads what is there."""
    if topic is None:
        return
    policy = configs.get(topic, {}).get(CLEANUP_POLICY)
    if policy is not None and "compact" not in policy:
        log.warning(
            "control topic is not compacted: retention may delete profiles still in force, "
            "and a worker that starts after that does not know them",
            topic=topic,
            cleanup_policy=policy,
        )


def _load_scorer(settings: RunSettings, obs: Observability) -> Scorer:
    """Build the scorer, warm it up with one batch, and mark the model ready; raises
    :class:`_StartUpError` with the exit code when that fails."""
    started = time.monotonic()
    try:
        scorer = build_scorer(settings.model, include_nli_probs=settings.tagging.include_nli_probs)
    except ScorerConfigError as exc:
        raise _StartUpError(_usage_error(str(exc))) from exc
    except Exception as exc:
        log.exception("cannot load the scorer")
        raise _StartUpError(EXIT_FATAL) from exc
    loaded = time.monotonic()
    obs.metrics.set_model_info(scorer.info)
    try:
        warm_up(scorer, settings.tagging)
    except WarmUpError as exc:
        log.exception("the model failed its warm-up batch")
        raise _StartUpError(EXIT_FATAL) from exc
    obs.health.mark_model_ready()
    log.info(
        "model ready",
        model=scorer.info.name,
        revision=scorer.info.revision,
        device=scorer.info.device,
        load_s=round(loaded - started, 3),
        warm_up_s=round(time.monotonic() - loaded, 3),
    )
    return scorer
