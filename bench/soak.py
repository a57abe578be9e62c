"""Memory under a steady load: ``tagstream run`` fed at a fixed rate for minutes, RSS sampled.

A producer in this process writes small events (the pipeline benchmark's) at ``--rate``
events/s (default 3,500: about half of what the no-model worker sustains on the 2-core
development machine, see the README) for ``--minutes`` (default 10) to a fresh 8-partition
topic; one worker with the no-model scorer consumes it. Every ``SAMPLE_EVERY_S`` the worker's
resident set size (``VmRSS`` of ``/proc/PID/status``) and the outputs so far are recorded.

Reported: the RSS at minute 1 and at the last minute, its growth between them (goal: under
5 %), the peak (``VmHWM``), and whether every input was scored. The samples go to
``bench/results/soak.json``, and a plot of RSS over time to ``soak.png`` when matplotlib is
installed.

Run from the repository root: ``python -m bench.soak [--minutes N] [--rate R]
[--bootstrap HOST:PORT] [--set TAGSTREAM_X=Y ...]``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from bench.common import (
    RESULTS,
    Topics,
    broker,
    check_alive,
    committed_at_end,
    event,
    fast_producer,
    log_end,
    machine_info,
    start_worker,
    stop_worker,
    worker_env,
    write_report,
)

NOOP_SCORER: Final = "worker.scoring.noop:NoopScorer"
DEFAULT_MINUTES: Final = 10.0
# Half the no-model worker's rate on the development machine (7,500-7,800 events/s).
DEFAULT_RATE: Final = 3_500
PARTITIONS: Final = 8
# Often enough for a smooth curve, rarely enough to cost nothing.
SAMPLE_EVERY_S: Final = 5.0
# The producer sends in slices this long, sleeping off what is left of each.
SLICE_S: Final = 0.05
# After the load stops, how long the worker gets to score and commit the rest.
DRAIN_TIMEOUT_S: Final = 120.0
# RSS growth from minute 1 to the end that the soak accepts.
GROWTH_GOAL: Final = 0.05
# The RSS compared at the start: the worker has warmed up by then.
BASELINE_MINUTE_S: Final = 60.0


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    rss_mib: float
    produced: int


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory field of ``/proc/PID/status``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class SteadyProducer(threading.Thread):
    """Writes events at a fixed rate until stopped; counts what it wrote."""

    def __init__(self, bootstrap: str, topic: str, rate: int) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self._producer = fast_producer(bootstrap)
        self._topic = topic
        self._rate = rate
        self._halt = threading.Event()
        self.produced = 0

    def run(self) -> None:
        per_slice = max(1, round(self._rate * SLICE_S))
        started = time.monotonic()
        while not self._halt.is_set():
            for _ in range(per_slice):
                key, value = event(self.produced)
                self._producer.produce(self._topic, key=key, value=value)
                self.produced += 1
            self._producer.poll(0)
            # Sleep until this many events are due at the rate (catches up after a stall).
            due = started + self.produced / self._rate
            self._halt.wait(max(0.0, due - time.monotonic()))
        self._producer.flush(30)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def soak(bootstrap: str, minutes: float, rate: int, settings: dict[str, str]) -> dict[str, object]:
    topics = Topics.create(bootstrap, "soak", PARTITIONS)
    env = worker_env(bootstrap, topics, {"TAGSTREAM_SCORER": NOOP_SCORER, **settings})
    logs = Path(tempfile.mkdtemp(prefix="tagstream-soak-"))
    log_path = logs / "worker-soak.log"
    process = start_worker(env, log_path)
    producer = SteadyProducer(bootstrap, topics.input, rate)
    samples: list[Sample] = []
    producer.start()
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < minutes * 60:
            check_alive(process, log_path)
            samples.append(Sample(round(elapsed, 1), rss_mib(process.pid), producer.produced))
            print(f"  {elapsed:6.0f} s  RSS {samples[-1].rss_mib:7.1f} MiB", flush=True)
            time.sleep(SAMPLE_EVERY_S)
        producer.stop()
        drained = _drain(bootstrap, topics)
        peak = rss_mib(process.pid, "VmHWM")
    finally:
        code = stop_worker(process, log_path)
    return _report(
        samples,
        rate=rate,
        minutes=minutes,
        peak_mib=peak,
        drained=drained,
        produced=producer.produced,
        exit_code=code,
    )


def _drain(bootstrap: str, topics: Topics) -> bool:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if committed_at_end(bootstrap, topics.group, topics.input, topics.partitions):
            return sum(log_end(bootstrap, topics.input, topics.partitions).values()) > 0
        time.sleep(1.0)
    return False


def _report(
    samples: list[Sample],
    *,
    rate: int,
    minutes: float,
    peak_mib: float,
    drained: bool,
    produced: int,
    exit_code: int,
) -> dict[str, object]:
    first = next(s for s in samples if s.elapsed_s >= BASELINE_MINUTE_S)
    last = samples[-1]
    growth = (last.rss_mib - first.rss_mib) / first.rss_mib
    print(
        f"RSS at {first.elapsed_s:.0f} s: {first.rss_mib:.1f} MiB; at {last.elapsed_s:.0f} s: "
        f"{last.rss_mib:.1f} MiB; growth {growth:+.1%} (goal < {GROWTH_GOAL:.0%}); "
        f"peak {peak_mib:.1f} MiB; {produced:,} events at {rate:,}/s, all committed: {drained}"
    )
    return {
        "rate": rate,
        "minutes": minutes,
        "produced": produced,
        "all_committed": drained,
        "exit_code": exit_code,
        "rss_minute_1_mib": first.rss_mib,
        "rss_end_mib": last.rss_mib,
        "growth": growth,
        "peak_mib": peak_mib,
        "samples": [asdict(sample) for sample in samples],
    }


def plot(report: dict[str, object], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", flush=True)
        return
    samples = report["samples"]
    assert isinstance(samples, list)
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot([s["elapsed_s"] / 60 for s in samples], [s["rss_mib"] for s in samples])
    axis.set_xlabel("minutes")
    axis.set_ylabel("worker RSS (MiB)")
    axis.set_title(f"tagstream run (no-model scorer) at {report['rate']:,} events/s")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "soak.png", dpi=120)
    print(f"wrote {out / 'soak.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES)
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE)
    parser.add_argument("--bootstrap", default=None, help="reuse this broker (host:port)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder ({RESULTS})")
    parser.add_argument(
        "--set", action="append", default=[], metavar="TAGSTREAM_X=Y", help="worker setting"
    )
    args = parser.parse_args(argv)
    if args.minutes * 60 <= BASELINE_MINUTE_S:
        parser.error("--minutes must be more than 1")
    settings = dict(item.split("=", 1) for item in args.set)
    with broker(args.bootstrap) as bootstrap:
        report = soak(bootstrap, args.minutes, args.rate, settings)
    report["machine"] = machine_info()
    path = write_report(args.out, "soak", report)
    print(f"wrote {path}")
    plot(report, path.parent)
    growth = report["growth"]
    assert isinstance(growth, float)
    return 0 if growth < GROWTH_GOAL and report["all_committed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
