"""End-to-end latency of ``tagstream run`` under an open-loop load, against the input rate.

1. The maximum: unless ``--max-rate`` gives it, a saturation run (``--calibration-events``
   pre-produced events, the ``noop`` scenario of ``bench/pipeline.py``) measures the worker's
   events/s with the chosen scorer.
2. For each ``max_wait_ms`` (``--max-wait-ms``, default 5 and 50): a fresh worker on fresh
   topics (8 partitions), then, one after the other, an open-loop producer at 25 %, 50 % and
   75 % of the maximum (``--fractions``) for ``--seconds`` each. Open loop: event *i* is sent
   at ``start + i / rate`` whatever the worker does, so a slow worker cannot slow the load.
3. Latency of each event = output record timestamp - input record timestamp. Both topics
   use LogAppendTime, so both are the broker's append times on the broker's clock: the
   figure runs from the moment the input was in the log to the moment its scored event was
   (just before the broker acknowledged it), and excludes the load generator's own delays.
   The first ``--warmup-s`` of each rate are left out. p50 / p95 / p99 per rate.

With ``--ceiling`` the same rates also go through the plain consume-produce loop of
``bench/pipeline.py`` (its ``ceiling`` scenario, in a process of its own, writing for each
record only its input's timestamp): what Kafka and this machine cost an event with no
pipeline at all, the floor under the worker's figures (``max_wait_ms`` is 0 in its rows).

Prints a table, writes ``latency.json`` and ``latency.png`` (p50/p95/p99 against the rate,
one colour per ``max_wait_ms``) to ``--out`` (default ``bench/results``).

Run from the repository root: ``python -m bench.latency [--max-rate N] [--scorer noop|nli]
[--seconds S] [--ceiling] [--bootstrap HOST:PORT] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from confluent_kafka import Message, Producer

from bench.common import (
    RESULTS,
    Topics,
    broker,
    check_alive,
    event,
    machine_info,
    percentile,
    print_table,
    read_topic,
    start_worker,
    stop_worker,
    worker_env,
    write_report,
)
from bench.pipeline import (
    NOOP_SCORER,
    CeilingLoop,
    Progress,
    WorkerRun,
    nli_settings,
    run_worker,
)

REPO = Path(__file__).resolve().parents[1]

DEFAULT_FRACTIONS: Final = (0.25, 0.5, 0.75)
# The default (50) and a tenth of it: what a latency-sensitive deployment would pick.
DEFAULT_MAX_WAITS: Final = (5, 50)
DEFAULT_SECONDS: Final = 20.0
DEFAULT_WARMUP_S: Final = 3.0
DEFAULT_CALIBRATION_EVENTS: Final = 60_000
DEFAULT_PARTITIONS: Final = 8
# The load generator sends what is due every millisecond.
TICK_S: Final = 0.001
# Load generator: 5 ms of lingering keeps its produce requests (and the broker CPU they cost)
# few; that delay is not measured (latency starts at the input's LogAppendTime).
LOAD_LINGER_MS: Final = 5
# After a rate's last event: how long to wait for its outputs before moving on.
DRAIN_TIMEOUT_S: Final = 120.0
# Start-up: the worker joins the group and answers a first event within this.
READY_TIMEOUT_S: Final = 180.0
POLL_S: Final = 0.2
PERCENTILES: Final = (0.5, 0.95, 0.99)


@dataclass
class Point:
    # "worker" (tagstream run) or "ceiling" (the plain loop, --ceiling).
    pipeline: str
    max_wait_ms: int
    fraction: float
    target_rate: float
    achieved_rate: float
    events: int
    measured: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Phase:
    fraction: float
    rate: float
    start_ms: int
    end_ms: int
    sent: int


def open_loop(producer: Producer, topic: str, rate: float, seconds: float, first: int) -> int:
    """Send events ``first, first+1, ...`` at ``rate`` per second for ``seconds``; how many.

    The events are built beforehand, so the loop only produces (the generator shares the
    machine's CPU with the worker and the broker).
    """
    planned = [event(first + index) for index in range(int(rate * seconds) + 1)]
    start = time.perf_counter()
    sent = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        due = min(int(elapsed * rate), len(planned))
        while sent < due:
            key, value = planned[sent]
            try:
                producer.produce(topic, value=value, key=key)
            except BufferError:
                producer.poll(TICK_S)
                continue
            sent += 1
        producer.poll(0)
        time.sleep(TICK_S)
    producer.flush(DRAIN_TIMEOUT_S)
    return sent


def wait_for_outputs(progress: Progress, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while progress.outputs() < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"outputs stopped short of {count} after {timeout_s:.0f} s")
        time.sleep(POLL_S)


@dataclass(frozen=True)
class OpenLoop:
    """One worker on fresh topics under an open-loop load: each (fraction, rate) in turn."""

    name: str  # topic prefix; the worker's log is worker-NAME.log in ``out``
    settings: dict[str, str]
    rates: list[tuple[float, float]]
    seconds: float
    partitions: int
    out: Path
    root: Path = REPO
    # The plain consume-produce loop instead of tagstream run (settings and root unused).
    ceiling: bool = False


class StampedLoop(CeilingLoop):
    """The ceiling loop, writing for each record only ``{"source": {"timestamp": T}}``
    (T: the input's timestamp), which is all :func:`appended` reads of an output."""

    def outputs(self, messages: list[Message]) -> Iterator[tuple[Message, Any, Any]]:
        for message in messages:
            if message.error() is None:
                stamp = {"source": {"timestamp": message.timestamp()[1]}}
                yield message, orjson.dumps(stamp), None


def serve_ceiling(spec: str) -> int:
    """The ``--serve-ceiling`` process: the stamped loop on the topics ``spec`` (JSON)
    names, until SIGTERM."""
    fields = orjson.loads(spec)
    bootstrap = fields.pop("bootstrap")
    loop = StampedLoop(bootstrap, Topics(**fields))

    def stop(_signum: int, _frame: object) -> None:
        loop.stopping = True

    signal.signal(signal.SIGTERM, stop)
    loop.run(sys.maxsize)
    return 0


def start_ceiling(bootstrap: str, topics: Topics, log_path: Path) -> subprocess.Popen[bytes]:
    spec = orjson.dumps({"bootstrap": bootstrap, **asdict(topics)}).decode()
    command = [sys.executable, "-m", "bench.latency", "--serve-ceiling", spec]
    log = log_path.open("wb")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


@dataclass
class Measured:
    """What an :class:`OpenLoop` run left: its topics, its phases, and per output its
    input's timestamp and when a read_committed reader got it (ms)."""

    topics: Topics
    phases: list[Phase]
    visible: list[tuple[int, int]]


def measure(bootstrap: str, run: OpenLoop) -> Measured:
    """Start the worker, wait for its first output, run each rate, wait for its outputs."""
    topics = Topics.create(bootstrap, run.name, run.partitions)
    log_path = run.out / f"worker-{run.name}.log"
    if run.ceiling:
        process = start_ceiling(bootstrap, topics, log_path)
    else:
        env = worker_env(bootstrap, topics, run.settings, run.root)
        process = start_worker(env, log_path, run.root)
    progress = Progress(bootstrap, topics, visibility=True)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": LOAD_LINGER_MS, "acks": "all"}
    )
    phases: list[Phase] = []
    try:
        producer.produce(topics.input, value=event(0)[1], key=event(0)[0])
        producer.flush(READY_TIMEOUT_S)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while progress.outputs() < 1:
            check_alive(process, log_path)
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not answer a first event")
            time.sleep(POLL_S)
        total = 1
        for fraction, rate in run.rates:
            print(f"  {run.name}: {rate:,.0f} events/s ...", flush=True)
            start_ms = int(time.time() * 1000)
            sent = open_loop(producer, topics.input, rate, run.seconds, total)
            end_ms = int(time.time() * 1000)
            total += sent
            check_alive(process, log_path)
            wait_for_outputs(progress, total, DRAIN_TIMEOUT_S)
            phases.append(Phase(fraction, rate, start_ms, end_ms, sent))
    finally:
        progress.close()
        stop_worker(process, log_path)
    return Measured(topics, phases, progress.visible)


def run_rates(
    bootstrap: str, max_wait_ms: int, rates: list[tuple[float, float]], args: argparse.Namespace
) -> list[Point]:
    """One worker with ``max_wait_ms``; each (fraction, rate) in turn; the latency points."""
    settings = {**args.scorer_settings, "TAGSTREAM_MAX_WAIT_MS": str(max_wait_ms)}
    run = OpenLoop(
        f"latency-{max_wait_ms}",
        settings,
        rates,
        args.seconds,
        args.partitions,
        args.out,
        args.worker_root or REPO,
    )
    measured = measure(bootstrap, run)
    return points(bootstrap, measured.topics, max_wait_ms, measured.phases, args.warmup_s)


def run_ceiling_rates(
    rates: list[tuple[float, float]], bootstrap: str, args: argparse.Namespace
) -> list[Point]:
    """The same rates through the plain loop (``--ceiling``)."""
    run = OpenLoop(
        "latency-ceiling", {}, rates, args.seconds, args.partitions, args.out, ceiling=True
    )
    measured = measure(bootstrap, run)
    return points(bootstrap, measured.topics, 0, measured.phases, args.warmup_s, pipeline="ceiling")


def appended(bootstrap: str, topics: Topics) -> list[tuple[int, int]]:
    """Per output record: its input's timestamp (in the JSON) and its own (LogAppendTime)."""
    output = read_topic(bootstrap, topics.output, topics.partitions, keep_values=True)
    return [
        (int(orjson.loads(value)["source"]["timestamp"]), timestamp)
        for timestamp, value in zip(output.timestamps, output.values, strict=True)
    ]


def phase_latencies(
    samples: Iterable[tuple[int, int]], phases: Sequence[Phase], warmup_s: float
) -> list[list[float]]:
    """Sorted latencies (end ms - input ms) per phase, of the inputs appended during it
    after its first ``warmup_s``."""
    latencies: list[list[float]] = [[] for _ in phases]
    for source_ms, end_ms in samples:
        for index, phase in enumerate(phases):
            if phase.start_ms + warmup_s * 1000 <= source_ms <= phase.end_ms:
                latencies[index].append(float(end_ms - source_ms))
                break
    for values in latencies:
        values.sort()
    return latencies


def points(  # noqa: PLR0917
    bootstrap: str,
    topics: Topics,
    max_wait_ms: int,
    phases: list[Phase],
    warmup_s: float,
    pipeline: str = "worker",
) -> list[Point]:
    """Latency percentiles per phase from the output records (input timestamp in the JSON)."""
    latencies = phase_latencies(appended(bootstrap, topics), phases, warmup_s)
    result = []
    for phase, values in zip(phases, latencies, strict=True):
        p50, p95, p99 = (percentile(values, p) for p in PERCENTILES)
        seconds = (phase.end_ms - phase.start_ms) / 1000
        result.append(
            Point(
                pipeline=pipeline,
                max_wait_ms=max_wait_ms,
                fraction=phase.fraction,
                target_rate=round(phase.rate, 1),
                achieved_rate=round(phase.sent / seconds, 1),
                events=phase.sent,
                measured=len(values),
                p50_ms=p50,
                p95_ms=p95,
                p99_ms=p99,
                max_ms=values[-1] if values else float("nan"),
            )
        )
    return result


def plot(result: list[Point], max_rate: float, path: Path) -> Path | None:
    """p50 / p95 / p99 latency against the input rate, one colour per max_wait_ms."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", flush=True)
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"p50_ms": ("-", "o"), "p95_ms": ("--", "s"), "p99_ms": (":", "^")}
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for colour, (pipeline, wait) in zip(colours, _series(result), strict=False):
        rows = sorted(
            (p for p in result if (p.pipeline, p.max_wait_ms) == (pipeline, wait)),
            key=lambda p: p.target_rate,
        )
        name = f"max_wait_ms={wait}" if pipeline == "worker" else "plain loop"
        rates = [p.achieved_rate for p in rows]
        for key, (line, marker) in styles.items():
            axes.plot(
                rates,
                [getattr(p, key) for p in rows],
                linestyle=line,
                marker=marker,
                color=colour,
                label=f"{name} {key[:3]}",
            )
    axes.set_yscale("log")
    axes.set_xlabel(f"input rate, events/s (maximum measured: {max_rate:,.0f})")
    axes.set_ylabel("end-to-end latency, ms (log)")
    axes.set_title("tagstream run: input append -> output append (LogAppendTime)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _series(result: list[Point]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((p.pipeline, p.max_wait_ms) for p in result))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def numbers(kind: type) -> Any:
        return lambda value: [kind(v) for v in value.split(",") if v.strip()]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rate", type=float, default=None, help="skip the calibration")
    parser.add_argument("--calibration-events", type=int, default=DEFAULT_CALIBRATION_EVENTS)
    parser.add_argument("--fractions", type=numbers(float), default=list(DEFAULT_FRACTIONS))
    parser.add_argument("--max-wait-ms", type=numbers(int), default=list(DEFAULT_MAX_WAITS))
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per rate")
    parser.add_argument("--warmup-s", type=float, default=DEFAULT_WARMUP_S)
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)
    parser.add_argument("--scorer", choices=("noop", "nli"), default="noop")
    parser.add_argument("--bootstrap", default=None, help="reuse this broker (host:port)")
    parser.add_argument("--worker-root", type=Path, default=None, help="another checkout")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--ceiling", action="store_true", help="also measure the plain consume-produce loop"
    )
    # The plain loop's own process (started by --ceiling).
    parser.add_argument("--serve-ceiling", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_ceiling is not None:
        return serve_ceiling(args.serve_ceiling)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    result: list[Point] = []
    with (
        tempfile.TemporaryDirectory(prefix="tagstream-bench-") as scratch,
        broker(args.bootstrap) as bootstrap,
    ):
        if args.scorer == "noop":
            args.scorer_settings = {"TAGSTREAM_SCORER": NOOP_SCORER}
        else:
            args.scorer_settings = nli_settings(Path(scratch), {})
        max_rate = args.max_rate
        if max_rate is None:
            print(f"calibration: {args.calibration_events:,} events, saturated", flush=True)
            run = WorkerRun(
                f"latency-max-{args.scorer}",
                args.calibration_events,
                args.scorer_settings,
                root=args.worker_root or REPO,
            )
            max_rate = run_worker(bootstrap, args.partitions, run, args.out).events_per_s
            print(f"  maximum: {max_rate:,.0f} events/s", flush=True)
        rates = [(fraction, fraction * max_rate) for fraction in args.fractions]
        for wait in args.max_wait_ms:
            result.extend(run_rates(bootstrap, wait, rates, args))
        if args.ceiling:
            result.extend(run_ceiling_rates(rates, bootstrap, args))
    print(f"\nend-to-end latency, ms (maximum rate {max_rate:,.0f} events/s, {args.scorer})")
    print_table(
        [
            "pipeline",
            "max_wait_ms",
            "% of max",
            "rate",
            "achieved",
            "measured",
            "p50",
            "p95",
            "p99",
            "max",
        ],
        [
            [
                p.pipeline,
                p.max_wait_ms,
                f"{p.fraction:.0%}",
                p.target_rate,
                p.achieved_rate,
                p.measured,
                p.p50_ms,
                p.p95_ms,
                p.p99_ms,
                p.max_ms,
            ]
            for p in result
        ],
    )
    picture = plot(result, max_rate, args.out / "latency.png")
    path = write_report(
        args.out,
        "latency",
        {
            "machine": machine,
            "settings": {
                "scorer": args.scorer,
                "max_rate": max_rate,
                "max_rate_source": "--max-rate" if args.max_rate else "calibration run",
                "fractions": args.fractions,
                "max_wait_ms": args.max_wait_ms,
                "seconds_per_rate": args.seconds,
                "warmup_s": args.warmup_s,
                "partitions": args.partitions,
                "timestamps": "LogAppendTime on input and output topics",
                "worker_root": str(args.worker_root or REPO),
                "ceiling": args.ceiling,
                "command": sys.argv,
            },
            "points": [asdict(p) for p in result],
            "plot": str(picture) if picture else None,
        },
    )
    print(f"wrote {path}" + (f" and {picture}" if picture else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
