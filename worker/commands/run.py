"""``tagstream run``: the streaming worker.

Settings come from ``TAGSTREAM_*`` environment variables, an optional YAML file
(``--config``) and the flags below; flags win over the environment, which wins over the
file (see :mod:`worker.config`). Every setting has a flag named after it
(``--max-batch-size`` for ``TAGSTREAM_MAX_BATCH_SIZE``), except the secrets.

Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 1 when a second signal cut the
stop short, 2 for an invalid or missing setting (the message names it) or a missing
topic, 3 when a fatal runtime error stopped the worker.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Final, get_args

import structlog
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from worker.app import EXIT_FATAL, Worker
from worker.config import ConfigError, RunSettings, env_name, load_run_settings, setting_names
from worker.deadletter import WorkerIdentity
from worker.kafka_client import missing_topics
from worker.observer import Observer
from worker.scoring.base import Scorer
from worker.scoring.factory import ScorerConfigError, build_scorer

log = structlog.get_logger(__name__)

EXIT_INTERRUPTED: Final = 1
EXIT_USAGE: Final = 2
# How long start-up waits for the cluster to say which topics exist; a broker that does not
# answer by then is not a configuration error, so start-up goes on (and retries).
TOPIC_CHECK_TIMEOUT_S: Final = 10.0
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


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
    """First SIGTERM/SIGINT: graceful stop. Second: exit 1 at once, committing nothing."""

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

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received += 1
        if self.received > 1:
            sys.stderr.write(f"tagstream run: second {signal.Signals(signum).name}, exiting\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        log.info("stop requested", signal=signal.Signals(signum).name)
        if self.worker is not None:
            self.worker.request_stop()


def make_observer(_settings: RunSettings) -> Observer:
    """The hooks the worker reports to; metrics plug in here."""
    return Observer()


def worker_identity(settings: RunSettings, scorer: Scorer) -> WorkerIdentity:
    info = scorer.info
    return WorkerIdentity(
        group=settings.kafka.group_id,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        model=f"{info.name}@{info.revision}",
    )


def _usage_error(message: str) -> int:
    sys.stderr.write(f"tagstream run: {message}\n")
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
    try:
        settings = load_run_settings(args.config, _flags(args))
    except ConfigError as exc:
        return _usage_error(str(exc))
    kafka = settings.kafka
    missing = missing_topics(
        kafka, [kafka.output_topic, kafka.dead_letter_topic], TOPIC_CHECK_TIMEOUT_S
    )
    if missing:
        return _usage_error(f"topic(s) do not exist: {', '.join(missing)}")
    try:
        scorer = build_scorer(settings.model)
    except ScorerConfigError as exc:
        return _usage_error(str(exc))
    except Exception:
        log.exception("cannot load the scorer")
        return EXIT_FATAL
    if signals.received:
        return 0
    worker = Worker(settings, scorer, worker_identity(settings, scorer), make_observer(settings))
    signals.worker = worker
    return worker.run()
