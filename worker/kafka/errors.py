"""A thin, typed layer over confluent-kafka: records, client configuration, error classes.

Everything else in the worker talks to Kafka through the types here, so the rules that
decide the delivery guarantee (no auto-commit, no auto offset store, idempotent
producer with ``acks=all``) live in one place and cannot be overridden by extra settings.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import structlog
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient

from worker.config.settings import KafkaSettings

log = structlog.get_logger(__name__)

# One topic-partition, the key of every per-partition structure in the worker.
PartitionKey = tuple[str, int]
Headers = tuple[tuple[str, bytes | None], ...]
# Headers of a record to produce, in the form confluent-kafka accepts.
OutHeaders = list[tuple[str, str | bytes | None]]

# A few milliseconds of lingering turns a scored micro-batch into a handful of produce
# requests instead of one request per event, at no visible latency cost.
PRODUCER_LINGER_MS: Final = 5
# The solo producer re-sends a record that the broker refused as too large, alone, to tell
# "this record is too large" apart from "its batch was too large".
SOLO_BATCH_MESSAGES: Final = 1


class ErrorKind(enum.Enum):
    """What the worker does about a Kafka error."""

    RETRIABLE = "retriable"  # back off and try again; never dead-letter
    TOO_LARGE = "too_large"  # the record can never be written to this topic
    FATAL = "fatal"  # stop the worker, committing only what is done


class KafkaFatalError(RuntimeError):
    """An error that stops the worker (authorization, fatal producer error, ...)."""


_FATAL_CODES: Final = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError._FATAL,
        KafkaError._FENCED,
    }
)
_TOO_LARGE_CODES: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        18,  # RECORD_LIST_TOO_LARGE: larger than the broker's segment size
    }
)
# Errors that go away by themselves: brokers restarting, leaders moving, slow requests.
_TRANSIENT_CODES: Final = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._QUEUE_FULL,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._WAIT_COORD,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_COORDINATOR,
        KafkaError.REBALANCE_IN_PROGRESS,
    }
)


def classify(error: KafkaError) -> ErrorKind:
    """Retriable, too large, or fatal. Unknown permanent errors count as fatal: retrying
    them forever would stall the partition, dead-lettering them could drop good events."""
    code = error.code()
    if error.fatal() or code in _FATAL_CODES:
        return ErrorKind.FATAL
    if code in _TOO_LARGE_CODES:
        return ErrorKind.TOO_LARGE
    if error.retriable() or code in _TRANSIENT_CODES:
        return ErrorKind.RETRIABLE
    return ErrorKind.FATAL


def is_fatal(error: KafkaError) -> bool:
    """Whether a client-level (non-delivery) error must stop the worker."""
    return bool(error.fatal()) or error.code() in _FATAL_CODES


class InputRecord(NamedTuple):
    """One consumed record, detached from the librdkafka message.

    A named tuple rather than a frozen dataclass: one is built per consumed record, and a
    tuple is built several times faster while being just as immutable.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None

    @property
    def partition_key(self) -> PartitionKey:
        return (self.topic, self.partition)

    @classmethod
    def from_message(cls, message: Message) -> InputRecord:
        """Copy out of a consumed (error-free) message."""
        timestamp_type, timestamp = message.timestamp()
        partition, offset = message.partition(), message.offset()
        if partition is None or offset is None:
            raise ValueError("a consumed message without partition or offset")
        raw_headers = message.headers()
        return cls(
            message.topic() or "",
            partition,
            offset,
            message.key(),
            message.value(),
            _headers(raw_headers) if raw_headers else (),
            None if timestamp_type == TIMESTAMP_NOT_AVAILABLE else timestamp,
        )


def _as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode("utf-8") if isinstance(value, str) else value


def _headers(raw: Any) -> Headers:
    pairs = raw.items() if isinstance(raw, dict) else raw
    return tuple((name, _as_bytes(value)) for name, value in pairs)


def security_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The librdkafka security settings shared by the consumer and the producer."""
    config: dict[str, Any] = {"security.protocol": kafka.security_protocol}
    optional = {
        "sasl.mechanism": kafka.sasl_mechanism,
        "sasl.username": kafka.sasl_username,
        "ssl.ca.location": kafka.ssl_ca_location,
        "ssl.certificate.location": kafka.ssl_certificate_location,
        "ssl.key.location": kafka.ssl_key_location,
    }
    config.update({key: value for key, value in optional.items() if value is not None})
    if kafka.sasl_password is not None:
        config["sasl.password"] = kafka.sasl_password.get_secret_value()
    if kafka.ssl_key_password is not None:
        config["ssl.key.password"] = kafka.ssl_key_password.get_secret_value()
    return config


def consumer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """Consumer settings: manual commits of explicitly computed offsets only."""
    config: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": kafka.group_id,
        "client.id": kafka.client_id,
        "auto.offset.reset": kafka.auto_offset_reset,
        "group.protocol": kafka.group_protocol,
        **security_config(kafka),
    }
    if kafka.group_protocol == "classic":
        # The KIP-848 protocol picks assignors on the broker and refuses this setting.
        config["partition.assignment.strategy"] = kafka.assignment_strategy
    if kafka.group_instance_id is not None:
        config["group.instance.id"] = kafka.group_instance_id
    config.update(kafka.consumer_config)
    config.update({"enable.auto.commit": False, "enable.auto.offset.store": False})
    return config


def producer_config(kafka: KafkaSettings, *, solo: bool = False) -> dict[str, Any]:
    """Producer settings: idempotent, ``acks=all``; ``solo`` sends one record per request."""
    config: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": f"{kafka.client_id}-solo" if solo else kafka.client_id,
        "linger.ms": 0 if solo else PRODUCER_LINGER_MS,
        **security_config(kafka),
    }
    config.update(kafka.producer_config)
    if solo:
        config["batch.num.messages"] = SOLO_BATCH_MESSAGES
    config.update({"enable.idempotence": True, "acks": "all"})
    return config


def describe_partitions(keys: Sequence[PartitionKey]) -> list[str]:
    """``["news[0]", "news[3]"]`` for logs."""
    return [f"{topic}[{partition}]" for topic, partition in sorted(keys)]


def missing_topics(
    kafka: KafkaSettings,
    names: Sequence[str],
    timeout_s: float,
    client_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Which of ``names`` the cluster does not have. An unreachable cluster is not an
    answer: then nothing is reported missing (the worker starts and retries).

    ``client_config``: extra librdkafka settings such as the structlog log bridge; without
    it librdkafka writes its connection errors to stderr as raw text.
    """
    admin = AdminClient(
        {
            **(client_config or {}),
            "bootstrap.servers": kafka.bootstrap_servers,
            **security_config(kafka),
        }
    )
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        log.warning("cannot check the topics at start-up", error=str(exc))
        return []
    finally:
        admin.poll(0)  # hands librdkafka's queued log lines to the log bridge
    return [name for name in dict.fromkeys(names) if name not in metadata.topics]


# Commit errors a rebalance causes: the next commit, in the new generation, succeeds.
REBALANCE_COMMIT_ERRORS: Final = frozenset(
    {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID}
)
# Commit errors that only clear once this member takes part in the rebalance.
NEEDS_GROUP_PROGRESS: Final = frozenset(
    {KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID, KafkaError.FENCED_MEMBER_EPOCH}
)
