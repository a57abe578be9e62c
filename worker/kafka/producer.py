"""The producer, typed: records in, delivery reports out as :class:`ClientError` data.

No policy here: retries, the one-record resend, dead-letter routing, offsets and when a
transaction commits or aborts are the pipeline's (:mod:`worker.pipeline.delivery`,
:mod:`worker.pipeline.transactions`). The transactional calls return a failure as a
:class:`~worker.kafka.errors.TxnError` instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from worker.kafka.errors import (
    ClientError,
    TxnError,
    client_error,
    delivery_error,
    transaction_error,
)
from worker.kafka.records import OutHeaders, PartitionKey

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

    # -- transactions (a producer configured with transactional.id) -----------------------

    def init_transactions(self, timeout_s: float) -> TxnError | None:
        """Register the transactional.id: fences older producers with the same id and
        aborts the transaction one of them left open."""
        return _txn_call(lambda: self._producer.init_transactions(timeout_s))

    def begin_transaction(self) -> TxnError | None:
        return _txn_call(self._producer.begin_transaction)

    def send_offsets_to_transaction(
        self, positions: Mapping[PartitionKey, int], group_metadata: object, timeout_s: float
    ) -> TxnError | None:
        """Add the consumer's next offsets to the transaction; the broker checks
        ``group_metadata`` (the consumer's generation) and fences a zombie (KIP-447)."""
        offsets = [TopicPartition(topic, part, pos) for (topic, part), pos in positions.items()]
        return _txn_call(
            lambda: self._producer.send_offsets_to_transaction(offsets, group_metadata, timeout_s)
        )

    def commit_transaction(self, timeout_s: float) -> TxnError | None:
        """Flush, then commit: every record and offset of the transaction becomes visible."""
        return _txn_call(lambda: self._producer.commit_transaction(timeout_s))

    def abort_transaction(self, timeout_s: float) -> TxnError | None:
        """Purge what is queued, then abort: nothing of the transaction becomes visible."""
        return _txn_call(lambda: self._producer.abort_transaction(timeout_s))

    def purge(self) -> None:
        """Fail every record not yet acknowledged (their reports come with the next poll)."""
        self._producer.purge()

    def __len__(self) -> int:
        """Records handed over and not yet reported."""
        return len(self._producer)

    def close(self) -> None:
        """Flush what is outstanding and release the client."""
        self._producer.close()

    def _client_error(self, error: KafkaError) -> None:
        self._on_error(client_error(error))


def _txn_call(call: Callable[[], object]) -> TxnError | None:
    try:
        call()
    except KafkaException as exc:
        return transaction_error(exc.args[0])
    return None
