"""``TAGSTREAM_PROCESSING_GUARANTEE=exactly-once`` under faults, judged by a read_committed ledger.

Each test mixes a poison corpus into the stream (not JSON, breaking the contract, failing in
the model) and drives real worker subprocesses through a fault: kill -9 twice, workers
joining and leaving under each group protocol, a broker restart, records the broker refuses
inside a transaction, and a zombie (SIGSTOP past the session timeout while a second worker
takes over). The ledger reads the output and dead-letter topics as a downstream
``read_committed`` consumer: every input offset exactly once in exactly one of them, zero
duplicates, committed offsets at the log end.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import orjson
import pytest

from tests.support.kafka_fixtures import create_topic, unique_name
from tests.support.ledger import LedgerReport, count_by_stage
from tests.support.scorers import ERROR_MARKER
from tests.support.worker_process import (
    COMPLETE_TIMEOUT_S,
    Harness,
    Pipeline,
    WorkerProcess,
    good_event,
    output_count,
    wait_for_outputs,
)

STREAM_SLEEP_MS = 25
STREAM_BATCH_SIZE = 16
# The broker's minimum session timeout: a killed or stopped member is noticed after 6 s.
SESSION_TIMEOUT_MS = 6000
FAST_SESSION = {"session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": 1000}
# Short enough that a transaction a killed worker left open (or a zombie's) is aborted by
# the coordinator within seconds, so read_committed readers and the next owner move on.
TRANSACTION_TIMEOUT_MS = 10_000
REBALANCE_SLEEP_MS = 60
# One poison record every POISON_EVERY inputs, cycling through the kinds below.
POISON_EVERY = 23
POISON: tuple[tuple[bytes, str], ...] = (
    (b"not json at all", "deserialize"),
    (orjson.dumps({"id": "p-no-text"}), "validate"),
    (orjson.dumps({"id": "p-score", "text": f"sports {ERROR_MARKER}"}), "inference"),
)
PARTITION_NAME = re.compile(r"[\w.-]+\[\d+\]")


def _stream(count: int) -> Iterator[tuple[bytes | None, bytes | None]]:
    """``count`` inputs: good events with a poison record every :data:`POISON_EVERY`."""
    for index in range(count):
        if index % POISON_EVERY == POISON_EVERY - 1:
            value, _ = POISON[(index // POISON_EVERY) % len(POISON)]
            yield f"p-{index}".encode(), value
        else:
            yield good_event(index)


def _poison_count(count: int) -> int:
    return sum(1 for index in range(count) if index % POISON_EVERY == POISON_EVERY - 1)


def _env(
    pipeline: Pipeline,
    sleep_ms: int = STREAM_SLEEP_MS,
    transactional_id: str | None = None,
    **settings: object,
) -> dict[str, str]:
    session = {} if settings.get("group_protocol") == "consumer" else FAST_SESSION
    env = pipeline.env(
        processing_guarantee="exactly-once",
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        max_batch_size=STREAM_BATCH_SIZE,
        consumer_config=session,
        **settings,
    )
    if transactional_id is not None:
        env["TAGSTREAM_TRANSACTIONAL_ID"] = transactional_id
    env["TAGSTREAM_TEST_SCORER_SLEEP_MS"] = str(sleep_ms)
    return env


def _assigned(worker: WorkerProcess) -> list[str]:
    return [
        name
        for line in worker.lines("partitions assigned")
        for name in PARTITION_NAME.findall(line)
    ]


def _complete(pipeline: Pipeline, harness: Harness) -> LedgerReport:
    report = pipeline.ledger("read_committed").wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()
    return report


def _assert_exact(report: LedgerReport, events: int, harness: Harness) -> None:
    """Every input exactly once, in exactly one topic; the poison ones dead-lettered."""
    detail = report.describe() + harness.fleet.outputs()
    assert report.clean, detail
    assert report.duplicates == 0, detail
    assert len(report.inputs) == events, detail
    assert len(report.outputs) + len(report.dead_letters) == events, detail
    stages = count_by_stage(report)
    assert sum(stages.values()) == _poison_count(events), (stages, detail)


# -- crashes ------------------------------------------------------------------------------


def test_kill_9_twice_leaves_every_result_visible_exactly_once(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=4)
    events = 2000
    pipeline.produce(harness.producer(), _stream(events))
    # A stable id per replica, as a StatefulSet pod has: the restarted worker fences its
    # killed predecessor and aborts the transaction it left open at once.
    env = _env(pipeline, transactional_id=f"{pipeline.group_id}-0")

    first = harness.start(env)
    wait_for_outputs(pipeline, events // 4)
    first.kill()
    second = harness.start(env)
    wait_for_outputs(pipeline, (events * 2) // 3)
    second.kill()
    harness.start(env)
    report = _complete(pipeline, harness)

    _assert_exact(report, events, harness)
    written = output_count(pipeline)
    print(f"\nkill -9 twice: {written} output offsets used (aborted records and markers too)")


# -- rebalances ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "protocol",
    [
        pytest.param({}, id="cooperative-sticky"),
        pytest.param({"assignment_strategy": "range"}, id="range"),
        pytest.param({"group_protocol": "consumer"}, id="kip848-consumer"),
    ],
)
def test_workers_joining_and_leaving_keep_the_ledger_exact(
    harness: Harness, protocol: dict[str, str]
) -> None:
    pipeline = harness.pipeline(partitions=6)
    events = 3000
    pipeline.produce(harness.producer(), _stream(events))
    # No transactional id: each process derives a unique one.
    env = _env(pipeline, sleep_ms=REBALANCE_SLEEP_MS, **protocol)

    first = harness.start(env)
    second = harness.start(env)
    wait_for_outputs(pipeline, events // 6)
    third = harness.start(env)
    third.wait_for("partitions assigned")
    wait_for_outputs(pipeline, events // 3)
    leaving = next((worker for worker in (first, second) if _assigned(worker)), first)
    leaving.send(signal.SIGTERM)
    assert leaving.wait() == 0, leaving.output()
    assert output_count(pipeline) < events, "the stream was over before a worker left"
    report = _complete(pipeline, harness)

    _assert_exact(report, events, harness)
    assert _assigned(third), third.output()
    assert leaving.lines("partitions revoked"), leaving.output()


# -- the broker goes away -----------------------------------------------------------------


def test_a_broker_restart_mid_stream_keeps_the_ledger_exact(harness: Harness) -> None:
    if not harness.kafka.managed:
        pytest.skip("needs the session's own broker (unset TAGSTREAM_TEST_BOOTSTRAP)")
    pipeline = harness.pipeline(partitions=4)
    first_half, second_half = 1000, 600
    pipeline.produce(harness.producer(), _stream(first_half))

    worker = harness.start(_env(pipeline))
    wait_for_outputs(pipeline, 300)
    harness.kafka.restart()
    pipeline.produce(harness.producer(), _stream(second_half))
    report = pipeline.ledger("read_committed").wait_until_complete(COMPLETE_TIMEOUT_S)
    assert worker.running(), worker.output()
    harness.stop_all()

    detail = report.describe() + harness.fleet.outputs()
    assert report.clean, detail
    assert report.duplicates == 0, detail
    assert len(report.inputs) == first_half + second_half, detail
    poison = _poison_count(first_half) + _poison_count(second_half)
    assert sum(count_by_stage(report).values()) == poison, detail
    hung = len(worker.lines("hung past its timeout"))
    print(f"\nbroker restart: {hung} producer(s) abandoned inside a hung call")


# -- records the broker refuses inside a transaction --------------------------------------


def test_outputs_the_broker_rejects_abort_once_then_dead_letter_their_inputs(
    harness: Harness,
) -> None:
    admin = harness.admin
    output = create_topic(admin, unique_name("out"), 1, {"cleanup.policy": "compact"})
    pipeline = Pipeline(
        bootstrap=harness.kafka.bootstrap,
        input_topic=create_topic(admin, unique_name("in"), 2),
        output_topic=output,
        dead_letter_topic=create_topic(admin, f"{output}.dlq", 1),
        group_id=unique_name("group"),
        partitions=2,
    )
    events, keyless_every = 600, 97
    # A compacted output refuses records without a key: each such output makes its
    # transaction abortable (its neighbours in the request fail with it); the replay sends
    # each suspect alone, inside the transaction, and then dead-letters the culprit's input
    # (stage produce). A suspect written outside the transaction would be a duplicate here.
    records = [
        (None, value) if index % keyless_every == 0 else (key, value)
        for index, (key, value) in enumerate(_stream(events))
    ]
    pipeline.produce(harness.producer(), records)
    keyless = sum(1 for key, _ in records if key is None)

    worker = harness.start(_env(pipeline, sleep_ms=5))
    report = _complete(pipeline, harness)

    detail = report.describe() + worker.output()
    assert report.clean, detail
    assert report.duplicates == 0, detail
    assert len(report.inputs) == events, detail
    assert len(report.outputs) + len(report.dead_letters) == events, detail
    stages = count_by_stage(report)
    assert stages["produce"] == keyless, (stages, detail)
    assert sum(stages.values()) == _poison_count(events) + keyless, (stages, detail)
    assert worker.lines("transaction aborted"), detail


# -- a zombie -----------------------------------------------------------------------------


def test_a_zombie_resumed_after_its_partitions_moved_on_is_fenced(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=4)
    events = 2000
    pipeline.produce(harness.producer(), _stream(events))
    env = _env(pipeline)

    zombie = harness.start(env)
    wait_for_outputs(pipeline, events // 4)
    zombie.send(signal.SIGSTOP)
    stopped_at = output_count(pipeline)
    heir = harness.start(env)
    # Past the session timeout the group drops the zombie and gives the heir everything.
    heir.wait_for("partitions assigned", timeout_s=60.0)
    wait_for_outputs(pipeline, stopped_at + events // 4, timeout_s=120.0)
    zombie.send(signal.SIGCONT)
    report = pipeline.ledger("read_committed").wait_until_complete(COMPLETE_TIMEOUT_S)
    zombie_output = zombie.output()
    harness.stop_all()

    _assert_exact(report, events, harness)
    # What the zombie had open, and what it tried after waking up, was never committed.
    fenced = [
        line
        for line in zombie_output.splitlines()
        if "transaction aborted" in line or "partitions lost" in line
    ]
    assert fenced, zombie_output
