"""``tagstream replay`` against a real broker: a poison corpus is dead-lettered, the limit is
"fixed", the dead letters go back into the input topic and the ledger of the replayed
inputs is complete; a second run in the same group replays nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Final

import orjson

from tests.support.kafka_fixtures import REPO
from tests.support.ledger import Record
from tests.support.worker_process import (
    COMPLETE_TIMEOUT_S,
    Harness,
    Pipeline,
    good_event,
)
from worker.exit_codes import EXIT_INTERRUPTED

# The "bug": a text limit the good events meet and the poison ones break.
TIGHT_TEXT_CHARS: Final = 60
EVENTS: Final = 40
FIXABLE: Final = (5, 12, 19, 26, 33)
STUB_AT: Final = 8  # too large for the dead-letter topic below: written as a stub
BROKEN_AT: Final = 30  # not JSON: fails again after the fix
DLQ_MAX_BYTES: Final = "1024"
REPLAY_TIMEOUT_S: Final = 120
# The SIGTERM test: 40 records at 10 per second, stopped after the first 5 are written.
SIGTERM_RECORDS: Final = 40
SIGTERM_RATE: Final = 10
SIGTERM_AFTER: Final = 5


def _corpus() -> list[tuple[bytes, bytes]]:
    events = [good_event(index) for index in range(EVENTS)]
    for index in FIXABLE:
        text = f"Event {index}: a longer news item about sports " + "and more " * 8
        events[index] = (f"e-{index}".encode(), orjson.dumps({"id": f"e-{index}", "text": text}))
    events[STUB_AT] = (b"huge", orjson.dumps({"id": "huge", "text": "sports " * 600}))
    events[BROKEN_AT] = (b"broken", b"{not json")
    return events


def _replay(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "replay", *args],
        cwd=REPO,
        env=pipeline.env(),
        capture_output=True,
        text=True,
        timeout=REPLAY_TIMEOUT_S,
        check=False,
    )


def _replayed(records: Iterator[Record] | list[Record]) -> list[Record]:
    return [record for record in records if record.header("tagstream.replay.of")]


def test_dead_letters_are_replayed_once_after_the_fix(harness: Harness) -> None:
    pipeline = harness.pipeline(
        partitions=2, dead_letter_config={"max.message.bytes": DLQ_MAX_BYTES}
    )
    corpus = _corpus()
    pipeline.produce(harness.producer(), corpus, headers=[("trace-id", b"t-1")])
    harness.start(pipeline.env(max_text_chars=TIGHT_TEXT_CHARS))
    ledger = pipeline.ledger()
    before = ledger.wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()
    assert before.clean, before.describe()
    dead_letter_records = [r for records in before.dead_letters.values() for r in records]
    assert len(dead_letter_records) == len(FIXABLE) + 2
    assert sum(r.value is None for r in dead_letter_records) == 1  # the stub

    # A dry run lists what would go and commits nothing.
    dry = _replay(pipeline, "--dry-run", "--max-replays", "1")
    assert dry.returncode == 0, dry.stderr
    rows = dry.stdout.strip().splitlines()[1:]
    assert len(rows) == len(FIXABLE) + 1, dry.stdout
    assert "would replay 6 of 7 dead letters" in dry.stderr
    assert "skipped 1: stubs without a value" in dry.stderr
    assert "validate" in dry.stderr and "deserialize" in dry.stderr

    # The fix: the default limit. Then the replay, into each record's source topic.
    harness.start(pipeline.env())
    first = _replay(pipeline, "--max-replays", "1")
    assert first.returncode == 0, first.stderr
    assert f"replayed 6 of 7 dead letters from {pipeline.dead_letter_topic}" in first.stderr
    assert "skipped 1: stubs without a value" in first.stderr

    after = ledger.wait_until_complete(COMPLETE_TIMEOUT_S)
    assert after.clean, after.describe()
    replayed = _replayed(list(after.inputs.values()))
    assert len(replayed) == len(FIXABLE) + 1
    dead_letter_coordinates = {
        f"{r.topic}:{r.partition}:{r.offset}" for r in dead_letter_records if r.value is not None
    }
    assert {r.header("tagstream.replay.of") for r in replayed} == dead_letter_coordinates
    originals = dict(corpus)
    for record in replayed:
        assert record.header("tagstream.replay.count") == "1"
        assert record.key is not None and record.value == originals[record.key]
        assert record.header("trace-id") == "t-1"
        assert not any(name.startswith("tagstream.error.") for name in record.headers)
    coordinates = {r.key: (r.topic, r.partition, r.offset) for r in replayed}
    for index in FIXABLE:
        (output,) = after.outputs[coordinates[f"e-{index}".encode()]]
        assert orjson.loads(output.value or b"")["id"] == f"e-{index}"
    (again,) = after.dead_letters[coordinates[b"broken"]]
    assert again.header("tagstream.prev.replay.count") == "1"

    # A second run in the same group: the re-failed record has had its one replay.
    second = _replay(pipeline, "--max-replays", "1")
    assert second.returncode == 0, second.stderr
    assert "replayed 0 of 1 dead letters" in second.stderr
    assert "skipped 1: already replayed --max-replays times" in second.stderr
    final = ledger.wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()
    assert len(_replayed(list(final.inputs.values()))) == len(FIXABLE) + 1
    assert final.clean, final.describe()


def test_a_missing_dead_letter_topic_is_a_usage_error(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    result = _replay(pipeline, "--from", "no-such-topic-here")
    assert result.returncode == 2
    assert "--from no-such-topic-here: no such topic" in result.stderr


def _write_dead_letters(
    harness: Harness,
    pipeline: Pipeline,
    count: int,
    extra_headers: list[tuple[str, str | bytes | None]] | None = None,
) -> list[tuple[bytes, bytes]]:
    """``count`` validate-stage dead letters, keys ``k-0`` ...; their (key, value) pairs."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("tagstream.error.stage", b"validate"),
        ("tagstream.error.class", b"ValidateError"),
        *(extra_headers or []),
    ]
    records = [(f"k-{i}".encode(), f'{{"text": "t{i}"}}'.encode()) for i in range(count)]
    producer = harness.producer()
    for key, value in records:
        producer.produce(pipeline.dead_letter_topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0
    return records


def test_a_run_cut_short_by_max_records_resumes_where_it_stopped(
    harness: Harness, new_topic: Callable[..., str]
) -> None:
    pipeline = harness.pipeline(partitions=1)
    target = new_topic(partitions=1)
    extra: list[tuple[str, str | bytes | None]] = [
        ("tagstream.source.topic", pipeline.input_topic.encode()),
        ("tagstream.failed_at", b"2024-05-01T12:00:00Z"),
    ]
    records = _write_dead_letters(harness, pipeline, 5, extra)

    args = ("--from", pipeline.dead_letter_topic, "--to", target, "--group", "resume-test")
    first = _replay(pipeline, *args, "--max-records", "2", "--rate", "50")
    assert first.returncode == 0, first.stderr
    assert "replayed 2 of 2" in first.stderr and "stopped at --max-records 2" in first.stderr
    rest = _replay(pipeline, *args)
    assert rest.returncode == 0, rest.stderr
    assert "replayed 3 of 3" in rest.stderr
    nothing = _replay(pipeline, *args)
    assert nothing.returncode == 0 and "replayed 0 of 0" in nothing.stderr

    written = pipeline.ledger().read(target)
    assert [(r.key, r.value) for r in written] == records
    assert [r.header("tagstream.replay.of") for r in written] == [
        f"{pipeline.dead_letter_topic}:0:{offset}" for offset in range(5)
    ]
    assert not pipeline.ledger().read(pipeline.input_topic)


def test_a_run_stopped_by_sigterm_commits_what_it_replayed_and_the_next_goes_on(
    harness: Harness, new_topic: Callable[..., str]
) -> None:
    pipeline = harness.pipeline(partitions=1)
    target = new_topic(partitions=1)
    records = _write_dead_letters(harness, pipeline, SIGTERM_RECORDS)
    args = ("--from", pipeline.dead_letter_topic, "--to", target, "--group", "sigterm-test")

    first = subprocess.Popen(
        [sys.executable, "-m", "worker", "replay", *args, "--rate", str(SIGTERM_RATE)],
        cwd=REPO,
        env=pipeline.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + REPLAY_TIMEOUT_S
    while len(pipeline.ledger().read(target)) < SIGTERM_AFTER:
        assert first.poll() is None and time.monotonic() < deadline, "replay ended too early"
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=REPLAY_TIMEOUT_S)
    assert first.returncode == EXIT_INTERRUPTED, stderr
    stopped_at = len(pipeline.ledger().read(target))
    assert stopped_at < SIGTERM_RECORDS, "the run was over before the signal"

    rest = _replay(pipeline, *args)
    assert rest.returncode == 0, rest.stderr
    assert f"replayed {SIGTERM_RECORDS - stopped_at} of" in rest.stderr
    written = pipeline.ledger().read(target)
    # Each exactly once, in order: the stopped run committed every replay it had sent.
    assert [(r.key, r.value) for r in written] == records
