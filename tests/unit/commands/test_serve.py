"""``tagstream serve`` as a process: start-up errors name the setting, SIGTERM drains."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.scorers import BLOCK_MARKER, GATE_ENV
from worker.commands.serve import setting_names, torch_threads
from worker.config.loading import env_name
from worker.exit_codes import EXIT_OK, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[3]
# A process start imports torch and transformers: seconds on a loaded 2-core machine.
START_TIMEOUT_S = 120.0
POLL_S = 0.05


def _env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TAGSTREAM_")}
    env.update(
        TAGSTREAM_SCORER="tests.support.scorers:fake",
        TAGSTREAM_LOG_FORMAT="json",
        PYTHONPATH=str(ROOT),
        **settings,
    )
    return env


@contextmanager
def _serve(
    tmp_path: Path, env: dict[str, str], *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", *args],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in log.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines


def _wait_for(condition: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")


def _port(log: Path) -> int:
    def found() -> int | None:
        for line in _lines(log):
            if line.get("event") == "serving":
                return int(line["port"])
        return None

    port: int = _wait_for(found, "the 'serving' log line")
    return port


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_every_serve_setting_is_a_flag_and_the_short_ones_work() -> None:
    from worker.cli import build_parser

    names = setting_names()
    assert {"serve_host", "serve_port", "max_batch_size", "model", "labels"} <= set(names)
    assert "output_topic" not in names and "metrics_port" not in names
    args = build_parser(["serve"]).parse_args(["serve", "--host", "::1", "--port", "9"])
    assert (args.serve_host, args.serve_port) == ("::1", "9")


@pytest.mark.parametrize(
    ("setting", "cpus", "environ", "threads"),
    [
        (0, 2, {}, 1),  # one CPU left to the event loop
        (0, 16, {}, 15),
        (0, 1, {}, 1),  # never none
        (0, 8, {"OMP_NUM_THREADS": "4"}, None),  # the environment's choice stands
        (3, 8, {"OMP_NUM_THREADS": "4"}, 3),  # the setting wins
    ],
)
def test_torch_threads_leave_a_cpu_to_the_event_loop(
    setting: int, cpus: int, environ: dict[str, str], threads: int | None
) -> None:
    assert torch_threads(setting, cpus, environ) == threads


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--port", "70000"], "serve_port"),
        (["--serve-max-inputs", "0"], "serve_max_inputs"),
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--serve-batching", "eager"], "serve_batching"),
        (["--serve-torch-threads", "-1"], "serve_torch_threads"),
        (["--serve-max-inputs", "10", "--serve-max-pending-texts", "5"], "serve_max_inputs"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_it(
    tmp_path: Path, args: list[str], setting: str
) -> None:
    with _serve(tmp_path, _env(), *args) as (process, log):
        assert process.wait(START_TIMEOUT_S) == EXIT_USAGE
    errors = [line for line in _lines(log) if line.get("event") == "cannot start"]
    assert errors and env_name(setting) in errors[0]["error"]


def test_a_taken_port_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("--host", "127.0.0.1", "--port", str(port))
        with _serve(tmp_path, _env(), *args) as (process, log):
            assert process.wait(START_TIMEOUT_S) == EXIT_USAGE
    errors = [line for line in _lines(log) if line.get("event") == "cannot start"]
    assert errors and "TAGSTREAM_SERVE_PORT" in errors[0]["error"]


def test_sigterm_drains_the_request_in_flight_and_exits_0(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    env = _env(**{GATE_ENV: str(gate)})
    with _serve(tmp_path, env, "--host", "127.0.0.1", "--port", "0") as (process, log):
        port = _port(log)
        base = f"http://127.0.0.1:{port}"
        _wait_for(
            lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200, "ready"
        )
        answer: list[httpx.Response] = []
        payload = {"inputs": f"held {BLOCK_MARKER}", "parameters": {"candidate_labels": ["held"]}}
        client = threading.Thread(
            target=lambda: answer.append(
                httpx.post(f"{base}/v1/classify", json=payload, timeout=60)
            )
        )
        client.start()
        _wait_for(lambda: "tagstream_serve_pending_texts 1.0" in _metrics(base), "pending text")

        process.send_signal(signal.SIGTERM)
        _wait_for(lambda: _refused(port), "the listener to close")  # no new connection
        assert process.poll() is None  # still draining the request in flight
        gate.touch()
        client.join(60)
        code = process.wait(START_TIMEOUT_S)

    assert code == EXIT_OK
    assert answer and answer[0].status_code == 200
    assert answer[0].json()["tags"] == ["held"]
    events = [line.get("event") for line in _lines(log)]
    assert "draining requests in flight" in events
    drained = [line for line in _lines(log) if line.get("event") == "request batcher drained"]
    assert drained and drained[0]["complete"] is True


def _metrics(base: str) -> str:
    response = _get(f"{base}/metrics")
    return "" if response is None else response.text
