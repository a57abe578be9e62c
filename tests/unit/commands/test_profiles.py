"""``tagstream profiles``: what ``set`` writes, what ``list`` prints, and the usage errors
that stop it before it talks to Kafka (the broker round trips are in the integration
tests)."""

from __future__ import annotations

import argparse

import orjson
import pytest

from worker.cli import build_parser, main
from worker.commands.profiles import profile_lines, spec_of
from worker.contract.profiles import Profile, ProfileLimits
from worker.errors import ConfigError
from worker.exit_codes import EXIT_USAGE


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TAGSTREAM_CONTROL_TOPIC", "TAGSTREAM_MAX_LABELS", "TAGSTREAM_LABELS"):
        monkeypatch.delenv(name, raising=False)


def _args(*argv: str) -> argparse.Namespace:
    full = ["profiles", *argv]
    return build_parser(full).parse_args(full)


def test_set_builds_the_record_value_from_the_flags() -> None:
    args = _args(
        "set",
        "news",
        "--labels",
        "sports, finance",
        "--single-label",
        "--threshold",
        "0.7",
        "--label-threshold",
        "finance=0.9",
        "--hypothesis-template",
        "It is {}.",
    )
    value = orjson.loads(spec_of(args, ProfileLimits()).to_json())
    assert value == {
        "labels": ["sports", "finance"],
        "hypothesis_template": "It is {}.",
        "multi_label": False,
        "threshold": 0.7,
        "label_thresholds": {"finance": 0.9},
    }


def test_set_refuses_what_a_worker_would_reject() -> None:
    args = _args("set", "news", "--labels", "a,b,c")
    with pytest.raises(ConfigError, match="at most 2 labels"):
        spec_of(args, ProfileLimits(max_labels=2))
    args = _args("set", "news", "--labels", "a", "--label-threshold", "b=0.5")
    with pytest.raises(ConfigError, match="not one of the labels"):
        spec_of(args, ProfileLimits())
    with pytest.raises(ConfigError, match="TAGSTREAM_MAX_PROFILE_RECORD_BYTES=64"):
        spec_of(_args("set", "news", "--labels", "x" * 60), ProfileLimits(max_record_bytes=64))


def test_a_threshold_outside_zero_to_one_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        _args("set", "news", "--labels", "a", "--threshold", "2")
    assert caught.value.code == EXIT_USAGE
    assert "within 0..1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set", "news", "--labels", "a"], "--topic is required"),
        (["set", "bad name", "--labels", "a", "--topic", "p"], "profile name"),
        (["delete", "a/b", "--topic", "p"], "profile name"),
        (["set", "news", "--labels", "a,a", "--topic", "p"], "unique"),
    ],
)
def test_usage_errors_name_the_problem_before_any_kafka_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["profiles", *argv]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_list_prints_a_table_or_json_lines() -> None:
    profiles = [
        Profile("default", 3, ("a", "b"), True, "It is {}.", 0.5, {"b": 0.8}),
        Profile("news", 9, ("c",), False, "News {}.", 0.6),
    ]
    table = profile_lines(profiles, as_json=False)
    assert table[0].split("\t") == [
        "name",
        "version",
        "multi_label",
        "threshold",
        "label_thresholds",
        "template",
        "labels",
    ]
    assert table[1].split("\t") == ["default", "3", "true", "0.5", "b=0.8", "It is {}.", "a,b"]
    assert table[2].split("\t") == ["news", "9", "false", "0.6", "-", "News {}.", "c"]
    lines = profile_lines(profiles, as_json=True)
    assert [orjson.loads(line) for line in lines] == [p.describe() for p in profiles]
