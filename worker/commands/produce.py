"""``tagstream produce``: send input events to a topic (demos, load tests, replays).

The events come from a JSON-lines file (``--file PATH``, ``-`` for stdin), one record per
non-blank line sent as is (so invalid lines can be sent on purpose), or from the built-in
news-like sample sentences. A line that is a JSON object with a string ``id`` is keyed by
it; sample events get the ids ``sample-1``, ``sample-2``, ...

``--count`` caps the number of events (samples repeat to reach it), ``--rate`` paces them
(events per second). Exit status: 0 when the broker acknowledged every event, 1 when some
could not be delivered, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Final

import orjson

from worker.config.settings import DEFAULT_BOOTSTRAP_SERVERS, ENV_PREFIX, split_csv
from worker.exit_codes import EXIT_OK, EXIT_UNDELIVERED, EXIT_USAGE
from worker.kafka.errors import ClientError
from worker.kafka.producer import KafkaProducer

STDIN: Final = "-"
# Everything queued must reach the broker before the command returns; a minute covers a
# broker that is slow to accept the first requests.
FLUSH_TIMEOUT_S: Final = 60.0

SAMPLE_TEXTS: Final = (
    "The central bank raised interest rates by a quarter point to curb inflation.",
    "The home team clinched the championship with a last-minute goal in extra time.",
    "Parliament passed the new budget after a long night of heated debate.",
    "A new smartphone with a foldable screen goes on sale next month.",
    "Researchers found that regular exercise lowers the risk of heart disease.",
    "Heavy rain and strong winds are expected across the coast this weekend.",
    "Shares of the chipmaker jumped after it reported record quarterly profits.",
    "The tennis star withdrew from the tournament with a shoulder injury.",
    "The president met foreign ministers to discuss the trade agreement.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "The film won best picture at the festival and broke box office records.",
    "Hospitals report a rise in flu cases as winter approaches.",
    "A startup released an open-source model that writes computer code.",
    "Oil prices fell sharply after producers agreed to increase output.",
    "The marathon was postponed because of an extreme heat warning.",
    "Voters head to the polls on Sunday in a closely watched election.",
    "A cyberattack disrupted online banking services for several hours.",
    "The museum opened an exhibition of rediscovered Renaissance paintings.",
    "Scientists warn that melting glaciers will raise sea levels faster than expected.",
    "The striker signed a five-year contract with the league champions.",
)


@dataclass(frozen=True, slots=True)
class Outgoing:
    key: bytes | None
    value: bytes


def sample_events(count: int) -> Iterator[Outgoing]:
    """``count`` sample events, cycling through the built-in sentences."""
    for index, text in enumerate(islice(cycle(SAMPLE_TEXTS), count), start=1):
        event_id = f"sample-{index}"
        yield Outgoing(event_id.encode(), orjson.dumps({"id": event_id, "text": text}))


def _key_of(line: bytes) -> bytes | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    event_id = obj.get("id") if isinstance(obj, dict) else None
    return event_id.encode() if isinstance(event_id, str) else None


def file_events(lines: Iterable[bytes], count: int | None) -> Iterator[Outgoing]:
    """One event per non-blank line, keyed by its ``id`` when it has one."""
    values = (line.rstrip(b"\r\n") for line in lines)
    non_blank = (value for value in values if value.strip())
    for value in islice(non_blank, count):
        yield Outgoing(_key_of(value), value)


def configure(parser: argparse.ArgumentParser) -> None:
    env_topics = split_csv(os.environ.get(f"{ENV_PREFIX}INPUT_TOPICS", ""))
    parser.add_argument(
        "--topic",
        default=env_topics[0] if env_topics else None,
        help="Topic to send to [first of TAGSTREAM_INPUT_TOPICS].",
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get(f"{ENV_PREFIX}BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP_SERVERS),
        help="Kafka bootstrap servers [TAGSTREAM_BOOTSTRAP_SERVERS].",
    )
    parser.add_argument(
        "--file", help="JSON-lines file of input events, '-' for stdin (default: samples)."
    )
    parser.add_argument("--count", type=int, help="Send at most this many events.")
    parser.add_argument("--rate", type=float, default=0.0, help="Events per second (0: no limit).")
    parser.add_argument(
        "-X",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra librdkafka producer setting (repeatable).",
    )


class _Deliveries:
    def __init__(self) -> None:
        self.acked = 0
        self.failed: list[str] = []

    def __call__(self, error: ClientError | None) -> None:
        if error is None:
            self.acked += 1
        else:
            self.failed.append(error.message)


def _report_client_error(error: ClientError) -> None:
    if error.fatal:
        sys.stderr.write(f"tagstream produce: {error.message}\n")


def _producer(args: argparse.Namespace) -> KafkaProducer:
    config: dict[str, str] = {"bootstrap.servers": args.bootstrap_servers}
    for item in args.extra:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"-X {item!r}: expected KEY=VALUE")
        config[key] = value
    config.update({"enable.idempotence": "true", "acks": "all"})
    return KafkaProducer(config, on_error=_report_client_error)


def _events(args: argparse.Namespace) -> Iterator[Outgoing]:
    if args.file is None:
        return sample_events(len(SAMPLE_TEXTS) if args.count is None else args.count)
    if args.file == STDIN:
        return file_events(sys.stdin.buffer, args.count)
    path = Path(args.file)
    if not path.is_file():
        raise OSError(f"--file {path}: no such file")
    return file_events(_lines(path), args.count)


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        yield from handle


def send(
    producer: KafkaProducer, topic: str, events: Iterable[Outgoing], rate: float
) -> _Deliveries:
    deliveries = _Deliveries()
    started = time.monotonic()
    for index, event in enumerate(events):
        if rate > 0:
            time.sleep(max(0.0, started + index / rate - time.monotonic()))
        while True:
            try:
                refused = producer.produce(topic, event.key, event.value, [], deliveries)
            except BufferError:
                producer.poll(0.1)
                continue
            if refused is not None:
                deliveries(refused)
            break
        producer.poll(0)
    producer.flush(FLUSH_TIMEOUT_S)
    producer.close()
    return deliveries


def execute(args: argparse.Namespace) -> int:
    if not args.topic:
        sys.stderr.write("tagstream produce: --topic is required (or TAGSTREAM_INPUT_TOPICS)\n")
        return EXIT_USAGE
    if args.count is not None and args.count < 0:
        sys.stderr.write("tagstream produce: --count must not be negative\n")
        return EXIT_USAGE
    try:
        producer = _producer(args)
        events = _events(args)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"tagstream produce: {exc}\n")
        return EXIT_USAGE
    deliveries = send(producer, args.topic, events, args.rate)
    sys.stderr.write(f"sent {deliveries.acked} events to {args.topic}\n")
    if deliveries.failed:
        sys.stderr.write(
            f"tagstream produce: {len(deliveries.failed)} not delivered: {deliveries.failed[0]}\n"
        )
        return EXIT_UNDELIVERED
    return EXIT_OK
