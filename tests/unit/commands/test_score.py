"""``tagstream score`` end to end: ``python -m worker score`` in a subprocess, real models."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from worker.commands.score import score_lines
from worker.config.settings import TaggingSettings
from worker.contract.events import ScoredEvent
from worker.contract.scorer import LabelScores, ModelInfo, ScoreOutcome, ScoreRequest

REPO_ROOT = Path(__file__).resolve().parents[3]
# Loading torch + a model on 2 shared CPU cores can take a while; far above the normal ~10 s.
CLI_TIMEOUT_S = 300
SPORTS = '{"id": "s1", "text": "The striker scored twice in the final", "metadata": {"k": [1]}}'
FINANCE = (
    '{"text": "Shares fell 3% after the central bank raised interest rates", '
    '"labels": ["finance", "sports"], "multi_label": false}'
)
WEATHER = '{"text": "Heavy rain and strong winds are expected tomorrow"}'


def run_cli(
    args: Sequence[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("TAGSTREAM_")}
    clean.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "worker", "score", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=REPO_ROOT,
        env=clean,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def scored_lines(stdout: bytes) -> list[ScoredEvent]:
    return [ScoredEvent.model_validate(orjson.loads(line)) for line in stdout.splitlines()]


def stderr_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return [line for line in result.stderr.decode().splitlines() if line.startswith("line ")]


def test_embedding_scores_valid_lines_and_reports_the_others(tmp_path: Path) -> None:
    lines = [
        SPORTS.encode(),  # 1
        b"",  # 2: blank, skipped silently
        b'{"text": "unterminated',  # 3
        FINANCE.encode(),  # 4
        b'{"id": "no-text"}',  # 5
        b'{"text": "caf\xe9"}',  # 6: Latin-1, not UTF-8
        b"[1, 2]",  # 7
        b'{"text": "x", "hypothesis_template": "{} {y}"}',  # 8: fails in the scorer
        WEATHER.encode(),  # 9
        b"   ",  # 10: blank
    ]
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    args = ["--scorer", "embedding", "--labels", "sports,finance,weather", "--device", "cpu"]
    result = run_cli([str(source), *args, "--batch-size", "2"])
    assert result.returncode == 2, result.stderr.decode()
    events = scored_lines(result.stdout)
    assert [event.source.offset for event in events] == [1, 4, 9]
    assert [event.id for event in events] == ["s1", "-:0:4", "-:0:9"]
    assert all(event.source.topic == "-" and event.source.partition == 0 for event in events)
    assert all(event.source.timestamp is None for event in events)
    sports, finance, weather = events
    assert sports.labels[0] == "sports"
    assert sports.metadata == {"k": [1]}
    assert sports.multi_label is True
    assert finance.multi_label is False
    assert finance.labels == ["finance", "sports"]
    assert finance.tags == ["finance"]
    assert weather.labels[0] == "weather"
    assert "weather" in weather.tags
    assert sports.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert sports.nli is None

    reports = stderr_lines(result)
    assert [report.split(":")[0] for report in sorted(reports)] == [
        "line 3",
        "line 5",
        "line 6",
        "line 7",
        "line 8",
    ]
    text = "\n".join(reports)
    assert "line 3: deserialize: value is not valid JSON" in text
    assert "line 5: validate: text: Field required" in text
    assert "line 6: deserialize: value is not valid UTF-8" in text
    assert "line 7: deserialize: value is an array, expected a JSON object" in text
    # A template the contract refuses never reaches the scorer.
    assert "line 8: validate: hypothesis_template" in text
    assert "5 line(s) not scored" in result.stderr.decode()


def test_stdin_all_valid_exits_0_and_flags_override_the_environment() -> None:
    stdin = "\n".join([SPORTS, WEATHER, ""]).encode()
    env = {
        "TAGSTREAM_LABELS": "politics,music",
        "TAGSTREAM_MULTI_LABEL": "true",
        "TAGSTREAM_HYPOTHESIS_TEMPLATE": "This text is about {}.",
    }
    args = ["--scorer", "embedding", "--labels", "sports,weather", "--single-label"]
    result = run_cli([*args, "--device", "cpu"], stdin=stdin, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert stderr_lines(result) == []
    sports, weather = scored_lines(result.stdout)
    for event in (sports, weather):
        assert sorted(event.labels) == ["sports", "weather"]  # the flag, not the env
        assert event.multi_label is False  # the flag, not the env
        assert event.hypothesis_template == "This text is about {}."  # the env
        assert len(event.tags) == 1
        assert sum(event.scores) == pytest.approx(1.0, abs=1e-5)
    assert sports.tags == ["sports"]
    assert weather.tags == ["weather"]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--threshold", "1.5"], {}, "threshold (--threshold / TAGSTREAM_THRESHOLD)"),
        (["--template", "no slot"], {}, "hypothesis_template (--template / TAGSTREAM_"),
        ([], {"TAGSTREAM_DTYPE": "float8"}, "dtype (--dtype / TAGSTREAM_DTYPE)"),
        (["--device", "gpu0"], {}, "device (--device / TAGSTREAM_DEVICE)"),
        (["--scorer", "bogus"], {}, "scorer (--scorer / TAGSTREAM_SCORER)"),
        (["--max-batch-tokens", "8"], {}, "max_batch_tokens (--max-batch-tokens"),
        (["--labels", "a,a"], {}, "labels (--labels / TAGSTREAM_LABELS)"),
        ([], {"TAGSTREAM_LABEL_THRESHOLDS": "{oops"}, 'field "label_thresholds"'),
    ],
)
def test_invalid_settings_exit_2_naming_the_setting(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_cli(args, stdin=(WEATHER + "\n").encode(), env=env)
    assert result.returncode == 2
    assert result.stdout == b""
    assert named in result.stderr.decode()


def test_missing_input_file_exits_2(tmp_path: Path) -> None:
    result = run_cli([str(tmp_path / "absent.jsonl"), "--labels", "a"])
    assert result.returncode == 2
    assert "input file not found" in result.stderr.decode()


def test_nli_tiny_model_with_probabilities(tiny_bart_dir: Path) -> None:
    stdin = "\n".join([SPORTS, FINANCE, '{"text": " "}']).encode()
    args = ["--scorer", "nli", "--model", str(tiny_bart_dir), "--labels", "sports,finance"]
    result = run_cli([*args, "--device", "cpu", "--include-nli-probs"], stdin=stdin)
    assert result.returncode == 2, result.stderr.decode()
    assert stderr_lines(result) == ["line 3: validate: text: text must not be blank"]
    events = scored_lines(result.stdout)
    assert [event.source.offset for event in events] == [1, 2]
    for event in events:
        assert event.model.name == str(tiny_bart_dir)
        assert event.model.revision == "local"
        assert event.nli is not None
        assert sorted(event.nli) == sorted(event.labels)
        for probs in event.nli.values():
            total = probs.entailment + probs.contradiction + (probs.neutral or 0.0)
            assert total == pytest.approx(1.0, abs=1e-4)


def test_nli_chunk_mode_and_int8_say_how_many_windows_were_read(tiny_bart_dir: Path) -> None:
    """A text past two windows of the tiny model (128 tokens) is read on two and says so."""
    long = orjson.dumps({"text": " ".join(["the team won the game at the stadium ."] * 60)})
    stdin = b"\n".join([long, WEATHER.encode()])
    args = ["--model", str(tiny_bart_dir), "--labels", "sports,weather", "--device", "cpu"]
    result = run_cli([*args, "--long-text", "chunk", "--max-chunks", "2", "--dtype", "int8"], stdin)
    assert result.returncode == 0, result.stderr.decode()
    events = scored_lines(result.stdout)
    assert [(e.chunks_read, e.truncated) for e in events] == [(2, True), (1, False)]
    truncating = run_cli(args, stdin)
    assert truncating.returncode == 0, truncating.stderr.decode()
    assert b"chunks_read" not in truncating.stdout


class RecordingScorer:
    """Scores every label 0.5 except the first (0.9); records the batch sizes it got."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="stub", revision="1", scorer="stub", device="cpu", dtype="none")

    @property
    def max_batch_tokens(self) -> int:
        return 1024

    def estimate_tokens(self, request: ScoreRequest) -> int:
        return len(request.text)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        self.calls.append(len(requests))
        return [
            LabelScores(
                labels=request.labels,
                scores=(0.9, *([0.5] * (len(request.labels) - 1))),
                truncated=False,
            )
            for request in requests
        ]


def test_score_lines_batches_and_keeps_input_order() -> None:
    lines = [b'{"text": "t%d"}\n' % i for i in range(5)]
    lines.insert(2, b"\n")
    lines.insert(4, b"{bad\n")
    scorer = RecordingScorer()
    out = io.BytesIO()
    failures = score_lines(lines, scorer, TaggingSettings(labels=["a", "b"]), out, batch_size=2)
    assert failures == 1
    assert scorer.calls == [2, 2, 1]
    events = scored_lines(out.getvalue())
    assert [event.source.offset for event in events] == [1, 2, 4, 6, 7]
    assert [event.id for event in events] == ["-:0:1", "-:0:2", "-:0:4", "-:0:6", "-:0:7"]
    assert all(event.tags == ["a", "b"] for event in events)


def test_a_line_naming_a_profile_is_reported_not_scored_with_the_defaults() -> None:
    stdin = "\n".join([SPORTS, '{"text": "The match ended 2-1.", "profile": "news"}', ""])
    args = ["--scorer", "embedding", "--labels", "sports,weather", "--device", "cpu"]
    result = run_cli(args, stdin=stdin.encode())
    assert len(scored_lines(result.stdout)) == 1
    assert "line 2: validate: profile: unknown profile 'news'" in result.stderr.decode()
