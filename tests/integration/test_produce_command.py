"""``tagstream produce`` against a real broker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

from tests.support.kafka_fixtures import REPO, KafkaCluster
from tests.support.ledger import Ledger


def _produce(
    kafka: KafkaCluster, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "produce", "--bootstrap-servers", kafka.bootstrap, *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_samples_reach_the_topic_keyed_by_id(
    kafka: KafkaCluster, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=2)
    result = _produce(kafka, "--topic", topic, "--count", "25", "--rate", "500")
    assert result.returncode == 0, result.stderr
    assert b"sent 25 events" in result.stderr

    records = Ledger(kafka.bootstrap, [], "", "", "unused").read(topic)
    assert len(records) == 25
    for record in records:
        event = orjson.loads(record.value or b"")
        assert record.key == event["id"].encode()
        assert event["text"]


def test_a_json_lines_file_is_sent_line_by_line(
    kafka: KafkaCluster, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(partitions=1)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"id": "x1", "text": "sports"}\n\n{"text": "no id"}\nnot json\n')
    result = _produce(kafka, "--topic", topic, "--file", str(path))
    assert result.returncode == 0, result.stderr
    records = Ledger(kafka.bootstrap, [], "", "", "unused").read(topic)
    assert [(r.key, r.value) for r in records] == [
        (b"x1", b'{"id": "x1", "text": "sports"}'),
        (None, b'{"text": "no id"}'),
        (None, b"not json"),
    ]
    from_stdin = _produce(kafka, "--topic", topic, "--file", "-", stdin=b'{"id": "s"}\n')
    assert from_stdin.returncode == 0 and b"sent 1 events" in from_stdin.stderr
