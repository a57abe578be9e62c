"""Shared pieces of the Kafka benchmarks: a broker, topics, input, worker processes, reports.

Every benchmark starts its own local broker (``dev/kafka/kafkactl.py``) on free ports in a
temporary directory and stops it at the end, unless ``--bootstrap`` names one to reuse.
Topics and groups get unique names, so runs never see each other's data.

Timestamps: output topics are created with ``message.timestamp.type=LogAppendTime``, so an
output record's timestamp is the moment the broker appended it (just before it
acknowledged it to the producer), on the broker's clock. Throughput spans and latencies
are read from those timestamps, never from the benchmark's own clock, so the reader's
speed does not enter the figures.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import http.client
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

REPO: Final = Path(__file__).resolve().parents[1]
KAFKACTL: Final = REPO / "dev" / "kafka" / "kafkactl.py"
RESULTS: Final = REPO / "bench" / "results"
# A cold broker start on a loaded 2-core machine takes 10-30 s; kafkactl waits up to 90.
KAFKACTL_TIMEOUT_S: Final = 180.0
# kafkactl up is retried this often in a fresh folder before the benchmark gives up.
BROKER_START_ATTEMPTS: Final = 3
# Topic creation is one controller round trip; generous for a loaded machine.
ADMIN_TIMEOUT_S: Final = 30.0
# The input producer: large batches and a little lingering fill the topics fast.
INPUT_LINGER_MS: Final = 20
INPUT_BATCH_MESSAGES: Final = 10_000
# A reader poll returns this many records at most (fewer per call only costs time).
READ_BATCH: Final = 1000
# How often completion (committed offsets at the log end) is checked.
COMPLETION_POLL_S: Final = 0.25
# SIGTERM, then this long for the worker's graceful stop before SIGKILL.
WORKER_STOP_TIMEOUT_S: Final = 60.0
LOG_APPEND_TIME: Final = {"message.timestamp.type": "LogAppendTime"}
LABELS: Final = ("sports", "finance", "politics", "weather")
# News-like sentences of 60-90 characters: the "small events" of the benchmarks.
SAMPLE_TEXTS: Final = (
    "The central bank raised interest rates by a quarter point to curb inflation.",
    "The home team clinched the championship with a last-minute goal in extra time.",
    "Parliament passed the new budget after a long night of heated debate.",
    "A new smartphone with a foldable screen goes on sale next month.",
    "Researchers found that regular exercise lowers the risk of heart disease.",
    "Heavy rain and strong winds are expected across the coast this weekend.",
    "Shares of the chipmaker jumped after it reported record quarterly profits.",
    "The tennis star withdrew from the tournament with a shoulder injury.",
)
# --event-bytes: below this the events cannot be padded (one sample sentence and its JSON
# already take ~90-115 bytes).
MIN_EVENT_BYTES: Final = 128
# --event-bytes: above this the noop scorer's estimate (~4 characters a token, times the
# 4 labels) passes the worker's default max_event_tokens (65,536) and events would be
# dead-lettered; max_text_chars (100,000) and Kafka's 1 MB message limit lie further out.
MAX_EVENT_BYTES: Final = 60_000
# A /metrics scrape renders in milliseconds; a loaded 2-core machine may stall it briefly.
METRICS_TIMEOUT_S: Final = 2.0
LIBRARIES: Final = (
    "confluent-kafka",
    "orjson",
    "pydantic",
    "pydantic-core",
    "structlog",
    "torch",
    "transformers",
    "tokenizers",
    "matplotlib",
)


# -- machine and report --------------------------------------------------------------------


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    pairs = (line.partition(":") for line in text.splitlines())
    return {key.strip(): value.strip() for key, _, value in pairs}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as lscpu lists them (empty where lscpu is missing)."""
    return set(_lscpu().get("Flags", "").split())


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    """CPU, memory, load, Python and library versions: what the figures were measured on."""
    cpu = _lscpu()
    info: dict[str, Any] = {
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "memory_gib": _memory_gib(),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }
    with contextlib.suppress(ImportError):
        import confluent_kafka

        info["librdkafka"] = confluent_kafka.libversion()[0]
    return info


def write_report(out: Path | None, name: str, report: dict[str, Any]) -> Path:
    """``report`` as JSON under ``out`` (a directory), else ``bench/results/NAME.json``."""
    directory = out if out is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    report = {"finished_at": dt.datetime.now(dt.UTC).isoformat(), **report}
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table; numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row, raw in zip(cells, rows, strict=True):
        print(
            "  ".join(
                value.rjust(w) if isinstance(item, int | float) else value.ljust(w)
                for value, w, item in zip(row, widths, raw, strict=True)
            )
        )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


# -- broker and topics ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """Yield a bootstrap address: ``bootstrap`` as given, else a broker of our own that is
    stopped (and its data removed) on the way out, also after Ctrl-C."""
    if bootstrap:
        yield bootstrap
        return
    with tempfile.TemporaryDirectory(prefix="tagstream-bench-kafka-") as scratch:
        flags = _start_broker(Path(scratch))
        try:
            yield f"127.0.0.1:{flags[1]}"
        finally:
            _kafkactl("down", flags)


def _kafkactl(action: str, flags: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(KAFKACTL), action, *flags]
    return subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=KAFKACTL_TIMEOUT_S
    )


def _start_broker(scratch: Path) -> list[str]:
    """kafkactl up on free ports; retried in a fresh folder (a random cluster id that
    starts with '-' makes kafka-storage's argument parser fail, about 1 start in 64)."""
    failures = []
    for attempt in range(BROKER_START_ATTEMPTS):
        port, controller = free_port(), free_port()
        data_dir = scratch / f"kafka-{attempt}"
        flags = ["--port", str(port), "--controller-port", str(controller)]
        flags += ["--data-dir", str(data_dir)]
        print(f"starting a local Kafka broker on 127.0.0.1:{port} ...", flush=True)
        started = _kafkactl("up", flags)
        if started.returncode == 0:
            return flags
        failures.append(started.stdout + started.stderr)
        _kafkactl("down", flags)
    raise SystemExit("the local broker did not start:\n" + "\n".join(failures))


def create_topics(bootstrap: str, topics: dict[str, tuple[int, dict[str, str]]]) -> None:
    """``{name: (partitions, config)}``, created and waited for."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [
        NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)
        for name, (partitions, config) in topics.items()
    ]
    for future in admin.create_topics(new, operation_timeout=ADMIN_TIMEOUT_S).values():
        future.result(timeout=ADMIN_TIMEOUT_S)


# -- input ---------------------------------------------------------------------------------


def event(index: int, size: int | None = None) -> tuple[bytes, bytes]:
    """(key, value) of the ``index``-th event, keyed by its id: the small event (~110 bytes
    of JSON) unless ``size`` asks for a value of about ``size`` bytes (see ``padded_text``).
    """
    event_id = f"e-{index}"
    first = index % len(SAMPLE_TEXTS)
    if size is None:
        text = SAMPLE_TEXTS[first]
    else:
        empty = len(json.dumps({"id": event_id, "text": ""}))
        text = padded_text(first, size - empty)
    return event_id.encode(), json.dumps({"id": event_id, "text": text}).encode()


@functools.lru_cache(maxsize=1024)
def padded_text(first: int, chars: int) -> str:
    """News-like text of at most ``chars`` characters (ASCII, so as many bytes in JSON):
    the sample sentences from ``SAMPLE_TEXTS[first]`` on, round and round, cut after the
    last whole word that fits. Never shorter than that first sentence."""
    count = len(SAMPLE_TEXTS)
    parts: list[str] = []
    length = -1  # no space before the first sentence
    while length < chars:
        sentence = SAMPLE_TEXTS[(first + len(parts)) % count]
        parts.append(sentence)
        length += len(sentence) + 1
    text = " ".join(parts)
    if len(text) > chars:
        text = text[: chars + 1].rsplit(" ", 1)[0]
    return text if len(text) >= len(parts[0]) else parts[0]


def fast_producer(bootstrap: str, **extra: Any) -> Producer:
    config = {
        "bootstrap.servers": bootstrap,
        "linger.ms": INPUT_LINGER_MS,
        "batch.num.messages": INPUT_BATCH_MESSAGES,
        "acks": "all",
        **extra,
    }
    return Producer(config)


@dataclass(frozen=True)
class InputWritten:
    """What ``produce_events`` wrote: how long it took, and the values' total size."""

    seconds: float
    count: int
    value_bytes: int

    @property
    def mean_value_bytes(self) -> float:
        return self.value_bytes / self.count if self.count else 0.0


def produce_input(bootstrap: str, topic: str, count: int) -> float:
    """Write ``count`` small events to ``topic`` (spread over its partitions by key); seconds."""
    return produce_events(bootstrap, topic, count).seconds


def produce_events(bootstrap: str, topic: str, count: int, size: int | None = None) -> InputWritten:
    """Write ``count`` events of about ``size`` bytes (small ones if None) to ``topic``."""
    producer = fast_producer(bootstrap)
    started = time.perf_counter()
    value_bytes = 0
    for index in range(count):
        key, value = event(index, size)
        value_bytes += len(value)
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        if index % INPUT_BATCH_MESSAGES == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        raise SystemExit(f"{remaining} input events were not acknowledged")
    return InputWritten(time.perf_counter() - started, count, value_bytes)


# -- reading results -----------------------------------------------------------------------


@dataclass
class TopicRead:
    """What a topic holds: timestamps (ms, in log order per partition) and values."""

    timestamps: list[int] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    coordinates: set[tuple[bytes, bytes]] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.timestamps)


def log_end(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("bench-peek")})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=ADMIN_TIMEOUT_S)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def read_topic(
    bootstrap: str, topic: str, partitions: int, *, keep_values: bool = False
) -> TopicRead:
    """Everything in ``topic`` up to its current end (timestamps; values if asked).

    ``coordinates`` collects each record's ``tagstream.source.partition`` /
    ``.offset`` headers, when it has them, to count duplicates. Read ``read_committed`` up to
    each partition's end of file: an exactly-once run's log also holds transaction markers,
    offsets no record is read at.
    """
    ends = log_end(bootstrap, topic, partitions)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("bench-read"),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions) if ends[p] > 0])
    result = TopicRead()
    remaining = {p for p in range(partitions) if ends[p] > 0}
    try:
        while remaining:
            for message in consumer.consume(READ_BATCH, 1.0):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(message.partition() or 0)
                        continue
                    raise SystemExit(f"reading {topic}: {error}")
                result.timestamps.append(message.timestamp()[1])
                if keep_values:
                    result.values.append(message.value() or b"")
                headers = message.headers()
                if headers:
                    found = dict(headers)
                    partition = found.get("tagstream.source.partition")
                    offset = found.get("tagstream.source.offset")
                    if isinstance(partition, bytes) and isinstance(offset, bytes):
                        result.coordinates.add((partition, offset))
    finally:
        consumer.close()
    return result


def committed_at_end(bootstrap: str, group: str, topic: str, partitions: int) -> bool:
    """Whether the group's committed offsets equal the input topic's log end."""
    ends = log_end(bootstrap, topic, partitions)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=ADMIN_TIMEOUT_S
        )
    finally:
        consumer.close()
    return all(tp.offset == ends[tp.partition] for tp in committed)


def wait_until(condition: Any, timeout_s: float, what: str) -> float:
    """Poll ``condition()`` until true; the time.monotonic() it became true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(COMPLETION_POLL_S)
    return time.monotonic()


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


# -- the worker as a subprocess ------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """One benchmark run's topics and group."""

    input: str
    output: str
    dead_letter: str
    group: str
    partitions: int

    @classmethod
    def create(cls, bootstrap: str, prefix: str, partitions: int) -> Topics:
        """Fresh input and output topics (LogAppendTime), a dead-letter topic, a group."""
        output = unique(f"{prefix}-out")
        topics = cls(
            input=unique(f"{prefix}-in"),
            output=output,
            dead_letter=f"{output}.dlq",
            group=unique(f"{prefix}-group"),
            partitions=partitions,
        )
        create_topics(
            bootstrap,
            {
                topics.input: (partitions, dict(LOG_APPEND_TIME)),
                topics.output: (partitions, dict(LOG_APPEND_TIME)),
                topics.dead_letter: (1, {}),
            },
        )
        return topics


def worker_env(
    bootstrap: str, topics: Topics, settings: dict[str, str], root: Path = REPO
) -> dict[str, str]:
    """The environment of a ``tagstream run`` subprocess: ours, minus stray TAGSTREAM_*.

    ``root``: the folder whose ``worker`` package runs (another checkout, to compare two
    versions of the worker on the same machine and broker).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGSTREAM_")}
    env.update(
        {
            "TAGSTREAM_BOOTSTRAP_SERVERS": bootstrap,
            "TAGSTREAM_INPUT_TOPICS": topics.input,
            "TAGSTREAM_OUTPUT_TOPIC": topics.output,
            "TAGSTREAM_DLQ_TOPIC": topics.dead_letter,
            "TAGSTREAM_GROUP_ID": topics.group,
            "TAGSTREAM_LABELS": ",".join(LABELS),
            "TAGSTREAM_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(root), str(REPO)])),
            **settings,
        }
    )
    return env


def start_worker(env: dict[str, str], log_path: Path, root: Path = REPO) -> subprocess.Popen[bytes]:
    """``python -m worker run`` in ``root`` (``-m`` puts it first on the path)."""
    log = log_path.open("wb")
    command = [sys.executable, "-m", "worker", "run"]
    return subprocess.Popen(command, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(process: subprocess.Popen[bytes], log_path: Path) -> int:
    """SIGTERM, wait for the graceful stop (SIGKILL after a minute); the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    code = process.returncode
    if code != 0:
        print(f"worker exited with {code}; its log: {log_path}", file=sys.stderr)
    return code


def scrape_metrics(port: int, host: str = "127.0.0.1") -> str | None:
    """The worker's ``/metrics`` page as text; None when it cannot be read."""
    try:
        with urllib.request.urlopen(
            f"http://{host}:{port}/metrics", timeout=METRICS_TIMEOUT_S
        ) as response:
            body: bytes = response.read()
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return body.decode("utf-8", errors="replace")


def metric_value(text: str, name: str) -> float | None:
    """The sum of every sample of metric ``name`` (any labels) in Prometheus text format;
    None when there is none. ``name`` is a full sample name, e.g. ``x_seconds_sum``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1 :]
        elif not rest.startswith(" "):
            continue  # another metric whose name starts with this one
        fields = rest.split()
        try:
            total += float(fields[0])
        except (IndexError, ValueError):
            continue
        found = True
    return total if found else None


def check_alive(process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is not None:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"the worker exited early ({process.returncode}):\n{tail}")
