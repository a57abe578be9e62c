"""The Grafana dashboard's queries against a real Prometheus scraping a live worker.

A real ``prometheus`` (Debian's package; ``.ci/run`` installs it) scrapes one worker every
second while events flow. Every PromQL expression of deploy/grafana/tagstream-dashboard.json
goes through Prometheus' HTTP API and must return at least one series. The Grafana variables
are replaced as the dashboard would with one worker selected: ``$job`` and ``$instance`` by
the scrape job and the worker's address, ``$__rate_interval`` by :data:`RATE_WINDOW`.

So that no panel is legitimately empty, the stream has a poison event every
:data:`POISON_EVERY` (dead-letter panels), and the output topic is deleted for a moment
and created again: the produces meanwhile fail with a transient error and the worker retries
them (the produce-retry panel).
The GPU memory series exist only where CUDA is in use: on a worker that exposes none, those
two expressions must still be accepted by Prometheus, and that is all they are held to.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
import yaml
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient

from tests.support.kafka_fixtures import REPO, create_topic, free_port, free_ports
from tests.support.worker_process import Harness, good_event

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)

DASHBOARD: Final = REPO / "deploy" / "grafana" / "tagstream-dashboard.json"
JOB: Final = "tagstream"
SCRAPE_INTERVAL: Final = "1s"
# Stands for $__rate_interval. Grafana makes it at least four scrape intervals (4 s here);
# 10 s still holds enough samples when a loaded machine misses a scrape or two.
RATE_WINDOW: Final = "10s"
POISON_EVERY: Final = 10
# About a hundred events a second: enough for every rate, little for a shared machine.
EVENTS_PER_S: Final = 100.0
# Generous bounds for a loaded machine; each only stops a test that would otherwise hang.
READY_DEADLINE_S: Final = 60.0
SERIES_DEADLINE_S: Final = 120.0
RECHECK_S: Final = 1.0
HTTP_TIMEOUT_S: Final = 5.0
GPU_METRIC_PREFIX: Final = "tagstream_gpu_"
# librdkafka retries a missing topic itself until message.timeout.ms (5 minutes by default)
# before the worker hears of it; 3 s brings the failure to the worker's own retry (and its
# metric) while the test waits.
SHORT_DELIVERY_TIMEOUT: Final = {"message.timeout.ms": 3000}


def _dashboard_expressions() -> list[str]:
    """Every panel target's ``expr`` (the variables' ``label_values`` queries are Grafana
    functions, not PromQL; their metric selectors are checked separately)."""
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        if panel.get("type") != "row"
        for target in panel.get("targets", [])
    ]


def _variable_selectors() -> list[tuple[str, str]]:
    """(metric selector, label) of each ``label_values(selector, label)`` variable."""
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    found = []
    for variable in dashboard["templating"]["list"]:
        definition = variable.get("definition", "")
        if definition.startswith("label_values("):
            selector, _, label = definition.removeprefix("label_values(")[:-1].rpartition(",")
            found.append((selector.strip(), label.strip()))
    return found


def substitute(expr: str, instance: str) -> str:
    """The expression as Grafana sends it with this one worker selected."""
    text = (
        expr.replace("$__rate_interval", RATE_WINDOW)
        .replace("$instance", instance)
        .replace("$job", JOB)
    )
    assert "$" not in text, f"a Grafana variable the test does not know: {text}"
    return text


class Prometheus:
    """A ``prometheus`` process of the test's own: temporary config and storage, free port."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("wb")
        assert PROMETHEUS is not None
        self.popen = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _get(self, path: str) -> tuple[int, bytes] | None:
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while (answer := self._get("/-/ready")) is None or answer[0] != 200:
            assert self.popen.poll() is None, self.log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(RECHECK_S)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr``; fails the test when Prometheus refuses it."""
        answer = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer is not None, "prometheus does not answer"
        body = orjson.loads(answer[1])
        assert answer[0] == 200 and body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


class Feeder(threading.Thread):
    """Sends events to the input topic until stopped: good ones, every POISON_EVERY-th not
    JSON."""

    def __init__(self, producer: Producer, topic: str) -> None:
        super().__init__(name="event-feeder", daemon=True)
        self.producer = producer
        self.topic = topic
        self.stopped = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.stopped.wait(1.0 / EVENTS_PER_S):
            key, value = good_event(index)
            if index % POISON_EVERY == POISON_EVERY - 1:
                value = b"{not json"
            self.producer.produce(self.topic, key=key, value=value)
            self.producer.poll(0)
            index += 1
        self.producer.flush(30)


def _scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return ""


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(RECHECK_S)


def _counter(port: int, name: str) -> float:
    """The sum of the samples of ``name`` in one scrape of the worker."""
    total = 0.0
    for line in _scrape(port).splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _recreate(admin: AdminClient, topic: str) -> None:
    """Create ``topic`` again, asking until the broker has finished deleting it."""
    deadline = time.monotonic() + READY_DEADLINE_S
    while True:
        try:
            create_topic(admin, topic, 1)
            return
        except KafkaException:
            assert time.monotonic() < deadline, f"{topic} could not be created again"
            time.sleep(RECHECK_S)


def test_every_dashboard_query_returns_series_while_events_flow(
    harness: Harness, tmp_path: Path
) -> None:
    pipeline = harness.pipeline(partitions=2)
    (metrics_port,) = free_ports(1)
    instance = f"127.0.0.1:{metrics_port}"
    worker = harness.start(
        pipeline.env(metrics_port=metrics_port, producer_config=SHORT_DELIVERY_TIMEOUT)
    )
    feeder = Feeder(harness.producer(), pipeline.input_topic)
    prometheus = Prometheus(tmp_path, instance)
    feeder.start()
    try:
        prometheus.wait_ready()
        _wait_for(
            lambda: _counter(metrics_port, "tagstream_events_scored_total") > 0,
            "the first scored events",
            READY_DEADLINE_S,
        )
        harness.admin.delete_topics([pipeline.output_topic])[pipeline.output_topic].result(30)
        _wait_for(
            lambda: _counter(metrics_port, "tagstream_produce_retries_total") > 0,
            "a produce retry (output topic missing)",
            READY_DEADLINE_S,
        )
        _recreate(harness.admin, pipeline.output_topic)

        expressions = [substitute(expr, instance) for expr in _dashboard_expressions()]
        assert len(expressions) >= 25
        cuda_in_use = any(
            line.startswith(GPU_METRIC_PREFIX) for line in _scrape(metrics_port).splitlines()
        )  # samples, not the HELP and TYPE lines
        required = [e for e in expressions if cuda_in_use or GPU_METRIC_PREFIX not in e]
        empty = list(required)

        def all_have_series() -> bool:
            nonlocal empty
            empty = [expr for expr in empty if not prometheus.query(expr)]
            return not empty

        deadline = time.monotonic() + SERIES_DEADLINE_S
        while not all_have_series():
            assert worker.running(), worker.output()
            if time.monotonic() > deadline:
                pytest.fail("no series for:\n" + "\n".join(empty))
            time.sleep(RECHECK_S)
        for expr in expressions:  # the GPU ones too: valid PromQL, whatever the device
            prometheus.query(expr)
        for selector, label in _variable_selectors():
            series = prometheus.query(substitute(selector, instance))
            assert series and all(label in item["metric"] for item in series), selector
    finally:
        feeder.stopped.set()
        feeder.join(60)
        prometheus.close()
    harness.stop_all()
