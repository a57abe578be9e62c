"""Requests per second and latency of ``tagstream serve`` at a few client concurrencies.

One ``python -m worker serve`` process on a free port (default batching settings), loaded
by an asyncio client in this process (raw keep-alive HTTP/1.1 connections) with C
requests always in flight, for C in ``--concurrency`` (default 1, 8, 64). Each request
is one text (the benchmark's sample sentences, round and round) against four candidate
labels, multi-label. Per level: a few
warm-up requests, then ``--requests`` measured ones; requests/s is the measured requests
over the time from the first sent to the last answered, and p50/p99 are the client-side
latencies of those requests. The mean micro-batch size of the level comes from the
server's ``tagstream_batch_size_events`` histogram (the difference across the level).

Batching (``--batching``, ``TAGSTREAM_SERVE_BATCHING``): ``continuous`` (the default: an
idle model takes the open batch at once) and ``windowed`` (the worker's rule: a text waits
up to ``TAGSTREAM_MAX_WAIT_MS`` for company); one server per scorer and batching mode.

Scorers (``--scorers``): ``noop`` (no model: the HTTP path and the batcher alone) and
``tiny`` (the tiny BART NLI model of the tests, built into a temporary directory, on the
CPU). The client and the server share the machine's cores, so on a small machine the
figures are a floor for either.

Run from the repository root: ``python -m bench.serve [--scorers noop,tiny]
[--batching continuous,windowed] [--concurrency 1,8,64] [--requests N]
[--out bench/results/serve.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from bench.common import (
    LABELS,
    REPO,
    RESULTS,
    SAMPLE_TEXTS,
    library_versions,
    machine_info,
    metric_value,
)

SCORERS: Final = ("noop", "tiny")
BATCHING: Final = ("continuous", "windowed")
DEFAULT_CONCURRENCY: Final = (1, 8, 64)
# Enough requests for a stable p99 (a hundred beyond it) at every level.
DEFAULT_REQUESTS: Final = 2_000
# Requests before each level's measurement: connections opened, caches and allocator warm.
WARM_UP_REQUESTS: Final = 50
# A server start imports torch and loads the model: seconds, more on a loaded machine.
START_TIMEOUT_S: Final = 180.0
STOP_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.1
REQUEST_TIMEOUT_S: Final = 120.0
HTTP_OK: Final = 200
HTTP_LIBRARIES: Final = ("fastapi", "starlette", "uvicorn", "h11")


@dataclass(frozen=True, slots=True)
class Level:
    """The figures of one scorer at one concurrency."""

    scorer: str
    batching: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch_size: float


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scorer_env(scorer: str, work: Path) -> dict[str, str]:
    if scorer == "noop":
        return {"TAGSTREAM_SCORER": "worker.scoring.noop:NoopScorer"}
    from tests.support.models import build_tiny_bart

    model = build_tiny_bart(work / "tiny-bart")
    return {"TAGSTREAM_MODEL": str(model), "TAGSTREAM_DEVICE": "cpu", "TAGSTREAM_DTYPE": "float32"}


@contextmanager
def _server(scorer: str, batching: str, work: Path) -> Iterator[str]:
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("TAGSTREAM_")}
    env.update(
        _scorer_env(scorer, work),
        TAGSTREAM_SERVE_BATCHING=batching,
        TAGSTREAM_LOG_FORMAT="json",
        TAGSTREAM_LOG_LEVEL="WARNING",
    )
    env["PYTHONPATH"] = str(REPO)
    log = (work / f"serve-{scorer}-{batching}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, process)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tagstream serve exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError("tagstream serve did not get ready")


def _payload(index: int) -> dict[str, Any]:
    return {
        "inputs": SAMPLE_TEXTS[index % len(SAMPLE_TEXTS)],
        "parameters": {"candidate_labels": list(LABELS), "multi_label": True},
    }


def _request_bytes(host: str, index: int) -> bytes:
    body = json.dumps(_payload(index)).encode()
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer (uvicorn always sends Content-Length); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(
        int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return status


async def _load(base: str, concurrency: int, total: int) -> tuple[list[float], int, float]:
    """Send ``total`` requests over ``concurrency`` keep-alive connections, one request in
    flight on each; latencies (s), errors, span (s). The client is raw asyncio streams with
    the requests built ahead: httpx's AsyncClient cost ~6 ms of CPU per request here, which
    on a small machine would measure the client, not the server."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    prepared = [_request_bytes(host, index) for index in range(len(SAMPLE_TEXTS))]
    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def one_connection() -> None:
        nonlocal next_index, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while next_index < total:
                index = next_index
                next_index += 1
                sent = time.perf_counter()
                writer.write(prepared[index % len(prepared)])
                status = await _answer(reader)
                latencies.append(time.perf_counter() - sent)
                errors += status != HTTP_OK
        finally:
            writer.close()
            await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def _batch_totals(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    events = metric_value(text, "tagstream_batch_size_events_sum") or 0.0
    batches = metric_value(text, "tagstream_batch_size_events_count") or 0.0
    return events, batches


def _percentile(values: Sequence[float], percent: int) -> float:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[percent - 1]


def run_level(base: str, scorer: str, batching: str, concurrency: int, requests: int) -> Level:
    asyncio.run(_load(base, concurrency, WARM_UP_REQUESTS))
    events_before, batches_before = _batch_totals(base)
    latencies, errors, span = asyncio.run(_load(base, concurrency, requests))
    events_after, batches_after = _batch_totals(base)
    batches = batches_after - batches_before
    return Level(
        scorer=scorer,
        batching=batching,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(span, 3),
        requests_per_s=round(len(latencies) / span, 1),
        p50_ms=round(_percentile(latencies, 50) * 1000, 2),
        p99_ms=round(_percentile(latencies, 99) * 1000, 2),
        mean_batch_size=round((events_after - events_before) / batches, 2) if batches else 0.0,
    )


def _table(levels: Sequence[Level]) -> str:
    rows = [
        "| scorer | batching | concurrency | requests/s | p50 ms | p99 ms | mean batch | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows.extend(
        f"| {level.scorer} | {level.batching} | {level.concurrency} | {level.requests_per_s} | "
        f"{level.p50_ms} | {level.p99_ms} | {level.mean_batch_size} | {level.errors} |"
        for level in levels
    )
    return "\n".join(rows)


def _run_server(scorer: str, batching: str, work: Path, args: argparse.Namespace) -> list[Level]:
    levels: list[Level] = []
    with _server(scorer, batching, work) as base:
        for concurrency in args.concurrency:
            level = run_level(base, scorer, batching, concurrency, args.requests)
            print(json.dumps(asdict(level)), flush=True)
            levels.append(level)
    return levels


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scorers", default=",".join(SCORERS))
    parser.add_argument("--batching", default=",".join(BATCHING))
    parser.add_argument("--concurrency", type=_ints, default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args(argv)
    scorers = [name for name in args.scorers.split(",") if name]
    modes = [name for name in args.batching.split(",") if name]
    unknown = sorted(set(scorers) - set(SCORERS)) + sorted(set(modes) - set(BATCHING))
    if unknown:
        parser.error(f"unknown scorer(s) or batching mode(s): {', '.join(unknown)}")
    machine = machine_info()
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="tagstream-bench-serve-") as tmp:
        for scorer in scorers:
            for batching in modes:
                levels.extend(_run_server(scorer, batching, Path(tmp), args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine["http_libraries"] = library_versions(HTTP_LIBRARIES)
    report = {"machine": machine, "requests_per_level": args.requests,
              "levels": [asdict(level) for level in levels]}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(_table(levels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
