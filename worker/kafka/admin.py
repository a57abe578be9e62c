"""Start-up checks against the cluster's metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource  # not re-exported for type checkers
from confluent_kafka.admin._resource import ResourceType

from worker.config.settings import KafkaSettings
from worker.kafka.config import security_config

log = structlog.get_logger(__name__)


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


def topic_configs(
    kafka: KafkaSettings,
    names: Sequence[str],
    timeout_s: float,
    client_config: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, str]]:
    """The effective configuration of each topic in ``names`` (name -> value), as far as
    the cluster answers within ``timeout_s``; a topic it does not describe is left out."""
    admin = AdminClient(
        {
            **(client_config or {}),
            "bootstrap.servers": kafka.bootstrap_servers,
            **security_config(kafka),
        }
    )
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in dict.fromkeys(names)]
    found: dict[str, dict[str, str]] = {}
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout_s)
        for resource, future in futures.items():
            entries = future.result(timeout=timeout_s)
            found[resource.name] = {
                key: str(entry.value) for key, entry in entries.items() if entry.value is not None
            }
    except (KafkaException, FutureTimeout) as exc:
        log.warning("cannot read the topics' configuration at start-up", error=str(exc))
    finally:
        admin.poll(0)
    return found
