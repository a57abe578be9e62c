"""``tagstream replay`` without a broker: its usage errors, the offsets it may commit, and
the summary it prints."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from worker.cli import build_parser, main
from worker.commands.replay import (
    UNUSED_TOPIC,
    PartitionProgress,
    ReplayPlan,
    Summary,
    load_kafka_settings,
    plan,
    summary_lines,
)
from worker.contract.replay import ReplayFilter, Verdict
from worker.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OUTPUT_TOPIC", "DLQ_TOPIC", "INPUT_TOPICS", "INPUT_TOPIC_REGEX", "GROUP_ID"):
        monkeypatch.delenv(f"TAGSTREAM_{name}", raising=False)


def _args(*argv: str) -> argparse.Namespace:
    return build_parser(["replay", *argv]).parse_args(["replay", *argv])


def _plan(*argv: str) -> ReplayPlan:
    args = _args(*argv)
    kafka, names_dlq = load_kafka_settings(args)
    return plan(args, kafka, names_dlq)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--since", "last tuesday"], "--since"),
        (["--until", "2024-13-01"], "--until"),
        (["--max-records", "0"], "--max-records"),
        (["--max-replays", "-1"], "--max-replays"),
        (["--rate", "-5"], "--rate"),
        (["--source-partition", "x"], "--source-partition"),
        (["--stage", "parse"], "--stage"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["replay", "--from", "news.dlq", *argv])
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


def test_without_from_or_a_dlq_setting_it_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay"]) == 2
    assert "--from is required" in capsys.readouterr().err


def test_the_to_topic_must_not_be_the_dead_letter_topic() -> None:
    with pytest.raises(ConfigError, match="--to"):
        _plan("--from", "news.dlq", "--to", "news.dlq")


def test_since_must_come_before_until() -> None:
    with pytest.raises(ConfigError, match="--since"):
        _plan("--from", "d", "--since", "2024-05-02", "--until", "2024-05-01")


def test_defaults_come_from_the_run_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGSTREAM_OUTPUT_TOPIC", "news.tagged")
    monkeypatch.setenv("TAGSTREAM_INPUT_TOPICS", "news")
    monkeypatch.setenv("TAGSTREAM_GROUP_ID", "taggers")
    replay = _plan()
    assert replay.source == "news.tagged.dlq"
    assert replay.group == "taggers-replay"
    assert replay.target is None
    assert replay.max_replays == 3
    monkeypatch.setenv("TAGSTREAM_DLQ_TOPIC", "news.dead")
    assert _plan("--group", "mine").source == "news.dead"
    assert _plan("--group", "mine").group == "mine"


def test_connection_settings_alone_are_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGSTREAM_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TAGSTREAM_SASL_MECHANISM", "SCRAM-SHA-512")
    kafka, names_dlq = load_kafka_settings(_args("--from", "d", "--bootstrap-servers", "b:9"))
    assert not names_dlq
    assert kafka.bootstrap_servers == "b:9"
    assert kafka.security_protocol == "SASL_SSL"
    assert kafka.output_topic == UNUSED_TOPIC


def test_an_invalid_setting_is_a_usage_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAGSTREAM_SECURITY_PROTOCOL", "CARRIER_PIGEON")
    assert main(["replay", "--from", "d"]) == 2
    assert "TAGSTREAM_SECURITY_PROTOCOL" in capsys.readouterr().err


def test_filters_reach_the_plan() -> None:
    replay = _plan(
        "--from", "d", "--stage", "validate", "--stage", "inference",
        "--error-class", "ValidateError", "--source-partition", "2",
        "--since", "2024-05-01T00:00:00Z", "--max-records", "10", "--dry-run",
    )  # fmt: skip
    assert replay.record_filter.stages == {"validate", "inference"}
    assert replay.record_filter.error_classes == {"ValidateError"}
    assert replay.record_filter.source_partitions == {2}
    assert replay.record_filter.since is not None and replay.record_filter.until is None
    assert replay.max_records == 10 and replay.dry_run


def test_the_committable_position_waits_for_the_first_unacknowledged_replay() -> None:
    progress = PartitionProgress(start=10)
    assert progress.position() == 10
    for offset in (10, 11, 12):
        progress.examine(offset)
    progress.mark_done(10)  # skipped at once
    progress.mark_done(12)  # acknowledged out of order
    assert progress.position() == 11
    progress.mark_done(11)
    assert progress.position() == 13
    progress.examine(15)  # 13 and 14 were never data records (compaction, markers)
    assert progress.position() == 15
    progress.mark_done(15)
    progress.skip_to(20)  # the fetch position passed the end
    assert progress.position() == 20


def test_skip_to_does_not_pass_a_pending_replay() -> None:
    progress = PartitionProgress(start=0)
    progress.examine(0)
    progress.skip_to(5)
    assert progress.position() == 0


def test_the_summary_counts_skips_and_says_why_stubs_are_not_replayed() -> None:
    summary = Summary(
        replayed=Counter({"news": 4}),
        skipped=Counter({Verdict.STUB: 1, Verdict.EXHAUSTED: 2}),
        by_kind=Counter({("validate", "ValidateError"): 3, ("inference", "ScoreError"): 1}),
        examined=7,
        complete=True,
    )
    replay = ReplayPlan("news.dlq", None, "g", ReplayFilter(), None, 3, 0.0, dry_run=False)
    text = "\n".join(summary_lines(summary, replay))
    assert "replayed 4 of 7 dead letters from news.dlq to news (4)" in text
    assert "skipped 1: stubs without a value (cannot be replayed" in text
    assert "skipped 2: already replayed --max-replays times" in text
    assert "  inference  ScoreError     1\n  validate   ValidateError  3" in text
    assert "run again" not in text
    dry = ReplayPlan("news.dlq", None, "g", ReplayFilter(), 4, 3, 0.0, dry_run=True)
    assert "would replay 4 of 7" in "\n".join(summary_lines(summary, dry))
    assert "stopped at --max-records 4" in "\n".join(summary_lines(summary, dry))
