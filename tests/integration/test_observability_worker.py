"""``tagstream run``'s observability against a real broker: ``/metrics`` agrees with the
ledger (across a rebalance too), the lag drains to 0, ``/readyz`` and ``/healthz`` follow
the model and the loop, and every log line is JSON with its context and without secrets.

Workers are subprocesses (tests/support/worker_process.py) with the test scorers of
tests/support/scorers.py; the gates there make "the model is loading" and "the model is
stuck" last exactly as long as a test needs, so nothing here depends on timing.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, TypeVar

import orjson

from tests.support.kafka_fixtures import free_port
from tests.support.ledger import LedgerReport, count_by_stage
from tests.support.observability import Samples, samples_of
from tests.support.scorers import BLOCK_MARKER, GATE_ENV, LOAD_GATE_ENV
from tests.support.worker_process import (
    COMPLETE_TIMEOUT_S,
    Harness,
    Pipeline,
    WorkerProcess,
    good_event,
)
from worker.observability.redaction import MASK

T = TypeVar("T")

# Generous bounds for a loaded machine: each only stops a test that would otherwise hang.
DEADLINE_S: Final = 60.0
# librdkafka statistics come every metrics.STATISTICS_INTERVAL_MS (5 s): the lag needs a
# few of them after the last commit.
LAG_DEADLINE_S: Final = 60.0
HTTP_TIMEOUT_S: Final = 5.0
RECHECK_S: Final = 0.2
# Invalid records, one per rejecting stage, mixed into the streams below.
BAD_VALUES: Final = (b"{not json", b'{"id": "no-text"}')
BAD_EVERY: Final = 9
# A small liveness bound, so a stuck model is noticed within seconds.
STALE_AFTER_S: Final = 2
CONTEXT_FIELDS: Final = ("timestamp", "level", "logger", "event", "worker_id", "group")
REBALANCE_EVENTS: Final = ("partitions assigned", "partitions revoked", "partitions lost")


# -- helpers ------------------------------------------------------------------------------


def _stream(events: int) -> list[tuple[bytes, bytes]]:
    """``events`` records; every BAD_EVERY-th one invalid (deserialize / validate)."""
    stream = []
    for index in range(events):
        key, value = good_event(index)
        if index % BAD_EVERY == BAD_EVERY - 1:
            value = BAD_VALUES[(index // BAD_EVERY) % len(BAD_VALUES)]
        stream.append((key, value))
    return stream


def _marked_event(index: int) -> tuple[bytes, bytes]:
    """A valid event whose batch the test scorers block on while the gate is closed."""
    key, _ = good_event(index)
    return key, orjson.dumps({"id": f"blocked-{index}", "text": f"sports {BLOCK_MARKER}"})


def _wait_for(condition: Callable[[], T | None], what: str, timeout_s: float = DEADLINE_S) -> T:
    """The first truthy value of ``condition()``, checked every RECHECK_S."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(RECHECK_S)


def _get(port: int, path: str) -> tuple[int, bytes] | None:
    """(status, body) of GET ``path``; None while nothing listens on the port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HTTP_TIMEOUT_S) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _probe(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    answer = _get(port, path)
    return None if answer is None else (answer[0], orjson.loads(answer[1]))


def _probe_until(
    port: int, path: str, accept: Callable[[int, dict[str, Any]], bool]
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        answer = _probe(port, path)
        return answer[1] if answer is not None and accept(*answer) else None

    return _wait_for(check, f"{path} on port {port}")


def _scrape(port: int) -> Samples:
    answer = _get(port, "/metrics")
    assert answer is not None and answer[0] == 200, answer
    return samples_of(answer[1].decode())


def _sum(samples: Samples, name: str, /, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value for (sample, key), value in samples.items() if sample == name and wanted <= key
    )


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (sample, key), value in samples.items():
        if sample == name:
            item = dict(key)[label]
            totals[item] = totals.get(item, 0.0) + value
    return {item: count for item, count in totals.items() if count}


class Counts:
    """The record counters of one scrape (the worker's ledger)."""

    def __init__(self, samples: Samples, input_topic: str) -> None:
        self.consumed = _sum(samples, "tagstream_events_consumed_total", topic=input_topic)
        self.scored = _sum(samples, "tagstream_events_scored_total")
        self.dead_lettered = _sum(samples, "tagstream_events_dead_lettered_total")
        self.discarded = _by_label(samples, "tagstream_events_discarded_total", "reason")
        self.dead_lettered_by_stage = _by_label(
            samples, "tagstream_events_dead_lettered_total", "stage"
        )

    def balanced(self) -> bool:
        return self.consumed == self.scored + self.dead_lettered + sum(self.discarded.values())

    def __repr__(self) -> str:
        return (
            f"consumed={self.consumed} scored={self.scored} "
            f"dead_lettered={self.dead_lettered} discarded={self.discarded}"
        )


def _drained_lag(port: int, topic: str, partitions: int) -> Samples | None:
    """The scrape once both lag gauges of every partition of ``topic`` read 0."""
    samples = _scrape(port)
    for unit in ("messages", "seconds"):
        lags = {
            dict(key)["partition"]: value
            for (name, key), value in samples.items()
            if name == f"tagstream_consumer_lag_{unit}" and dict(key)["topic"] == topic
        }
        if lags != {str(partition): 0.0 for partition in range(partitions)}:
            return None
    return samples


def _json_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    """Every output line of the worker, each required to be one JSON object."""
    lines = []
    for number, line in enumerate(worker.output().splitlines(), 1):
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(parsed, dict), line
        lines.append(parsed)
    assert lines, "the worker wrote nothing"
    return lines


def _events(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == event]


def _total_records(records: dict[Any, list[Any]]) -> int:
    return sum(len(found) for found in records.values())


def _complete(pipeline: Pipeline) -> LedgerReport:
    report = pipeline.ledger().wait_until_complete(COMPLETE_TIMEOUT_S)
    assert report.clean, report.describe()
    return report


# -- metrics ------------------------------------------------------------------------------


def test_metrics_agree_with_the_ledger_and_the_lag_drains_to_zero(harness: Harness) -> None:
    partitions = 3
    pipeline = harness.pipeline(partitions=partitions)
    pipeline.produce(harness.producer(), _stream(300))
    port = free_port()

    harness.start(pipeline.env(metrics_port=port, max_batch_size=16))
    report = _complete(pipeline)
    samples = _wait_for(
        lambda: _drained_lag(port, pipeline.input_topic, partitions),
        "the lag gauges to reach 0",
        LAG_DEADLINE_S,
    )
    harness.stop_all()

    ledger = Counts(samples, pipeline.input_topic)
    assert report.duplicates == 0, report.describe()
    assert ledger.consumed == len(report.inputs), ledger
    assert ledger.scored == len(report.outputs), ledger
    assert ledger.dead_lettered == len(report.dead_letters), ledger
    assert ledger.dead_lettered_by_stage == count_by_stage(report)
    assert ledger.discarded == {}
    assert ledger.balanced(), ledger
    # Every acknowledged record has an end-to-end latency; nothing is left in flight.
    assert samples[("tagstream_end_to_end_latency_seconds_count", frozenset())] == len(
        report.inputs
    )
    assert samples[("tagstream_in_flight_batches", frozenset())] == 0
    assert samples[("tagstream_assigned_partitions", frozenset())] == partitions
    assert _sum(samples, "tagstream_model_info", name="fake", revision="v1", scorer="fake") == 1


def test_each_worker_balances_its_ledger_across_a_rebalance(harness: Harness) -> None:
    """An eager rebalance while worker A is stuck in a batch: A's queued and in-flight work
    is dropped (revoked), the group's next owners redo it, and still every worker's
    consumed == scored + dead-lettered + discarded, and the fleet's scored and
    dead-lettered equal the records written."""
    pipeline = harness.pipeline(partitions=4)
    pipeline.produce(harness.producer(), [_marked_event(0), *_stream(400)])
    open_gate = harness.fleet.directory / "open"
    open_gate.touch()
    gate_a = harness.fleet.directory / "gate-a"
    settings = {
        "assignment_strategy": "range",  # eager: the rebalance revokes every partition
        "revoke_timeout_ms": 1000,
        "max_batch_size": 16,
        "health_stale_after_s": STALE_AFTER_S,
    }
    port_a, port_b = free_port(), free_port()
    env_a = pipeline.env(metrics_port=port_a, **settings)
    env_a[GATE_ENV] = str(gate_a)
    env_b = pipeline.env(metrics_port=port_b, **settings)
    env_b[GATE_ENV] = str(open_gate)

    worker_a = harness.start(env_a)
    _probe_until(port_a, "/healthz", lambda status, body: "inference" in body["stale"])
    worker_b = harness.start(env_b)
    worker_a.wait_for("revoke timeout")
    worker_a.wait_for("partitions assigned", count=2)
    gate_a.touch()
    report = _complete(pipeline)
    ledgers = [Counts(_scrape(port), pipeline.input_topic) for port in (port_a, port_b)]
    harness.stop_all()

    for ledger in ledgers:
        assert ledger.balanced(), ledgers
    assert ledgers[0].discarded.get("revoked", 0) >= 1, ledgers
    assert sum(ledger.scored for ledger in ledgers) == _total_records(report.outputs)
    assert sum(ledger.dead_lettered for ledger in ledgers) == _total_records(report.dead_letters)
    assert "partitions assigned" in worker_b.output()


# -- health -------------------------------------------------------------------------------


def test_readyz_waits_for_the_model_and_fails_during_shutdown(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    load_gate = harness.fleet.directory / "model-loaded"
    gate = harness.fleet.directory / "batch-released"
    port = free_port()
    env = pipeline.env(
        metrics_port=port,
        scorer="tests.support.scorers:gated",
        shutdown_timeout_s=DEADLINE_S,
        log_level="DEBUG",
    )
    env[LOAD_GATE_ENV], env[GATE_ENV] = str(load_gate), str(gate)
    worker = harness.start(env)

    status, body = _wait_for(lambda: _probe(port, "/readyz"), "the HTTP server")
    assert (status, body) == (503, {"status": "not_ready", "waiting_for": ["model", "group"]})
    assert _probe(port, "/healthz") == (
        200,
        {
            "status": "ok",
            "stale": [],
            "stale_after_s": 120.0,
            "components": {"poll": {"state": "starting"}, "inference": {"state": "starting"}},
        },
    )
    assert "model ready" not in worker.output()

    load_gate.touch()
    _probe_until(port, "/readyz", lambda status, body: status == 200)
    assert worker.lines("model ready")

    # A batch the model is stuck in keeps the shutdown busy: /readyz says so meanwhile.
    pipeline.produce(harness.producer(), [_marked_event(0), good_event(1)])
    worker.wait_for("batch submitted")
    worker.send(signal.SIGTERM)
    body = _probe_until(port, "/readyz", lambda status, body: status == 503)
    assert body == {"status": "shutting_down"}
    health = _probe(port, "/healthz")
    assert health is not None and health[0] == 200 and health[1]["status"] == "shutting_down"
    assert worker.running()

    gate.touch()
    assert worker.wait() == 0, worker.output()
    assert _probe(port, "/readyz") is None  # the server went away with the worker
    _complete(pipeline)


def test_healthz_fails_while_the_model_is_stuck_and_recovers(harness: Harness) -> None:
    pipeline = harness.pipeline(partitions=1)
    gate = harness.fleet.directory / "batch-released"
    port = free_port()
    env = pipeline.env(metrics_port=port, health_stale_after_s=STALE_AFTER_S)
    env[GATE_ENV] = str(gate)
    harness.start(env)
    _probe_until(port, "/readyz", lambda status, body: status == 200)

    pipeline.produce(harness.producer(), [good_event(0), _marked_event(1), good_event(2)])
    body = _probe_until(port, "/healthz", lambda status, body: status == 503)
    assert body["status"] == "stale"
    assert "inference" in body["stale"], body
    assert body["components"]["inference"]["age_s"] > STALE_AFTER_S

    gate.touch()
    _probe_until(port, "/healthz", lambda status, body: status == 200)
    _complete(pipeline)
    harness.stop_all()


# -- logs ---------------------------------------------------------------------------------


def test_every_log_line_is_json_with_its_context_fields(harness: Harness) -> None:
    partitions = 2
    pipeline = harness.pipeline(partitions=partitions)
    pipeline.produce(harness.producer(), _stream(120))
    port = free_port()
    worker = harness.start(pipeline.env(metrics_port=port, max_batch_size=8, log_level="DEBUG"))
    report = _complete(pipeline)
    samples = _scrape(port)
    harness.stop_all()

    lines = _json_lines(worker)
    for line in lines:
        missing = [field for field in CONTEXT_FIELDS if field not in line]
        assert not missing, (missing, line)
        assert line["group"] == pipeline.group_id, line
    assert len({line["worker_id"] for line in lines}) == 1
    (start,) = _events(lines, "worker starting")
    assert start["level"] == "info"
    assert start["settings"]["kafka"]["group_id"] == pipeline.group_id
    assert start["settings"]["observability"]["log_level"] == "DEBUG"

    # One warning per dead-lettered record, naming the record.
    dead = _events(lines, "dead-lettering input")
    assert {line["level"] for line in dead} == {"warning"}
    coordinates = [(line["topic"], line["partition"], line["offset"]) for line in dead]
    assert sorted(coordinates) == sorted(report.dead_letters)

    # One info line per rebalance callback: the join, and the revoke of the stop.
    rebalances = [line for line in lines if line["event"] in REBALANCE_EVENTS]
    assert {line["level"] for line in rebalances} == {"info"}
    assert Counter(line["event"] for line in rebalances) == {
        "partitions assigned": samples[
            ("tagstream_rebalances_total", frozenset({("kind", "assigned")}))
        ],
        "partitions revoked": 1,
    }

    # One debug line per batch on each thread, with the same batch ids.
    batches = int(samples[("tagstream_inference_seconds_count", frozenset())])
    assert batches >= len(report.outputs) // 8
    for event in ("batch submitted", "batch scored"):
        found = _events(lines, event)
        assert {line["level"] for line in found} == {"debug"}, event
        assert sorted(line["batch_id"] for line in found) == list(range(1, batches + 1)), event
    scored = {line["batch_id"]: line["size"] for line in _events(lines, "batch scored")}
    assert sum(scored.values()) == len(report.outputs)


def test_a_sasl_password_never_appears_in_any_log_line(harness: Harness) -> None:
    """A worker configured for SASL against the PLAINTEXT broker: it starts, fails to
    authenticate again and again with librdkafka's debug output on, and is stopped."""
    password = 'Tagstream-S3cret"pw\\x'
    pipeline = harness.pipeline(partitions=1)
    debug = {"debug": "security,broker,conf"}
    env = pipeline.env(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="tagstream",
        consumer_config={**debug, "sasl.password": password},
        producer_config=debug,
        log_level="DEBUG",
    )
    env["TAGSTREAM_SASL_PASSWORD"] = password
    worker = harness.start(env)
    worker.wait_for("worker started")
    worker.wait_for("SASL", count=3)  # librdkafka's authentication lines, via structlog
    worker.send(signal.SIGTERM)
    worker.wait()

    output = worker.output()
    for form in (password, orjson.dumps(password).decode()[1:-1], repr(password)[1:-1]):
        assert form not in output
    lines = _json_lines(worker)
    (start,) = _events(lines, "worker starting")
    kafka = start["settings"]["kafka"]
    assert kafka["sasl_password"] == MASK
    assert kafka["consumer_config"]["sasl.password"] == MASK
    assert any(line["logger"] == "tagstream.librdkafka" for line in lines)
