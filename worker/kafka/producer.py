"""The producer, typed: records in, delivery reports out as :class:`ClientError` data.

No policy here: retries, the one-record resend, dead-letter routing and offsets are the
pipeline's (:mod:`worker.pipeline.delivery`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from worker.kafka.errors import ClientError, client_error, delivery_error
from worker.kafka.records import OutHeaders

# Called on the polling thread with None (acknowledged) or the classified error.
DeliveryReport = Callable[[ClientError | None], None]
# Called with a client-level error (not about one record).
ClientErrorHook = Callable[[ClientError], None]


class KafkaProducer:
    """One librdkafka producer. ``config``: the complete librdkafka configuration
    (:func:`worker.kafka.config.producer_config` plus any client extras)."""

    def __init__(self, config: Mapping[str, Any], *, on_error: ClientErrorHook) -> None:
        self._on_error = on_error
        self._producer = Producer({**config, "error_cb": self._client_error})

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: OutHeaders,
        on_delivery: DeliveryReport,
    ) -> ClientError | None:
        """Hand one record to librdkafka; the error if it was refused at once.

        Raises ``BufferError`` when librdkafka's local queue is full: :meth:`poll` (or
        waiting) makes room.
        """

        def report(error: KafkaError | None, _message: Message) -> None:
            on_delivery(None if error is None else delivery_error(error))

        # The client takes a list and only reads it; the pipeline always passes one.
        as_list = cast("list[tuple[str, str | bytes | None]]", headers)
        try:
            self._producer.produce(topic, value=value, key=key, headers=as_list, on_delivery=report)
        except KafkaException as exc:
            return delivery_error(exc.args[0])
        return None

    def poll(self, timeout_s: float) -> None:
        """Run the delivery reports that arrived (waiting up to ``timeout_s`` for one)."""
        self._producer.poll(timeout_s)

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every outstanding record; returns how many remain."""
        return int(self._producer.flush(timeout_s))

    def __len__(self) -> int:
        """Records handed over and not yet reported."""
        return len(self._producer)

    def close(self) -> None:
        """Flush what is outstanding and release the client."""
        self._producer.close()

    def _client_error(self, error: KafkaError) -> None:
        self._on_error(client_error(error))
