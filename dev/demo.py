"""`make demo`: tag ~20 news-like events end to end on the local broker, then stop everything.

Steps: make sure the local broker runs, create fresh input/output/dead-letter topics, start
``tagstream run`` (the offline MiniLM embedding scorer unless ``MODEL`` names an NLI model),
produce the built-in sample events with ``tagstream produce``, read the scored events back and
print them as a table, then stop the worker (SIGTERM, a clean shutdown) and the broker if the
demo started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from worker.contract.events import ScoredEvent

REPO = Path(__file__).resolve().parents[1]
KAFKACTL = REPO / "dev" / "kafka" / "kafkactl.py"
DEMO_LABELS = "politics,sports,business,technology,science,health,entertainment,weather"
SAMPLE_COUNT = 20
INPUT_PARTITIONS = 3
# Loading the model and joining the group take a few seconds; scoring 20 events on CPU a few more.
RESULT_DEADLINE_S = 180.0
# A clean shutdown commits and leaves the group; the worker's own bound is 30 s.
WORKER_STOP_TIMEOUT_S = 40.0
TEXT_WIDTH = 58


def bootstrap() -> str:
    return f"127.0.0.1:{os.environ.get('TAGSTREAM_KAFKA_PORT', '19092')}"


def create_topics(admin: AdminClient, names: list[str]) -> None:
    topics = [
        NewTopic(name, num_partitions=INPUT_PARTITIONS, replication_factor=1) for name in names
    ]
    for future in admin.create_topics(topics, operation_timeout=30).values():
        future.result(timeout=30)


def worker_env(suffix: str) -> dict[str, str]:
    model = os.environ.get("MODEL")
    env = {
        **os.environ,
        "TAGSTREAM_BOOTSTRAP_SERVERS": bootstrap(),
        "TAGSTREAM_INPUT_TOPICS": f"demo-events-{suffix}",
        "TAGSTREAM_OUTPUT_TOPIC": f"demo-scored-{suffix}",
        "TAGSTREAM_DLQ_TOPIC": f"demo-dlq-{suffix}",
        "TAGSTREAM_GROUP_ID": f"demo-{suffix}",
        "TAGSTREAM_LABELS": DEMO_LABELS,
        "TAGSTREAM_SCORER": "nli" if model else "embedding",
        "TAGSTREAM_METRICS_PORT": "0",
        "TAGSTREAM_LOG_LEVEL": os.environ.get("TAGSTREAM_LOG_LEVEL", "WARNING"),
    }
    if model:
        env["TAGSTREAM_MODEL"] = model
    return env


def read_scored(topic: str, expected: int) -> list[ScoredEvent]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap(),
            "group.id": f"demo-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    events: list[ScoredEvent] = []
    deadline = time.monotonic() + RESULT_DEADLINE_S
    try:
        while len(events) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=100, timeout=1.0):
                value = message.value()
                if message.error() is None and value is not None:
                    events.append(ScoredEvent.model_validate_json(value))
    finally:
        consumer.close()
    return events


def print_table(events: list[ScoredEvent], texts: dict[str, str]) -> None:
    header = f"{'text':<{TEXT_WIDTH}}  {'tags':<24}  top scores"
    print(header)
    print("-" * len(header))
    order = {event_id: index for index, event_id in enumerate(texts)}
    for event in sorted(events, key=lambda e: order.get(e.id, len(order))):
        text = textwrap.shorten(texts.get(event.id, ""), TEXT_WIDTH, placeholder="…")
        pairs = zip(event.labels[:3], event.scores[:3], strict=True)
        top = ", ".join(f"{label} {score:.2f}" for label, score in pairs)
        tags = ", ".join(event.tags) or "-"
        print(f"{text:<{TEXT_WIDTH}}  {tags:<24}  {top}")


def sample_texts() -> dict[str, str]:
    from worker.commands.produce import sample_events

    texts: dict[str, str] = {}
    for outgoing in sample_events(SAMPLE_COUNT):
        event = orjson.loads(outgoing.value)
        texts[str(event["id"])] = str(event["text"])
    return texts


def main() -> int:
    started_broker = (
        subprocess.run(
            [sys.executable, str(KAFKACTL), "status"], capture_output=True, check=False
        ).returncode
        != 0
    )
    subprocess.run([sys.executable, str(KAFKACTL), "up"], check=True)
    suffix = uuid.uuid4().hex[:6]
    env = worker_env(suffix)
    admin = AdminClient({"bootstrap.servers": bootstrap()})
    create_topics(
        admin,
        [env["TAGSTREAM_INPUT_TOPICS"], env["TAGSTREAM_OUTPUT_TOPIC"], env["TAGSTREAM_DLQ_TOPIC"]],
    )
    print(
        f"demo: topics {env['TAGSTREAM_INPUT_TOPICS']} -> {env['TAGSTREAM_OUTPUT_TOPIC']}; "
        f"scorer {env['TAGSTREAM_SCORER']}; starting the worker"
    )
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, cwd=REPO)
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "worker",
                "produce",
                "--topic",
                env["TAGSTREAM_INPUT_TOPICS"],
                "--count",
                str(SAMPLE_COUNT),
            ],
            env=env,
            cwd=REPO,
            check=True,
        )
        events = read_scored(env["TAGSTREAM_OUTPUT_TOPIC"], SAMPLE_COUNT)
        print()
        print_table(events, sample_texts())
        print(f"\ndemo: {len(events)} of {SAMPLE_COUNT} events scored")
        ok = len(events) == SAMPLE_COUNT
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
        if started_broker:
            subprocess.run([sys.executable, str(KAFKACTL), "down"], check=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
