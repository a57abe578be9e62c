"""``tagstream run`` against a real broker: the happy path, bad input, scorer errors.

Workers run as subprocesses with the fast fake scorer (tests/support/scorers.py) unless
a test says otherwise; the ledger (tests/support/ledger.py) is the verdict.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import orjson
import pytest

from tests.support.ledger import LedgerReport, Record, count_by_stage
from tests.support.scorers import ERROR_MARKER, RAISE_MARKER
from tests.support.worker_process import (
    COMPLETE_TIMEOUT_S,
    LABELS,
    Harness,
    expected_label,
    good_event,
)


def _only(records: list[Record]) -> Record:
    assert len(records) == 1, records
    return records[0]


def _assert_scored(report: LedgerReport) -> None:
    """Every output carries its input's key, id, source and the label its text names."""
    for coordinate, records in report.outputs.items():
        record = _only(records)
        source_record = report.inputs[coordinate]
        assert record.key == source_record.key
        scored = orjson.loads(record.value or b"")
        event = orjson.loads(source_record.value or b"")
        assert scored["id"] == event["id"]
        source = scored["source"]
        assert (source["topic"], source["partition"], source["offset"]) == coordinate
        assert scored["tags"] == [expected_label(source_record.value or b"")]
        assert set(scored["labels"]) == set(LABELS)


# -- happy path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "settings"),
    [
        pytest.param(2000, {}, id="cooperative-sticky-2000"),
        pytest.param(300, {"assignment_strategy": "range"}, id="range-300"),
        pytest.param(300, {"group_protocol": "consumer"}, id="kip848-consumer-300"),
    ],
)
def test_every_event_is_scored_once_and_committed(
    harness: Harness,
    events: int,
    settings: dict[str, str],
) -> None:
    pipeline = harness.pipeline(partitions=4)
    pipeline.produce(harness.producer(), (good_event(i) for i in range(events)))

    harness.start(pipeline.env(**settings))
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert report.duplicates == 0, report.describe()
    assert len(report.inputs) == events
    assert not report.dead_letters
    assert {partition for _, partition, _ in report.inputs} == {0, 1, 2, 3}
    _assert_scored(report)
    headers = _only(next(iter(report.outputs.values()))).headers
    assert set(headers) == {
        "tagstream.source.topic",
        "tagstream.source.partition",
        "tagstream.source.offset",
    }


def test_happy_path_with_the_tiny_bart_nli_model(
    harness: Harness,
    tiny_bart_dir: Path,
) -> None:
    pipeline = harness.pipeline(partitions=2)
    pipeline.produce(harness.producer(), (good_event(i) for i in range(40)))

    env = pipeline.env(scorer="nli", model=str(tiny_bart_dir), device="cpu", max_batch_size=16)
    harness.start(env)
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert report.duplicates == 0
    assert not report.dead_letters
    for coordinate, records in report.outputs.items():
        scored = orjson.loads(_only(records).value or b"")
        assert _only(records).key == report.inputs[coordinate].key
        assert sorted(scored["labels"]) == sorted(LABELS)
        assert all(0.0 <= score <= 1.0 for score in scored["scores"])
        assert scored["model"]["name"] == str(tiny_bart_dir)


# -- bad input ----------------------------------------------------------------------------

MAX_TEXT_CHARS = 200
# (name, value, stage): every way a record can be rejected before scoring.
BAD_INPUTS: list[tuple[str, bytes | None, str]] = [
    ("malformed-json", b'{"text": "unterminated', "deserialize"),
    ("invalid-utf8", b'{"text": "caf\xe9 \xff"}', "deserialize"),
    ("binary", bytes([0, 159, 146, 150, 1, 2, 255]), "deserialize"),
    ("empty", b"", "deserialize"),
    ("tombstone", None, "deserialize"),
    ("not-an-object", b'["sports", "finance"]', "deserialize"),
    ("missing-text", b'{"id": "no-text", "labels": ["a"]}', "validate"),
    ("blank-text", b'{"text": "   \\n\\t "}', "validate"),
    ("text-over-limit", orjson.dumps({"text": "x" * (MAX_TEXT_CHARS + 1)}), "validate"),
    ("labels-not-strings", b'{"text": "about sports", "labels": ["sports", 7]}', "validate"),
    (
        "template-without-braces",
        b'{"text": "sports", "hypothesis_template": "No slot."}',
        "validate",
    ),
]
# Bad records sit at the first, a middle and the last offset of windows of BATCH_SIZE
# offsets, with valid events between them; the very first and the very last record of the
# stream are bad too.
BATCH_SIZE = 8
POSITIONS = ("first", "middle", "last")
SLOT_OF = {"first": 0, "middle": BATCH_SIZE // 2, "last": BATCH_SIZE - 1}
TRACE_HEADER = ("trace-id", b"abc-123")


BadStream = list[tuple[bytes | None, bytes | None, str | None]]


def _bad_input_stream() -> BadStream:
    """(key, value, "name@position" for bad records / None for good ones)."""
    stream: BadStream = []
    good = 0
    for name, value, _ in BAD_INPUTS:
        for position in POSITIONS:
            for slot in range(BATCH_SIZE):
                if slot == SLOT_OF[position]:
                    stream.append((f"bad-{name}-{position}".encode(), value, f"{name}@{position}"))
                else:
                    key, good_value = good_event(good)
                    good += 1
                    stream.append((key, good_value, None))
    return stream


def test_bad_input_is_dead_lettered_once_with_its_raw_bytes(
    harness: Harness,
) -> None:
    pipeline = harness.pipeline(partitions=1)
    stream = _bad_input_stream()
    producer = harness.producer()
    for key, value, _ in stream:
        producer.produce(pipeline.input_topic, key=key, value=value, headers=[TRACE_HEADER])
    assert producer.flush(30) == 0

    env = pipeline.env(max_batch_size=BATCH_SIZE, max_text_chars=MAX_TEXT_CHARS)
    harness.start(env)
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert report.duplicates == 0
    stage_of = {name: stage for name, _, stage in BAD_INPUTS}
    raw_of = {name: value for name, value, _ in BAD_INPUTS}
    for offset, (key, _, label) in enumerate(stream):
        coordinate = (pipeline.input_topic, 0, offset)
        if label is None:
            assert coordinate in report.outputs and coordinate not in report.dead_letters
            continue
        name = label.split("@")[0]
        assert coordinate not in report.outputs, label
        record = _only(report.dead_letters[coordinate])
        assert record.value == raw_of[name], label
        assert record.key == key, label
        assert record.header_list[0] == TRACE_HEADER, label
        assert record.header("tagstream.error.stage") == stage_of[name], label
        assert record.header("tagstream.error.class") in {"DeserializeError", "ValidateError"}
        assert record.header("tagstream.error.message"), label
        assert record.header("tagstream.source.offset") == str(offset)
        assert record.header("tagstream.group") == pipeline.group_id
        assert record.header("tagstream.attempts") == "1"
        assert record.header("tagstream.model") == "fake@v1"
        assert record.header("tagstream.source.timestamp")
        assert record.header("tagstream.worker")
        assert record.header(
            "tagstream.failed_at",
        ).endswith("Z")  # type: ignore[union-attr]
    assert count_by_stage(report) == {
        "deserialize": 6 * len(POSITIONS),
        "validate": 5 * len(POSITIONS),
    }
    _assert_scored(report)


# -- scorer errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scorer", "marker", "error_class"),
    [
        pytest.param(
            "tests.support.scorers:fake", ERROR_MARKER, "FakeScoreError", id="score-error"
        ),
        pytest.param("tests.support.scorers:raising", RAISE_MARKER, "RuntimeError", id="raises"),
    ],
)
def test_a_scorer_error_dead_letters_only_that_event(
    harness: Harness,
    scorer: str,
    marker: str,
    error_class: str,
) -> None:
    pipeline = harness.pipeline(partitions=1)
    events = [good_event(i) for i in range(60)]
    marked_key = b"marked"
    marked_value = orjson.dumps({"id": "marked", "text": f"sports {marker} news"})
    events.insert(29, (marked_key, marked_value))
    pipeline.produce(harness.producer(), events)

    harness.start(pipeline.env(scorer=scorer, max_batch_size=16))
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert list(report.dead_letters) == [(pipeline.input_topic, 0, 29)]
    record = _only(report.dead_letters[(pipeline.input_topic, 0, 29)])
    assert record.value == marked_value and record.key == marked_key
    assert record.header("tagstream.error.stage") == "inference"
    assert record.header("tagstream.error.class") == error_class
    assert len(report.outputs) == 60
    _assert_scored(report)


# -- produce errors -----------------------------------------------------------------------


def test_an_output_too_large_for_the_topic_dead_letters_its_input(
    harness: Harness,
) -> None:
    limit = 4096
    pipeline = harness.pipeline(partitions=1, output_config={"max.message.bytes": str(limit)})
    events = [good_event(i) for i in range(30)]
    big_value = orjson.dumps(
        {"id": "big", "text": "sports news", "metadata": {"blob": "m" * (2 * limit)}}
    )
    events.insert(10, (b"big", big_value))
    pipeline.produce(harness.producer(), events)

    harness.start(pipeline.env(max_batch_size=64))
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert list(report.dead_letters) == [(pipeline.input_topic, 0, 10)]
    record = _only(report.dead_letters[(pipeline.input_topic, 0, 10)])
    assert record.value == big_value
    assert record.header("tagstream.error.stage") == "produce"
    assert record.header("tagstream.error.class") == "MSG_SIZE_TOO_LARGE"
    assert int(record.header("tagstream.attempts") or 0) >= 2
    assert len(report.outputs) == 30
    _assert_scored(report)


def test_a_dead_letter_too_large_for_its_topic_is_written_as_a_bounded_stub(
    harness: Harness,
) -> None:
    # A dead-letter topic whose limit the invalid record below cannot meet.
    pipeline = harness.pipeline(partitions=1, dead_letter_config={"max.message.bytes": "1024"})
    events = [good_event(i) for i in range(20)]
    huge = b"z" * 4000
    events[10] = (b"huge", huge)  # not JSON: dead-lettered, but too large for the topic
    pipeline.produce(harness.producer(), events)

    worker = harness.start(pipeline.env())
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert worker.wait() == 0, worker.output()
    assert report.clean, report.describe()
    assert list(report.dead_letters) == [(pipeline.input_topic, 0, 10)]
    stub = _only(report.dead_letters[(pipeline.input_topic, 0, 10)])
    assert stub.key == b"huge" and stub.value is None
    assert stub.header("tagstream.error.stage") == "deserialize"
    assert stub.header("tagstream.value.truncated") == "true"
    assert stub.header("tagstream.value.size") == str(len(huge))
    assert stub.header("tagstream.value.sha256") == hashlib.sha256(huge).hexdigest()
    assert len(report.outputs) == 19
    output = worker.output()
    assert "writing a stub without the value" in output
    assert "dead-letter topic record size limit" in output and "1024" in output


def test_a_null_key_output_to_a_compacted_topic_dead_letters_its_input(
    harness: Harness,
) -> None:
    pipeline = harness.pipeline(partitions=1, output_config={"cleanup.policy": "compact"})
    events: list[tuple[bytes | None, bytes]] = [good_event(i) for i in range(20)]
    events[5] = (None, events[5][1])  # no key: the compacted output topic refuses it
    pipeline.produce(harness.producer(), events)

    worker = harness.start(pipeline.env())
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert list(report.dead_letters) == [(pipeline.input_topic, 0, 5)]
    record = _only(report.dead_letters[(pipeline.input_topic, 0, 5)])
    assert record.header("tagstream.error.stage") == "produce"
    assert record.header("tagstream.error.class") == "INVALID_RECORD"
    assert len(report.outputs) == 19
    assert "output topic is compacted" in worker.output()


def test_a_topic_regex_subscription(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=2)
    pipeline.produce(harness.producer(), (good_event(i) for i in range(200)))
    env = pipeline.env()
    del env["TAGSTREAM_INPUT_TOPICS"]
    env["TAGSTREAM_INPUT_TOPIC_REGEX"] = f"^{re.escape(pipeline.input_topic)}$"

    harness.start(env)
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert report.duplicates == 0
    _assert_scored(report)


def test_a_missing_output_topic_stops_start_up_with_exit_2(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    env = pipeline.env(output_topic="no-such-topic-anywhere", dlq_topic=pipeline.dead_letter_topic)
    worker = harness.start(env)
    assert worker.wait() == 2
    assert "no-such-topic-anywhere" in worker.output()
