"""structlog configuration: JSON lines (or a console view), context fields, secret redaction.

One handler on the root logger renders every record, from structlog and from the standard
library alike (librdkafka's own log included, see :func:`librdkafka_logger`), so each line
has the same shape:

* ``TAGSTREAM_LOG_FORMAT``: ``json`` (one orjson object per line), ``console``, or ``auto``
  (console when the stream is a terminal, JSON otherwise); ``TAGSTREAM_LOG_LEVEL``.
* Context: :func:`bind_process_context` fields (worker id, group) appear on every line of
  every thread; ``structlog.contextvars.bind_contextvars`` / ``bound_contextvars`` fields
  (topic, partition, offset, batch id) appear on the lines of the thread that bound them,
  for stdlib records too. (New threads start with an empty contextvars context, hence the
  process-wide variant.)
* Secrets never reach the output (:mod:`worker.observability.redaction`): registered values
  are masked wherever they occur, also inside longer
  strings, and values under secret-looking keys (password, secret, token, ...) are masked at
  every nesting level. A last pass over each rendered line masks registered values that came
  through any other route (an exception message, an object's repr, a traceback).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from types import TracebackType
from typing import Any, Final, TextIO

import orjson
import structlog

from worker.config.observability import ObservabilitySettings
from worker.observability.redaction import redact_event, scrub

LIBRDKAFKA_LOGGER_NAME: Final = "tagstream.librdkafka"
# confluent-kafka logs librdkafka lines as ``logger.log(level, "%s [%s] %s", facility,
# client name, "[thrd:NAME]: text")``.
_LIBRDKAFKA_FORMAT: Final = "%s [%s] %s"
_LIBRDKAFKA_ARGS: Final = 3
_LIBRDKAFKA_THREAD: Final = re.compile(r"^\[thrd:(?P<thread>[^\]]*)\]: (?P<text>.*)$", re.DOTALL)


class _State:
    """Process-wide context. Writers replace the value under the lock and never mutate it,
    so readers on any thread need no lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process_context: Mapping[str, Any] = {}


_state = _State()


# -- context -------------------------------------------------------------------------------


def bind_process_context(**fields: Any) -> None:
    """Fields on every log line of every thread from now on (``worker_id``, ``group``)."""
    with _state.lock:
        _state.process_context = {**_state.process_context, **fields}


def clear_process_context() -> None:
    with _state.lock:
        _state.process_context = {}


def _add_process_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in _state.process_context.items():
        event_dict.setdefault(key, value)
    return event_dict


# -- librdkafka ----------------------------------------------------------------------------


class _LibrdkafkaRecord(logging.Filter):
    """Split confluent-kafka's ``"FAC [client] [thrd:x]: text"`` into structured fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            record.msg == _LIBRDKAFKA_FORMAT
            and isinstance(args, tuple)
            and len(args) == _LIBRDKAFKA_ARGS
        ):
            facility, client, text = (str(arg) for arg in args)
            match = _LIBRDKAFKA_THREAD.match(text)
            record.msg, record.args = (match["text"] if match else text), ()
            record.rdkafka_facility = facility
            record.rdkafka_client = client
            if match:
                record.rdkafka_thread = match["thread"]
        return True


def librdkafka_logger() -> logging.Logger:
    """The stdlib logger to pass as confluent-kafka's ``logger`` setting.

    confluent-kafka then delivers librdkafka's log lines from ``poll()`` (no librdkafka
    thread calls into Python) and they are rendered like every other line, with
    ``rdkafka_facility``, ``rdkafka_client`` and ``rdkafka_thread`` fields.
    """
    logger = logging.getLogger(LIBRDKAFKA_LOGGER_NAME)
    if not any(isinstance(existing, _LibrdkafkaRecord) for existing in logger.filters):
        logger.addFilter(_LibrdkafkaRecord())
    return logger


# -- configuration -------------------------------------------------------------------------


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


# Leading keys of every JSON line, so a human scanning raw output sees them first.
_FIRST_KEYS: Final = ("timestamp", "level", "logger", "event")


def _order_keys(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    ordered = {key: event_dict[key] for key in _FIRST_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


class _ScrubbingRenderer:
    """Wrap a renderer and mask registered secrets in the finished line."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        return scrub(str(self._renderer(logger, method_name, event_dict)))


def _use_console(settings: ObservabilitySettings, stream: TextIO) -> bool:
    if settings.log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return settings.log_format == "console"


def configure_logging(
    settings: ObservabilitySettings | None = None, *, stream: TextIO | None = None
) -> None:
    """Route structlog and the standard library through one renderer on ``stream``
    (stderr by default). Replaces the root logger's handlers and the uncaught-exception
    hooks (``sys.excepthook``, ``threading.excepthook``); call once at start-up."""
    settings = settings if settings is not None else ObservabilitySettings()
    stream = stream if stream is not None else sys.stderr
    console = _use_console(settings, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_process_context,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream, "isatty", lambda: False)()),
            # No local variables in tracebacks: they may hold secrets nobody registered.
            exception_formatter=structlog.dev.plain_traceback,
        )
        if console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    # The console renderer formats exceptions itself; JSON needs them as a string field.
    json_only: list[Any] = [] if console else [structlog.processors.format_exc_info, _order_keys]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *json_only,
            redact_event,
            _ScrubbingRenderer(renderer),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)
    # Uncaught exceptions become log lines too, rendered (and redacted) like the others,
    # instead of raw tracebacks on stderr.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    librdkafka_logger()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a module-level logger used before this call (at import) would
        # otherwise keep structlog's default, non-JSON configuration for good.
        cache_logger_on_first_use=False,
    )


def _log_uncaught(
    exc_type: type[BaseException],
    exc_value: BaseException,
    traceback: TracebackType | None,
) -> None:
    logging.getLogger("tagstream.uncaught").critical(
        "uncaught exception", exc_info=(exc_type, exc_value, traceback)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("tagstream.uncaught").critical(
        "uncaught exception in thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"thread_name": args.thread.name if args.thread is not None else None},
    )
