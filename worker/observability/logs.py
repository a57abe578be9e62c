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
* Secrets never reach the output: values registered with :func:`register_secret` (or found
  by :func:`register_settings_secrets`) are masked wherever they occur, also inside longer
  strings, and values under secret-looking keys (password, secret, token, ...) are masked at
  every nesting level. A last pass over each rendered line masks registered values that came
  through any other route (an exception message, an object's repr, a traceback).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Final, TextIO, cast

import orjson
import structlog
from pydantic import BaseModel, SecretBytes, SecretStr

from worker.config.observability import ObservabilitySettings

MASK: Final = "**********"
# Keys whose values are secrets whatever they hold: librdkafka's sasl.password,
# ssl.key.password, ssl.keystore.password, sasl.oauthbearer.client.secret, the settings'
# sasl_password / ssl_key_password, and the usual token / API key / credential names.
# "token" must be a whole final word: batch_tokens, max_batch_tokens and tokenizer are not.
SECRET_KEY_PATTERN: Final = re.compile(
    r"pass(word|wd|phrase)|secret|private[._-]?key|ssl\.key\.pem|sasl\.oauthbearer\.config"
    r"|(^|[._-])(token|access[._-]?token|api[._-]?key|credentials?)$",
    re.IGNORECASE,
)
# Deeper structures than this are rendered as (scrubbed) text instead of being walked.
MAX_REDACT_DEPTH: Final = 16
LIBRDKAFKA_LOGGER_NAME: Final = "tagstream.librdkafka"
# confluent-kafka logs librdkafka lines as ``logger.log(level, "%s [%s] %s", facility,
# client name, "[thrd:NAME]: text")``.
_LIBRDKAFKA_FORMAT: Final = "%s [%s] %s"
_LIBRDKAFKA_ARGS: Final = 3
_LIBRDKAFKA_THREAD: Final = re.compile(r"^\[thrd:(?P<thread>[^\]]*)\]: (?P<text>.*)$", re.DOTALL)


class _State:
    """Registered secrets and process-wide context. Writers replace the values under the
    lock and never mutate them, so readers on any thread need no lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.secret_forms: tuple[str, ...] = ()
        self.process_context: Mapping[str, Any] = {}


_state = _State()


# -- secrets -------------------------------------------------------------------------------


def _forms(secret: str) -> set[str]:
    """How a secret can appear in a line: raw, JSON-escaped, repr-escaped."""
    return {secret, orjson.dumps(secret).decode()[1:-1], repr(secret)[1:-1]}


def register_secret(value: str | SecretStr | SecretBytes | bytes | None) -> None:
    """Mask this value wherever it appears in any later log line. Empty values are ignored."""
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not value:
        return
    with _state.lock:
        forms = set(_state.secret_forms) | _forms(value)
        # Longest first, so a secret containing another one is masked whole.
        _state.secret_forms = tuple(sorted(forms, key=len, reverse=True))


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    with _state.lock:
        _state.secret_forms = ()


def register_settings_secrets(*settings: object) -> None:
    """Register every secret in pydantic settings (or dataclasses of them): ``SecretStr`` /
    ``SecretBytes`` fields, and string values under secret-looking keys at any depth (such
    as ``consumer_config={"sasl.password": ...}``)."""
    for item in settings:
        _collect_secrets(item, key=None, depth=0)


def _collect_secrets(value: Any, key: str | None, depth: int) -> None:
    if depth > MAX_REDACT_DEPTH:
        return
    if isinstance(value, SecretStr | SecretBytes):
        register_secret(value)
    elif isinstance(value, str | bytes):
        if key is not None and SECRET_KEY_PATTERN.search(key):
            register_secret(value)
    else:
        for child_key, child in _children(value, key):
            _collect_secrets(child, child_key, depth + 1)


def _children(value: Any, key: str | None) -> Iterable[tuple[str | None, Any]]:
    """The (key, value) pairs inside a settings object, dataclass, mapping or collection;
    items of a collection inherit the key the collection sits under."""
    if isinstance(value, BaseModel):
        return [(name, getattr(value, name)) for name in type(value).model_fields]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(field.name, getattr(value, field.name)) for field in dataclasses.fields(value)]
    if isinstance(value, Mapping):
        return [(str(item_key), item) for item_key, item in value.items()]
    if isinstance(value, list | tuple | set | frozenset):
        return [(key, item) for item in value]
    return []


def scrub(text: str) -> str:
    """Mask every registered secret occurring in ``text``."""
    for form in _state.secret_forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with secrets masked: registered values inside strings, and the
    values of secret-looking keys in mappings at any depth. Pydantic models become dicts."""
    if isinstance(value, str):
        return scrub(value)
    if depth > MAX_REDACT_DEPTH:
        return scrub(str(value))
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {key: _redact_item(key, item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [redact(item, depth + 1) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def _redact_item(key: Any, value: Any, depth: int) -> Any:
    if isinstance(key, str) and SECRET_KEY_PATTERN.search(key) and value not in (None, ""):
        return MASK
    return redact(value, depth)


def redact_event(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: :func:`redact` applied to the whole event dict."""
    return cast(MutableMapping[str, Any], redact(event_dict))


def redacted_settings(*settings: object) -> dict[str, Any]:
    """Effective settings for the start-up line, secrets masked, one section per model.

    Accepts pydantic models (section name: the class name without ``Settings``, lower case)
    and dataclasses of models such as ``RunSettings`` (section name: the field name).
    """
    sections: dict[str, Any] = {}
    for item in settings:
        for name, model in _sections(item):
            sections[name] = redact(model.model_dump(mode="json"))
    return sections


def _sections(item: object) -> Iterable[tuple[str, BaseModel]]:
    if isinstance(item, BaseModel):
        name = type(item).__name__.removesuffix("Settings").lower() or "settings"
        yield name, item
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        for field in dataclasses.fields(item):
            value = getattr(item, field.name)
            if isinstance(value, BaseModel):
                yield field.name, value
    else:
        raise TypeError(f"not a settings model: {type(item).__name__}")


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
