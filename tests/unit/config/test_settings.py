"""Settings of ``tagstream run``: sources and precedence, validation, exit code 2, and the
librdkafka configuration built from them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from tests.support.scorers import FakeScorer
from worker.cli import main
from worker.commands import run as run_command
from worker.config.loading import SECTIONS, load_observability_settings, load_run_settings
from worker.config.observability import ObservabilitySettings
from worker.config.serve import ServeBatching, ServeSettings
from worker.config.settings import KafkaSettings, ModelSettings
from worker.errors import ConfigError
from worker.kafka.config import (
    consumer_config,
    control_consumer_config,
    producer_config,
    security_config,
)
from worker.observability.setup import start_observability
from worker.pipeline.delivery import RETRY_BACKOFF_MAX_S, backoff_delay

REPO = Path(__file__).resolve().parents[3]
REQUIRED = {"input_topics": "news", "output_topic": "news.tagged"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TAGSTREAM_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _restore_logging(restore_logging: None) -> None:
    """Every test here leaves logging as it found it."""


def _error(**flags: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_run_settings(flags=flags)
    return str(caught.value)


# -- sources and precedence ---------------------------------------------------------------


def test_the_public_environment_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "TAGSTREAM_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "TAGSTREAM_INPUT_TOPICS": "news, blogs",
        "TAGSTREAM_OUTPUT_TOPIC": "tagged",
        "TAGSTREAM_DLQ_TOPIC": "tagged.errors",
        "TAGSTREAM_GROUP_ID": "taggers",
        "TAGSTREAM_MODEL": "some/model",
        "TAGSTREAM_REVISION": "v2",
        "TAGSTREAM_SCORER": "embedding",
        "TAGSTREAM_LABELS": "sports,finance",
        "TAGSTREAM_MULTI_LABEL": "false",
        "TAGSTREAM_THRESHOLD": "0.7",
        "TAGSTREAM_HYPOTHESIS_TEMPLATE": "It is about {}.",
        "TAGSTREAM_MAX_BATCH_SIZE": "32",
        "TAGSTREAM_MAX_WAIT_MS": "20",
        "TAGSTREAM_MAX_BATCH_TOKENS": "4096",
        "TAGSTREAM_DEVICE": "cpu",
        "TAGSTREAM_DTYPE": "float16",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    settings = load_run_settings()

    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.kafka.input_topics == ["news", "blogs"]
    assert settings.kafka.output_topic == "tagged"
    assert settings.kafka.dead_letter_topic == "tagged.errors"
    assert settings.kafka.group_id == "taggers"
    assert (settings.model.model, settings.model.revision) == ("some/model", "v2")
    assert settings.model.scorer == "embedding"
    assert settings.tagging.labels == ["sports", "finance"]
    assert settings.tagging.multi_label is False
    assert settings.tagging.threshold == 0.7
    assert settings.tagging.hypothesis_template == "It is about {}."
    assert (settings.batch.max_batch_size, settings.batch.max_wait_ms) == (32, 20)
    assert settings.model.max_batch_tokens == 4096
    assert (settings.model.device, settings.model.dtype) == ("cpu", "float16")


def test_defaults() -> None:
    settings = load_run_settings(flags=REQUIRED)
    assert settings.batch.max_batch_size == 64
    assert settings.batch.max_wait_ms == 50
    assert settings.batch.max_in_flight_batches == 2
    assert settings.delivery.commit_interval_ms == 1000
    assert settings.shutdown.revoke_timeout_ms == 10_000
    assert settings.shutdown.shutdown_timeout_s == 30
    assert settings.kafka.assignment_strategy == "cooperative-sticky"
    assert settings.kafka.dead_letter_topic == "news.tagged.dlq"


def test_flags_win_over_the_environment_which_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tagstream.yaml"
    config.write_text(
        "input_topics: [from-file]\n"
        "output_topic: out-file\n"
        "max_batch_size: 8\n"
        "max_wait_ms: 11\n"
        "labels: [a, b]\n"
        "consumer_config: {fetch.min.bytes: 1024}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("TAGSTREAM_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("TAGSTREAM_MAX_WAIT_MS", "22")

    settings = load_run_settings(config, flags={"max_wait_ms": "33"})

    assert settings.kafka.input_topics == ["from-file"]
    assert settings.tagging.labels == ["a", "b"]
    assert settings.kafka.consumer_config == {"fetch.min.bytes": 1024}
    assert settings.batch.max_batch_size == 16  # env over file
    assert settings.batch.max_wait_ms == 33  # flag over env


def test_observability_settings_come_from_the_same_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tagstream.yaml"
    config.write_text(
        "input_topics: [news]\noutput_topic: out\nmetrics_port: 9500\nlog_format: console\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("TAGSTREAM_HEALTH_STALE_AFTER_S", "15")
    flags = {"log_level": "debug"}

    alone = load_observability_settings(config, flags)
    settings = load_run_settings(config, flags)

    assert settings.observability == alone
    assert (alone.metrics_port, alone.log_format) == (9500, "console")
    assert (alone.log_level, alone.health_stale_after_s) == ("DEBUG", 15)


def test_every_setting_name_belongs_to_one_section() -> None:
    names = Counter(name for cls in SECTIONS.values() for name in cls.model_fields)
    assert [name for name, count in names.items() if count > 1] == []


def test_serve_settings_read_their_own_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not set(ServeSettings.model_fields) & {
        n for c in SECTIONS.values() for n in c.model_fields
    }
    monkeypatch.setenv("TAGSTREAM_SERVE_PORT", "9000")
    monkeypatch.setenv("TAGSTREAM_SERVE_MAX_PENDING_TEXTS", "64")
    assert ServeSettings().serve_batching is ServeBatching.CONTINUOUS
    monkeypatch.setenv("TAGSTREAM_SERVE_BATCHING", "windowed")
    settings = ServeSettings()
    assert (settings.serve_port, settings.serve_max_pending_texts) == (9000, 64)
    assert (settings.serve_host, settings.serve_max_inputs) == ("0.0.0.0", 64)
    assert settings.serve_batching is ServeBatching.WINDOWED
    with pytest.raises(ValidationError, match="TAGSTREAM_SERVE_MAX_INPUTS"):
        ServeSettings(serve_max_inputs=65)


def test_an_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("output_topic: x\nmax_batch_sise: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        load_run_settings(config)


# -- validation ---------------------------------------------------------------------------


def test_a_missing_output_topic_is_named() -> None:
    assert "TAGSTREAM_OUTPUT_TOPIC" in _error(input_topics="news")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"max_batch_size": "0"}, "TAGSTREAM_MAX_BATCH_SIZE"),
        ({"max_batch_size": "many"}, "TAGSTREAM_MAX_BATCH_SIZE"),
        ({"max_wait_ms": "-1"}, "TAGSTREAM_MAX_WAIT_MS"),
        ({"max_in_flight_batches": "0"}, "TAGSTREAM_MAX_IN_FLIGHT_BATCHES"),
        ({"commit_interval_ms": "0"}, "TAGSTREAM_COMMIT_INTERVAL_MS"),
        ({"threshold": "1.5"}, "TAGSTREAM_THRESHOLD"),
        ({"hypothesis_template": "no slot"}, "TAGSTREAM_HYPOTHESIS_TEMPLATE"),
        ({"device": "tpu"}, "TAGSTREAM_DEVICE"),
        ({"assignment_strategy": "sticky"}, "TAGSTREAM_ASSIGNMENT_STRATEGY"),
        ({"group_protocol": "modern"}, "TAGSTREAM_GROUP_PROTOCOL"),
        ({"security_protocol": "TLS"}, "TAGSTREAM_SECURITY_PROTOCOL"),
        ({"input_topic_regex": "news-(", "input_topics": ""}, "TAGSTREAM_INPUT_TOPIC_REGEX"),
        ({"consumer_config": '{"enable.auto.commit": true}'}, "TAGSTREAM_CONSUMER_CONFIG"),
        (
            {"consumer_config": '{"partition.assignment.strategy": "range"}'},
            "partition.assignment.strategy",
        ),
        ({"consumer_config": '{"group.protocol": "consumer"}'}, "group.protocol"),
        ({"producer_config": '{"acks": "1"}'}, "TAGSTREAM_PRODUCER_CONFIG"),
    ],
)
def test_an_invalid_setting_is_named(flags: dict[str, str], named: str) -> None:
    assert named in _error(**{**REQUIRED, **flags})


def test_topics_and_a_topic_regex_exclude_each_other() -> None:
    both = _error(**REQUIRED, input_topic_regex="news-.*")
    assert "TAGSTREAM_INPUT_TOPICS" in both and "TAGSTREAM_INPUT_TOPIC_REGEX" in both
    assert "TAGSTREAM_INPUT_TOPICS" in _error(output_topic="out")


def test_a_regex_subscription_uses_the_librdkafka_prefix() -> None:
    settings = load_run_settings(flags={"output_topic": "o", "input_topic_regex": "news-.*"})
    assert settings.kafka.subscription == ["^news-.*"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run"], "TAGSTREAM_OUTPUT_TOPIC"),
        (
            ["run", "--input-topics", "a", "--output-topic", "b", "--max-batch-size", "0"],
            "TAGSTREAM_MAX_BATCH_SIZE",
        ),
        (
            ["run", "--input-topics", "a", "--output-topic", "b", "--scorer", "nope"],
            "TAGSTREAM_SCORER",
        ),
    ],
)
def test_the_run_command_exits_2_naming_the_setting(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_the_worker_process_exits_2_on_an_invalid_environment() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TAGSTREAM_")}
    env.update(TAGSTREAM_INPUT_TOPICS="a", TAGSTREAM_OUTPUT_TOPIC="b", TAGSTREAM_MAX_WAIT_MS="soon")
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "TAGSTREAM_MAX_WAIT_MS" in result.stderr
    (line,) = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert (line["level"], line["event"], line["exit_code"]) == ("error", "cannot start", 2)
    assert "TAGSTREAM_MAX_WAIT_MS" in line["error"]


def test_the_scorer_is_built_with_nli_probabilities_warmed_up_and_marked_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[bool] = []

    def build_scorer(settings: ModelSettings, *, include_nli_probs: bool = False) -> FakeScorer:
        built.append(include_nli_probs)
        return FakeScorer(settings)

    monkeypatch.setattr(run_command, "build_scorer", build_scorer)
    settings = load_run_settings(flags={**REQUIRED, "include_nli_probs": "true"})
    obs = start_observability(ObservabilitySettings(metrics_port=0), max_batch_size=8)
    assert obs.health.readiness().body["waiting_for"] == ["model", "group"]

    scorer = run_command._load_scorer(settings, obs)

    assert built == [True]
    assert scorer.info.name == "fake"
    assert obs.health.readiness().body["waiting_for"] == ["group"]


def test_secrets_have_no_command_line_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    assert "--sasl-username" in help_text and "--max-batch-size" in help_text
    assert "--sasl-password" not in help_text and "--ssl-key-password" not in help_text


# -- librdkafka configuration -------------------------------------------------------------


def _kafka(**values: object) -> KafkaSettings:
    return KafkaSettings(input_topics=["news"], output_topic="out", **values)  # type: ignore[arg-type]


def test_the_consumer_never_commits_or_stores_offsets_by_itself() -> None:
    config = consumer_config(_kafka(consumer_config={"fetch.min.bytes": 10}))
    assert config["enable.auto.commit"] is False
    assert config["enable.auto.offset.store"] is False
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert config["fetch.min.bytes"] == 10
    assert "group.instance.id" not in config


def test_the_consumer_prefetch_is_bounded_unless_the_user_says_otherwise() -> None:
    assert consumer_config(_kafka())["queued.max.messages.kbytes"] == 16_384
    roomy = consumer_config(_kafka(consumer_config={"queued.max.messages.kbytes": 65_536}))
    assert roomy["queued.max.messages.kbytes"] == 65_536


def test_the_kip848_protocol_leaves_the_assignor_to_the_broker() -> None:
    config = consumer_config(_kafka(group_protocol="consumer", group_instance_id="replica-0"))
    assert config["group.protocol"] == "consumer"
    assert "partition.assignment.strategy" not in config
    assert config["group.instance.id"] == "replica-0"


def test_the_producer_is_idempotent_with_acks_all() -> None:
    config = producer_config(_kafka(producer_config={"linger.ms": 20}))
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger.ms"] == 20
    solo = producer_config(_kafka(), solo=True)
    assert solo["batch.num.messages"] == 1 and solo["enable.idempotence"] is True


def test_security_settings_reach_both_clients() -> None:
    kafka = _kafka(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password="s3cret",
        ssl_ca_location="/etc/ca.pem",
    )
    expected = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
    }
    assert security_config(kafka) == expected
    assert expected.items() <= consumer_config(kafka).items()
    assert expected.items() <= producer_config(kafka).items()
    assert "s3cret" not in repr(kafka)


def test_a_sasl_mechanism_needs_a_sasl_protocol() -> None:
    assert "TAGSTREAM_SASL_MECHANISM" in _error(**REQUIRED, sasl_mechanism="PLAIN")


def test_retry_backoff_grows_exponentially_up_to_a_cap() -> None:
    delays = [backoff_delay(attempt) for attempt in range(1, 12)]
    assert 0.08 <= delays[0] <= 0.12
    assert 0.16 <= delays[1] <= 0.24
    assert 0.32 <= delays[2] <= 0.48
    assert max(delays) <= RETRY_BACKOFF_MAX_S * 1.2
    assert delays[-1] >= RETRY_BACKOFF_MAX_S * 0.8


def test_the_default_labels_obey_the_event_label_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGSTREAM_LABELS", "sports,finance,weather")
    monkeypatch.setenv("TAGSTREAM_MAX_LABELS", "2")
    with pytest.raises(
        ConfigError, match=r"TAGSTREAM_LABELS.*at most 2 labels.*TAGSTREAM_MAX_LABELS=2"
    ):
        load_run_settings(flags={"input_topics": "in", "output_topic": "out"})
    monkeypatch.setenv("TAGSTREAM_MAX_LABELS", "3")
    monkeypatch.setenv("TAGSTREAM_MAX_LABEL_CHARS", "6")
    with pytest.raises(ConfigError, match="TAGSTREAM_MAX_LABEL_CHARS=6"):
        load_run_settings(flags={"input_topics": "in", "output_topic": "out"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TAGSTREAM_MAX_UNCOMMITTED_RECORDS", "0"),
        ("TAGSTREAM_MAX_UNCOMMITTED_AGE_S", "0"),
        ("TAGSTREAM_RETRY_DEADLINE_S", "-1"),
        ("TAGSTREAM_CIRCUIT_WINDOW", "0"),
        ("TAGSTREAM_CIRCUIT_FAILURE_SHARE", "1.5"),
        ("TAGSTREAM_CIRCUIT_MAX_OPEN_S", "0"),
        ("TAGSTREAM_MAX_EVENT_TOKENS", "0"),
    ],
)
def test_a_bad_limit_stops_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_run_settings(flags={"input_topics": "in", "output_topic": "out"})


def test_profile_settings_default_to_off_with_documented_limits() -> None:
    profiles = load_run_settings(flags=REQUIRED).profiles
    assert profiles.control_topic is None
    assert (profiles.max_profiles, profiles.max_profile_record_bytes) == (1000, 65536)
    assert profiles.control_load_timeout_s == 60.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_profiles", "0"),
        ("max_profile_record_bytes", "10"),
        ("control_load_timeout_s", "0"),
        ("control_topic", ""),
    ],
)
def test_a_bad_profile_setting_stops_start_up_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"TAGSTREAM_{name.upper()}"):
        load_run_settings(flags={**REQUIRED, name: value})


def test_the_control_reader_stays_outside_the_input_group() -> None:
    kafka = load_run_settings(flags=REQUIRED).kafka
    config = control_consumer_config(kafka)
    assert config["group.id"] != kafka.group_id
    assert config["enable.auto.commit"] is False
    assert config["isolation.level"] == "read_committed"
