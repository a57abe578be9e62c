"""librdkafka configuration of the worker's clients, built from :class:`KafkaSettings`.

The settings the delivery guarantee depends on (no auto-commit, no auto offset store,
``isolation.level=read_committed``, an idempotent producer with ``acks=all``, and in
exactly-once mode its ``transactional.id``) are applied last, over any extra settings.
"""

from __future__ import annotations

from typing import Any, Final

from worker.config.settings import KafkaSettings

# A few milliseconds of lingering turns a scored micro-batch into a handful of produce
# requests instead of one request per event, at no visible latency cost.
PRODUCER_LINGER_MS: Final = 5
# librdkafka's prefetch queue (its default: 64 MiB) holds fetched records outside the
# worker's own byte bound (TAGSTREAM_MAX_BUFFERED_BYTES, 32 MiB); 16 MiB is still about two
# seconds of input at the no-model worker's 4 KiB rate (8.9 MB/s) and keeps the process's
# worst case near 50 MiB of records instead of 100.
CONSUMER_QUEUED_MAX_KBYTES: Final = 16_384
# The control topic holds at most a few MiB of small profile records: 4 MiB of prefetch
# reads it in a few fetches without holding a second input-sized queue.
CONTROL_QUEUED_MAX_KBYTES: Final = 4_096
CONTROL_CLIENT_SUFFIX: Final = "-control"
# Left at librdkafka's defaults, on purpose: fetch.min.bytes 1 (a fetch answers as soon as
# anything is there; a larger minimum buys fewer requests with latency, and the worker is
# bound by per-event Python work, not by requests) and no producer compression (the
# broker's topic configuration can compress; a client-side codec is a per-deployment choice:
# TAGSTREAM_PRODUCER_CONFIG='{"compression.type": "lz4"}').
# The solo producer re-sends a record that the broker refused as too large, alone, to tell
# "this record is too large" apart from "its batch was too large".
SOLO_BATCH_MESSAGES: Final = 1


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
        "queued.max.messages.kbytes": CONSUMER_QUEUED_MAX_KBYTES,
        **security_config(kafka),
    }
    if kafka.group_protocol == "classic":
        # The KIP-848 protocol picks assignors on the broker and refuses this setting.
        config["partition.assignment.strategy"] = kafka.assignment_strategy
    if kafka.group_instance_id is not None:
        config["group.instance.id"] = kafka.group_instance_id
    config.update(kafka.consumer_config)
    # read_committed in both modes: a chained tagstream stage (or any transactional
    # producer upstream) must never have its aborted records scored.
    config.update(
        {
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
        }
    )
    return config


def control_consumer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The control topic reader's settings: it assigns every partition itself and never
    joins a group or commits (the ``group.id`` only satisfies the client), so every worker
    reads every record."""
    config: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": f"{kafka.group_id}{CONTROL_CLIENT_SUFFIX}",
        "client.id": f"{kafka.client_id}{CONTROL_CLIENT_SUFFIX}",
        "auto.offset.reset": "earliest",
        "queued.max.messages.kbytes": CONTROL_QUEUED_MAX_KBYTES,
        **security_config(kafka),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
    }
    return config


def producer_config(
    kafka: KafkaSettings,
    *,
    solo: bool = False,
    transactional_id: str | None = None,
    transaction_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """Producer settings: idempotent, ``acks=all``; ``solo`` sends one record per request;
    ``transactional_id`` makes it the transactional producer of exactly-once mode."""
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
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
        if transaction_timeout_ms is not None:
            config["transaction.timeout.ms"] = transaction_timeout_ms
    return config
