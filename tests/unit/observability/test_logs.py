"""Log output: JSON lines with context fields, stdlib and librdkafka routed through
structlog, and secrets that never reach a line."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import structlog
from confluent_kafka import Producer
from pydantic import SecretStr

from worker.config.observability import ObservabilitySettings
from worker.config.settings import KafkaSettings
from worker.observability.logs import (
    LIBRDKAFKA_LOGGER_NAME,
    bind_process_context,
    configure_logging,
    librdkafka_logger,
)
from worker.observability.redaction import (
    MASK,
    redact,
    redacted_settings,
    register_secret,
    register_settings_secrets,
)

# Quotes and a backslash: the JSON and repr escapes of the value differ from the raw text.
SASL_PASSWORD = 'sasl-Pa55"word\\x'
OAUTH_SECRET = "oauth-client-secret-123"
CONTEXT = {"topic": "news", "partition": 3, "offset": 42, "batch_id": "b-7"}
PROCESS = {"worker_id": "worker-1", "group": "tagstream"}
# confluent-kafka hands librdkafka log lines over in poll(); a debug context makes it log at
# once (broker set-up), with no broker needed. The bound only stops a broken test.
LIBRDKAFKA_WAIT_S = 5.0


@pytest.fixture(autouse=True)
def _restore_logging(restore_logging: None) -> None:
    """Every test here leaves logging as it found it."""


def _configure(fmt: str = "json", level: str = "DEBUG") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(ObservabilitySettings(log_format=fmt, log_level=level), stream=stream)
    return stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    parsed = [orjson.loads(line) for line in text.splitlines()]
    assert all(isinstance(line, dict) for line in parsed)
    return parsed


def _kafka_settings() -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers="127.0.0.1:1",
        input_topics=["news"],
        output_topic="news.tagged",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="tagstream",
        sasl_password=SecretStr(SASL_PASSWORD),
        consumer_config={"sasl.oauthbearer.client.secret": OAUTH_SECRET},
    )


def _librdkafka_lines(stream: io.StringIO, config: dict[str, Any]) -> list[dict[str, Any]]:
    producer = Producer(
        {"bootstrap.servers": "127.0.0.1:1", "logger": librdkafka_logger(), **config}
    )
    deadline = time.monotonic() + LIBRDKAFKA_WAIT_S
    lines: list[dict[str, Any]] = []
    while not lines and time.monotonic() < deadline:
        producer.poll(0.1)
        lines = [line for line in _lines(stream) if line["logger"] == LIBRDKAFKA_LOGGER_NAME]
    producer.flush(0)
    return lines


# -- shape and context ---------------------------------------------------------------------


def test_every_line_is_json_with_the_context_fields() -> None:
    stream = _configure()
    bind_process_context(**PROCESS)
    structlog.contextvars.bind_contextvars(**CONTEXT)
    structlog.get_logger("tagstream.test").info("batch scored", size=8)
    logging.getLogger("some.library").warning("stdlib %s", "record", extra={"attempt": 2})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("tagstream.test").exception("scorer failed")
    lines = _lines(stream)
    assert [line["event"] for line in lines] == ["batch scored", "stdlib record", "scorer failed"]
    for line in lines:
        assert {**CONTEXT, **PROCESS}.items() <= line.items()
        assert {"timestamp", "level", "logger"} <= line.keys()
    assert lines[0]["size"] == 8
    assert (lines[1]["level"], lines[1]["logger"], lines[1]["attempt"]) == (
        "warning",
        "some.library",
        2,
    )
    assert "RuntimeError: boom" in lines[2]["exception"]


def test_other_threads_get_the_process_context_but_not_this_threads_context() -> None:
    stream = _configure()
    bind_process_context(**PROCESS)
    structlog.contextvars.bind_contextvars(**CONTEXT)

    def inference() -> None:
        with structlog.contextvars.bound_contextvars(batch_id="b-9"):
            structlog.get_logger("tagstream.inference").debug("batch scored")

    thread = threading.Thread(target=inference)
    thread.start()
    thread.join()
    (line,) = _lines(stream)
    assert PROCESS.items() <= line.items()
    assert line["batch_id"] == "b-9"
    assert "topic" not in line


def test_librdkafka_logs_are_routed_through_structlog() -> None:
    stream = _configure()
    bind_process_context(**PROCESS)
    lines = _librdkafka_lines(stream, {"debug": "broker"})
    assert lines
    first = lines[0]
    assert first["level"] == "debug"
    assert first["rdkafka_client"].startswith("rdkafka#producer-")
    assert first["rdkafka_facility"].isupper()
    assert "rdkafka_thread" in first
    assert not first["event"].startswith("[thrd:")
    assert PROCESS.items() <= first.items()


def test_uncaught_exceptions_in_threads_become_redacted_json_lines() -> None:
    stream = _configure()
    register_secret(SASL_PASSWORD)

    def crash() -> None:
        raise RuntimeError(f"cannot authenticate with {SASL_PASSWORD}")

    thread = threading.Thread(target=crash, name="tagstream-inference")
    thread.start()
    thread.join()
    (line,) = _lines(stream)
    assert (line["level"], line["event"], line["thread_name"]) == (
        "critical",
        "uncaught exception in thread",
        "tagstream-inference",
    )
    assert f"RuntimeError: cannot authenticate with {MASK}" in line["exception"]


def test_uncaught_exceptions_in_the_main_thread_become_json_lines() -> None:
    stream = _configure()
    try:
        raise KeyError("missing")
    except KeyError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    (line,) = _lines(stream)
    assert line["event"] == "uncaught exception"
    assert "KeyError: 'missing'" in line["exception"]


def test_level_filters_structlog_and_stdlib_alike() -> None:
    stream = _configure(level="WARNING")
    structlog.get_logger("tagstream.test").info("hidden")
    logging.getLogger("lib").info("hidden too")
    structlog.get_logger("tagstream.test").warning("shown")
    assert [line["event"] for line in _lines(stream)] == ["shown"]


def test_auto_format_is_json_when_the_stream_is_not_a_terminal() -> None:
    stream = _configure(fmt="auto")
    structlog.get_logger("t").info("hello")
    assert _lines(stream)[0]["event"] == "hello"


def test_console_format_is_human_readable() -> None:
    stream = _configure(fmt="console")
    structlog.get_logger("t").info("hello", topic="news")
    text = stream.getvalue()
    assert "hello" in text
    assert "topic=news" in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)


# -- secrets -------------------------------------------------------------------------------


def test_a_registered_sasl_password_never_appears_in_any_line() -> None:
    stream = _configure()
    settings = _kafka_settings()
    register_settings_secrets(settings)
    log = structlog.get_logger("tagstream.test")
    log.info(f"connecting with {SASL_PASSWORD}")
    log.debug("config", config={"outer": {"inner": [f"pw={SASL_PASSWORD}"]}})
    log.info("as a plain field", value=SASL_PASSWORD)
    log.info("positional %s", SASL_PASSWORD)
    logging.getLogger("lib").error("stdlib %s", SASL_PASSWORD)
    logging.getLogger(LIBRDKAFKA_LOGGER_NAME).warning(
        "%s [%s] %s", "SASL", "rdkafka#consumer-1", f"[thrd:main]: bad password {SASL_PASSWORD}"
    )
    try:
        raise ValueError(f"auth failed for {SASL_PASSWORD}")
    except ValueError:
        log.exception("failure")
    log.info("oauth", note=f"client secret {OAUTH_SECRET}")
    text = stream.getvalue()
    lines = _lines(stream)
    assert len(lines) == 8
    for secret in (SASL_PASSWORD, OAUTH_SECRET):
        for form in (secret, orjson.dumps(secret).decode()[1:-1], repr(secret)[1:-1]):
            assert form not in text
    assert lines[0]["event"] == f"connecting with {MASK}"
    assert lines[1]["config"] == {"outer": {"inner": [f"pw={MASK}"]}}


def test_secret_named_keys_are_masked_at_every_level_even_unregistered() -> None:
    stream = _configure()
    structlog.get_logger("t").info(
        "settings",
        password="p1",
        nested={"sasl.password": "p2", "deeper": {"ssl.key.password": "p3", "ok": "visible"}},
        items=[{"access_token": "p4"}, {"client_secret": "p5"}],
        max_batch_tokens=16384,
        batch_tokens=99,
    )
    (line,) = _lines(stream)
    assert line["password"] == MASK
    assert line["nested"] == {
        "sasl.password": MASK,
        "deeper": {"ssl.key.password": MASK, "ok": "visible"},
    }
    assert line["items"] == [{"access_token": MASK}, {"client_secret": MASK}]
    assert (line["max_batch_tokens"], line["batch_tokens"]) == (16384, 99)


def test_secrets_are_masked_in_console_output_too() -> None:
    stream = _configure(fmt="console")
    register_secret(SecretStr(SASL_PASSWORD))
    structlog.get_logger("t").info("connecting", detail=("tuple", SASL_PASSWORD), obj=object())
    structlog.get_logger("t").info(f"raw {SASL_PASSWORD}")
    text = stream.getvalue()
    assert SASL_PASSWORD not in text
    assert repr(SASL_PASSWORD)[1:-1] not in text
    assert MASK in text


class _Holder:
    """An arbitrary object whose text form embeds the secret (JSON renders str(),
    the console renders repr())."""

    def __str__(self) -> str:
        return f"Holder(password={SASL_PASSWORD})"

    __repr__ = __str__


def test_secrets_inside_rendered_objects_and_tracebacks_are_masked() -> None:
    for fmt in ("json", "console"):
        stream = _configure(fmt=fmt)
        register_secret(SASL_PASSWORD)
        log = structlog.get_logger("t")
        log.info("object field", holder=_Holder())
        try:
            raise ConnectionError(f"login failed: {SASL_PASSWORD}")
        except ConnectionError:
            log.exception("connection failed")
        text = stream.getvalue()
        assert "Holder(password=" in text, fmt
        assert "login failed" in text, fmt
        assert SASL_PASSWORD not in text, fmt
        assert orjson.dumps(SASL_PASSWORD).decode()[1:-1] not in text, fmt


def test_librdkafka_lines_cannot_leak_the_password_from_the_client_config() -> None:
    stream = _configure()
    settings = _kafka_settings()
    register_settings_secrets(settings)
    assert settings.sasl_password is not None
    config = {
        "debug": "broker,security,conf",
        "security.protocol": "sasl_plaintext",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "tagstream",
        "sasl.password": settings.sasl_password.get_secret_value(),
    }
    assert _librdkafka_lines(stream, config)
    assert SASL_PASSWORD not in stream.getvalue()


def test_redacted_settings_for_the_start_up_line() -> None:
    settings = _kafka_settings()
    sections = redacted_settings(settings, ObservabilitySettings(log_format="json"))
    assert set(sections) == {"kafka", "observability"}
    kafka = sections["kafka"]
    assert kafka["sasl_password"] == MASK
    assert kafka["sasl_username"] == "tagstream"
    assert kafka["consumer_config"] == {"sasl.oauthbearer.client.secret": MASK}
    assert kafka["ssl_key_password"] is None  # unset stays visibly unset
    assert sections["observability"]["log_format"] == "json"
    rendered = orjson.dumps(sections).decode()
    assert SASL_PASSWORD not in rendered
    assert OAUTH_SECRET not in rendered


def test_redacted_settings_accepts_a_dataclass_of_settings() -> None:
    @dataclass(frozen=True)
    class Run:
        kafka: KafkaSettings
        observability: ObservabilitySettings

    sections = redacted_settings(Run(_kafka_settings(), ObservabilitySettings()))
    assert set(sections) == {"kafka", "observability"}
    assert sections["kafka"]["sasl_password"] == MASK


def test_redact_leaves_ordinary_values_alone() -> None:
    value = {"labels": ["sports", "finance"], "count": 3, "ratio": 0.5, "none": None}
    assert redact(value) == value


def test_empty_secrets_are_ignored() -> None:
    register_secret("")
    register_secret(None)
    stream = _configure()
    structlog.get_logger("t").info("nothing to mask")
    assert _lines(stream)[0]["event"] == "nothing to mask"
