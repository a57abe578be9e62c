"""``tagstream run`` under faults: kill -9, SIGTERM, rebalances, a broker restart, a slow model.

Each test drives real worker subprocesses and lets the ledger judge: every input in the
output or the dead-letter topic, never both, and the group committed to the log end.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
from confluent_kafka.admin import AdminClient

from tests.support.ledger import Ledger
from tests.support.scorers import read_scorer_log
from tests.support.worker_process import (
    COMPLETE_TIMEOUT_S,
    Harness,
    Pipeline,
    WorkerProcess,
    good_event,
    output_count,
    wait_for_outputs,
)

# Per-batch sleep of the fake scorer in the crash tests: slow enough that a signal lands
# mid-stream, fast enough that a test takes seconds.
STREAM_SLEEP_MS = 25
STREAM_BATCH_SIZE = 16
# The broker's minimum session timeout: a killed member is noticed after 6 s, not 45 s.
# Past the fast session timeout and a rejoin, well inside the ledger's wait.
REJOIN_TIMEOUT_S = 30
FAST_SESSION = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
# Per-batch sleep in the rebalance test: the stream outlasts two rebalances.
REBALANCE_SLEEP_MS = 60
# A stopping worker's exit after its shutdown timeout, with the broker gone: the closes'
# floors (1 s each), the interpreter's exit, and one synchronous commit that librdkafka
# holds until it gives up on the coordinator (about 10 s here), which the timeout cannot cut.
SHUTDOWN_SLACK_S = 30
# Requests the killed worker had already sent may still be appended by the broker.
KILL_SETTLE_S = 1.0


PARTITION_NAME = re.compile(r"[\w.-]+\[\d+\]")


def _assigned(worker: WorkerProcess) -> list[str]:
    """Every partition the worker was ever assigned, from its log."""
    return [
        name
        for line in worker.lines("partitions assigned")
        for name in PARTITION_NAME.findall(line)
    ]


def _stream_env(
    pipeline: Pipeline, sleep_ms: int = STREAM_SLEEP_MS, **settings: object
) -> dict[str, str]:
    """A worker that scores batches of 16 slowly enough to be caught mid-stream, and whose
    group notices a killed member within seconds."""
    # The KIP-848 protocol takes session timeouts from the broker and refuses these.
    session = {} if settings.get("group_protocol") == "consumer" else FAST_SESSION
    env = pipeline.env(max_batch_size=STREAM_BATCH_SIZE, consumer_config=session, **settings)
    env["TAGSTREAM_TEST_SCORER_SLEEP_MS"] = str(sleep_ms)
    return env


def _written_coordinates(ledger: Ledger) -> set[tuple[str, int, int]]:
    report = ledger.check()
    return set(report.outputs) | set(report.dead_letters)


# -- crashes and signals ------------------------------------------------------------------


def test_kill_9_then_restart_loses_nothing(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=4)
    events = 2000
    pipeline.produce(harness.producer(), (good_event(i) for i in range(events)))
    ledger = pipeline.ledger()

    first = harness.start(_stream_env(pipeline))
    wait_for_outputs(pipeline, events // 3)
    first.kill()
    time.sleep(KILL_SETTLE_S)
    committed_at_kill = ledger.committed()
    written_at_kill = _written_coordinates(ledger)
    uncommitted_written = {
        (topic, partition, offset)
        for topic, partition, offset in written_at_kill
        if offset >= (committed_at_kill.get((topic, partition)) or 0)
    }

    harness.start(_stream_env(pipeline))
    report = ledger.wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    duplicated = {c for c, records in report.outputs.items() if len(records) > 1}
    print(
        f"\nkill -9: {len(written_at_kill)} outputs written at the kill, "
        f"{len(uncommitted_written)} of them uncommitted; "
        f"duplicates after restart: {report.duplicates}"
    )
    # Only work that was in flight (written, not committed) at the kill is redone.
    assert duplicated <= uncommitted_written
    assert report.duplicates <= len(uncommitted_written)


def test_sigterm_then_restart_exits_0_without_duplicates(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=4)
    events = 2000
    pipeline.produce(harness.producer(), (good_event(i) for i in range(events)))
    shutdown_timeout_s = 20

    first = harness.start(_stream_env(pipeline, shutdown_timeout_s=shutdown_timeout_s))
    wait_for_outputs(pipeline, events // 3)
    first.send(signal.SIGTERM)
    assert first.wait(shutdown_timeout_s + 10) == 0, first.output()
    stopped_early = output_count(pipeline)
    assert stopped_early < events, "the stream was over before the signal"
    assert "worker stopped" in first.output()

    harness.start(_stream_env(pipeline))
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe()
    assert report.duplicates == 0, report.describe()


def test_a_second_signal_exits_1_at_once(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    pipeline.produce(harness.producer(), (good_event(i) for i in range(200)))
    env = pipeline.env(max_batch_size=4, shutdown_timeout_s=60, log_level="DEBUG")
    env["TAGSTREAM_TEST_SCORER_SLEEP_MS"] = "3000"

    worker = harness.start(env)
    worker.wait_for("batch submitted", count=2)
    worker.send(signal.SIGTERM)
    worker.wait_for("stopping")  # now waiting for a 3 s batch
    worker.send(signal.SIGINT)

    assert worker.wait(10) == 1
    output = worker.output()
    assert "second SIGINT" in output
    assert "worker stopped" not in output
    # Nothing past where the fetch started (the first commit of an assignment stores that).
    assert pipeline.ledger().committed()[(pipeline.input_topic, 0)] in (None, 0)


# -- rebalances ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "protocol",
    [
        pytest.param({}, id="cooperative-sticky"),
        pytest.param({"assignment_strategy": "range"}, id="range"),
        pytest.param({"group_protocol": "consumer"}, id="kip848-consumer"),
    ],
)
def test_workers_joining_and_leaving_keep_the_ledger_clean(
    harness: Harness, protocol: dict[str, str]
) -> None:
    pipeline = harness.pipeline(partitions=6)
    events = 3000
    pipeline.produce(harness.producer(), (good_event(i) for i in range(events)))
    env = _stream_env(pipeline, sleep_ms=REBALANCE_SLEEP_MS, **protocol)

    first = harness.start(env)
    second = harness.start(env)
    wait_for_outputs(pipeline, events // 6)
    third = harness.start(env)
    third.wait_for("partitions assigned")
    wait_for_outputs(pipeline, events // 3)
    # The member that leaves must own partitions. The KIP-848 assignor does not always give
    # the first member a share before the stream is under way, so take one that has.
    leaving = next((worker for worker in (first, second) if _assigned(worker)), first)
    leaving.send(signal.SIGTERM)
    assert leaving.wait() == 0, leaving.output()
    assert output_count(pipeline) < events, "the stream was over before a worker left"

    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()

    assert report.clean, report.describe() + harness.fleet.outputs()
    assert report.duplicates == 0, report.describe() + harness.fleet.outputs()
    assert _assigned(third), third.output()
    assert leaving.lines("partitions revoked"), leaving.output()


# -- the broker goes away -----------------------------------------------------------------


def test_the_worker_recovers_from_a_broker_restart(harness: Harness) -> None:
    if not harness.kafka.managed:
        pytest.skip("needs the session's own broker (unset TAGSTREAM_TEST_BOOTSTRAP)")
    pipeline = harness.pipeline(partitions=4)
    first_half, second_half = range(1000), range(1000, 1600)
    pipeline.produce(harness.producer(), (good_event(i) for i in first_half))

    # A consumer that stops rejoining after the restart is replaced well inside the wait.
    worker = harness.start(_stream_env(pipeline, rejoin_timeout_s=REJOIN_TIMEOUT_S))
    wait_for_outputs(pipeline, 300)
    harness.kafka.restart()
    pipeline.produce(harness.producer(), (good_event(i) for i in second_half))

    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    assert worker.running(), worker.output()
    harness.stop_all()

    assert report.clean, report.describe()
    assert len(report.inputs) == len(first_half) + len(second_half)
    replaced = len(worker.lines("replacing the consumer"))
    print(f"\nbroker restart: duplicates {report.duplicates}, consumers replaced {replaced}")


def test_sigterm_while_the_broker_is_down_exits(
    harness: Harness,
) -> None:
    """Outputs the broker never acknowledges are not committed, and neither the consumer's
    close (waiting for a coordinator) nor the producer's (whose flush would wait for them)
    keeps the worker alive; the restarted broker then gets every input from the next
    worker."""
    if not harness.kafka.managed:
        pytest.skip("needs the session's own broker (unset TAGSTREAM_TEST_BOOTSTRAP)")
    pipeline = harness.pipeline(partitions=2)
    events = 5000  # about 8 s of the slow scorer: still streaming once the broker is down
    pipeline.produce(harness.producer(), (good_event(i) for i in range(events)))
    shutdown_timeout_s = 4
    first = harness.start(_stream_env(pipeline, shutdown_timeout_s=shutdown_timeout_s))
    wait_for_outputs(pipeline, 100)
    harness.kafka.stop()
    try:
        first.send(signal.SIGTERM)
        # The timeout, the close's floor, and the process's own start and exit.
        assert first.wait(shutdown_timeout_s + SHUTDOWN_SLACK_S) == 0, first.output()
    finally:
        harness.kafka.start()
    assert "worker stopped" in first.output()

    harness.start(_stream_env(pipeline))
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    harness.stop_all()
    assert report.clean, report.describe()


# -- a slow model -------------------------------------------------------------------------

MAX_POLL_INTERVAL_MS = 7000
SLOW_BATCH_MS = 2000
SLOW_BATCH_SIZE = 10
SLOW_EVENTS = 80  # 8 batches x 2 s = 16 s of scoring, more than twice the poll interval
IN_FLIGHT_LIMIT = 2
# About a dozen waiting events: the 80 consumed at once pause the input, as a model slower
# than its input does with the default 32 MiB.
SLOW_BUFFER_BYTES = 16_384
IN_FLIGHT = re.compile(r"in_flight\W+(\d+)")


def _group_members(admin: AdminClient, group_id: str) -> list[str]:
    description = admin.describe_consumer_groups([group_id])[group_id].result(timeout=10)
    return sorted(member.member_id for member in description.members)


def test_a_slow_model_pauses_input_and_keeps_the_group_membership(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    pipeline.produce(harness.producer(), (good_event(i) for i in range(SLOW_EVENTS)))
    scorer_log = harness.fleet.directory / "scorer.jsonl"
    consumer_config = {
        "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
    }
    env = pipeline.env(
        max_batch_size=SLOW_BATCH_SIZE,
        max_in_flight_batches=IN_FLIGHT_LIMIT,
        max_buffered_bytes=SLOW_BUFFER_BYTES,
        consumer_config=consumer_config,
        log_level="DEBUG",
    )
    env["TAGSTREAM_TEST_SCORER_SLEEP_MS"] = str(SLOW_BATCH_MS)
    env["TAGSTREAM_TEST_SCORER_LOG"] = str(scorer_log)

    worker = harness.start(env)
    worker.wait_for("input paused")
    members_while_paused = _group_members(harness.admin, pipeline.group_id)
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    members_at_end = _group_members(harness.admin, pipeline.group_id)
    output = worker.output()  # before the stop, which revokes on leaving the group
    harness.stop_all()

    batches = read_scorer_log(scorer_log)
    assert batches[-1]["ended"] - batches[0]["started"] > MAX_POLL_INTERVAL_MS / 1000
    assert report.clean, report.describe()
    assert report.duplicates == 0, report.describe()
    lines = output.splitlines()
    submitted = [line for line in lines if "batch submitted" in line]
    in_flight = [int(match) for match in IN_FLIGHT.findall("\n".join(submitted))]
    assert len(in_flight) == SLOW_EVENTS // SLOW_BATCH_SIZE
    assert max(in_flight) == IN_FLIGHT_LIMIT
    assert "input resumed" in output
    # The same single member all along: no rebalance, no poll-interval expiry.
    assert len(members_while_paused) == 1
    assert members_at_end == members_while_paused
    assert sum("partitions assigned" in line for line in lines) == 1
    assert "partitions revoked" not in output and "partitions lost" not in output
    # The start-up line echoes the settings, max.poll.interval.ms among them.
    logged = "\n".join(line for line in lines if "worker starting" not in line)
    assert "max.poll.interval" not in logged and "maximum poll interval" not in logged.lower()
    assert sum(int(batch["size"]) for batch in batches) == SLOW_EVENTS
