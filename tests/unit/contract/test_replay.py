"""Replay headers and filters (worker/contract/replay.py): the inverse of the dead-letter
renaming, the replay count that stops a loop, stubs, and the filters of ``tagstream replay``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.contract.deadletter import (
    Failure,
    Header,
    Stage,
    WorkerIdentity,
    dead_letter_headers,
    stub_headers,
)
from worker.contract.replay import (
    HEADER_REPLAY_COUNT,
    HEADER_REPLAY_OF,
    DeadLetter,
    ReplayFilter,
    Verdict,
    decide,
    parse_time,
    replay_headers,
    replay_of,
)
from worker.kafka.records import InputRecord

IDENTITY = WorkerIdentity(group="taggers", worker="host-1:4242", model="fake@1")
FAILED_AT = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
FAILURE = Failure(Stage.VALIDATE, "ValidateError", "text: too long")
OF = replay_of("news.dlq", 0, 17)


def _input(headers: tuple[Header, ...] = (), partition: int = 3) -> InputRecord:
    return InputRecord("news", partition, 1234, b"k-1", b'{"text": "x"}', headers, 1714566615000)


def _dead_letter(record: InputRecord, failure: Failure = FAILURE) -> DeadLetter:
    return DeadLetter.from_headers(dead_letter_headers(record, failure, IDENTITY, FAILED_AT))


def test_a_dead_letter_is_read_back_from_the_headers_the_worker_writes() -> None:
    dead_letter = _dead_letter(_input(partition=5))
    assert dead_letter.stage == "validate"
    assert dead_letter.error_class == "ValidateError"
    assert dead_letter.failed_at == FAILED_AT
    assert dead_letter.source_topic == "news"
    assert dead_letter.source_partition == 5
    assert not dead_letter.stub
    assert dead_letter.replay_count == 0


def test_the_replayed_record_carries_the_inputs_own_headers_and_no_dead_letter_ones() -> None:
    original = (("trace-id", b"abc"), ("empty", None), ("tagstream.custom", b"mine"))
    headers = replay_headers(_dead_letter(_input(original)), OF)
    assert headers == [
        ("trace-id", b"abc"),
        ("empty", None),
        ("tagstream.custom", b"mine"),  # renamed tagstream.prev.custom in the DLQ, restored
        (HEADER_REPLAY_COUNT, b"1"),
        (HEADER_REPLAY_OF, b"news.dlq:0:17"),
    ]


def test_a_nested_previous_header_loses_one_level_of_renaming_only() -> None:
    headers = replay_headers(_dead_letter(_input((("tagstream.prev.x", b"old"),))), OF)
    assert ("tagstream.prev.x", b"old") in headers


def test_the_count_goes_up_across_failures_until_max_replays_stops_the_loop() -> None:
    record = _input((("trace-id", b"abc"),))
    counts = []
    for _ in range(4):
        dead_letter = _dead_letter(record)
        counts.append(dead_letter.replay_count)
        verdict = decide(dead_letter, ReplayFilter(), 3, "news")
        if verdict is not Verdict.REPLAY:
            break
        # The replayed record fails again: the worker dead-letters it with these headers.
        record = record._replace(headers=tuple(replay_headers(dead_letter, OF)), offset=99)
    assert counts == [0, 1, 2, 3]
    assert verdict is Verdict.EXHAUSTED
    # Exactly one count and one origin on every replayed record, never a pile-up.
    names = [name for name, _ in record.headers]
    assert names.count(HEADER_REPLAY_COUNT) == 1 and names.count(HEADER_REPLAY_OF) == 1
    assert ("trace-id", b"abc") in record.headers


def test_a_stub_is_recognised_and_never_replayed() -> None:
    full = dead_letter_headers(_input(), FAILURE, IDENTITY, FAILED_AT)
    stub = DeadLetter.from_headers(stub_headers(full, b'{"text": "x"}'))
    assert stub.stub
    assert decide(stub, ReplayFilter(), 3, "news") is Verdict.STUB
    # A filtered-out stub counts as filtered: the filters come first.
    assert decide(stub, ReplayFilter(stages={"inference"}), 3, "news") is Verdict.FILTERED


def test_no_target_without_a_source_topic_or_to() -> None:
    dead_letter = DeadLetter.from_headers([("tagstream.error.stage", b"deserialize")])
    assert dead_letter.source_topic is None
    assert decide(dead_letter, ReplayFilter(), 3, None) is Verdict.NO_TARGET


@pytest.mark.parametrize(
    ("record_filter", "matches"),
    [
        (ReplayFilter(), True),
        (ReplayFilter(stages={"validate"}), True),
        (ReplayFilter(stages={"inference", "produce"}), False),
        (ReplayFilter(error_classes={"ValidateError"}), True),
        (ReplayFilter(error_classes={"ScoreError"}), False),
        (ReplayFilter(source_partitions={3}), True),
        (ReplayFilter(source_partitions={0, 1}), False),
        (ReplayFilter(since=FAILED_AT), True),  # inclusive
        (ReplayFilter(since=FAILED_AT + timedelta(microseconds=1)), False),
        (ReplayFilter(until=FAILED_AT), False),  # exclusive
        (ReplayFilter(until=FAILED_AT + timedelta(seconds=1)), True),
        (
            ReplayFilter(since=FAILED_AT - timedelta(days=1), until=FAILED_AT + timedelta(days=1)),
            True,
        ),
    ],
)
def test_filters(record_filter: ReplayFilter, matches: bool) -> None:
    assert record_filter.matches(_dead_letter(_input())) is matches


def test_a_time_bound_does_not_match_a_record_without_failed_at() -> None:
    dead_letter = DeadLetter.from_headers([("tagstream.failed_at", b"yesterday")])
    assert dead_letter.failed_at is None
    assert ReplayFilter().matches(dead_letter)
    assert not ReplayFilter(since=FAILED_AT).matches(dead_letter)


def test_parse_time_accepts_rfc3339_and_takes_naive_times_as_utc() -> None:
    assert parse_time("2024-05-01T12:30:15.123456Z") == FAILED_AT
    assert parse_time("2024-05-01T14:30:15.123456+02:00") == FAILED_AT
    assert parse_time("2024-05-01T12:30:15.123456") == FAILED_AT
    assert parse_time("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_time("2024-05-01T00:00:00-05:00").tzinfo == UTC
    assert parse_time("2024-05-01T00:00:00-05:00") == datetime(
        2024, 5, 1, tzinfo=timezone(timedelta(hours=-5))
    )
    with pytest.raises(ValueError):
        parse_time("last tuesday")
