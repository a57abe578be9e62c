"""Dead-letter headers (worker/deadletter.py): the original kept, the reasons added, 1 KiB cap."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from worker.contract.deadletter import (
    MAX_ERROR_MESSAGE_BYTES,
    MAX_STUB_INPUT_HEADER_BYTES,
    Failure,
    Stage,
    WorkerIdentity,
    dead_letter_headers,
    stub_headers,
    truncate_utf8,
)
from worker.kafka.records import InputRecord

IDENTITY = WorkerIdentity(group="taggers", worker="host-1:4242", model="facebook/bart@abc123")
FAILED_AT = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


def _record(
    headers: tuple[tuple[str, bytes | None], ...] = (), timestamp: int | None = 1714566615000
) -> InputRecord:
    return InputRecord(
        topic="news",
        partition=3,
        offset=1234,
        key=b"k-1",
        value=b"\xff not json",
        headers=headers,
        timestamp_ms=timestamp,
    )


def test_headers_keep_the_originals_first_and_add_every_tagstream_header() -> None:
    original = (("trace-id", b"abc"), ("empty", None), ("trace-id", b"dup"))
    failure = Failure(Stage.DESERIALIZE, "DeserializeError", "value is not valid UTF-8")

    headers = dead_letter_headers(_record(original), failure, IDENTITY, FAILED_AT)

    assert headers[:3] == list(original)
    assert dict(headers[3:]) == {
        "tagstream.error.stage": b"deserialize",
        "tagstream.error.class": b"DeserializeError",
        "tagstream.error.message": b"value is not valid UTF-8",
        "tagstream.source.topic": b"news",
        "tagstream.source.partition": b"3",
        "tagstream.source.offset": b"1234",
        "tagstream.source.timestamp": b"1714566615000",
        "tagstream.group": b"taggers",
        "tagstream.attempts": b"1",
        "tagstream.worker": b"host-1:4242",
        "tagstream.model": b"facebook/bart@abc123",
        "tagstream.failed_at": b"2024-05-01T12:30:15.123456Z",
    }


def test_produce_failures_report_their_attempts_and_a_missing_timestamp_is_empty() -> None:
    failure = Failure(Stage.PRODUCE, "MSG_SIZE_TOO_LARGE", "too large", attempts=3)
    headers = dict(dead_letter_headers(_record(timestamp=None), failure, IDENTITY, FAILED_AT))
    assert headers["tagstream.error.stage"] == b"produce"
    assert headers["tagstream.attempts"] == b"3"
    assert headers["tagstream.source.timestamp"] == b""


def test_a_long_message_is_cut_to_1_kib() -> None:
    failure = Failure(Stage.INFERENCE, "RuntimeError", "x" * 5000)
    headers = dict(dead_letter_headers(_record(), failure, IDENTITY, FAILED_AT))
    message = headers["tagstream.error.message"]
    assert isinstance(message, bytes)
    assert len(message) == MAX_ERROR_MESSAGE_BYTES
    assert message.endswith(b"...")
    assert message.startswith(b"xxxx")


def test_truncation_never_splits_a_utf8_character() -> None:
    text = "é" * 1000  # 2 bytes each: 2000 bytes
    cut = truncate_utf8(text, limit=101)
    assert len(cut) <= 101
    assert cut.decode("utf-8") == "é" * 49 + "..."  # 98 bytes + 3; a half "é" is dropped


def test_a_message_within_the_limit_is_unchanged() -> None:
    exactly = "a" * MAX_ERROR_MESSAGE_BYTES
    assert truncate_utf8(exactly) == exactly.encode()
    assert truncate_utf8("ünïcode ✓") == "ünïcode ✓".encode()


def test_a_stub_keeps_key_headers_and_says_which_value_it_stands_for() -> None:
    failure = Failure(Stage.DESERIALIZE, "DeserializeError", "not JSON")
    record = _record((("trace-id", b"abc"),))
    headers = dead_letter_headers(record, failure, IDENTITY, FAILED_AT)
    stub = dict(stub_headers(headers, b"z" * 4000))
    assert stub["trace-id"] == b"abc"
    assert stub["tagstream.error.stage"] == b"deserialize"
    assert stub["tagstream.value.truncated"] == b"true"
    assert stub["tagstream.value.size"] == b"4000"
    assert stub["tagstream.value.sha256"] == hashlib.sha256(b"z" * 4000).hexdigest().encode()
    assert "tagstream.headers.truncated" not in stub


def test_a_stub_leaves_out_input_headers_past_its_bound_but_keeps_its_own() -> None:
    failure = Failure(Stage.PRODUCE, "MSG_SIZE_TOO_LARGE", "too large")
    record = _record((("blob", b"h" * (MAX_STUB_INPUT_HEADER_BYTES + 1)),))
    stub = stub_headers(dead_letter_headers(record, failure, IDENTITY, FAILED_AT), None)
    names = [name for name, _ in stub]
    assert "blob" not in names
    assert all(name.startswith("tagstream.") for name in names)
    assert dict(stub)["tagstream.headers.truncated"] == b"true"
    assert dict(stub)["tagstream.value.size"] == b"0"
    assert sum(len(name) + len(value or b"") for name, value in stub) < 4096


def test_input_headers_named_like_ours_are_kept_as_previous_ones() -> None:
    failure = Failure(Stage.VALIDATE, "ValidateError", "text: Field required")
    chained = (("tagstream.error.stage", b"inference"), ("tagstream.prev.group", b"g0"))
    headers = dead_letter_headers(_record(chained), failure, IDENTITY, FAILED_AT)
    names = [name for name, _ in headers]
    assert names.count("tagstream.error.stage") == 1
    assert dict(headers)["tagstream.error.stage"] == b"validate"
    assert dict(headers)["tagstream.prev.error.stage"] == b"inference"
    assert "tagstream.prev.prev.group" in names


def test_every_added_header_is_bounded() -> None:
    failure = Failure(Stage.INFERENCE, "E" * 5000, "m" * 5000)
    identity = WorkerIdentity(group="g" * 5000, worker="w" * 5000, model="m" * 5000)
    headers = dead_letter_headers(_record(), failure, identity, FAILED_AT)
    assert all(len(value or b"") <= MAX_ERROR_MESSAGE_BYTES for _, value in headers)
