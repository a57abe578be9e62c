"""``tagstream produce`` without a broker: what it would send, and its usage errors."""

from __future__ import annotations

import io

import orjson
import pytest

from worker.cli import main
from worker.commands.produce import SAMPLE_TEXTS, file_events, sample_events


def test_samples_are_keyed_by_id_and_repeat_to_reach_the_count() -> None:
    events = list(sample_events(25))
    assert len(events) == 25
    assert len(SAMPLE_TEXTS) == 20
    assert events[0].key == b"sample-1"
    first = orjson.loads(events[0].value)
    assert first == {"id": "sample-1", "text": SAMPLE_TEXTS[0]}
    assert orjson.loads(events[20].value)["text"] == SAMPLE_TEXTS[0]
    assert len({event.key for event in events}) == 25


def test_file_lines_are_sent_as_is_keyed_by_their_id() -> None:
    lines = io.BytesIO(
        b'{"id": "a1", "text": "one"}\n'
        b"\n"
        b"not json at all\r\n"
        b'{"id": 7, "text": "numeric id"}\n'
        b'{"text": "no id"}\n'
    )
    events = list(file_events(lines, None))
    assert [event.key for event in events] == [b"a1", None, None, None]
    assert events[1].value == b"not json at all"
    assert list(file_events(io.BytesIO(b"{}\n{}\n{}\n"), 2)) == list(
        file_events(io.BytesIO(b"{}\n{}\n"), None)
    )


def test_produce_needs_a_topic(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TAGSTREAM_INPUT_TOPICS", raising=False)
    assert main(["produce"]) == 2
    assert "--topic" in capsys.readouterr().err


def test_produce_reports_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["produce", "--topic", "t", "--file", "/nonexistent/events.jsonl"]) == 2
    assert "no such file" in capsys.readouterr().err
